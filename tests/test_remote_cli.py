"""run.py --remote end to end, offline: the remote path (requests serialized exactly as for NDIF,
run by NDIF's own code: in its sandbox, as for an ordinary key, unless --server-path trusted)
against the local path, the self-check on arrival in the manifest and as an error, --dry-run
(also with NDIF unreachable, and with another nnsight than NDIF's) and --submit; on canned NDIF
answers, a model NDIF loads on demand and its refusal, and an nnsight mismatch."""

import json
import re

import pytest

import run
import tiny
from interventions.pipeline.results import read_results

GRID = ["--l-wait", "0-3", "--l-transfer", "1-2"]
TRUSTED = ["--server-path", "trusted"]  # where the server's path does not matter: faster


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
    # the self-check, then sweep 7 cells -> 1 request, necessity 10 -> 2, alternatives 6 -> 1,
    # plus the CAMA build (which also carries the full model's predictions).
    assert stats["n_requests"] == 6
    assert stats["bytes_up"] > 0 and stats["bytes_down"] > 0
    assert (stats["server_path"], stats["server_code"]) == ("sandbox", "ndif 0.1.2")
    assert [r["kind"] for r in stats["requests"]][:2] == ["selfcheck", "cama"]
    assert {r["kind"] for r in stats["requests"]} == {"selfcheck", "cama", "cells"}
    check = stats["self_check"]
    assert check["passed"] is True and len(check["compared"]) == 5
    assert {c["check"]: c["passed"] for c in check["compared"]} == dict.fromkeys(
        ["all_allowed", "sink_self", "before_write", "write_error", "write_change"], True)


def test_dry_run_plans_the_requests_the_run_sends_and_writes_nothing(tiny_dir, tmp_path,
                                                                      capsys):
    args = ["--model", tiny_dir, *GRID, "--experiments", "sweep,alternatives", "--remote",
            "--remote-backend", "local", *TRUSTED, "--cells-per-request", "4",
            "--cache-dir", tmp_path / "cache"]
    out = tmp_path / "o"
    code, text, err = cli(capsys, *args, "--out", out, "--dry-run")
    assert code == 0, err
    assert not out.exists()
    assert "nothing was sent" in text
    total = next(line for line in text.splitlines() if line.startswith("total:"))
    planned = int(total.split()[1])
    assert cli(capsys, *args, "--out", out)[0] == 0
    stats = json.loads((out / "manifest.json").read_text())["remote"]
    # the self-check + 1 CAMA build + ceil(7/4) sweep + ceil(6/4) alternatives requests
    assert planned == stats["n_requests"] == 1 + 1 + 2 + 2
    rows = [re.match(r"\s+\d+\s+(\w+)\s+\S+\s+(.+?)\s+(\d+)\s+(\d+)\s+[\d.]+ \w?B\s+[\d.]+ \w?B$",
                     line) for line in text.splitlines() if re.match(r"\s+\d+\s", line)]
    assert [(m[1], m[2], int(m[3]), int(m[4])) for m in rows] == \
        [(r["kind"], r["label"], r["cells"], r["traces"]) for r in stats["requests"]]
    assert ("preflight: not needed (--remote-backend local: the server is this process)"
            in text.splitlines())


def planned_uploads(text):
    """Bytes up of each request row of a dry run's table (printed as ``56.9 kB``)."""
    unit = {"B": 1, "kB": 1e3, "MB": 1e6}
    rows = [re.search(r"([\d.]+) (B|kB|MB)\s+[\d.]+ (?:B|kB|MB)\s*$", line)
            for line in text.splitlines() if re.match(r"\s+\d+\s", line)]
    return [float(m.group(1)) * unit[m.group(2)] for m in rows]


def test_a_dry_run_splits_requests_over_the_byte_budget_as_the_run_does(tiny_dir, tmp_path,
                                                                         capsys):
    args = ["--model", tiny_dir, *GRID, "--remote", "--remote-backend", "local", *TRUSTED,
            "--cells-per-request", "8", "--cache-dir", tmp_path / "cache", "--out", tmp_path / "o"]
    whole = planned_uploads(cli(capsys, *args, "--dry-run")[1])
    assert len(whole) == 3  # the self-check, the CAMA build, 7 cells in one request
    budget = (max(whole) - 1000) / 1e6  # the largest request no longer fits (print rounding)
    code, text, err = cli(capsys, *args, "--dry-run", "--max-request-mb", budget)
    assert code == 0, err
    split = planned_uploads(text)
    assert len(split) == 4 and max(split) < max(whole) - 1000
    assert cli(capsys, *args, "--max-request-mb", budget)[0] == 0
    stats = json.loads((tmp_path / "o" / "manifest.json").read_text())["remote"]
    assert stats["n_requests"] == 4 and stats["max_request_bytes"] == int(budget * 1e6)
    assert [r["cells"] for r in stats["requests"] if r["kind"] == "cells"] == [4, 3]


