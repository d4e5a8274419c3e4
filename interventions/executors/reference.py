"""The reference executor: interventions applied inside nnsight traces, batch by batch.

Greedy scoring (the spec): a prompt is right when the argmax of the last position's logits is the
answer token. :class:`NnsightExecutor` is the ground truth every other executor is tested against.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from ..mechanisms.plan import AF1Plan, Intervention, as_intervention
from ..mechanisms.traced import CamaLayer, apply_intervention, logit_measures
from .base import Predictions


class NnsightExecutor:
    """Evaluates interventions on one data set by applying them inside nnsight traces.

    The reference path: every other executor is tested against it.

    Args:
        model: an :class:`interventions.AF1Model`.
        prompts: the data set's prompts; answer_ids: their answer token ids.
        batch_size: prompts per forward pass (batches hold prompts of equal token length).
        groups: ``(N,)`` CAMA group of each prompt, for a table built with groups (a data set
            of several templates, :func:`tasks.cama_groups`); ``None``: one group.
    """

    name = "nnsight"

    def __init__(self, model, prompts: Sequence[str], answer_ids: Sequence[int],
                 batch_size: int = 32, groups: Sequence[int] | None = None):
        self.model = model
        self.n_prompts = len(prompts)
        self.answer_ids = torch.as_tensor(np.asarray(answer_ids), dtype=torch.long)
        self.groups = None if groups is None else torch.as_tensor(np.asarray(groups))
        self.batches = model.encode_batches(prompts, batch_size)
        self._clean: Predictions | None = None
        self._reference: list | None = None  # per batch: (log-probs (R, V), rows (R,))

    def _run(self, intervention: Intervention | None, cama: CamaLayer | None,
             keep_reference: bool = False) -> Predictions:
        """Every batch in a trace under ``intervention``; the measures come from the last
        position's logits (:func:`logit_measures`, against the clean pass kept by
        :meth:`clean`; ``keep_reference``: this is that pass, keep its distributions)."""
        pred = np.zeros(self.n_prompts, dtype=np.int64)
        logit = np.zeros(self.n_prompts, dtype=np.float32)
        logprob = np.zeros(self.n_prompts, dtype=np.float32)
        kl = None if keep_reference else np.full(self.n_prompts, np.nan, dtype=np.float32)
        lm, sites = self.model.lm, self.model.sites
        kept = []
        with torch.no_grad():
            for b, (indices, enc) in enumerate(self.batches):
                answers = self.answer_ids[indices]
                groups = None if self.groups is None else self.groups[indices]
                with lm.trace(enc):
                    if intervention is not None:
                        apply_intervention(sites, intervention, cama, groups)
                    logits = sites.root.output.logits[:, -1].save()
                reference = (None, None) if keep_reference else self._reference[b]
                ids, ans, lp, divergence = logit_measures(logits, answers, *reference)
                if keep_reference:  # the clean distributions of the prompts it gets right
                    rows = (ids.cpu() == answers).nonzero()[:, 0]
                    kept.append((torch.log_softmax(logits.float(), -1)[rows.to(logits.device)],
                                 rows))
                else:
                    kl[indices] = divergence.cpu().numpy()
                pred[indices] = ids.cpu().numpy()
                logit[indices] = ans.cpu().numpy()
                logprob[indices] = lp.cpu().numpy()
        if keep_reference:
            self._reference = kept
        return Predictions(pred, logit, logprob, kl)

    def clean(self) -> Predictions:
        """Predictions of the unmodified model (computed once; its last-position distributions
        on the prompts it gets right are kept as the reference of every cell's KL)."""
        if self._clean is None:
            self._clean = self._run(None, None, keep_reference=True)
        return self._clean

    def run(self, plan: AF1Plan | Intervention, cama: CamaLayer | None = None) -> Predictions:
        """Predictions under an AF1 plan or a general intervention (``cama``: the table layer
        its residual replacement needs, if any)."""
        self.clean()  # the reference of the KL divergence
        return self._run(as_intervention(plan, self.model.n_layers), cama)

    def run_many(self, cells: Iterable[tuple[Any, AF1Plan | Intervention, CamaLayer | None]]
                 ) -> Iterator[tuple[Any, Predictions]]:
        """Evaluate many cells; yields ``(tag, predictions)`` as each finishes.

        ``cells`` holds ``(tag, plan_or_intervention, cama_layer)``. Executors that share work
        between cells (the fast executor) or group them into requests (remote) override this;
        callers consume results as they come so that finished cells are saved at once.
        """
        for tag, plan, cama in cells:
            yield tag, self.run(plan, cama)
