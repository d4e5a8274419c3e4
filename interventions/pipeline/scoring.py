"""Scores: full accuracy, faithfulness and their counts, from two sets of predictions.

``full accuracy`` is the unmodified model's share of right prompts; ``faithfulness`` is the share
of the prompts the full model gets right that AF1 also gets right (the paper's headline metric).
Each share comes with its 95% interval, and AF1 is compared with the full model on the same
prompts by the paired (McNemar) test (:mod:`.stats`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..executors.base import Predictions
from .stats import row_intervals


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


def score(full: Predictions, af1: Predictions, answer_ids: Sequence[int],
          prompt_of: np.ndarray | None = None) -> dict:
    """Full accuracy, faithfulness, counts over prompts, 95% intervals and the paired test
    against the full model (``faithfulness`` and its interval are ``None`` when the full model
    gets nothing right: it is undefined, not zero). ``prompt_of``: see
    :func:`correct_per_prompt`."""
    answer_ids = np.asarray(answer_ids)
    full_ok = correct_per_prompt(full.correct(answer_ids), prompt_of)
    af1_ok = correct_per_prompt(af1.correct(answer_ids), prompt_of)
    n_full = int(full_ok.sum())
    n_both = int((full_ok & af1_ok).sum())
    counts = {
        "faithfulness": n_both / n_full if n_full else None,
        "full_accuracy": n_full / len(full_ok),
        "af1_accuracy": float(af1_ok.mean()),
        "n_prompts": len(full_ok),
        "n_full_correct": n_full,
        "n_af1_correct_of_full": n_both,
        "n_af1_correct": int(af1_ok.sum()),
    }
    return {**counts, **row_intervals(counts)}
