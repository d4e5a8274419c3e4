"""The fast executor: AF1 without the work the subgraph does not need, on the plain HF module.

:class:`FastExecutor` has the interface of :class:`~.reference.NnsightExecutor` (the
reference path, which stays the ground truth in tests) but calls the decoder layers itself, with
masks, position ids and position embeddings it builds (``ArchAdapter`` knows each architecture's
embeddings, rotary module, final norm, head and cache keyword). It computes only what the
prediction depends on:

* **No wait stage.** When ``h_k`` is replaced (CAMA, position mean, zero), layers ``0..k-1`` do
  not run: the replaced positions are a table look-up, and the sink's clean ``h_k`` comes from
  running every layer once on the sink alone (it attends only to itself in every layer under
  every rule), once per distinct sink token, reused by every cell and batch.
* **All positions only while needed.** From the first layer ``n`` after which the last query
  reads only the sink and itself (``n = L_wait + L_transfer`` for AF1), the other positions can
  no longer reach the prediction, and the sink's state is its clean one: layers ``n..L-1`` run
  on the last token alone, at its original position, with the sink's keys and values (recorded
  in the same sink-alone pass) prepended to its own; the head runs on the last token only.
* **Sharing across cells.** Cells with the same replaced layer and table form a group: layers
  whose all-position inputs and masks are the same for several of its cells run once for all
  (for a fixed ``L_wait`` the transfer stage is shared by every ``L_transfer``; without a
  replacement the clean layers before a cell's first rule are shared). The last tokens of all
  the group's cells and prompts then go through the last-token layers together, each row with
  its own mask, ``batch_size x longest prompt`` rows per layer call (as many tokens as one
  all-position batch).

Every :class:`~interventions.mechanisms.plan.Intervention` (so every :class:`AF1Plan` variant) takes this
path: rules per layer become masks, a replacement becomes the start state. Sliding-window layers
(``ArchAdapter.layer_windows``) get every rule intersected with their window, as the reference
does: in such a layer a last token at position ``>= window`` does not read its sink. The one
exception is a rotary embedding whose frequencies depend on the longest position in a call
(Phi-3's ``longrope`` beyond its original context, ``dynamic``): there one token's rotary is not
its row of the whole prompt's, so with a prompt that long the executor says why in
``fallback_reason`` and evaluates everything through the reference :class:`NnsightExecutor`,
under that executor's name.

Shapes: ``B`` prompts in a batch, ``T`` padded length (left padding), ``N`` prompts, ``D``
hidden size, ``L`` decoder layers, ``R`` last-token rows (cells x prompts), ``S`` distinct sink
tokens, ``H``/``d`` key-value heads and head size, ``V`` vocabulary.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from ..errors import UserError
from ..mechanisms.plan import AF1Plan, Intervention, as_intervention
from ..mechanisms.traced import (CamaLayer, allowed_keys, logit_measures, mask_like,
                                  wait_replacement)
from .base import Predictions
from .reference import NnsightExecutor

UNRESTRICTED = ("all", "all")
# Last-token rows per call of the head: each call holds a few ``(rows, V)`` float32 tensors
# (logits, log-probabilities, the clean ones for the KL), 128 MB each at 256 rows of a
# 128k vocabulary (Llama-3).
HEAD_ROWS = 256


class _KeyValueRecorder:
    """Stands in for a Hugging Face cache in a layer call and keeps each layer's keys and values.

    Attributes:
        keys, values: ``{layer: (B, H, T, d)}`` as the attention computed them (post-rotary).
    """

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.keys[layer_idx] = key_states
        self.values[layer_idx] = value_states
        return key_states, value_states


class _KeyValuePrefix:
    """Stands in for a Hugging Face cache in a layer call: prepends fixed keys and values
    ``(R, H, P, d)`` to the ones the layer computes, so its queries can attend to them."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys = keys
        self.values = values

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return (torch.cat([self.keys.to(key_states.device), key_states], -2),
                torch.cat([self.values.to(value_states.device), value_states], -2))


