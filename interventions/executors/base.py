"""What every executor returns, and what an executor is.

An *executor* evaluates interventions on one data set: ``clean()`` gives the unmodified model's
:class:`Predictions`, ``run(plan, cama)`` one cell's, and ``run_many(cells)`` yields
``(tag, predictions)`` for many ``(tag, plan_or_intervention, cama_layer)`` cells, sharing work
where it can. Three implement it: :class:`~interventions.executors.reference.NnsightExecutor`
(inside nnsight traces; the reference path), :class:`~interventions.executors.fast.FastExecutor`
(the plain module, only what the prediction needs) and
:class:`~interventions.executors.remote.executor.RemoteExecutor` (NDIF).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Predictions:
    """Per-prompt greedy predictions, in data-set order.

    Attributes:
        pred_ids: ``(N,)`` int64 argmax token at the last position.
        answer_logits: ``(N,)`` float32 logit of the answer token.
    """

    pred_ids: np.ndarray
    answer_logits: np.ndarray

    def correct(self, answer_ids: np.ndarray) -> np.ndarray:
        return self.pred_ids == answer_ids
