"""FastExecutor against the nnsight reference path (NnsightExecutor's batches and
``apply_intervention`` inside traces): every (L_wait, L_transfer) of a full grid on tiny random
models of all five architectures (eager and sdpa), the plan variants, general interventions,
the fallback, and SmolLM2 in float32 and bfloat16.

The fast executor pads: it sorts prompts by token length and cuts batches, so prompts of
different lengths share a left-padded batch; the reference batches equal lengths only.
"""

import numpy as np
import pytest
import torch

from conftest import wrap_tiny
from interventions.mechanisms.cama import build_cama_table
from interventions.executors.reference import NnsightExecutor
from interventions.executors.fast import FastExecutor
from interventions.mechanisms.plan import AF1Plan, Intervention, PlanError
from interventions.mechanisms.traced import apply_intervention
from tiny import ARCHITECTURES

# Three token lengths (4, 13, 15 characters = tokens): one padded batch on the fast side.
PROMPTS = ["Calculate: 3+4=", "3+5=", "What is 2+2? ", "Calculate: 1+7=", "7+1=",
           "What is 6+1? "]
IMPLS = ("eager", "sdpa")
FP32_TOLERANCE = 1e-4  # max |logit difference| at the last position (the bound)


def answer_ids(tokenizer, prompts):
    return [tokenizer.convert_tokens_to_ids(str(len(p) % 10)) for p in prompts]


def reference_last_logits(executor: NnsightExecutor, plan, cama=None) -> torch.Tensor:
    """``(N, V)`` last-position logits through the reference executor's own batches and
    ``apply_intervention`` (what ``NnsightExecutor.run`` does, keeping every logit)."""
    model = executor.model
    intervention = None if plan is None else (
        plan if isinstance(plan, Intervention) else plan.intervention(model.n_layers))
    out = None
    with torch.no_grad():
        for indices, enc in executor.batches:
            with model.lm.trace(enc):
                if intervention is not None:
                    apply_intervention(model.sites, intervention, cama)
                logits = model.lm.output.logits[:, -1].save()
            if out is None:
                out = torch.zeros(executor.n_prompts, logits.shape[-1])
            out[indices] = logits.float().cpu()
    return out


def check_cells(model, cells, prompts, batch_size=32, tolerance=FP32_TOLERANCE):
    """Run ``cells`` through ``run_many`` (shared work) and check every cell against the
    reference: identical predictions, answer logits and all last-position logits within
    ``tolerance``. Where a cell's difference exceeds it, the reference's own sensitivity to
    batching (its batched run against one prompt at a time) must be at least half as large:
    the fast path may differ from the reference no more than twice as much as the reference
    differs from itself. Returns the largest logit difference seen."""
    answers = answer_ids(model.tokenizer, prompts)
    reference = NnsightExecutor(model, prompts, answers)
    fast = FastExecutor(model, prompts, answers, batch_size=batch_size)
    assert fast.fallback_reason is None and fast.name == "fast"
    results = dict(fast.run_many(cells))
    assert set(results) == {tag for tag, _, _ in cells}
    worst = 0.0
    for tag, plan, cama in cells:
        want = reference_last_logits(reference, plan, cama)
        got = fast.last_logits(plan, cama)
        assert got.shape == want.shape
        preds = results[tag]
        assert np.array_equal(preds.pred_ids, want.argmax(-1).numpy()), tag
        want_answer = want.gather(-1, torch.tensor(answers)[:, None])[:, 0].numpy()
        diff = float((got - want).abs().max())
        bound = tolerance
        if diff > tolerance:
            one_by_one = NnsightExecutor(model, prompts, answers, batch_size=1)
            noise = float((reference_last_logits(one_by_one, plan, cama) - want).abs().max())
            bound = max(tolerance, 2 * noise)
        assert diff <= bound, (tag, diff, bound)
        np.testing.assert_allclose(preds.answer_logits, want_answer, atol=bound, rtol=0)
        worst = max(worst, diff)
    return worst


