"""The executors against the independent plain-hook implementation (tests/reference.py) on the
tiny models of every architecture, eager and sdpa.

* The fast executor over a grid of AF1 cells, the plan variants and the necessity windows, on
  left-padded batches of prompts of different lengths (it shares no mask or CAMA code with the
  hooks; its comparison with the nnsight path in test_fast_executor.py shares both).
* AF1 in a later invoke of a trace with several invokes (the row offsets of the masks).
* Necessity and the alternatives one prompt at a time, through both executors.

CAMA. The executors get their means from the project's table, the hooks from the reference's
brute force; both key a mean by (position, token) within the prompts of one token length. The
prompts below are also chosen so that every non-sink (position, token) occurs at a single token
length, so that the comparison would not depend on how lengths are keyed.

Tolerance. Both sides compute the same float32 arithmetic in different orders, so they may
differ by rounding only: ``reference.float32_rounding_bound`` (the worst case at the magnitudes
of the clean pass and the compared logits, about 1e-4 here, where differences of about 6e-7
are measured; see the derivation in tests/reference.py). A wrong mask or look-up moves logits
by far more: every cell is checked to differ from the clean model by more than the bound.
"""

import pytest
import torch

import reference
from reference import assert_logits_close
from conftest import wrap_tiny
from interventions.executors.fast import FastExecutor
from interventions.executors.reference import NnsightExecutor
from interventions.mechanisms import traced
from interventions.mechanisms.cama import build_cama_table
from interventions.mechanisms.plan import AF1Plan
from interventions.mechanisms.traced import apply_af1
from interventions.pipeline.experiments import alternative_cells, necessity_cells
from tiny import ARCHITECTURES, digit_tokenizer

pytestmark = pytest.mark.precision


# Token lengths 1, 4, 13 and 15 (characters are tokens; no BOS, so the first character is the
# sink): both of the fast executor's batches of 5 are left padded.
PROMPTS = ["3+5=", "9", "What is 2+2? ", "Calculate: 3+4=", "7+1=", "What is 6+1? ",
           "Calculate: 1+7=", "4+4=", "2+6="]
IMPLS = ("eager", "sdpa")
VARIANTS = {  # AF1Plan keywords of the plan variants (the alternatives of the paper)
    "zero": {"wait_ablation": "zero"},
    "position mean": {"wait_ablation": "position_mean"},
    "no wait ablation": {"wait_ablation": "none"},
    "all tokens peek": {"transfer_peek": "all"},
    "no sink": {"sink": False},
}


class Setup:
    """One tiny model with its project table and the reference's brute-force means."""

    def __init__(self, arch, attn):
        self.tokenizer = digit_tokenizer()
        self.model = wrap_tiny(arch, self.tokenizer, attn)
        self.n_layers = self.model.n_layers
        self.table = build_cama_table(self.model, PROMPTS, "test", progress=False)
        hf = self.model.hf
        self.means = {"cama": reference.brute_force_cama(hf, self.tokenizer, PROMPTS),
                      "position_mean": reference.brute_force_position_mean(hf, self.tokenizer,
                                                                           PROMPTS),
                      "zero": reference.zero_means(hf.config.hidden_size)}
        self.answers = [self.tokenizer.convert_tokens_to_ids(str(len(p) % 10)) for p in PROMPTS]
        with torch.no_grad():
            clean = hf(**self.model.encode(PROMPTS), output_hidden_states=True)
        self.magnitude = max(float(h.abs().max()) for h in (*clean.hidden_states, clean.logits))
        self.length = max(len(ids) for ids in self.tokenizer(PROMPTS)["input_ids"])

    def bound(self, *outputs):
        """The float32 rounding bound at the magnitudes of the clean model and ``outputs``."""
        magnitude = max([self.magnitude] + [float(o.abs().max()) for o in outputs])
        return reference.float32_rounding_bound(self.model.hf, magnitude, self.length)

    def hooks(self, plan):
        """What the reference computes for an AF1Plan, from its fields only."""
        return reference.hook_arguments(self.n_layers, plan.l_wait, plan.l_transfer, self.means,
                                        sink=plan.sink, wait_ablation=plan.wait_ablation,
                                        transfer_peek=plan.transfer_peek)

    def hook_logits(self, prompts, hooks):
        """``(N, V)`` last-position logits of the hooks on one left-padded batch."""
        enc = self.model.encode(prompts)
        return reference.af1_logits_with_hooks(self.model.hf, enc, *hooks)[:, -1]


@pytest.fixture(scope="module", params=[(a, i) for a in ARCHITECTURES for i in IMPLS],
                ids=lambda p: f"{p[0]}-{p[1]}")
def setup(request):
    assert reference.keys_at_several_lengths(digit_tokenizer(), PROMPTS) == []
    return Setup(*request.param)


def af1_cells(setup, plans):
    """``(tag, plan, table layer, hook arguments)`` of AF1 plans."""
    return [(repr(p), p, setup.table.for_intervention(p.intervention(setup.n_layers)),
             setup.hooks(p)) for p in plans]


def necessity(setup, windows):
    """``(tag, intervention, None, hook arguments)`` of the necessity experiment's cells."""
    return [(f"necessity {c.fields['layer']}+{c.fields['window']}", c.intervention, None,
             (reference.necessity_rules(c.fields["layer"], c.fields["window"]),))
            for c in necessity_cells(setup.n_layers, windows)]


