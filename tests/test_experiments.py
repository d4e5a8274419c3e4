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
from interventions.pipeline.results import read_results

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
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


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
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
        outputs[cell.fields["variant"]] = got
    # Every alternative changes the computation (the comparison above is not vacuous).
    base = outputs["AF1 (CAMA + ABP)"]
    for variant, got in outputs.items():
        if variant != "AF1 (CAMA + ABP)":
            assert not torch.allclose(got, base, atol=1e-4), variant


def row(w, t, faith):
    return {"l_wait": w, "l_transfer": t, "faithfulness": faith, "full_accuracy": 0.5}


def test_af1_search_takes_largest_wait_then_smallest_transfer():
    rows = [row(5, 1, 0.95), row(8, 2, 0.91), row(8, 1, 0.7), row(8, 3, 0.99), row(9, 4, 0.89),
            row(3, 4, 0.995), row(9, 3, None)]
    assert frontier(rows, 0.9) == {1: 5, 2: 8, 3: 8, 4: 3}
    found = af1_search(rows, 0.9)
    assert (found["l_wait"], found["l_transfer"], found["met_threshold"]) == (8, 2, True)
    # Nothing reaches 0.999: the best cell (largest wait among ties) is reported, flagged.
    found = af1_search(rows, 0.999)
    assert (found["l_wait"], found["l_transfer"], found["met_threshold"]) == (3, 4, False)


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
    from interventions.pipeline.jobs import JobConfig, run_job

    model_dir = tiny.save_tiny_model("llama", tmp_path / "m", tiny.digit_tokenizer())
    out = tmp_path / "run"
    run_job(JobConfig(model=model_dir, experiments="all", out=str(out), progress=False,
                      cache_dir=str(tmp_path / "cache"), l_transfer="1-2"))
    made = sorted(p.name for p in (out / "figures").iterdir())
    rebuilt = tmp_path / "rebuilt"
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "
            "sys.modules['nnsight'] = None; from figures.__main__ import main; "
            f"sys.exit(main([{str(out)!r}, '--out', {str(rebuilt)!r}]))")
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