def grid(n_layers, table):
    return [((w, t), AF1Plan(w, t), table.layer(w) if w else None)
            for w in range(n_layers) for t in range(1, n_layers + 1) if w + t <= n_layers]


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("attn", IMPLS)
def test_full_grid_equals_reference_with_padding(arch, attn, digit_tok):
    model = wrap_tiny(arch, digit_tok, attn)
    table = build_cama_table(model, PROMPTS, "test", progress=False)
    cells = grid(model.n_layers, table)
    assert len(cells) == 10
    check_cells(model, cells, PROMPTS)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_variants_and_general_interventions_equal_reference(arch, number_tok):
    """Every plan variant, general interventions (necessity, 'self' rules, a replacement with
    rules before it), the clean model, one-token prompts and several padded batches."""
    model = wrap_tiny(arch, number_tok, "sdpa")
    prompts = ["12+30=", "7", "What is 5+7? ", "12+7=", "9", "What is 12+30? "]
    table = build_cama_table(model, prompts, "test", progress=False)
    n_layers = model.n_layers
    plans = [AF1Plan(2, 1, sink=False), AF1Plan(0, 2, sink=False),
             AF1Plan(1, 2, wait_ablation="zero"), AF1Plan(2, 2, wait_ablation="position_mean"),
             AF1Plan(2, 1, wait_ablation="none"), AF1Plan(1, 1, wait_ablation="none"),
             AF1Plan(1, 2, transfer_peek="all"), AF1Plan(2, 1, transfer_peek="all", sink=False),
             AF1Plan(1, 3), AF1Plan(3, 0)]
    cells = [(repr(p), p, table.for_intervention(p.intervention(n_layers))) for p in plans]
    interventions = [Intervention({k: ("sink_self", "all")}) for k in range(n_layers)]
    interventions += [Intervention({1: ("self", "self"), 3: ("all", "self")}),
                      Intervention({0: ("sink_self", "all"), 3: ("sink_self", "sink_self")}, 2,
                                   "cama"),
                      Intervention({})]
    cells += [(f"intervention {i}", iv, table.for_intervention(iv))
              for i, iv in enumerate(interventions)]
    check_cells(model, cells, prompts, batch_size=4)


def test_duplicate_cells_and_equal_table_layers_share_one_evaluation(digit_tok):
    model = wrap_tiny("llama", digit_tok, "eager")
    table = build_cama_table(model, PROMPTS, "test", progress=False)
    fast = FastExecutor(model, PROMPTS, answer_ids(digit_tok, PROMPTS))
    # table.layer() returns a fresh CamaLayer each call: equal content must group together.
    cells = [("a", AF1Plan(2, 1), table.layer(2)), ("b", AF1Plan(2, 2), table.layer(2)),
             ("c", AF1Plan(2, 1), table.layer(2))]
    groups = fast._groups(cells)
    assert len(groups) == 1 and len(groups[0].cells) == 2
    results = dict(fast.run_many(cells))
    assert np.array_equal(results["a"].answer_logits, results["c"].answer_logits)


def test_sink_state_comes_from_the_model_not_the_table(digit_tok):
    """Corrupt the table's position-0 rows: the reference keeps the sink's clean state, and so
    must the fast path (it runs the sink alone)."""
    model = wrap_tiny("qwen2", digit_tok, "eager")
    table = build_cama_table(model, PROMPTS, "test", progress=False)
    table.means[:, table.keys[:, 0] == 0] = 1e3
    check_cells(model, grid(model.n_layers, table)[4:], PROMPTS)


def test_errors_match_the_reference(digit_tok):
    model = wrap_tiny("llama", digit_tok, "sdpa")
    table = build_cama_table(model, ["3+4="], "test", progress=False)
    fast = FastExecutor(model, ["3+5="], [5])
    with pytest.raises(KeyError,
                       match=r"no entry for \(position, token, length, group\) \(2, "):
        fast.run(AF1Plan(2, 1), table.layer(2))
    with pytest.raises(ValueError, match="replaces h_2 but the CAMA layer given is h_1"):
        fast.run(AF1Plan(2, 1), table.layer(1))
    with pytest.raises(PlanError, match="exceeds the model's 4 layers"):
        list(fast.run_many([("x", AF1Plan(1, 1), table.layer(1)), ("y", AF1Plan(3, 2), None)]))


