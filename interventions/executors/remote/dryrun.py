"""The dry run: the remote executor itself, with a transport that measures and sends nothing.

:func:`measure_remote_job` does a job's remote work (the self-check, then per task its CAMA build,
clean pass and cells) through :class:`~.executor.RemoteExecutor` and :class:`~.client.RemoteClient`
as a run does, so requests are chunked, made and split to the byte budget by the very code that
sends them. Its transport, :class:`MeasuringTransport`, keeps each request's size (serialized as
it is sent, uncompressed) and the references the server's import rules would refuse, and answers
with zeros of the layout the request declares (``saves``, see ``RemoteClient.backend``): a CAMA
table built in a dry run has zero means of the real shape and dtype.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ...mechanisms.cama import build_cama_table
from ...mechanisms.plan import AF1Plan, Intervention, as_intervention, table_layers
from .audit import audit_request
from .client import (DEFAULT_CELLS_PER_REQUEST, DEFAULT_MAX_REQUEST_BYTES, RemoteClient,
                     format_bytes)
from .executor import RemoteExecutor
from .selfcheck import run_self_check


@dataclass
class PlannedTask:
    """One task's share of a job, as the dry run needs it.

    Attributes:
        label: e.g. ``"A+B-calculate"``.
        prompts: the data set's prompts; answer_ids: ``(N,)`` their answer tokens (default:
            zeros: the same bytes); groups: ``(N,)`` CAMA groups, or ``None``.
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
    answer_ids: Sequence[int] | None = None
    groups: Sequence[int] | None = None


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


def encode_result(result: dict) -> bytes:
    """A result blob as the server sends it uncompressed: ``torch.save`` of the saved values."""
    buffer = io.BytesIO()
    torch.save(result, buffer, pickle_protocol=4)
    return buffer.getvalue()


def result_bytes(layout: dict) -> int:
    """Bytes of a result blob holding tensors of ``layout`` (name -> ``(shape, dtype)``): their
    data plus the container (measured on empty tensors, so nothing large is built)."""
    empty = {name: torch.zeros(0, dtype=dtype) for name, (_, dtype) in layout.items()}
    data = sum(torch.Size(shape).numel() * torch.zeros((), dtype=dtype).element_size()
               for shape, dtype in layout.values())
    return len(encode_result({"result": empty})) + data


@dataclass
class Measured:
    """What :class:`MeasuringTransport` saw of one request."""

    task: str
    bytes_down: int
    violations: list[str]


class MeasuringTransport:
    """A transport that sends nothing: it measures each request and answers with zeros of the
    layout the request declares (stride-0 tensors: nothing large travels or is stored).

    ``task`` labels the requests that follow (the caller sets it); ``measured`` holds one
    :class:`Measured` per request, in the order of the client's ``stats.requests``.
    """

    name = "dry-run"
    host = None

    def __init__(self):
        self.task = "-"
        self.measured: list[Measured] = []
        self._layout: dict = {}

    def expect(self, layout: dict | None) -> None:
        """The layout (name -> ``(shape, dtype)``) of the next request's result."""
        self._layout = dict(layout or {})

    def send(self, blob: bytes, compress: bool) -> tuple[bytes, None]:
        if compress:
            raise ValueError("a dry run measures requests uncompressed (compress=False)")
        self.measured.append(Measured(self.task, result_bytes(self._layout),
                                      audit_request(blob).violations))
        zeros = {name: torch.zeros((), dtype=dtype).expand(shape)
                 for name, (shape, dtype) in self._layout.items()}
        return encode_result({"result": zeros}), None


def _zero_sums(model, encodings, layers, keys, progress=True, groups=None) -> torch.Tensor:
    """A CAMA runner without requests: zero sums (a cached table's stand-in in a dry run)."""
    hidden = model.hf.config.get_text_config().hidden_size
    return torch.zeros(len(layers), len(keys), hidden, dtype=torch.float64)


def measure_remote_job(model, tasks: Sequence[PlannedTask], batch_size: int = 32,
                       cells_per_request: int = DEFAULT_CELLS_PER_REQUEST,
                       cama_batches_per_request: int | None = None,
                       max_request_bytes: int | None = DEFAULT_MAX_REQUEST_BYTES,
                       self_check_prompts: Sequence[str] | None = None) -> RemotePlan:
    """The requests a remote job would send, with their sizes; sends nothing.

    The work runs as in a job: the self-check first (on ``self_check_prompts``, when given),
    then per task its CAMA build (``cama_layers``, through ``RemoteExecutor.cama_runner``, which
    also carries the clean predictions), its clean pass (when ``clean`` and not yet carried) and
    its cells (``RemoteExecutor.run_many``), one executor per task label, through a client whose
    transport is a :class:`MeasuringTransport`. Uploads are the requests' real sizes before
    compression; downloads are the sizes of the tensors each request saves plus the result
    container: ``(len(layers), K, D)`` float32 sums for a CAMA build (``K``: the data set's
    CAMA keys), int32 ids and float32 answer logits, log-probabilities and KL per prompt and
    configuration. Cells that need a table no task here builds (a cached one) get a table of
    zeros of its keys, made without a request.
    """
    transport = MeasuringTransport()
    client = RemoteClient(model, transport=transport, compress=False,
                          max_request_bytes=max_request_bytes, log=lambda message: None)
    if self_check_prompts is not None:
        run_self_check(client, model, self_check_prompts)  # answered with zeros: no verdict
    executors: dict[str, RemoteExecutor] = {}
    tables: dict = {}
    for task in tasks:
        transport.task = task.label
        executor = executors.get(task.label)
        if executor is None:
            answers = [0] * len(task.prompts) if task.answer_ids is None else task.answer_ids
            executor = executors[task.label] = RemoteExecutor(
                model, list(task.prompts), answers, batch_size=batch_size,
                cells_per_request=cells_per_request, client=client, groups=task.groups)
        if task.cama_layers:
            tables[task.label] = build_cama_table(
                model, list(task.prompts), "dry run", task.cama_layers, batch_size,
                progress=False, runner=executor.cama_runner(cama_batches_per_request),
                groups=task.groups)
        if task.clean:
            executor.clean()
        interventions = [as_intervention(c, model.n_layers) for c in task.cells]
        needed = table_layers(interventions)
        table = tables.get(task.label)
        if needed and (table is None or not needed <= set(table.layers)):
            table = tables[task.label] = build_cama_table(
                model, list(task.prompts), "dry run", sorted(needed), batch_size,
                progress=False, runner=_zero_sums, groups=task.groups)
        for _ in executor.run_many((None, iv, table.for_intervention(iv) if iv.needs_table
                                    else None) for iv in interventions):
            pass
    requests = [PlannedRequest(r.kind, m.task, r.label, r.cells, r.traces, r.bytes_up,
                               m.bytes_down, m.violations)
                for r, m in zip(client.stats.requests, transport.measured, strict=True)]
    return RemotePlan(model.identity.model_id, model.n_layers, model.identity.dtype, batch_size,
                      cells_per_request, requests, max_request_bytes)
