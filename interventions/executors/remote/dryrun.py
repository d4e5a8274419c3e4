"""The dry run: every request a remote job would send, with its size; nothing is sent.

:func:`plan_remote_job` builds every request exactly as the job would send it (the self-check
first, then per task its CAMA build and cells, split to fit the byte budget as the client
splits them; CAMA means replaced by zeros of the same shape and dtype, since the table does not
exist yet), serializes it, counts its bytes and checks it against the server's import rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from nnsight.schema.request import RequestModel
from nnsight.tracing.backend import Backend

from ...mechanisms.cama import position_mean_keys, table_keys
from ...mechanisms.plan import AF1Plan, Intervention, as_intervention
from ...mechanisms.traced import CamaLayer
from .audit import audit_request
from .client import (DEFAULT_CELLS_PER_REQUEST, DEFAULT_MAX_REQUEST_BYTES, RequestTooLarge,
                     format_bytes)
from .executor import (cells_session, chunk_cells, range_label, residual_sums_session,
                       split_to_fit)
from .selfcheck import CHECKS as SELF_CHECKS
from .selfcheck import send_self_check
from .transport import encode_result


@dataclass
class PlannedTask:
    """One task's share of a job, as the dry run needs it.

    Attributes:
        label: e.g. ``"A+B-calculate"``.
        prompts: the data set's prompts.
        cells: plans or interventions still to evaluate, in order.
        cama_layers: layers of a CAMA table to build on NDIF (empty when the table is cached or
            no cell needs one).
        clean: whether the full model's predictions are needed. They ride on the CAMA request
            when one is built (``RemoteExecutor.cama_runner``), else cost one request.
    """

    label: str
    prompts: Sequence[str]
    cells: Sequence[AF1Plan | Intervention] = ()
    cama_layers: Sequence[int] = ()
    clean: bool = True


@dataclass
class PlannedRequest:
    kind: str
    task: str
    label: str
    cells: int
    traces: int
    bytes_up: int
    bytes_down: int
    violations: list[str] = field(default_factory=list)


@dataclass
class RemotePlan:
    """What a job would send. ``str(plan)`` is the printable ``--dry-run`` output."""

    model: str
    n_layers: int
    dtype: str
    batch_size: int
    cells_per_request: int
    requests: list[PlannedRequest]
    max_request_bytes: int | None = None

    @property
    def bytes_up(self) -> int:
        return sum(r.bytes_up for r in self.requests)

    @property
    def bytes_down(self) -> int:
        return sum(r.bytes_down for r in self.requests)

    def to_dict(self) -> dict:
        return {"model": self.model, "n_requests": len(self.requests),
                "n_cells": sum(r.cells for r in self.requests if r.kind == "cells"),
                "n_traces": sum(r.traces for r in self.requests),
                "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                "requests": [vars(r) for r in self.requests]}

    def __str__(self) -> str:
        head = (f"NDIF dry run: {self.model} ({self.n_layers} layers, {self.dtype}), batches of "
                f"<= {self.batch_size} prompts, <= {self.cells_per_request} configurations per "
                "request" + (f", each <= {format_bytes(self.max_request_bytes)} (split in halves "
                             "until it fits)" if self.max_request_bytes else ""))
        rows = [("#", "kind", "task", "what", "configs", "traces", "up", "down")]
        for i, r in enumerate(self.requests, 1):
            rows.append((str(i), r.kind, r.task, r.label, str(r.cells), str(r.traces),
                         format_bytes(r.bytes_up), format_bytes(r.bytes_down)))
        widths = [max(len(row[j]) for row in rows) for j in range(len(rows[0]))]
        lines = [head] + ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                          for row in rows]
        n_cells = sum(r.cells for r in self.requests if r.kind == "cells")
        lines.append(f"total: {len(self.requests)} requests, {n_cells} configurations, "
                     f"{sum(r.traces for r in self.requests)} forward passes, up "
                     f"{format_bytes(self.bytes_up)}, down {format_bytes(self.bytes_down)}")
        lines.append("bytes: each request serialized here as it would be sent (CAMA means as "
                     "zeros of their shape), before zstd; downloads from the saved tensors' "
                     "sizes")
        violations = sorted({v for r in self.requests for v in r.violations})
        if violations:
            lines.append("server rules: these references would be refused: "
                         + ", ".join(violations))
        lines.append("nothing was sent")
        return "\n".join(lines)


class _Capture(Backend):
    """Serializes the block as a request would carry it, and runs nothing; a request over the
    byte budget raises :class:`RequestTooLarge`, as the client does before sending."""

    def __init__(self, label: str = "request", max_request_bytes: int | None = None):
        self.label = label
        self.max_request_bytes = max_request_bytes
        self.blob = b""

    def __call__(self, tracer) -> None:
        self.blob = RequestModel.serialize(tracer, compress=False)
        if self.max_request_bytes is not None and len(self.blob) > self.max_request_bytes:
            raise RequestTooLarge(self.label, len(self.blob), self.max_request_bytes)


def _result_bytes(**shapes: tuple[tuple[int, ...], torch.dtype]) -> int:
    """Bytes of a result blob holding tensors of these shapes: their data plus the container
    (measured on empty tensors, so nothing large is built)."""
    empty = {name: torch.zeros(0, dtype=dtype) for name, (_, dtype) in shapes.items()}
    data = sum(torch.Size(shape).numel() * torch.zeros((), dtype=dtype).element_size()
               for shape, dtype in shapes.values())
    return len(encode_result({"result": empty}, compress=False)) + data


def plan_remote_job(model, tasks: Sequence[PlannedTask], batch_size: int = 32,
                    cells_per_request: int = DEFAULT_CELLS_PER_REQUEST,
                    cama_batches_per_request: int | None = None,
                    max_request_bytes: int | None = DEFAULT_MAX_REQUEST_BYTES,
                    self_check_prompts: Sequence[str] | None = None) -> RemotePlan:
    """The requests a remote job would send, with their sizes; sends nothing.

    Requests are made exactly as the job makes them: the self-check first (on
    ``self_check_prompts``, when given), then per task its CAMA build and cells, chunked as
    :class:`RemoteExecutor` and the remote CAMA runner chunk them and split in halves until
    each fits ``max_request_bytes``. Each request is serialized here (so its upload size is the
    real one before compression, to a few bytes of pickling bookkeeping, and it is checked
    against the server's import rules); CAMA means, which do not exist before the table is
    built, travel as zeros of their shape and the model's dtype. Downloads are the sizes of the
    tensors the request saves plus the result container: ``(len(layers), K, D)`` float32 sums
    for a CAMA build (``K``: the data set's CAMA keys), int32 ids and float32
    answer logits, log-probabilities and KL per prompt and configuration.
    """
    n_layers = model.n_layers
    hidden = model.hf.config.get_text_config().hidden_size
    dtype = getattr(torch, model.identity.dtype)
    lm, sites = model.lm, model.sites
    requests: list[PlannedRequest] = []

    def capture(label, session, *args) -> _Capture:
        backend = _Capture(label, max_request_bytes)
        session(lm, sites, backend, *args)
        return backend

    def add(kind, task, cells, traces, captured, down):
        requests.append(PlannedRequest(kind, task, captured.label, cells, traces,
                                       len(captured.blob), down,
                                       audit_request(captured.blob).violations))

    if self_check_prompts is not None:
        backend = _Capture("self-check", max_request_bytes)
        send_self_check(model, self_check_prompts, backend)
        add("selfcheck", "-", 0, 4, backend,
            _result_bytes(**{name: ((), torch.float32) for name, *_ in SELF_CHECKS}))
    for task in tasks:
        encoded = model.encode_batches(list(task.prompts), batch_size)
        encodings = [enc for _, enc in encoded]
        n_prompts = len(task.prompts)
        answers = [torch.zeros(len(indices), dtype=torch.long) for indices, _ in encoded]
        keys, _ = table_keys(encodings)
        clean_pending = task.clean

        if task.cama_layers:
            layers = sorted(int(k) for k in task.cama_layers)
            size = cama_batches_per_request or len(encodings)
            batches = list(zip(encodings, answers if clean_pending else [None] * len(encodings)))
            for first in range(0, len(batches), size):
                def send_sums(part, start, first=first):
                    label = range_label("CAMA sums, batches", first + start, len(part),
                                        len(batches))
                    return capture(label, residual_sums_session, part, layers, keys, hidden)

                for part, captured in split_to_fit(batches[first:first + size], send_sums,
                                                   "batch"):
                    n = sum(len(enc["input_ids"]) for enc, _ in part)
                    shapes = {"residual_sums": ((len(layers), len(keys), hidden),
                                                torch.float32)}
                    if clean_pending:
                        shapes.update(pred_ids=((n,), torch.int32),
                                      answer_logits=((n,), torch.float32),
                                      answer_logprobs=((n,), torch.float32))
                    add("cama", task.label, 0, len(part), captured, _result_bytes(**shapes))
            clean_pending = False
        batches = list(zip(encodings, answers))
        if clean_pending:
            captured = capture("full model", cells_session, [(None, None)], batches)
            add("clean", task.label, 1, len(batches), captured,
                _result_bytes(pred_ids=((n_prompts,), torch.int32),
                              answer_logits=((n_prompts,), torch.float32),
                              answer_logprobs=((n_prompts,), torch.float32)))
        items = [(None, as_intervention(c, n_layers), None) for c in task.cells]
        shared_keys = {"cama": keys,
                       "position_mean": position_mean_keys(keys)[0]}
        first = 0
        for chunk in chunk_cells(items, cells_per_request):
            def send_cells(part, start, first=first):
                placeholders: dict = {}  # each request uploads its own layers, once
                cells = []
                for _, intervention, _ in part:
                    cama = None
                    if intervention.needs_table:
                        ident = (intervention.replacement, intervention.replace_layer)
                        if ident not in placeholders:
                            k = shared_keys[intervention.replacement]
                            placeholders[ident] = CamaLayer(
                                intervention.replace_layer, k,
                                torch.zeros(len(k), hidden, dtype=dtype),
                                intervention.replacement)
                        cama = placeholders[ident]
                    cells.append((intervention, cama))
                label = range_label("cells", first + start, len(part), len(items))
                return capture(label, cells_session, cells, batches)

            for part, captured in split_to_fit(chunk, send_cells, "configuration"):
                n = len(part) * n_prompts
                # + a clean pass per batch, the reference of the cells' KL (steps.cell_traces)
                add("cells", task.label, len(part), (len(part) + 1) * len(batches), captured,
                    _result_bytes(pred_ids=((n,), torch.int32),
                                  answer_logits=((n,), torch.float32),
                                  answer_logprobs=((n,), torch.float32),
                                  kl=((n,), torch.float32)))
            first += len(chunk)
    return RemotePlan(model.identity.model_id, n_layers, model.identity.dtype, batch_size,
                      cells_per_request, requests, max_request_bytes)