def test_submit_then_rerun_collects_into_the_same_results(tiny_dir, tmp_path, capsys):
    args = ["--model", tiny_dir, *GRID, "--remote", "--remote-backend", "local", *TRUSTED,
            "--out", tmp_path / "o"]
    code, text, _ = cli(capsys, *args, "--submit")
    assert code == 0 and "submitted" in text
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["status"] == "submitted" and manifest["submitted_jobs"]
    assert not (tmp_path / "o" / "results.jsonl").exists()
    assert cli(capsys, *args)[0] == 0
    assert len(read_results(tmp_path / "o" / "results.jsonl")) == 7


def test_the_local_backend_without_ndif_is_one_error_line_and_a_dry_run_still_works(
        tiny_dir, tmp_path, capsys, monkeypatch):
    import sys

    for name in ["ndif"] + [m for m in sys.modules if m.startswith("ndif.")]:
        monkeypatch.setitem(sys.modules, name, None)  # as if it were not installed
    args = ["--model", tiny_dir, *GRID, "--remote", "--remote-backend", "local", "--out",
            tmp_path / "o"]
    code, _, err = cli(capsys, *args)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: --remote-backend local")
    assert err.rstrip().endswith("pip install --no-deps --ignore-requires-python ndif==0.1.2")
    assert not (tmp_path / "o").exists()
    code, text, err = cli(capsys, *args, "--dry-run")
    assert code == 0 and "nothing was sent" in text, err


def test_remote_flags_without_remote_are_refused(tiny_dir, tmp_path, capsys):
    code, _, err = cli(capsys, "--model", tiny_dir, "--dry-run", "--out", tmp_path / "o")
    assert code == 2 and "go with --remote" in err
    code, _, err = cli(capsys, "--model", tiny_dir, "--remote", *TRUSTED, "--out", tmp_path / "o")
    assert code == 2 and "--server-path goes with --remote --remote-backend local" in err


def test_a_dry_run_works_with_ndif_unreachable_and_a_real_run_does_not(tiny_dir, tmp_path,
                                                                       capsys, monkeypatch):
    from nnsight.schema.config import CONFIG

    monkeypatch.setattr(CONFIG.API, "APIKEY", "key-123")
    monkeypatch.setattr(CONFIG.API, "HOST", "http://127.0.0.1:9")  # nothing listens there
    args = ["--model", tiny_dir, *GRID, "--remote", "--out", tmp_path / "o"]
    code, text, err = cli(capsys, *args, "--dry-run")
    assert code == 0, err
    assert any(line.startswith("preflight: not checked: NDIF unreachable at http://127.0.0.1:9")
               for line in text.splitlines())
    assert "nothing was sent" in text and not (tmp_path / "o").exists()
    code, _, err = cli(capsys, *args)
    assert code == 2 and err.startswith("error: cannot reach NDIF at http://127.0.0.1:9")
    assert not (tmp_path / "o").exists()


def test_a_failed_self_check_stops_the_job_with_one_line_and_is_recorded(tiny_dir, tmp_path,
                                                                         capsys, monkeypatch):
    """A mask slot the layers do not read: the self-check catches it before any cell."""
    from interventions.mechanisms.adapters import ArchAdapter

    monkeypatch.setattr(ArchAdapter, "mask_slot", lambda self, module: (None, "not_the_mask"))
    code, _, err = cli(capsys, "--model", tiny_dir, *GRID, "--remote", "--remote-backend",
                       "local", *TRUSTED, "--out", tmp_path / "o")
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith("error: the remote self-check failed: ")
    assert "likely cause: the attention-mask slot resolved on the client (argument None or " \
           "keyword 'not_the_mask')" in line
    check = json.loads((tmp_path / "o" / "manifest.json").read_text())["remote"]["self_check"]
    assert check["passed"] is False and check["mask_slot"] == {"index": None,
                                                               "name": "not_the_mask"}
    assert not (tmp_path / "o" / "results.jsonl").exists()  # no cell was evaluated


# -- on canned NDIF answers: a model loaded on demand, another nnsight ------------------------------


