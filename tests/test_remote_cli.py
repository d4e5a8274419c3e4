"""run.py --remote end to end, offline: the remote path (requests serialized exactly as for NDIF,
run by the in-process stand-in server) against the local path, --dry-run and --submit."""

import json

import pytest

import run
import tiny
from interventions.pipeline.results import read_results

GRID = ["--l-wait", "0-3", "--l-transfer", "1-2"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny.save_tiny_model("gpt2", tmp_path_factory.mktemp("tiny-gpt2"),
                                tiny.digit_tokenizer())


def cli(capsys, *argv):
    code = run.main([*map(str, argv), "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def cells(out):
    drop = ("seconds", "executor")
    return {(r["experiment"], r["l_wait"], r["l_transfer"], r["layer"], r["window"],
             r["variant"]): {k: v for k, v in r.items() if k not in drop}
            for r in read_results(out / "results.jsonl")}


def test_remote_path_equals_local_path_for_every_experiment_on_the_main_task(
        tiny_dir, tmp_path, capsys):
    args = ["--model", tiny_dir, *GRID, "--experiments", "sweep,necessity,alternatives",
            "--af1-config", "2,1"]
    assert cli(capsys, *args, "--out", tmp_path / "local")[0] == 0
    code, out, err = cli(capsys, *args, "--out", tmp_path / "remote", "--remote",
                         "--remote-backend", "local", "--cells-per-request", "8",
                         "--cache-dir", tmp_path / "remote-cache")
    assert code == 0, err
    local, remote = cells(tmp_path / "local"), cells(tmp_path / "remote")
    assert local.keys() == remote.keys() and len(local) == 7 + 10 + 6
    for key in local:
        assert remote[key]["pred_ids"] == local[key]["pred_ids"], key
        assert remote[key]["faithfulness"] == local[key]["faithfulness"]
    manifest = json.loads((tmp_path / "remote" / "manifest.json").read_text())
    stats = manifest["remote"]
    # sweep 7 cells -> 1 request, necessity 10 -> 2, alternatives 6 -> 1, plus the CAMA build
    # (which also carries the full model's predictions).
    assert stats["n_requests"] == 5
    assert stats["bytes_up"] > 0 and stats["bytes_down"] > 0
    assert {r["kind"] for r in stats["requests"]} == {"cama", "cells"}


def test_dry_run_plans_the_requests_the_run_sends_and_writes_nothing(tiny_dir, tmp_path,
                                                                      capsys):
    args = ["--model", tiny_dir, *GRID, "--experiments", "sweep,alternatives", "--remote",
            "--remote-backend", "local", "--cells-per-request", "4",
            "--cache-dir", tmp_path / "cache"]
    out = tmp_path / "o"
    code, text, err = cli(capsys, *args, "--out", out, "--dry-run")
    assert code == 0, err
    assert not out.exists()
    assert "nothing was sent" in text
    total = next(line for line in text.splitlines() if line.startswith("total:"))
    planned = int(total.split()[1])
    assert cli(capsys, *args, "--out", out)[0] == 0
    sent = json.loads((out / "manifest.json").read_text())["remote"]["n_requests"]
    # 1 CAMA build + ceil(7/4) sweep + ceil(6/4) alternatives requests
    assert planned == sent == 1 + 2 + 2


def test_submit_then_rerun_collects_into_the_same_results(tiny_dir, tmp_path, capsys):
    args = ["--model", tiny_dir, *GRID, "--remote", "--remote-backend", "local",
            "--out", tmp_path / "o"]
    code, text, _ = cli(capsys, *args, "--submit")
    assert code == 0 and "submitted" in text
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["status"] == "submitted" and manifest["submitted_jobs"]
    assert not (tmp_path / "o" / "results.jsonl").exists()
    assert cli(capsys, *args)[0] == 0
    assert len(read_results(tmp_path / "o" / "results.jsonl")) == 7


def test_remote_flags_without_remote_are_refused(tiny_dir, tmp_path, capsys):
    code, _, err = cli(capsys, "--model", tiny_dir, "--dry-run", "--out", tmp_path / "o")
    assert code == 2 and "go with --remote" in err
