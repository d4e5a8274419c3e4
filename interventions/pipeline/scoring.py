"""Scores: full accuracy, faithfulness and their counts, and the continuous measures (the
answer's probability, the KL divergence from the full model), from per-row predictions.

``full accuracy`` is the unmodified model's share of right prompts; ``faithfulness`` is the share
of the prompts the full model gets right that AF1 also gets right (the paper's headline metric).
Each share comes with its 95% Wilson interval, and AF1 is compared with the full model on the
same prompts by the paired (McNemar) test (:mod:`.stats`).

**Continuous measures** (every results row; :func:`measure`), on the prompts the full model gets
right, so on the same prompts as faithfulness:

* ``answer_prob_full`` / ``answer_prob_af1``: the mean over those prompts of the probability the
  full model / AF1 gives the answer at the last position (softmax of the last position's
  logits). Under ``--answer full`` a prompt's probability is the product of its teacher-forced
  answer tokens' probabilities (the probability of the whole answer given the prompt).
* ``answer_prob_ratio``: ``answer_prob_af1 / answer_prob_full`` (a ratio of means).
* ``kl_full_to_af1``: the mean of ``KL(full || AF1)`` in nats between the two last-position
  distributions over the vocabulary; under ``--answer full`` a prompt's KL is the sum over its
  teacher-forced answer positions (the chain rule's terms, on the answer's path).

Each has a 95% percentile-bootstrap interval over those prompts (``<name>_ci``; seeded,
:data:`~.stats.BOOTSTRAP_RESAMPLES` resamples, the prompts resampled jointly for all four, named
in ``measure_method``) and is ``None`` where undefined (the full model gets nothing right; a row
of an executor or file that does not record the measure).

**Prompts, not rows.** Under ``--answer full`` a data set has one row per answer token
(``source_row`` names its prompt); every count, paired test and measure here is over prompts.
:class:`DataOutcomes` pairs results rows with the saved data set they were measured on, and
refuses (:class:`PairingError`) rows of another data set or length: nothing is truncated.

Nothing here imports torch (``figures`` uses it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..executors.base import Predictions
from .stats import (bootstrap_means, bootstrap_method, paired, percentile_interval,
                    row_intervals)

# The continuous measures of every results row, each with a ``<name>_ci`` twin.
MEASURES = ("answer_prob_full", "answer_prob_af1", "answer_prob_ratio", "kl_full_to_af1")


class PairingError(ValueError):
    """Results that do not describe the same prompts: rows of another data set (fingerprint)
    or of another length than the data set they are paired with."""


def correct_per_prompt(correct: np.ndarray, prompt_of: np.ndarray | None) -> np.ndarray:
    """``(N,)`` bool: a prompt is right when every row scored for it is right.

    Args:
        correct: ``(R,)`` bool per evaluated row.
        prompt_of: ``(R,)`` the prompt of each row (full answer scoring: one row per answer
            token), or ``None``: one row per prompt.
    """
    if prompt_of is None:
        return correct
    wrong = np.bincount(prompt_of, weights=~correct, minlength=int(prompt_of.max()) + 1)
    return wrong == 0


def sum_per_prompt(values: np.ndarray, prompt_of: np.ndarray | None) -> np.ndarray:
    """``(N,)`` float64: the sum of each prompt's rows of ``values`` ``(R,)`` (NaN when any of
    them is NaN); ``values`` itself when ``prompt_of`` is ``None``."""
    if prompt_of is None:
        return values
    return np.bincount(prompt_of, weights=values, minlength=int(prompt_of.max()) + 1)


def _float_rows(values) -> np.ndarray | None:
    """Per-row measures as float64 of their float32 values (``None`` entries: NaN), so that
    numbers recomputed from a file equal those computed from the executor's arrays."""
    if values is None:
        return None
    array = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    return array.astype(np.float32).astype(np.float64)


def stored(values: np.ndarray | None) -> list | None:
    """Per-row float32 measures as ``results.jsonl`` keeps them: 9 significant digits (which
    give back the same float32), ``None`` for NaN."""
    if values is None:
        return None
    return [None if np.isnan(v) else float(f"{v:.9g}") for v in np.asarray(values, np.float32)]


