"""FastExecutor against the nnsight reference path (NnsightExecutor's batches and
``apply_intervention`` inside traces): every (L_wait, L_transfer) of a full grid on tiny random
models of every architecture of ``tiny.ARCHITECTURES`` (eager and sdpa where the family has it;
sliding windows shorter than the prompts), the plan variants, general interventions, and SmolLM2
in float32 and in bfloat16 (against its own float32 computation). The rotary fallback is in
``test_model_families.py``.

The fast executor pads: it sorts prompts by token length and cuts batches, so prompts of
different lengths share a left-padded batch; the reference batches equal lengths only.
"""

import copy

import numpy as np
import pytest
import torch

import reference
from conftest import wrap_tiny
from reference import assert_logits_close
from interventions.mechanisms.cama import build_cama_table
from interventions.executors.reference import NnsightExecutor
from interventions.executors.fast import FastExecutor
from interventions.mechanisms.plan import AF1Plan, Intervention, PlanError, as_intervention
from interventions.mechanisms.traced import apply_intervention
import tiny
from tiny import ARCHITECTURES

pytestmark = pytest.mark.precision


# Three token lengths (4, 13, 15 characters = tokens): one padded batch on the fast side.
PROMPTS = ["Calculate: 3+4=", "3+5=", "What is 2+2? ", "Calculate: 1+7=", "7+1=",
           "What is 6+1? "]
IMPLS = ("eager", "sdpa")


def answer_ids(tokenizer, prompts):
    return [tokenizer.convert_tokens_to_ids(str(len(p) % 10)) for p in prompts]


def reference_last_logits(executor: NnsightExecutor, plan, cama=None) -> torch.Tensor:
    """``(N, V)`` last-position logits through the reference executor's own batches and
    ``apply_intervention`` (what ``NnsightExecutor.run`` does, keeping every logit)."""
    model = executor.model
    intervention = None if plan is None else as_intervention(plan, model.n_layers)
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


def check_cells(model, cells, prompts, batch_size=32, real_weights=False):
    """Run ``cells`` through ``run_many`` (shared work) and check every cell against the
    reference path: all last-position logits and the answer logits within the float32 rounding
    bound of tests/reference.py at the magnitudes the reference reaches on that cell, and the
    same predictions wherever that bound decides them. Tiny random models
    (``real_weights=False``) take the worst-case bound, real checkpoints the residual-stream
    bound (see tests/reference.py). Returns the largest logit difference seen."""
    answers = answer_ids(model.tokenizer, prompts)
    ref = NnsightExecutor(model, prompts, answers)
    fast = FastExecutor(model, prompts, answers, batch_size=batch_size)
    assert fast.fallback_reason is None and fast.name == "fast"
    results = dict(fast.run_many(cells))
    assert set(results) == {tag for tag, _, _ in cells}
    if not real_weights:
        length = max(len(ids) for ids in model.tokenizer(list(prompts))["input_ids"])
        clean = max(reference.clean_magnitude(model.hf, enc) for _, enc in ref.batches)
    worst = 0.0
    for tag, plan, cama in cells:
        replace_layer = as_intervention(plan, model.n_layers).replace_layer
        with reference.ResidualMagnitude(model.hf, first_layer=replace_layer or 0) as seen:
            want = reference_last_logits(ref, plan, cama)
        got = fast.last_logits(plan, cama)
        assert got.shape == want.shape
        if real_weights:
            bound = reference.residual_rounding_bound(
                reference.FLOAT32_EPS, seen.value,
                reference.layers_run(model.n_layers, replace_layer))
        else:
            magnitude = max(clean, float(want.abs().max()), float(got.abs().max()))
            bound = reference.float32_rounding_bound(model.hf, magnitude, length)
        diff, _ = assert_logits_close(got, want, bound, f"{tag} (fast, every logit)")
        assert_logits_close(results[tag], want, bound, f"{tag} (run_many)", answers)
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
    model = wrap_tiny(arch, number_tok, tiny.supported_attention(arch))
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