def test_fast_executor_equals_hooks_on_padded_batches(setup):
    """The AF1 grid (L_transfer = 0 included), the plan variants and the necessity windows of
    one and two layers, through ``run_many`` (cells share work, as in a job) and
    ``last_logits`` (every logit of the last position)."""
    n = setup.n_layers
    plans = [AF1Plan(w, t) for w in range(n) for t in range(n - w + 1)]
    plans += [AF1Plan(1, 2, **kw) for kw in VARIANTS.values()] + [AF1Plan(0, 2, sink=False)]
    cells = af1_cells(setup, plans) + necessity(setup, windows=(1, 2))
    assert len(cells) == 14 + 6 + 7
    fast = FastExecutor(setup.model, PROMPTS, setup.answers, batch_size=5)
    assert fast.fallback_reason is None and len(fast.batches) == 2
    shared = dict(fast.run_many([cell[:3] for cell in cells]))
    clean = setup.hook_logits(PROMPTS, ({},))
    worst = 0.0
    for tag, plan, cama, hooks in cells:
        want = setup.hook_logits(PROMPTS, hooks)
        bound = setup.bound(want)
        assert float((want - clean).abs().max()) > 10 * bound, f"{tag}: no effect to check"
        worst = max(worst, assert_logits_close(fast.last_logits(plan, cama), want, bound, tag)[0])
        assert_logits_close(shared[tag], want, bound, f"{tag} (run_many)", setup.answers)
    assert worst > 0  # the two implementations are independent, not bit-identical


def test_necessity_and_alternatives_one_prompt_at_a_time(setup):
    """Each prompt alone (no padding; with sdpa the model then passes no mask at all), through
    the nnsight path and the fast executor, against the hooks on that prompt alone."""
    cells = necessity(setup, windows=(1, 2))
    cells += af1_cells(setup, [c.intervention for c in alternative_cells(AF1Plan(1, 2))])
    assert len(cells) == 4 + 3 + 6
    decided = compared = 0
    for i in (0, 3):  # lengths 4 and 15
        prompt, answer = PROMPTS[i], setup.answers[i]
        nnsight = NnsightExecutor(setup.model, [prompt], [answer])
        fast = FastExecutor(setup.model, [prompt], [answer])
        fast_results = dict(fast.run_many([cell[:3] for cell in cells]))
        for tag, plan, cama, hooks in cells:
            want = setup.hook_logits([prompt], hooks)
            bound = setup.bound(want)
            what = f"{tag} on {prompt!r}"
            decided += assert_logits_close(nnsight.run(plan, cama), want, bound,
                                           f"{what} (nnsight)", [answer], each_decided=False)[1]
            assert_logits_close(fast_results[tag], want, bound, f"{what} (fast)", [answer],
                                each_decided=False)
            compared += 1
    # One prompt may be a float32 tie under heavy ablation; most comparisons must be decided.
    assert 2 * decided >= compared


# Several invokes in one trace; the entry of each invoke is the plan it runs (None: clean).
INVOKES = {
    "same length": [["3+5="], ["7+1=", "4+4="], ["2+6="]],
    "padded": [["Calculate: 3+4=", "3+5="], ["What is 2+2? "], ["7+1=", "Calculate: 1+7="]],
}
PLACEMENTS = {
    "second": [None, AF1Plan(1, 2), None],
    "third": [None, None, AF1Plan(1, 2)],
    "second and third": [None, AF1Plan(2, 1), AF1Plan(0, 2, transfer_peek="all")],
}


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("batch", INVOKES)
def test_af1_in_a_later_invoke_equals_hooks_and_leaves_the_others_clean(setup, batch, placement,
                                                                       monkeypatch):
    """AF1 applied in the second or third invoke: its rows must equal the hooks on those
    prompts alone, the other rows the clean model. With sdpa and prompts of one length the
    model passes no mask, so the first invoke that restricts a layer writes a whole-batch mask
    at its row offset (nnsight_internals.current_batch_group), which later invokes edit."""
    model = setup.model
    plans = PLACEMENTS[placement]
    groups = INVOKES[batch]
    # Record the row offsets apply_rules reads, to show the offset branch ran with start > 0.
    offsets = []
    record = traced.current_batch_group

    def recording(interleaver):
        rows = record(interleaver)
        offsets.append(rows)
        return rows

    monkeypatch.setattr(traced, "current_batch_group", recording)
    saved = []
    with torch.no_grad(), model.lm.trace() as tracer:
        for prompts, plan in zip(groups, plans):
            with tracer.invoke(prompts):
                if plan is not None:
                    apply_af1(model.sites, plan, setup.table.for_intervention(
                        plan.intervention(setup.n_layers)))
                saved.append(model.lm.output.logits[:, -1].save())
    for prompts, plan, got in zip(groups, plans, saved):
        if plan is None:
            with torch.no_grad():
                want = model.hf(**model.encode(prompts)).logits[:, -1]
        else:
            want = setup.hook_logits(prompts, setup.hooks(plan))
        assert_logits_close(got, want, setup.bound(want), f"{prompts} under {plan}")
    # Sliding-window layers always get a mask from the model, so only models without them
    # reach the whole-batch branch.
    if (batch == "same length" and model.sites.attn_implementation == "sdpa"
            and not any(model.sites.windows)):
        first = plans.index(next(p for p in plans if p is not None))
        starts = {rows[0] for rows in offsets if rows is not None}
        assert min(starts) == sum(len(g) for g in groups[:first]) > 0
