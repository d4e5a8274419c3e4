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


def score(full: Predictions, af1: Predictions, answer_ids: Sequence[int]) -> dict:
    """Full accuracy, faithfulness, counts, 95% intervals and the paired test against the full
    model (``faithfulness`` and its interval are ``None`` when the full model gets nothing
    right: it is undefined, not zero)."""
    answer_ids = np.asarray(answer_ids)
    full_ok = full.correct(answer_ids)
    af1_ok = af1.correct(answer_ids)
    n_full = int(full_ok.sum())
    n_both = int((full_ok & af1_ok).sum())
    counts = {
        "faithfulness": n_both / n_full if n_full else None,
        "full_accuracy": n_full / len(answer_ids),
        "af1_accuracy": float(af1_ok.mean()),
        "n_prompts": len(answer_ids),
        "n_full_correct": n_full,
        "n_af1_correct_of_full": n_both,
        "n_af1_correct": int(af1_ok.sum()),
    }
    return {**counts, **row_intervals(counts)}
