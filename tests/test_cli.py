"""run.py end to end on a tiny local model, and every kind of bad input it must refuse cleanly."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import run
from interventions.errors import UserError
from interventions.pipeline.config import CONVERTED_FLAGS, JobConfig, config_from_args
from interventions.pipeline.results import read_results
from tasks import load_task, task_fingerprint

ROOT = Path(__file__).resolve().parent.parent


def run_cli(capsys, *argv):
    code = run.main([*map(str, argv), "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_run_writes_results_dataset_manifest_and_heatmap(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "--model", tiny_dir, "--l-wait", "0-3",
                                "--l-transfer", "1-2", "--out", out, "--tasks", "A+B,A-B")
    assert code == 0, err
    rows = read_results(out / "results.jsonl")
    # 4 x 2 grid minus (3, 2) which does not fit 4 layers, for each of the two tasks.
    assert len(rows) == 2 * 7
    assert {(r["l_wait"], r["l_transfer"]) for r in rows} == {
        (w, t) for w in range(4) for t in (1, 2) if w + t <= 4}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["model"]["n_layers"] == 4 and manifest["model"]["weights_sha256"]
    for key in ("nnsight", "transformers", "torch", "datasets"):
        assert manifest["environment"]["packages"][key]
    assert manifest["git"]["commit"] is None or len(manifest["git"]["commit"]) == 40
    # The figures are drawn after the job (run.py -> figures.render.render_run) and listed.
    assert sorted(manifest["figures"]) == sorted(
        str(p.relative_to(out)) for p in (out / "figures").iterdir())
    assert manifest["timings"]["figures_s"] >= 0
    for label in ("A+B-calculate", "A-B-calculate"):
        assert (out / "figures" / f"heatmap_{label}.png").stat().st_size > 1000
        assert (out / "figures" / f"heatmap_{label}.pdf").exists()
        # The saved data set recomputes every number of its rows.
        data = load_task(out / "data" / label)
        fingerprint = task_fingerprint(data.remove_columns(["full_pred_id", "full_correct"]))
        assert manifest["tasks"][label]["dataset_fingerprint"] == fingerprint
        answers = np.array(data["answer_token_id"])
        full_ok = np.array(data["full_pred_id"]) == answers
        assert full_ok.tolist() == data["full_correct"]
        for row in (r for r in rows if r["dataset_fingerprint"] == fingerprint):
            af1_ok = np.array(row["pred_ids"]) == answers
            assert row["n_prompts"] == len(answers)
            assert row["n_full_correct"] == full_ok.sum()
            assert row["full_accuracy"] == pytest.approx(full_ok.mean())
            expected = (full_ok & af1_ok).sum() / full_ok.sum() if full_ok.sum() else None
            assert row["faithfulness"] == (pytest.approx(expected) if expected is not None
                                           else None)


def test_rerun_skips_finished_cells(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ("--model", tiny_dir, "--l-wait", "1-2", "--l-transfer", "1", "--out", out)
    assert run_cli(capsys, *args)[0] == 0
    first = (out / "results.jsonl").read_bytes()
    assert run_cli(capsys, *args)[0] == 0
    assert (out / "results.jsonl").read_bytes() == first
    assert json.loads((out / "manifest.json").read_text())["n_rows_new"] == 0


BAD_INPUTS = {
    "missing model path": (["--model", "./no/such/model"], "does not exist"),
    "grid beyond the model": (["--l-wait", "3", "--l-transfer", "2"], "cannot fit"),
    "negative layer": (["--l-wait=-1"], ">= 0"),
    "template without slots": (["--template", "hello there"], "has no slots"),
    "no operands with a non-negative result": (["--tasks", "A-B-C", "--operand-range", "1-1"],
                                               "non-negative result"),
    "unknown task": (["--tasks", "A*B"], "unknown task"),
    "bad layer syntax": (["--l-transfer", "two"], "takes a value"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_is_one_clear_line_and_writes_nothing(case, tiny_dir, tmp_path, capsys):
    argv, expected = BAD_INPUTS[case]
    if "--model" not in argv:
        argv = ["--model", tiny_dir, *argv]
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, *argv, "--out", out)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert not out.exists()


def test_mismatched_cama_table_is_refused(tiny_dir, tmp_path, capsys):
    out = tmp_path / "first"
    assert run_cli(capsys, "--model", tiny_dir, "--l-wait", "1", "--l-transfer", "1",
                   "--out", out, "--cache-dir", tmp_path / "cache")[0] == 0
    table = next((tmp_path / "cache" / "cama").glob("*.safetensors"))
    second = tmp_path / "second"
    code, _, err = run_cli(capsys, "--model", tiny_dir, "--tasks", "A-B", "--l-wait", "1",
                           "--l-transfer", "1", "--cama-table", table, "--out", second)
    assert code == 2 and "CAMA table was built for dataset" in err
    assert not second.exists()
    # The same table is accepted for the data set it was built on.
    assert run_cli(capsys, "--model", tiny_dir, "--l-wait", "1", "--l-transfer", "1",
                   "--cama-table", table, "--out", second)[0] == 0


def test_unwritable_out_is_refused_before_any_work(tiny_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code, _, err = run_cli(capsys, "--model", tiny_dir, "--out", blocker / "sub")
    assert code == 2 and "not writable" in err
    assert blocker.read_text() == "not a directory"


def test_user_errors_print_no_traceback_from_the_command_line(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "run.py"), "--model", "./no/such/dir",
                             "--out", str(tmp_path / "o")], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: model path './no/such/dir' does not exist"]


def test_help_explains_the_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--tasks", "--template", "--l-wait", "--l-transfer", "--out",
                 "--batch-size", "--device", "--dtype", "--remote"):
        assert flag in text


def test_flags_map_onto_the_config_fields_and_take_their_defaults():
    parser = run.build_parser()
    fields = set(JobConfig.__dataclass_fields__)
    dests = {a.dest for a in parser._actions} - {"help"}
    # Every flag is a field, or one of the few converted on the way (tasks, ranges, --no-...).
    assert dests - fields <= set(CONVERTED_FLAGS) and "no_progress" in dests
    assert fields - dests - {"progress", "argv"} == set()
    # No flags: exactly JobConfig's defaults (its default task as a list).
    cfg = config_from_args(parser.parse_args([]), ["run.py"])
    assert cfg == JobConfig(tasks=["A+B"], argv=["run.py"])
    assert config_from_args(parser.parse_args(["--dataset", "d.jsonl"])).tasks == []
    given = parser.parse_args(["--cells-per-request", "5", "--tasks", "A+B, A-B,",
                               "--operand-range", "2-7", "--no-progress", "--attn", "eager",
                               "--max-request-mb", "0.5", "--remote"])
    cfg = config_from_args(given)
    assert (cfg.cells_per_request, cfg.tasks, cfg.operand_range, cfg.progress,
            cfg.attn_implementation, cfg.max_request_mb, cfg.remote) == (
        5, ["A+B", "A-B"], (2, 7), False, "eager", 0.5, True)
    with pytest.raises(UserError, match="--operand-range takes LO-HI"):
        config_from_args(parser.parse_args(["--operand-range", "7"]))
    # A flag added to the parser without a field is refused, not dropped.
    args = parser.parse_args([])
    args.cells_per_batch = 3
    with pytest.raises(TypeError, match="cells_per_batch"):
        config_from_args(args)