@dataclass(frozen=True)
class PromptOutcomes:
    """One variant's outcome per prompt (``N`` prompts).

    Attributes:
        ok: ``(N,)`` bool, every answer token right.
        logprob: ``(N,)`` float64 log-probability of the answer (summed over its tokens under
            ``--answer full``), or ``None`` when not recorded.
        kl: ``(N,)`` float64 ``KL(full || this)`` in nats (summed likewise), NaN where not
            measured (the executors measure it where the full model is right), or ``None``.
    """

    ok: np.ndarray
    logprob: np.ndarray | None = None
    kl: np.ndarray | None = None

    def take(self, prompts: np.ndarray) -> "PromptOutcomes":
        """The outcomes of ``prompts`` ``(n,)`` only (indices)."""
        return PromptOutcomes(self.ok[prompts],
                              None if self.logprob is None else self.logprob[prompts],
                              None if self.kl is None else self.kl[prompts])


def prompt_outcomes(pred_ids, answer_ids, logprobs=None, kl=None,
                    prompt_of: np.ndarray | None = None) -> PromptOutcomes:
    """Per-prompt outcomes from per-row predictions (``(R,)`` each; ``logprobs``/``kl`` may be
    ``None``, ``kl`` entries ``None``/NaN where not measured)."""
    pred_ids, answer_ids = np.asarray(pred_ids), np.asarray(answer_ids)
    if pred_ids.shape != answer_ids.shape:
        raise PairingError(f"{len(pred_ids)} predictions for {len(answer_ids)} data-set rows")
    ok = correct_per_prompt(pred_ids == answer_ids, prompt_of)
    rows = [_float_rows(v) for v in (logprobs, kl)]
    for values in rows:
        if values is not None and len(values) != len(answer_ids):
            raise PairingError(f"{len(values)} measures for {len(answer_ids)} data-set rows")
    logprob, divergence = (None if v is None else sum_per_prompt(v, prompt_of) for v in rows)
    return PromptOutcomes(ok, logprob, divergence)


def continuous_measures(full: PromptOutcomes, af1: PromptOutcomes, seed: int) -> dict:
    """The four :data:`MEASURES` with their bootstrap intervals and ``measure_method``, on the
    prompts the full model gets right (see the module docstring)."""
    out = {name: None for name in MEASURES}
    out.update({f"{name}_ci": None for name in MEASURES})
    out["measure_method"] = bootstrap_method(seed)
    right = full.ok
    if not right.any() or full.logprob is None or af1.logprob is None:
        return out
    columns = [np.exp(full.logprob[right]), np.exp(af1.logprob[right])]
    kl = None if af1.kl is None else af1.kl[right]
    has_kl = kl is not None and not np.isnan(kl).any()
    if has_kl:
        columns.append(kl)
    samples = bootstrap_means(columns, seed)
    means = [float(c.mean()) for c in columns]
    out.update(answer_prob_full=means[0], answer_prob_full_ci=percentile_interval(samples[:, 0]),
               answer_prob_af1=means[1], answer_prob_af1_ci=percentile_interval(samples[:, 1]),
               answer_prob_ratio=means[1] / means[0],
               answer_prob_ratio_ci=percentile_interval(samples[:, 1] / samples[:, 0]))
    if has_kl:
        out.update(kl_full_to_af1=means[2], kl_full_to_af1_ci=percentile_interval(samples[:, 2]))
    return out


def measure(full: PromptOutcomes, af1: PromptOutcomes, seed: int = 0,
            prompts: np.ndarray | None = None) -> dict:
    """Every number of a results row, over ``prompts`` (indices; default all): full accuracy,
    faithfulness (``None`` when the full model gets nothing right: undefined, not zero), the
    counts, 95% intervals, the paired test against the full model, and the continuous measures
    (:func:`continuous_measures`, seeded by ``seed``)."""
    if prompts is not None:
        full, af1 = full.take(prompts), af1.take(prompts)
    n_full = int(full.ok.sum())
    n_both = int((full.ok & af1.ok).sum())
    counts = {
        "faithfulness": n_both / n_full if n_full else None,
        "full_accuracy": n_full / len(full.ok) if len(full.ok) else None,
        "af1_accuracy": float(af1.ok.mean()) if len(af1.ok) else None,
        "n_prompts": len(full.ok),
        "n_full_correct": n_full,
        "n_af1_correct_of_full": n_both,
        "n_af1_correct": int(af1.ok.sum()),
    }
    return {**counts, **row_intervals(counts), **continuous_measures(full, af1, seed)}


def score(full: Predictions, af1: Predictions, answer_ids: Sequence[int],
          prompt_of: np.ndarray | None = None, seed: int = 0) -> dict:
    """:func:`measure` of two executors' predictions on one data set (``answer_ids``: ``(R,)``
    per evaluated row; ``prompt_of``: see :func:`correct_per_prompt`)."""
    return measure(prompt_outcomes(full.pred_ids, answer_ids, full.answer_logprobs, None,
                                   prompt_of),
                   prompt_outcomes(af1.pred_ids, answer_ids, af1.answer_logprobs,
                                   af1.kl_from_clean, prompt_of), seed)