def canned_ndif(monkeypatch, tiny_dir, level="COLD", server_nnsight="0.8.1",
                client_nnsight=None):
    """NDIF's answers to /status, /env and /whoami as nnsight's helpers return them, listing
    the tiny model at ``level``; ``client_nnsight``: the version this nnsight reports."""
    import importlib.metadata

    from nnsight import ndif
    from nnsight.schema.config import CONFIG

    monkeypatch.setattr(CONFIG.API, "APIKEY", "key-123")
    entry = {"repo_id": str(tiny_dir), "deployment_level": level}
    if level != "COLD":
        entry.update(application_state="RUNNING", task="text-generation", revision="main")
    running = {"repo_id": "meta-llama/Llama-3.1-8B", "deployment_level": "HOT",
               "application_state": "RUNNING", "task": "text-generation",
               "config": json.dumps({"model_type": "gpt2"})}
    monkeypatch.setattr(ndif, "status", lambda raw=False: {"deployments": {"a": entry,
                                                                           "b": running}})
    transformers = importlib.metadata.version("transformers")
    monkeypatch.setattr(ndif, "get_remote_env", lambda: {
        "packages": {"nnsight": server_nnsight, "transformers": transformers}})
    monkeypatch.setattr(ndif, "whoami", lambda api_key=None: {"email": None, "tags": []})
    if client_nnsight is not None:
        real = importlib.metadata.version
        monkeypatch.setattr(importlib.metadata, "version",
                            lambda name: client_nnsight if name == "nnsight" else real(name))


def ndif_served_by(monkeypatch, make):
    """NDIF's transport replaced by ``make(lm)`` (what the job's client would reach)."""
    from interventions.executors.remote import client

    monkeypatch.setattr(client, "NdifTransport", lambda lm, **options: make(lm))


def trusted_server(lm):
    """NDIF's in-process path on the checkpoint the weightless client model names."""
    import torch

    from interventions import nnsight_internals as internals
    from interventions.executors.remote.ndif_server import load_server_model
    from interventions.executors.remote.transport import LocalTransport

    key = internals.model_key(lm)
    return LocalTransport(load_server_model(key, torch.bfloat16), "trusted", key,
                          internals.request_env(lm))


def test_a_model_ndif_loads_on_demand_proceeds_and_its_refusal_is_one_line(
        tiny_dir, tmp_path, capsys, monkeypatch):
    from nnsight.intervention.backends.remote import RemoteError

    canned_ndif(monkeypatch, tiny_dir, level="COLD")

    class Refuses:
        name, host, server_path = "ndif", "https://ndif.test", None

        def send(self, blob, compress):
            raise RemoteError("Could not deploy this model. Your API key may not load models "
                              "on demand.")

    ndif_served_by(monkeypatch, lambda lm: Refuses())
    code, out, err = cli(capsys, "--model", tiny_dir, *GRID, "--remote", "--out", tmp_path / "o")
    assert code == 2
    assert f"[af1] note: NDIF lists {tiny_dir} but has not deployed it (COLD); the run goes on" \
        in out
    (line,) = err.strip().splitlines()
    assert line == (f"error: NDIF did not load {tiny_dir} on demand (Could not deploy this model. "
                    "Your API key may not load models on demand.): it has not deployed this "
                    "model, and keys without on-demand access are refused; hosted models of the "
                    "same family: meta-llama/Llama-3.1-8B (e.g. `--model "
                    "meta-llama/Llama-3.1-8B`)")

    ndif_served_by(monkeypatch, trusted_server)  # a key that may: it runs
    code, out, err = cli(capsys, "--model", tiny_dir, *GRID, "--remote", "--out", tmp_path / "p")
    assert code == 0, err
    stats = json.loads((tmp_path / "p" / "manifest.json").read_text())["remote"]
    assert stats["self_check"]["passed"] and stats["server_path"] == "trusted"


def test_another_nnsight_than_ndifs_gives_the_install_line_and_a_dry_run_still_works(
        tiny_dir, tmp_path, capsys, monkeypatch):
    """This nnsight reports 0.8.0, NDIF runs 0.8.1: importing, planning and the dry run work
    (its plan says what to install), a real run stops with the exact `pip install`, and
    --allow-nnsight-mismatch runs anyway."""
    canned_ndif(monkeypatch, tiny_dir, level="HOT", client_nnsight="0.8.0")
    args = ["--model", tiny_dir, *GRID, "--remote", "--out", tmp_path / "o"]
    code, out, err = cli(capsys, *args, "--dry-run")
    assert code == 0, err
    (first,) = [line for line in out.splitlines() if line.startswith("preflight:")]
    assert first.endswith("; the run needs `pip install nnsight==0.8.1`)")
    assert not (tmp_path / "o").exists()
    code, out, err = cli(capsys, *args)
    assert code == 2 and err.strip() == (
        "error: nnsight 0.8.0 here but 0.8.1 on NDIF, which requires them to match: `pip "
        "install nnsight==0.8.1`, or pass --allow-nnsight-mismatch to try anyway")
    ndif_served_by(monkeypatch, trusted_server)
    code, out, err = cli(capsys, *args, "--allow-nnsight-mismatch")
    assert code == 0, err
    assert "[af1] warning: nnsight 0.8.0 here but 0.8.1 on NDIF" in out