@pytest.mark.parametrize("window", [4, 64])
def test_sliding_window_layers_equal_the_reference(window, digit_tok):
    """Qwen2 with every layer sliding, the window shorter than most prompts (4) or longer than
    all (64): the fast path intersects every rule with the window, as the reference does."""
    from interventions.mechanisms.models import wrap_model
    from transformers import AutoModelForCausalLM

    config = tiny.tiny_config("qwen2", len(digit_tok))
    config.use_sliding_window, config.sliding_window, config.max_window_layers = True, window, 0
    config.layer_types = ["sliding_attention"] * config.num_hidden_layers
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    model = wrap_model(hf, digit_tok)
    assert model.sites.windows == [window] * 4
    table = build_cama_table(model, PROMPTS, "test", progress=False)
    check_cells(model, grid(model.n_layers, table)
                + [("none", AF1Plan(0, 1, wait_ablation="none"), None)], PROMPTS)


# -- SmolLM2 (real weights) ----------------------------------------------------------------

# SmolLM2's residual stream reaches 2.5e4 at the sink from layer 2 on, so each cell's bound is
# reference.residual_rounding_bound at that magnitude (0.071 at (0, 1), where fast and reference
# differ by 2.1e-3 to 2.5e-3 on the kernels tried; 2e-5 to 7e-5 elsewhere).
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
    worst = check_cells(model, cells, prompts, real_weights=True)
    assert worst > 0  # the paths are independent: not bit-identical


@pytest.mark.slow
def test_smollm2_bfloat16_cells_are_their_own_cells(smollm2_data):
    """bfloat16 against the same computation in float32 on the same bf16-rounded weights and
    CAMA table (``exact``, whose own rounding is 2^16 times finer).

    The logits are within reference.residual_rounding_bound for one bfloat16 evaluation. At
    SmolLM2's magnitudes that bound says little: the sink's |h| of 2.5e4 is where bfloat16
    numbers are 128 apart, and bfloat16 fixes these logits to a few units at best (measured 0.3
    to 2.8 off, 8.5 at (0, 1) with avx2 kernels and no bf16 instructions), so no prediction is
    decided by it prompt by prompt. What the arithmetic does decide is which cell ran: each
    cell's bfloat16 logits must lie nearer (mean |difference| over prompts and vocabulary)
    to the exact logits of their own cell than to those of any other cell of the list. A
    wrong stage boundary, mask or table layer lands on another cell's logits or elsewhere;
    rounding moves the mean by a small fraction of the distance between cells (measured at
    most 0.18 of it, at (0, 1) on avx2; 0.12 natively)."""
    from interventions import load_model
    from interventions.mechanisms.models import wrap_model

    _, prompts = smollm2_data
    model = load_model("smollm2", device="cpu", dtype="bfloat16")
    exact_model = wrap_model(copy.deepcopy(model.hf).float(), model.tokenizer)
    table = build_cama_table(model, prompts, "test", progress=False)
    answers = answer_ids(model.tokenizer, prompts)
    exact = NnsightExecutor(exact_model, prompts, answers)
    fast = FastExecutor(model, prompts, answers)
    want, got = {}, {}
    for w, t in SMOLLM2_CELLS:
        plan, cama = AF1Plan(w, t), table.layer(w) if w else None
        with reference.ResidualMagnitude(exact_model.hf, first_layer=w) as seen:
            want[w, t] = reference_last_logits(exact, plan, cama)
        got[w, t] = fast.last_logits(plan, cama)
        bound = reference.residual_rounding_bound(
            reference.BFLOAT16_EPS, seen.value, reference.layers_run(model.n_layers, w),
            evaluations=1)
        error = float((got[w, t] - want[w, t]).abs().max())
        assert 0 < error <= bound, f"({w}, {t}): |logit difference| {error:.2f}, bound {bound:.1f}"
    for cell in SMOLLM2_CELLS:
        distance = {other: float((got[cell] - want[other]).abs().mean()) for other in want}
        nearest = min(distance, key=distance.get)
        assert nearest == cell, f"{cell}: bfloat16 logits nearest to {nearest}'s ({distance})"