class DataOutcomes:
    """The full model on one evaluated data set, to grade and pair results rows with.

    Made from an executor's clean predictions (``TaskRun.outcomes``) or from a saved data set
    (:meth:`from_dataset`); a row is accepted only when it was measured on this data set (its
    ``dataset_fingerprint``) and has one prediction per row of it.

    Attributes:
        fingerprint: the evaluated data set's fingerprint.
        answers: ``(R,)`` answer token per evaluated row; prompt_of: ``(R,)`` its prompt under
            ``--answer full``, else ``None``.
        full: the full model's :class:`PromptOutcomes` (``N`` prompts).
    """

    def __init__(self, fingerprint: str | None, answers, full_pred_ids, full_logprobs=None,
                 prompt_of=None):
        self.fingerprint = fingerprint
        self.answers = np.asarray(answers)
        self.prompt_of = None if prompt_of is None else np.asarray(prompt_of)
        self.full = prompt_outcomes(full_pred_ids, self.answers, full_logprobs, None,
                                    self.prompt_of)

    @classmethod
    def from_dataset(cls, dataset) -> "DataOutcomes":
        """From a data set saved by a run (``data/<name>``: the task columns, ``full_pred_id``
        or ``full_correct``, ``full_answer_logprob`` where recorded, ``source_row`` under
        ``--answer full``); its fingerprint is computed from its content."""
        from tasks import COLUMNS, task_fingerprint

        columns = dataset.column_names
        fingerprint = (task_fingerprint(dataset) if all(c in columns for c in COLUMNS)
                       else None)
        answers = np.asarray(dataset["answer_token_id"])
        if "full_pred_id" in columns:
            full_pred = np.asarray(dataset["full_pred_id"])
        else:  # right where the full model was right, wrong (any other id) elsewhere
            full_pred = np.where(np.asarray(dataset["full_correct"]), answers, -1)
        logprobs = dataset["full_answer_logprob"] if "full_answer_logprob" in columns else None
        prompt_of = dataset["source_row"] if "source_row" in columns else None
        return cls(fingerprint, answers, full_pred, logprobs, prompt_of)

    @property
    def n_rows(self) -> int:
        return len(self.answers)

    @property
    def n_prompts(self) -> int:
        return len(self.full.ok)

    def rows_of(self, prompts) -> list[int]:
        """The evaluated (saved) data set's rows of ``prompts`` (all of each prompt's rows
        under ``--answer full``), ascending."""
        if self.prompt_of is None:
            return sorted(int(p) for p in prompts)
        return np.flatnonzero(np.isin(self.prompt_of, list(prompts))).tolist()

    def check(self, row: dict) -> None:
        """Refuse (:class:`PairingError`) a row measured on another data set or of another
        length; never truncate."""
        theirs = row.get("dataset_fingerprint")
        if self.fingerprint is None or theirs != self.fingerprint:
            ours = self.fingerprint or "of unknown fingerprint: it lacks the task columns"
            raise PairingError(
                f"the {row.get('experiment', 'results')} row of {row.get('task')} was measured "
                f"on data set {theirs}, not on this one ({ours}); results of different data "
                "sets are not paired")
        if len(row["pred_ids"]) != self.n_rows:
            raise PairingError(f"the row of data set {theirs} has {len(row['pred_ids'])} "
                               f"predictions for its {self.n_rows} rows; nothing is truncated")

    def af1(self, row: dict) -> PromptOutcomes:
        """A results row's per-prompt outcomes (checked with :meth:`check`)."""
        self.check(row)
        return prompt_outcomes(row["pred_ids"], self.answers, row.get("answer_logprobs"),
                               row.get("kl_rows"), self.prompt_of)

    def measure(self, row: dict, seed: int = 0, prompts: np.ndarray | None = None) -> dict:
        """:func:`measure` of a results row on this data set (``prompts``: a subset)."""
        return measure(self.full, self.af1(row), seed, prompts)

    def pair(self, first: dict, second: dict, prompts: np.ndarray | None = None) -> dict:
        """The paired test of two rows on the prompts the full model gets right (among
        ``prompts``, default all): ``n_only_first``, ``n_only_second``, ``p_value``."""
        a, b = self.af1(first).ok, self.af1(second).ok
        keep = self.full.ok.copy()
        if prompts is not None:
            keep &= np.isin(np.arange(self.n_prompts), prompts)
        return paired(a[keep].tolist(), b[keep].tolist())
