"""The paper's experiments on tiny random models against independent computations, the AF1
search, resuming a killed run, and figures rebuilt with no model (and no torch) available."""

import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

import reference
import tiny
from conftest import wrap_tiny
from interventions.mechanisms.cama import build_cama_table
from interventions.pipeline.experiments import (ALTERNATIVES, af1_search, alternative_cells, frontier,
                                       necessity_cells, parse_experiments)
from interventions.mechanisms.plan import AF1Plan
from interventions.pipeline.results import complete_row, read_results
from test_stats import wilson_by_formula

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["Calculate: 3+4=", "3+5=", "What is 2+2? ", "Calculate: 1+7=", "7+1="]


def ours(model, cell, table):
    """Last-position logits of the nnsight reference path for one experiment cell."""
    from interventions.mechanisms.plan import as_intervention
    from interventions.mechanisms.traced import apply_intervention

    intervention = as_intervention(cell.intervention, model.n_layers)
    enc = model.encode(PROMPTS)
    with torch.no_grad(), model.lm.trace(enc):
        apply_intervention(model.sites, intervention, table.for_intervention(intervention))
        logits = model.lm.output.logits[:, -1].save()
    return enc, logits


@pytest.mark.precision
@pytest.mark.parametrize("arch", tiny.ARCHITECTURES)
def test_necessity_windows_equal_hook_implementation(arch, digit_tok):
    model = wrap_tiny(arch, digit_tok, "eager")
    table = build_cama_table(model, PROMPTS, "t", progress=False)
    cells = necessity_cells(model.n_layers, windows=(1, 2))
    assert len(cells) == 4 + 3
    for cell in cells:
        window = range(cell.fields["layer"], cell.fields["layer"] + cell.fields["window"])
        enc, got = ours(model, cell, table)
        want = reference.af1_logits_with_hooks(
            model.hf, enc, {k: ("sink_self", "all") for k in window})[:, -1]
        reference.assert_float32_close(model.hf, got, want, enc, f"necessity {cell.fields}")


@pytest.mark.precision
@pytest.mark.parametrize("arch", tiny.ARCHITECTURES)
def test_alternatives_equal_hook_implementation(arch, digit_tok):
    model = wrap_tiny(arch, digit_tok, tiny.supported_attention(arch))
    table = build_cama_table(model, PROMPTS, "t", progress=False)
    cama = reference.brute_force_cama(model.hf, digit_tok, PROMPTS)
    position_mean = reference.brute_force_position_mean(model.hf, digit_tok, PROMPTS)
    zeros = defaultdict(lambda: np.zeros(model.hf.config.hidden_size))
    n, w, t = model.n_layers, 1, 2  # all-peek differs from ABP only when L_transfer >= 2
    expected = {  # variant: (rules, replaced layer, replacement values)
        "AF1 (CAMA + ABP)": (reference.af1_rules(n, w, t), w, cama),
        "wait: zero ablation": (reference.af1_rules(n, w, t), w, zeros),
        "wait: position mean": (reference.af1_rules(n, w, t), w, position_mean),
        "wait: none": (reference.af1_rules(n, w, t), None, None),
        "transfer: all tokens peek": (reference.af1_rules(n, w, t, all_peek=True), w, cama),
        "transfer: no sink": (reference.af1_rules(n, w, t, sink=False), w, cama),
    }
    cells = alternative_cells(AF1Plan(w, t))
    assert [c.fields["variant"] for c in cells] == list(ALTERNATIVES) == list(expected)
    outputs = {}
    for cell in cells:
        enc, got = ours(model, cell, table)
        rules, layer, values = expected[cell.fields["variant"]]
        want = reference.af1_logits_with_hooks(model.hf, enc, rules, layer, values)[:, -1]
        reference.assert_float32_close(model.hf, got, want, enc, cell.fields["variant"])
        outputs[cell.fields["variant"]] = got
    # Every alternative changes the computation (the comparison above is not vacuous).
    base = outputs["AF1 (CAMA + ABP)"]
    for variant, got in outputs.items():
        if variant != "AF1 (CAMA + ABP)":
            assert not torch.allclose(got, base, atol=1e-4), variant


def row(w, t, right, full=40):
    """A sweep row whose AF1 keeps ``right`` of the ``full`` prompts the full model gets right
    (``right=None``: the full model gets none right), with the fields results.jsonl gives it."""
    if right is None:
        right, full = 0, 0
    counts = {"l_wait": w, "l_transfer": t, "n_prompts": 2 * max(full, 40), "n_full_correct": full,
              "n_af1_correct_of_full": right, "n_af1_correct": right,
              "faithfulness": right / full if full else None,
              "full_accuracy": full / (2 * max(full, 40))}
    return complete_row(counts)


def test_af1_search_takes_largest_wait_then_smallest_transfer():
    # Faithfulness 0.95, 0.925, 0.7, 0.975, 0.875, 0.995 and undefined.
    rows = [row(5, 1, 38), row(8, 2, 37), row(8, 1, 28), row(8, 3, 39), row(9, 4, 35),
            row(3, 4, 199, full=200), row(9, 3, None)]
    assert frontier(rows, 0.9) == {1: 5, 2: 8, 3: 8, 4: 3}
    found = af1_search(rows, 0.9)
    assert (found["l_wait"], found["l_transfer"], found["met_threshold"]) == (8, 2, True)
    assert found["threshold_on"] == "point"
    assert (found["n_af1_correct_of_full"], found["n_full_correct"]) == (37, 40)
    assert found["faithfulness_ci"] == pytest.approx(wilson_by_formula(37, 40), abs=1e-12)
    # Nothing reaches 0.999: the best cell (largest wait among ties) is reported, flagged.
    found = af1_search(rows, 0.999)
    assert (found["l_wait"], found["l_transfer"], found["met_threshold"]) == (3, 4, False)


