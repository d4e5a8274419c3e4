"""Scores: full accuracy, faithfulness and their counts, from two sets of predictions.

``full accuracy`` is the unmodified model's share of right prompts; ``faithfulness`` is the share
of the prompts the full model gets right that AF1 also gets right (the paper's headline metric).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..executors.base import Predictions


def score(full: Predictions, af1: Predictions, answer_ids: Sequence[int]) -> dict:
    """Full accuracy, faithfulness and counts (``faithfulness`` is ``None`` when the full model
    gets nothing right: it is undefined, not zero)."""
    answer_ids = np.asarray(answer_ids)
    full_ok = full.correct(answer_ids)
    af1_ok = af1.correct(answer_ids)
    n_full = int(full_ok.sum())
    n_both = int((full_ok & af1_ok).sum())
    return {
        "faithfulness": n_both / n_full if n_full else None,
        "full_accuracy": n_full / len(answer_ids),
        "af1_accuracy": float(af1_ok.mean()),
        "n_prompts": len(answer_ids),
        "n_full_correct": n_full,
        "n_af1_correct_of_full": n_both,
        "n_af1_correct": int(af1_ok.sum()),
    }
