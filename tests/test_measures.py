"""The continuous measures (the answer's probability under the full model and AF1, their ratio,
KL(full || AF1) at the last position) against a direct computation from the full and AF1 logits
of the independent hook implementation (tests/reference.py), through the nnsight, fast and
remote (local backend) executors; and their aggregation and bootstrap intervals in a results
row against sums and resamples written out here.

Tolerance. Each executor's logits differ from the hooks' by float32 rounding, at most ``d =
reference.float32_rounding_bound`` (as in test_independent.py). A log-probability
``z_i - logsumexp(z)`` then moves by at most ``2 d`` plus the rounding of its own float32
log-sum-exp, ``(V + 2) u (max |z| + 1)``: together ``e``. A probability ``p_i`` moves by at most
``p_i (exp(e) - 1)``, so ``KL = sum p_i (log p_i - log q_i)`` moves by at most
``(exp(e) - 1 + V u) sum p_i |log p_i - log q_i| + 2 e`` (the ``V u`` term: the float32 sum of
``V`` terms). The bounds are computed per prompt from the float64 values.
"""

import numpy as np
import pytest
import torch

import reference
from interventions import AF1Plan
from interventions.executors.fast import FastExecutor
from interventions.executors.reference import NnsightExecutor
from interventions.pipeline.scoring import continuous_measures, prompt_outcomes, score
from interventions.pipeline.stats import BOOTSTRAP_RESAMPLES
from test_answer_scoring import remote_executor
from test_independent import PROMPTS, Setup

U = reference.FLOAT32_UNIT_ROUNDOFF
PLANS = [AF1Plan(1, 1), AF1Plan(2, 1), AF1Plan(1, 2), AF1Plan(3, 1), AF1Plan(2, 1, sink=False),
         AF1Plan(1, 2, wait_ablation="zero")]
WRONG = (1, 5)  # prompts whose answer is not the full model's prediction


@pytest.fixture(scope="module")
def setup():
    """The tiny Llama of test_independent.py, with answers the full model gets right except on
    the prompts in WRONG (a random model rarely gets given answers right), and the direct
    float64 log-probabilities of the hooks' logits, each prompt run alone."""
    s = Setup("llama", "sdpa")
    encodings = [s.tokenizer([p], return_tensors="pt") for p in PROMPTS]
    s.clean_logits = reference.last_logits_one_by_one(s.model.hf, encodings, {})
    clean_pred = s.clean_logits.argmax(-1)
    s.answers = [int(t) if i not in WRONG else int((t + 1) % s.clean_logits.shape[-1])
                 for i, t in enumerate(clean_pred)]
    s.af1_logits = {repr(p): reference.last_logits_one_by_one(s.model.hf, encodings,
                                                              *s.hooks(p)) for p in PLANS}
    return s


def direct(logits, answers):
    """``(log-probabilities (N, V), answer log-probabilities (N,))`` in float64."""
    logp = torch.log_softmax(logits.double(), -1)
    return logp, logp.gather(-1, torch.tensor(answers)[:, None])[:, 0].numpy()


def logprob_error(setup, *logits):
    """``e`` of the module docstring for these logits (one number for the data set)."""
    vocab = logits[0].shape[-1]
    largest = max(float(z.abs().max()) for z in logits)
    return 2 * setup.bound(*logits) + (vocab + 2) * U * (largest + 1)


def kl_direct_and_bound(full_logp, af1_logp, e):
    """Per prompt: KL(full || AF1) in float64 and its bound (module docstring)."""
    p = full_logp.exp()
    spread = (p * (full_logp - af1_logp).abs()).sum(-1).numpy()
    kl = (p * (full_logp - af1_logp)).sum(-1).numpy()
    vocab = full_logp.shape[-1]
    return kl, (np.exp(e) - 1 + vocab * U) * spread + 2 * e


def executors(model, answers):
    return {"nnsight": NnsightExecutor(model, PROMPTS, answers, batch_size=4),
            "fast": FastExecutor(model, PROMPTS, answers, batch_size=4),
            "remote-local": remote_executor(model, PROMPTS, answers)}