def test_af1_search_on_the_lower_bound():
    # Wilson lower ends (formula in test_stats): 40/40 -> 0.912, 39/40 -> 0.871, 38/40 ->
    # 0.835, and 200/200 -> 0.981: only intervals that exclude < 0.9 pass.
    rows = [row(5, 1, 40), row(8, 3, 39), row(9, 2, 38), row(4, 2, 200, full=200)]
    assert wilson_by_formula(40, 40)[0] > 0.9 > wilson_by_formula(39, 40)[0]
    found = af1_search(rows, 0.9, on="lower")
    assert (found["l_wait"], found["l_transfer"], found["met_threshold"]) == (5, 1, True)
    assert found["threshold_on"] == "lower"
    assert frontier(rows, 0.9, on="lower") == {1: 5, 2: 4, 3: None}
    # The point rule takes the largest wait whose estimate passes, however few prompts.
    assert (af1_search(rows, 0.9)["l_wait"], af1_search(rows, 0.9)["l_transfer"]) == (9, 2)
    # No lower end reaches 0.99: the cell with the highest lower end, flagged.
    found = af1_search(rows, 0.99, on="lower")
    assert (found["l_wait"], found["l_transfer"], found["met_threshold"]) == (4, 2, False)


def test_parse_experiments():
    assert parse_experiments("all") == ["sweep", "necessity", "alternatives", "styles",
                                        "three_operand"]
    assert parse_experiments("styles,sweep") == ["sweep", "styles"]
    with pytest.raises(Exception, match="unknown experiment"):
        parse_experiments("sweep,nope")


def test_killed_run_resumes_to_the_same_results(tmp_path):
    model_dir = tiny.save_tiny_model("llama", tmp_path / "m", tiny.number_tokenizer(),
                                     n_layers=8)
    args = [sys.executable, str(ROOT / "run.py"), "--model", model_dir, "--l-transfer", "1-4",
            "--n-prompts", "400", "--no-progress", "--cache-dir", str(tmp_path / "cache")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    straight = tmp_path / "straight"
    subprocess.run(args + ["--out", str(straight)], check=True, env=env, capture_output=True,
                   timeout=600)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(args + ["--out", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = killed / "results.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if results.exists() and results.read_text().count("\n") >= 5:
            break
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    n_before = len(read_results(results))
    assert 5 <= n_before < 26, "the run was not killed mid-sweep"
    with open(results, "ab") as handle:  # as if killed in the middle of writing a line
        handle.write(b'{"experiment": "sweep", "l_wa')
    subprocess.run(args + ["--out", str(killed)], check=True, env=env, capture_output=True,
                   timeout=600)
    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["dropped_torn_line"] and manifest["resumed_rows"] == n_before
    assert manifest["n_rows_new"] == 26 - n_before

    def table(path):
        drop = ("seconds",)
        return sorted((json.dumps({k: v for k, v in r.items() if k not in drop},
                                  sort_keys=True) for r in read_results(path)))

    assert table(results) == table(straight / "results.jsonl")


def test_figures_rebuild_from_results_with_no_model_and_no_torch(tmp_path):
    from figures.render import render_run
    from interventions.pipeline.jobs import JobConfig, run_job

    model_dir = tiny.save_tiny_model("llama", tmp_path / "m", tiny.digit_tokenizer())
    out = tmp_path / "run"
    run_job(JobConfig(model=model_dir, experiments="all", out=str(out), progress=False,
                      cache_dir=str(tmp_path / "cache"), l_transfer="1-2"))
    assert not (out / "figures").exists()  # the pipeline draws nothing; run.py calls figures
    written = render_run(out)
    made = sorted(p.name for p in (out / "figures").iterdir())
    assert sorted(p.name for p in written) == made
    rebuilt = tmp_path / "rebuilt"
    # As on a machine without them: every import finder reports torch, transformers and
    # nnsight as absent (a probe finds nothing, an import raises ModuleNotFoundError).
    code = ("import sys\n"
            "ABSENT = ('torch', 'transformers', 'nnsight')\n"
            "class Hide:\n"
            "    def __init__(self, finder):\n"
            "        self.finder = finder\n"
            "    def __getattr__(self, name):\n"
            "        return getattr(self.finder, name)\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ABSENT:\n"
            "            return None\n"
            "        return self.finder.find_spec(name, path, target)\n"
            "sys.meta_path[:] = [Hide(f) for f in sys.meta_path]\n"
            "from figures.__main__ import main\n"
            f"code = main([{str(out)!r}, '--out', {str(rebuilt)!r}])\n"
            "assert not set(ABSENT) & set(sys.modules), 'imported'\n"
            "sys.exit(code)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in rebuilt.iterdir()) == made
    for kind in ("heatmap", "faithfulness_vs_lwait", "necessity", "alternatives"):
        assert (rebuilt / f"{kind}_A+B-calculate.png").stat().st_size > 1000
        assert (rebuilt / f"{kind}_A+B-calculate.pdf").exists()
        assert (rebuilt / f"{kind}_A+B-calculate.caption.txt").read_text().strip()
    for name in ("styles", "tasks_full_vs_af1", "probe_partial_result"):
        assert (rebuilt / f"{name}.png").exists()
    assert "## Alternatives" in (rebuilt / "tables.md").read_text()