class _Batch:
    """One left-padded batch of prompts and what every cell reuses on it.

    Attributes:
        indices: ``(B,)`` data-set rows of the prompts, in batch order.
        input_ids, real, positions: ``(B, T)`` ids, real-token mask, positions from the sink.
        rows, sink_col, last_col: ``(B,)`` row numbers and the sink's and last token's columns.
        masks, position_embeddings: reused by every all-position layer call on this batch
            (masks per rule pair and window, position embeddings per layer; filled on first
            use).
    """

    def __init__(self, indices: list[int], encoding: dict, device: torch.device,
                 groups: torch.Tensor | None = None):
        self.indices = torch.tensor(indices, dtype=torch.long)
        self.groups = None if groups is None else groups[self.indices].to(device)
        self.input_ids = encoding["input_ids"].to(device)
        self.real = encoding["attention_mask"].to(device).bool()
        self.positions = encoding["position_ids"].to(device)
        idx = torch.arange(self.real.shape[1], device=device)
        self.rows = torch.arange(len(indices), device=device)
        self.sink_col = self.real.long().argmax(-1)
        self.last_col = (self.real.long() * idx).argmax(-1)
        self.masks: dict[tuple, torch.Tensor] = {}
        self.position_embeddings = None


class _Cell:
    """One distinct intervention within a group, and the tags that asked for it.

    Attributes:
        rules: the rule pair of every layer ``start..L-1`` (``UNRESTRICTED`` where none).
        narrow_at: the first layer from which the last query reads only the sink and itself in
            every later layer (``L`` when it never does): from there on, it runs alone.
        reads_sink: ``(L,)`` bool, whether the last query may read the sink at each layer
            (used from ``narrow_at`` on).
    """

    def __init__(self, intervention: Intervention, start: int, n_layers: int):
        self.intervention = intervention
        self.tags: list[Any] = []
        self.start = start
        self.rules = [intervention.rules.get(k, UNRESTRICTED) for k in range(start, n_layers)]
        narrow_at = n_layers
        while narrow_at > start and self.rules[narrow_at - 1 - start][0] != "all":
            narrow_at -= 1
        self.narrow_at = narrow_at
        self.reads_sink = torch.tensor([k >= start and self.rules[k - start][0] == "sink_self"
                                        for k in range(n_layers)])

    def prefix(self, layer: int) -> tuple:
        """The rules of layers ``start..layer-1``: cells with equal prefixes share ``h_layer``."""
        return tuple(self.rules[:layer - self.start])


class _Group:
    """Cells that start from the same state: the same replaced layer, replacement and table."""

    def __init__(self, start: int, replacement: str | None, cama: CamaLayer | None):
        self.start = start
        self.replacement = replacement
        self.cama = cama
        self.cells: list[_Cell] = []

    def accepts(self, intervention: Intervention, cama: CamaLayer | None) -> bool:
        start = intervention.replace_layer if intervention.replace_layer is not None else 0
        return (start == self.start and intervention.replacement == self.replacement
                and _same_table_layer(cama if intervention.needs_table else None, self.cama))

    def add(self, tag, intervention: Intervention, n_layers: int) -> None:
        for cell in self.cells:
            if cell.intervention == intervention:
                cell.tags.append(tag)
                return
        cell = _Cell(intervention, self.start, n_layers)
        cell.tags.append(tag)
        self.cells.append(cell)


class _LastTokens:
    """The last token of every (cell, prompt) of a group, from where its cell narrows.

    Attributes (``R`` rows, sorted by ``narrow_at`` so the rows a layer runs are a prefix):
        hidden: ``(R, D)`` the residual entering layer ``narrow_at`` (``h_L`` once finished).
        narrow_at: ``(R,)`` the row's cell's ``narrow_at``.
        positions: ``(R,)`` the last token's original position.
        sinks: ``(R,)`` index of the prompt's sink token in the executor's sink tables.
        reads_sink: ``(R, L)`` whether the row may read its sink at each layer.
        cells, prompts: ``(R,)`` cell index in the group and data-set row of the prompt.
    """

    def __init__(self, parts: list[dict]):
        fields = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
        order = torch.argsort(fields["narrow_at"], stable=True)
        for name, value in fields.items():
            setattr(self, name, value[order.to(value.device)])