def test_measures_equal_a_direct_computation_from_logits(setup):
    answers = setup.answers
    right = np.array([i not in WRONG for i in range(len(PROMPTS))])
    full_logp, full_answer = direct(setup.clean_logits, answers)
    cells = [(repr(p), p, setup.table.for_intervention(p.intervention(setup.n_layers)))
             for p in PLANS]
    measured = {}
    for name, executor in executors(setup.model, answers).items():
        full = executor.clean()
        assert np.array_equal(full.pred_ids == np.array(answers), right), name
        e_full = logprob_error(setup, setup.clean_logits)
        assert np.abs(full.answer_logprobs - full_answer).max() <= e_full, name
        assert full.kl_from_clean is None
        got = dict(executor.run_many(cells))
        for tag, plan, _ in cells:
            what = f"{name} {tag}"
            af1_logits = setup.af1_logits[tag]
            af1_logp, af1_answer = direct(af1_logits, answers)
            e = logprob_error(setup, setup.clean_logits, af1_logits)
            preds = got[tag]
            assert np.abs(preds.answer_logprobs - af1_answer).max() <= e, what
            kl, kl_bound = kl_direct_and_bound(full_logp, af1_logp, e)
            assert np.all(np.isnan(preds.kl_from_clean[~right])), what  # full model wrong
            assert np.all(np.abs(preds.kl_from_clean[right] - kl[right])
                          <= kl_bound[right]), (what, preds.kl_from_clean, kl)
            assert kl[right].max() > 10 * kl_bound[right].max(), what  # AF1 changes something
            measured[(name, tag)] = preds

            # The row's measures: means over the prompts the full model gets right.
            row = score(full, preds, answers, seed=3)
            p_full = np.exp(full.answer_logprobs[right].astype(np.float64))
            p_af1 = np.exp(preds.answer_logprobs[right].astype(np.float64))
            assert row["answer_prob_full"] == pytest.approx(p_full.mean(), rel=1e-12)
            assert row["answer_prob_af1"] == pytest.approx(p_af1.mean(), rel=1e-12)
            assert row["answer_prob_ratio"] == pytest.approx(p_af1.mean() / p_full.mean(),
                                                             rel=1e-12)
            assert row["kl_full_to_af1"] == pytest.approx(
                preds.kl_from_clean[right].astype(np.float64).mean(), rel=1e-12)
            # ... and against the direct values: probabilities within exp(e) - 1 of their own.
            direct_full = np.exp(full_answer[right]).mean()
            direct_af1 = np.exp(af1_answer[right]).mean()
            assert abs(row["answer_prob_full"] - direct_full) <= (np.exp(e) - 1) * direct_full
            assert abs(row["answer_prob_af1"] - direct_af1) <= (np.exp(e) - 1) * direct_af1
            assert abs(row["kl_full_to_af1"] - kl[right].mean()) <= kl_bound[right].mean()
            for field in ("answer_prob_full", "answer_prob_af1", "answer_prob_ratio",
                          "kl_full_to_af1"):
                low, high = row[f"{field}_ci"]
                assert low <= row[field] <= high, field
            assert row["measure_method"] == (f"bootstrap 95%, {BOOTSTRAP_RESAMPLES} resamples "
                                             "over prompts, seed 3")

    # The executors agree with each other within the sum of their bounds to the hooks.
    for tag in (repr(p) for p in PLANS):
        e = logprob_error(setup, setup.clean_logits, setup.af1_logits[tag])
        _, kl_bound = kl_direct_and_bound(full_logp, direct(setup.af1_logits[tag], answers)[0],
                                          e)
        for other in ("nnsight", "remote-local"):
            a, b = measured[("fast", tag)], measured[(other, tag)]
            assert np.abs(a.answer_logprobs - b.answer_logprobs).max() <= 2 * e
            assert np.all(np.abs(a.kl_from_clean - b.kl_from_clean)[right]
                          <= 2 * kl_bound[right])


def test_bootstrap_intervals_equal_resamples_written_out():
    rng = np.random.default_rng(11)
    n = 17
    full_lp = np.log(rng.uniform(0.2, 1.0, n)).astype(np.float32)
    af1_lp = np.log(rng.uniform(0.01, 1.0, n)).astype(np.float32)
    kl = rng.uniform(0, 3, n).astype(np.float32)
    answers = np.arange(n)
    right = np.ones(n, bool)
    right[[2, 9]] = False  # the full model misses two prompts: they do not count
    full = prompt_outcomes(np.where(right, answers, -1), answers, full_lp)
    af1 = prompt_outcomes(answers, answers, af1_lp, kl)
    got = continuous_measures(full, af1, seed=5)
    values = [np.exp(full_lp[right].astype(float)), np.exp(af1_lp[right].astype(float)),
              kl[right].astype(float)]
    draws = np.random.default_rng(5)
    samples = []
    for _ in range(BOOTSTRAP_RESAMPLES):  # one resample of the right prompts at a time
        pick = draws.integers(0, right.sum(), size=right.sum())
        samples.append([v[pick].mean() for v in values])
    samples = np.array(samples)
    ratio = samples[:, 1] / samples[:, 0]
    for field, column in (("answer_prob_full", samples[:, 0]),
                          ("answer_prob_af1", samples[:, 1]), ("answer_prob_ratio", ratio),
                          ("kl_full_to_af1", samples[:, 2])):
        assert got[f"{field}_ci"] == pytest.approx(np.percentile(column, [2.5, 97.5]),
                                                   rel=1e-12), field
    assert got["answer_prob_ratio"] == pytest.approx(values[1].mean() / values[0].mean())
    # Undefined where the full model gets nothing right.
    none = continuous_measures(prompt_outcomes(answers - 1, answers, full_lp), af1, seed=5)
    assert all(none[f] is None and none[f"{f}_ci"] is None for f in
               ("answer_prob_full", "answer_prob_af1", "answer_prob_ratio", "kl_full_to_af1"))


def test_full_scoring_multiplies_probabilities_and_adds_divergences():
    # Prompt 0 has two answer tokens, prompt 1 one: its answer's probability is the product of
    # the teacher-forced tokens' probabilities, its KL the sum over its answer positions.
    answers = np.array([4, 5, 6])
    prompt_of = np.array([0, 0, 1])
    full = prompt_outcomes(answers, answers, np.log([0.5, 0.8, 0.9]), None, prompt_of)
    af1 = prompt_outcomes(answers, answers, np.log([0.25, 0.4, 0.9]), [0.1, 0.2, 0.05],
                          prompt_of)
    got = continuous_measures(full, af1, seed=0)
    assert got["answer_prob_full"] == pytest.approx((0.5 * 0.8 + 0.9) / 2, rel=1e-6)
    assert got["answer_prob_af1"] == pytest.approx((0.25 * 0.4 + 0.9) / 2, rel=1e-6)
    assert got["kl_full_to_af1"] == pytest.approx((0.1 + 0.2 + 0.05) / 2, rel=1e-6)