@pytest.mark.parametrize("window, falls_back", [(4, True), (64, False)])
def test_sliding_window_shorter_than_a_prompt_falls_back_to_the_reference(window, falls_back,
                                                                          digit_tok):
    """Qwen2 with sliding-window layers: the fast path's unrestricted layers are plainly
    causal, which is the model's own attention only while prompts fit in the window."""
    import tiny
    from interventions.mechanisms.models import wrap_model
    from transformers import AutoModelForCausalLM

    config = tiny.tiny_config("qwen2", len(digit_tok))
    config.use_sliding_window, config.sliding_window, config.max_window_layers = True, window, 0
    config.layer_types = ["sliding_attention"] * config.num_hidden_layers
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    model = wrap_model(hf, digit_tok)
    table = build_cama_table(model, PROMPTS, "test", progress=False)
    fast = FastExecutor(model, PROMPTS, answer_ids(digit_tok, PROMPTS))
    assert (fast.fallback_reason is not None) == falls_back
    assert fast.name == ("nnsight" if falls_back else "fast")
    plan = AF1Plan(0, 1, wait_ablation="none")  # layer 0 runs unrestricted: the window matters
    reference = NnsightExecutor(model, PROMPTS, answer_ids(digit_tok, PROMPTS))
    for cell_plan, cama in [(plan, None), (AF1Plan(1, 2), table.layer(1))]:
        want, got = reference.run(cell_plan, cama), fast.run(cell_plan, cama)
        assert np.array_equal(want.pred_ids, got.pred_ids)
        np.testing.assert_allclose(want.answer_logits, got.answer_logits, atol=FP32_TOLERANCE)
    if not falls_back:
        check_cells(model, [("none", plan, None)], PROMPTS)


# -- SmolLM2 (real weights) ----------------------------------------------------------------

# Measured on SmolLM2, CPU, sdpa, over the cells below (prompts: the fixture's): the largest
# |logit difference| at the last position, fast against reference, is 2.5e-5..4.9e-5 in float32
# except at (0, 1) with 2.7e-3, where the reference batched and one prompt at a time differ by
# 2.0e-3 (the residual stream reaches 2.4e4 from layer 12 on). In bfloat16 it is 0.25..0.78,
# and 1.75 at (0, 1), each equal to the reference's own batched-vs-one-at-a-time difference;
# predictions then differ in at most 2 prompts of 32, all where the reference's top two logits
# are within 0.125 (bf16 ties).
BF16_TOLERANCE = 2.0
BF16_TIE_GAP = 0.5
SMOLLM2_CELLS = [(0, 1), (5, 4), (15, 2), (17, 3), (20, 1), (20, 3), (20, 4), (25, 2), (27, 3),
                 (29, 1)]


@pytest.fixture(scope="module")
def smollm2_data():
    from interventions import load_model
    from tasks import build_task

    model = load_model("smollm2", device="cpu")
    # The default task (7 tokens) plus the 'words' style (other lengths): padded batches.
    prompts = (build_task(model.tokenizer, "A+B", style="calculate").dataset["prompt"][:20]
               + build_task(model.tokenizer, "A+B", style="words").dataset["prompt"][:12])
    return model, prompts


@pytest.mark.slow
def test_smollm2_float32_equals_reference(smollm2_data):
    model, prompts = smollm2_data
    assert len({len(model.tokenizer(p)["input_ids"]) for p in prompts}) > 1
    table = build_cama_table(model, prompts, "test", progress=False)
    cells = [((w, t), AF1Plan(w, t), table.layer(w) if w else None) for w, t in SMOLLM2_CELLS]
    cells.append(("zero", AF1Plan(20, 3, wait_ablation="zero"), None))
    worst = check_cells(model, cells, prompts)
    assert worst > 0  # the paths are independent: not bit-identical


@pytest.mark.slow
def test_smollm2_bfloat16_within_measured_tolerance(smollm2_data):
    from interventions import load_model

    _, prompts = smollm2_data
    model = load_model("smollm2", device="cpu", dtype="bfloat16")
    table = build_cama_table(model, prompts, "test", progress=False)
    answers = answer_ids(model.tokenizer, prompts)
    reference = NnsightExecutor(model, prompts, answers)
    fast = FastExecutor(model, prompts, answers)
    for w, t in SMOLLM2_CELLS:
        plan, cama = AF1Plan(w, t), table.layer(w) if w else None
        want = reference_last_logits(reference, plan, cama)
        got = fast.last_logits(plan, cama)
        assert got.shape == want.shape
        assert float((got - want).abs().max()) <= BF16_TOLERANCE, (w, t)
        top2 = want.topk(2, -1).values
        differ = got.argmax(-1) != want.argmax(-1)
        assert int(differ.sum()) <= len(prompts) // 10, (w, t)
        assert torch.all((top2[:, 0] - top2[:, 1])[differ] <= BF16_TIE_GAP), (w, t)
