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
        answer_logprobs: ``(N,)`` float32 log-probability of the answer token (log-softmax of
            the last position's logits, computed in float32), or ``None`` where not recorded.
        kl_from_clean: ``(N,)`` float32 ``KL(clean || this)`` in nats between the unmodified
            model's and this pass's last-position distributions, NaN where the clean model's
            prediction is wrong (only its right prompts are graded, so only their clean
            distributions are kept); ``None`` for the clean pass itself.

    Every executor computes the last two in float32 from the same logits as the first two
    (``mechanisms.traced.logit_measures``); on NDIF the clean distribution never leaves the
    server (each request runs the clean pass beside the cells and returns one float per row).
    """

    pred_ids: np.ndarray
    answer_logits: np.ndarray
    answer_logprobs: np.ndarray | None = None
    kl_from_clean: np.ndarray | None = None

    def correct(self, answer_ids: np.ndarray) -> np.ndarray:
        return self.pred_ids == answer_ids