def _same_table_layer(a: CamaLayer | None, b: CamaLayer | None) -> bool:
    if a is None or b is None:
        return a is b
    return a is b or (a.layer == b.layer and a.kind == b.kind and torch.equal(a.keys, b.keys)
                      and torch.equal(a.means, b.means))


class FastExecutor:
    """Evaluates AF1 plans and interventions by running only the layers and positions the last
    token's prediction depends on (see the module docstring); same interface and results as
    :class:`NnsightExecutor`.

    Args:
        model: an :class:`interventions.AF1Model` (eval mode).
        prompts: the data set's prompts; answer_ids: their answer token ids.
        batch_size: prompts per all-position forward pass (prompts are sorted by token length
            and cut into batches, left padded where lengths differ); a last-token layer call
            takes up to ``batch_size x longest prompt`` rows.
        groups: ``(N,)`` CAMA group of each prompt (see :class:`NnsightExecutor`).

    Attributes:
        fallback_reason: ``None``, or why every call goes to the reference executor instead.
        name: ``"fast"``, or the reference executor's name while falling back.
    """

    name = "fast"

    def __init__(self, model, prompts: Sequence[str], answer_ids: Sequence[int],
                 batch_size: int = 32, groups: Sequence[int] | None = None):
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        if model.hf.training:
            raise ValueError("FastExecutor needs the model in eval mode (dropout off)")
        self.model = model
        self.hf = model.hf
        self.adapter = model.adapter
        self.n_layers = model.n_layers
        self.layers = self.adapter.layer_modules(self.hf)
        self.n_prompts = len(prompts)
        self.answer_ids = torch.as_tensor(np.asarray(answer_ids), dtype=torch.long)
        self.device = model.device
        self.dtype = next(self.hf.parameters()).dtype
        self.attn_implementation = model.identity.attn_implementation
        # Clean sink states, keys and values: row i of each is the token self._sink_tokens[i].
        self._sink_tokens: dict[int, int] = {}
        self._sink_states = self._sink_keys = self._sink_values = None
        # The clean pass, and the reference of every cell's KL divergence: the clean
        # last-position log-probabilities (n_right, V) of the prompts it gets right, and each
        # prompt's row among them (N,) (-1: none kept).
        self._clean: Predictions | None = None
        self._reference_logprobs: torch.Tensor | None = None
        self._reference_index: torch.Tensor | None = None

        lengths = model.token_lengths(prompts)
        self.windows = self.adapter.layer_windows(self.hf.config, self.n_layers)
        self.fallback_reason = None
        limit = self.adapter.rotary_length_limit(self.hf)
        if limit is not None and max(lengths) > limit:
            self.fallback_reason = (
                f"the rotary embedding changes its frequencies for prompts longer than {limit} "
                f"tokens (the longest here has {max(lengths)}), so a token run alone would not "
                f"get the rotary it gets in its prompt")
            self._reference = NnsightExecutor(model, prompts, answer_ids, batch_size, groups)
            self.name = self._reference.name
            return
        order = sorted(range(self.n_prompts), key=lambda i: (lengths[i], i))
        groups = None if groups is None else torch.as_tensor(np.asarray(groups))
        self.batches = []
        for first in range(0, self.n_prompts, batch_size):
            indices = order[first:first + batch_size]
            encoding = model.encode([prompts[i] for i in indices])
            self.batches.append(_Batch(indices, encoding, self.device, groups))
        self.rows_per_call = batch_size * max(lengths)

    # -- the executor interface ------------------------------------------------------------

    def clean(self) -> Predictions:
        """Predictions of the unmodified model (computed once; its last-position distributions
        on the prompts it gets right are kept as the reference of every cell's KL)."""
        if self.fallback_reason:
            return self._reference.clean()
        if self._clean is None:
            with torch.no_grad():
                group = self._groups([(None, Intervention({}), None)])[0]
                pred, answer, logprob, _ = self._evaluate(group, keep_reference=True)
            self._clean = Predictions(pred[0], answer[0], logprob[0])
        return self._clean

    def run(self, plan: AF1Plan | Intervention, cama: CamaLayer | None = None) -> Predictions:
        """Predictions under an AF1 plan or a general intervention (``cama``: the table layer
        its residual replacement needs, if any)."""
        return next(self.run_many([(None, plan, cama)]))[1]

    def run_many(self, cells: Iterable[tuple[Any, AF1Plan | Intervention, CamaLayer | None]]
                 ) -> Iterator[tuple[Any, Predictions]]:
        """Evaluate many cells, sharing work between them; yields ``(tag, predictions)``.

        ``cells`` holds ``(tag, plan_or_intervention, cama_layer)``. Cells are grouped by the
        layer they replace and its table (for AF1: by ``L_wait``); a group's cells are yielded
        together when the group is done, groups in the order of their first cell. Every plan is
        checked against the model before anything runs.
        """
        if self.fallback_reason:
            yield from self._reference.run_many(cells)
            return
        groups = self._groups(cells)
        self.clean()  # the reference of the KL divergence
        for group in groups:
            with torch.no_grad():
                pred, answer, logprob, kl = self._evaluate(group)
            for i, cell in enumerate(group.cells):
                for tag in cell.tags:
                    yield tag, Predictions(pred[i].copy(), answer[i].copy(), logprob[i].copy(),
                                           kl[i].copy())

    def last_logits(self, plan: AF1Plan | Intervention, cama: CamaLayer | None = None
                    ) -> torch.Tensor:
        """Last-position logits ``(N, V)`` float32 in data-set order (for exactness checks;
        :meth:`run` keeps only the argmax and the answer's logit)."""
        if self.fallback_reason:
            raise NotImplementedError(f"no fast path on this model: {self.fallback_reason}")
        with torch.no_grad():
            group = self._groups([(None, plan, cama)])[0]
            return self._evaluate(group, keep_logits=True)[0][0]

    # -- evaluating one group --------------------------------------------------------------

    def _groups(self, cells) -> list[_Group]:
        """Cells grouped by the state they start from, in the order of their first cell."""
        groups: list[_Group] = []
        for tag, plan, cama in cells:
            intervention = as_intervention(plan, self.n_layers)
            group = next((g for g in groups if g.accepts(intervention, cama)), None)
            if group is None:
                start = intervention.replace_layer
                group = _Group(0 if start is None else start, intervention.replacement,
                               cama if intervention.needs_table else None)
                groups.append(group)
            group.add(tag, intervention, self.n_layers)
        return groups

    def _evaluate(self, group: _Group, keep_logits: bool = False,
                  keep_reference: bool = False):
        """Every cell of ``group`` on every prompt.

        Returns ``(pred_ids, answer_logits, answer_logprobs, kl_from_clean)``, numpy
        ``(n_cells, N)`` each (:class:`Predictions`; the KL against the kept clean pass, NaN
        where there is none), or with ``keep_logits`` the float32 logits ``(n_cells, N, V)`` as
        a one-tuple. ``keep_reference``: ``group`` is the clean pass; keep the log-probabilities
        of the prompts it gets right as the reference of later cells' KL.
        """
        n_cells = len(group.cells)
        rows = _LastTokens([part for batch in self.batches
                            for part in self._all_positions(group, batch)])
        self._last_token_layers(rows)
        logits = None
        pred = np.zeros((n_cells, self.n_prompts), dtype=np.int64)
        answer = np.zeros((n_cells, self.n_prompts), dtype=np.float32)
        logprob = np.zeros((n_cells, self.n_prompts), dtype=np.float32)
        kl = np.full((n_cells, self.n_prompts), np.nan, dtype=np.float32)
        kept = []
        step = min(self.rows_per_call, HEAD_ROWS)
        for first in range(0, len(rows.hidden), step):
            chunk = slice(first, first + step)
            out = self.adapter.logits(self.hf, rows.hidden[chunk]).float()  # (r, V)
            cells, prompts = rows.cells[chunk], rows.prompts[chunk]
            if keep_logits:
                if logits is None:
                    logits = torch.zeros(n_cells, self.n_prompts, out.shape[-1])
                logits[cells, prompts] = out.cpu()
                continue
            answers = self.answer_ids[prompts]
            reference, reference_rows = None, None
            if not keep_reference:
                index = self._reference_index[prompts]
                reference_rows = (index >= 0).nonzero()[:, 0]
                reference = self._reference_logprobs[index[reference_rows].to(self.device)]
            ids, ans, lp, divergence = logit_measures(out, answers, reference, reference_rows)
            cells, prompts = cells.numpy(), prompts.numpy()
            pred[cells, prompts] = ids.cpu().numpy()
            answer[cells, prompts] = ans.cpu().numpy()
            logprob[cells, prompts] = lp.cpu().numpy()
            if divergence is not None:
                kl[cells, prompts] = divergence.cpu().numpy()
            if keep_reference:
                right = (ids.cpu() == answers).nonzero()[:, 0]
                kept.append((prompts[right.numpy()],
                             torch.log_softmax(out, -1)[right.to(out.device)]))
        if keep_logits:
            return (logits,)
        if keep_reference:
            self._reference_index = torch.full((self.n_prompts,), -1, dtype=torch.long)
            self._reference_index[torch.as_tensor(np.concatenate([p for p, _ in kept]))] = \
                torch.arange(sum(len(p) for p, _ in kept))
            self._reference_logprobs = torch.cat([lp for _, lp in kept])
        return pred, answer, logprob, kl

    def _all_positions(self, group: _Group, batch: _Batch) -> list[dict]:
        """Run the group's all-position layers on one batch; the last tokens where each cell
        narrows, as parts of :class:`_LastTokens`.

        ``nodes`` holds the all-position states ``(B, T, D)`` still needed, keyed by the rules
        that made them: cells whose rules agree so far share one.
        """
        sinks = self._sink_index(batch.input_ids[batch.rows, batch.sink_col])
        last_positions = batch.positions[batch.rows, batch.last_col]
        nodes = {(): self._start_state(group, batch, sinks)}
        parts = []
        for k in range(group.start, self.n_layers + 1):
            for i, cell in enumerate(group.cells):
                if cell.narrow_at == k:
                    parts.append({
                        "hidden": nodes[cell.prefix(k)][batch.rows, batch.last_col],
                        "narrow_at": torch.full((len(batch.rows),), k),
                        "positions": last_positions,
                        "sinks": sinks,
                        # The last token never reads itself as the sink (one-token prompts).
                        "reads_sink": cell.reads_sink[None].to(self.device)
                        & (last_positions > 0)[:, None],
                        "cells": torch.full((len(batch.rows),), i),
                        "prompts": batch.indices,
                    })
            waiting = [cell for cell in group.cells if cell.narrow_at > k]
            if not waiting:
                break
            advanced = {}
            for cell in waiting:
                key = cell.prefix(k)
                rule = cell.rules[k - group.start]
                if key + (rule,) not in advanced:
                    advanced[key + (rule,)] = self._full_layer(k, nodes[key], rule, batch)
            nodes = advanced
        return parts

    def _start_state(self, group: _Group, batch: _Batch, sinks: torch.Tensor) -> torch.Tensor:
        """``h_start`` ``(B, T, D)``: the embeddings, or the replacement at every real non-sink
        position with the sink's clean state (padding stays zero; no real query reads it)."""
        if group.replacement is None:
            return self.adapter.embed(self.hf, batch.input_ids, batch.positions)
        intervention = Intervention({}, group.start, group.replacement)
        values, where = wait_replacement(intervention, group.cama, batch.input_ids, batch.real,
                                         batch.positions, batch.groups)
        h = torch.zeros(*batch.input_ids.shape, self._sink_states.shape[-1], dtype=self.dtype,
                        device=self.device)
        h[batch.rows, batch.sink_col] = self._sink_states[sinks, group.start]
        return torch.where(where[..., None], values.to(h.device, h.dtype), h)

    def _full_layer(self, k: int, h: torch.Tensor, rule: tuple[str, str],
                    batch: _Batch) -> torch.Tensor:
        """Layer ``k`` over every position under one rule pair: ``(B, T, D)`` -> ``(B, T, D)``."""
        key = (rule, self.windows[k])
        if key not in batch.masks:
            batch.masks[key] = mask_like(allowed_keys(batch.real, *rule, self.windows[k]), None,
                                         self.attn_implementation, self.dtype)
        if batch.position_embeddings is None:
            batch.position_embeddings = self.adapter.position_embeddings(self.hf, h,
                                                                         batch.positions)
        return self.adapter.call_layer(self.layers[k], h, batch.masks[key], batch.positions,
                                       batch.position_embeddings[k])

    def _last_token_layers(self, rows: _LastTokens) -> None:
        """Run every row from its ``narrow_at`` through the last layer, in place: each last
        token alone, with its sink's keys and values prepended (it reads them where its rule
        says ``sink_self`` and the sink is inside the layer's window), in calls of up to
        ``rows_per_call`` rows."""
        for k in range(int(rows.narrow_at.min()), self.n_layers):
            active = int((rows.narrow_at <= k).sum())  # rows are sorted by narrow_at
            window = self.windows[k]
            for first in range(0, active, self.rows_per_call):
                chunk = slice(first, min(first + self.rows_per_call, active))
                hidden = rows.hidden[chunk, None]  # (r, 1, D)
                positions = rows.positions[chunk, None]  # (r, 1)
                sinks = rows.sinks[chunk]
                reads_sink = rows.reads_sink[chunk, k]
                if window is not None:  # the sink (position 0) is inside the window
                    reads_sink = reads_sink & (rows.positions[chunk] < window)
                allow = torch.stack([reads_sink, torch.ones_like(reads_sink)], -1)  # sink, self
                mask = mask_like(allow[:, None, None, :], None, self.attn_implementation,
                                 self.dtype)
                prefix = _KeyValuePrefix(self._sink_keys[sinks, k], self._sink_values[sinks, k])
                rotary = self.adapter.position_embeddings(self.hf, hidden, positions)[k]
                out = self.adapter.call_layer(self.layers[k], hidden, mask, positions, rotary,
                                              cache=prefix)
                rows.hidden[chunk] = out[:, 0].to(rows.hidden.device)

    # -- the sinks -------------------------------------------------------------------------

    def _sink_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """Rows ``(B,)`` of the sink tokens ``(B,)`` in the sink tables, computing the missing
        ones: ``_sink_states (S, L+1, D)`` holds ``h_0..h_L`` and ``_sink_keys`` /
        ``_sink_values (S, L, H, 1, d)`` each layer's keys and values of the token run alone at
        position 0 (which is how a sink runs inside any prompt: it attends only to itself)."""
        missing = sorted({int(t) for t in tokens.tolist()} - set(self._sink_tokens))
        if missing:
            ids = torch.tensor(missing, device=self.device)[:, None]  # (s, 1)
            positions = torch.zeros_like(ids)
            h = self.adapter.embed(self.hf, ids, positions)
            rotary = self.adapter.position_embeddings(self.hf, h, positions)
            mask = mask_like(torch.ones(len(missing), 1, 1, 1, dtype=torch.bool,
                                        device=self.device),
                             None, self.attn_implementation, self.dtype)
            recorder = _KeyValueRecorder()
            states = [h[:, 0]]
            for k, layer in enumerate(self.layers):
                h = self.adapter.call_layer(layer, h, mask, positions, rotary[k],
                                            cache=recorder)
                states.append(h[:, 0].to(self.device))
            new = (torch.stack(states, 1),
                   torch.stack([recorder.keys[k].to(self.device)
                                for k in range(self.n_layers)], 1),
                   torch.stack([recorder.values[k].to(self.device)
                                for k in range(self.n_layers)], 1))
            if self._sink_states is None:
                self._sink_states, self._sink_keys, self._sink_values = new
            else:
                self._sink_states, self._sink_keys, self._sink_values = (
                    torch.cat([old, part]) for old, part in
                    zip((self._sink_states, self._sink_keys, self._sink_values), new))
            for token in missing:
                self._sink_tokens[token] = len(self._sink_tokens)
        return torch.tensor([self._sink_tokens[int(t)] for t in tokens.tolist()],
                            device=self.device)
