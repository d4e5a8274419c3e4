"""The embedded SmolLM2-135M-Instruct (real weights, offline): measured accuracy and a real run.

Measured on CPU, float32, sdpa (2026-11-29): the default task (A+B, 'Calculate: {A}+{B}=',
operands 1..9, 36 prompts) is answered right by the full model 26/36 = 0.722; AF1 faithfulness
peaks at L_wait=20, L_transfer=4 with 24/26 = 0.923 (README, "Measured on SmolLM2").
"""

import json

import numpy as np
import pytest

import run
from interventions import NnsightExecutor, load_model
from interventions.pipeline.results import read_results
from tasks import build_task

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2", device="cpu")


def test_smollm2_loads_as_a_30_layer_llama_with_digit_tokens(smollm2):
    assert smollm2.n_layers == 30
    assert smollm2.identity.architecture == "llama"
    assert smollm2.identity.weights_sha256.startswith("224d0cd3")
    assert smollm2.tokenizer.tokenize("123") == ["1", "2", "3"]


def test_default_task_full_accuracy_is_in_the_measured_range(smollm2):
    build = build_task(smollm2.tokenizer, task="A+B", style="calculate")
    assert len(build.dataset) == 36 and build.n_dropped == 45
    executor = NnsightExecutor(smollm2, build.dataset["prompt"], build.dataset["answer_token_id"])
    accuracy = executor.clean().correct(np.array(build.dataset["answer_token_id"])).mean()
    assert 0.65 <= accuracy <= 0.80, accuracy  # measured 26/36 = 0.722


def test_run_on_a_small_grid_writes_everything(tmp_path, capsys):
    out = tmp_path / "smol"
    code = run.main(["--l-wait", "19-20", "--l-transfer", "3-4", "--out", str(out),
                     "--no-progress", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    rows = {(r["l_wait"], r["l_transfer"]): r for r in read_results(out / "results.jsonl")}
    assert set(rows) == {(19, 3), (19, 4), (20, 3), (20, 4)}
    assert rows[(20, 4)]["faithfulness"] >= 0.75  # measured 24/26 = 0.923
    assert abs(rows[(20, 4)]["n_full_correct"] - 26) <= 1  # measured 26 of 36
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["source"] == "embedded" and manifest["status"] == "complete"
    assert (out / "figures" / "heatmap_A+B-calculate.png").exists()
    assert (out / "data" / "A+B-calculate" / "dataset_info.json").exists()
