"""Before anything is sent to NDIF: preflight checks and the dry-run plan.

Preflight answers three questions before expensive work, each with one clear message:
is there an API key, does the client's nnsight match the server's, and is the model hosted and
running on NDIF (else: what is, and which hosted model is closest). The decision
(:func:`preflight_decision`) is a pure function of :class:`NdifAnswers`, so it is tested with
canned answers; :func:`fetch_ndif_answers` is the thin part that asks NDIF.

The dry run (:func:`plan_remote_job`) builds every request the job would send, exactly as it
would be sent (CAMA means replaced by zeros of the same shape and dtype, since the table does not
exist yet), counts its bytes and sends nothing.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import re
from dataclasses import dataclass, field
from typing import Sequence

import torch
from nnsight.schema.request import RequestModel
from nnsight.tracing.backend import Backend

from ...errors import UserError
from ...mechanisms.cama import position_mean_keys, table_keys
from ...mechanisms.plan import AF1Plan, Intervention, as_intervention
from ...mechanisms.traced import CamaLayer
from .audit import audit_request
from .client import DEFAULT_CELLS_PER_REQUEST, format_bytes
from .executor import cells_session, chunk_cells, residual_sums_session
from .transport import encode_result

KEY_URL = "https://login.ndif.us"
STATUS_COMMAND = "python -c 'import nnsight; print(nnsight.status())'"
_DEPLOYED = ("HOT", "WARM")  # NDIF's deployed levels (COLD: downloaded, not loaded)


# -- preflight ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class NdifAnswers:
    """What preflight decides on, as data.

    Attributes:
        api_key_present: ``NDIF_API_KEY`` or nnsight's config holds a key.
        client_version: this process's nnsight version.
        server_env: NDIF's ``/env`` answer (``{"python_version", "packages": {name: version}}``),
            or ``None`` when it could not be fetched.
        status: NDIF's raw ``/status`` answer (``{"deployments": {name: {"repo_id",
            "revision", "deployment_level", "application_state", ...}}}``), or ``None``.
        host: the NDIF URL asked.
        error: why ``status``/``server_env`` are missing, if they are.
    """

    api_key_present: bool
    client_version: str
    server_env: dict | None
    status: dict | None
    host: str
    error: str | None = None


@dataclass
class PreflightResult:
    """``errors`` stop the run (first one first); ``warnings`` are printed and the run goes on."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    deployment: dict | None = None

    @property
    def ok(self) -> bool:
        return not self.errors

    def check(self) -> "PreflightResult":
        """Raise the first error as a :class:`UserError` (one line for ``run.py``)."""
        if self.errors:
            raise UserError(self.errors[0])
        return self


def _deployments(status: dict) -> list[dict]:
    return [d for d in (status or {}).get("deployments", {}).values() if d.get("repo_id")]


def running_models(status: dict) -> list[str]:
    """Repo ids NDIF has deployed and running, sorted."""
    return sorted({d["repo_id"] for d in _deployments(status)
                   if d.get("deployment_level") in _DEPLOYED
                   and d.get("application_state") == "RUNNING"})


def _size(name: str) -> str | None:
    sizes = re.findall(r"(\d+(?:\.\d+)?)b(?![a-z])", name.lower())
    return sizes[-1] if sizes else None


def closest_model(repo_id: str, candidates: Sequence[str]) -> str | None:
    """The candidate most like ``repo_id``: similar name, same parameter count (``8B``), same
    organisation; ``None`` when nothing is close. ``meta-llama/Meta-Llama-3-8B`` ->
    ``meta-llama/Llama-3.1-8B`` rather than the 70B or an instruct variant."""
    org, _, name = repo_id.lower().rpartition("/")

    def score(candidate: str) -> float:
        c_org, _, c_name = candidate.lower().rpartition("/")
        ratio = difflib.SequenceMatcher(None, name, c_name).ratio()
        same_size = _size(name) is not None and _size(name) == _size(c_name)
        return ratio + 0.5 * same_size + 0.1 * (org == c_org)

    ranked = sorted(candidates, key=lambda c: (-score(c), c))
    return ranked[0] if ranked and score(ranked[0]) >= 0.6 else None


def preflight_decision(repo_id: str, answers: NdifAnswers, revision: str | None = None
                       ) -> PreflightResult:
    """Decide whether ``repo_id`` can run on NDIF, from data only (no network).

    Checks, in order: API key; NDIF reachable; client nnsight == server nnsight (NDIF requires
    it; torch/transformers differences are warnings); the model deployed, running and at the
    requested revision.
    """
    result = PreflightResult()
    if not answers.api_key_present:
        result.errors.append(
            f"no NDIF API key: get one at {KEY_URL}, then `export NDIF_API_KEY=<key>` or store "
            "it once with `python -c 'import nnsight; nnsight.login()'`")
        return result
    if answers.status is None and answers.server_env is None:
        result.errors.append(f"cannot reach NDIF at {answers.host}"
                             + (f" ({answers.error})" if answers.error else "")
                             + "; check the network (and NDIF_HOST) or https://discuss.ndif.us")
        return result

    if answers.server_env is None:
        result.warnings.append("could not read NDIF's package versions; nnsight versions "
                               "are unchecked")
    else:
        packages = answers.server_env.get("packages", {})
        server = packages.get("nnsight")
        if server is not None and server != answers.client_version:
            result.errors.append(
                f"nnsight {answers.client_version} here but {server} on NDIF, which requires "
                f"them to match: `pip install nnsight=={server}` (this toolkit pins and is "
                f"tested with {answers.client_version})")
        for name in ("torch", "transformers"):
            local = _version(name)
            remote = packages.get(name)
            if remote is not None and local is not None and remote != local:
                result.warnings.append(f"{name} {local} here, {remote} on NDIF (traces run with "
                                       "NDIF's)")

    if answers.status is None:
        result.errors.append(f"cannot read NDIF's model list ({answers.error or 'no answer'}); "
                             f"check with `{STATUS_COMMAND}`")
        return result
    running = running_models(answers.status)
    matches = [d for d in _deployments(answers.status)
               if d["repo_id"].lower() == repo_id.lower()]
    live = [d for d in matches if d.get("deployment_level") in _DEPLOYED
            and d.get("application_state") == "RUNNING"]
    listing = ", ".join(running) if running else "none"
    if not matches:
        near = closest_model(repo_id, running)
        result.errors.append(
            f"NDIF does not host {repo_id}"
            + (f"; the closest hosted model is {near} (`--model {near}`)" if near else "")
            + f"; running now: {listing} (check with `{STATUS_COMMAND}`)")
    elif not live:
        states = ", ".join(sorted({f"{d.get('deployment_level')}/{d.get('application_state')}"
                                   for d in matches}))
        result.errors.append(f"NDIF hosts {repo_id} but it is not running now ({states}); "
                             f"try again later; running now: {listing}")
    else:
        wanted = revision or "main"
        at_revision = [d for d in live if (d.get("revision") or "main") == wanted]
        if not at_revision:
            served = ", ".join(sorted({d.get("revision") or "main" for d in live}))
            result.errors.append(f"NDIF runs {repo_id} at revision {served}, not {wanted}; "
                                 f"pass --revision {served.split(', ')[0]}")
        else:
            result.deployment = at_revision[0]
    return result


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def fetch_ndif_answers() -> NdifAnswers:
    """Ask NDIF (``/status`` and ``/env``, through nnsight's helpers) what preflight needs.

    Asks nothing when there is no API key: that is the first thing to fix.
    """
    from nnsight import ndif
    from nnsight.schema.config import CONFIG

    present = bool(CONFIG.API.APIKEY)
    client = _version("nnsight") or "unknown"
    if not present:
        return NdifAnswers(False, client, None, None, CONFIG.API.HOST)
    errors = []
    status = ndif.status(raw=True) or None  # nnsight answers {} when NDIF is unreachable
    if status is None:
        errors.append("no answer to /status")
    try:
        env = ndif.get_remote_env()
    except Exception as err:  # noqa: BLE001 - any failure means "could not fetch"
        env = None
        errors.append(f"/env: {err}")
    return NdifAnswers(True, client, env, status, CONFIG.API.HOST, "; ".join(errors) or None)


def preflight(repo_id: str, revision: str | None = None,
              answers: NdifAnswers | None = None) -> PreflightResult:
    """Fetch NDIF's answers (unless given) and raise the first blocking problem as a
    :class:`UserError`; returns the result (its ``warnings`` for the caller to print)."""
    return preflight_decision(repo_id, answers or fetch_ndif_answers(), revision).check()


# -- the dry run ---------------------------------------------------------------------------------


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
                "request")
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
    """Serializes the block as a request would carry it, and runs nothing."""

    blob: bytes = b""

    def __call__(self, tracer) -> None:
        self.blob = RequestModel.serialize(tracer, compress=False)


def _result_bytes(**shapes: tuple[tuple[int, ...], torch.dtype]) -> int:
    """Bytes of a result blob holding tensors of these shapes: their data plus the container
    (measured on empty tensors, so nothing large is built)."""
    empty = {name: torch.zeros(0, dtype=dtype) for name, (_, dtype) in shapes.items()}
    data = sum(torch.Size(shape).numel() * torch.zeros((), dtype=dtype).element_size()
               for shape, dtype in shapes.values())
    return len(encode_result(empty, compress=False)) + data


def plan_remote_job(model, tasks: Sequence[PlannedTask], batch_size: int = 32,
                    cells_per_request: int = DEFAULT_CELLS_PER_REQUEST,
                    cama_batches_per_request: int | None = None) -> RemotePlan:
    """The requests a remote job would send, with their sizes; sends nothing.

    Requests are chunked exactly as :class:`RemoteExecutor` and the remote CAMA runner chunk
    them. Each request is serialized here (so its upload size is the real one before
    compression, to a few bytes of pickling bookkeeping, and it is checked against the server's
    import rules); CAMA means, which do not exist before the table is built, travel as zeros of
    their shape and the model's dtype. Downloads are the sizes of the tensors the request saves
    plus the result container: ``(len(layers), K, D)`` float32 sums for a CAMA build (``K``:
    the data set's CAMA keys), int32 ids and float32 answer logits per prompt and
    configuration.
    """
    n_layers = model.n_layers
    hidden = model.hf.config.get_text_config().hidden_size
    dtype = getattr(torch, model.identity.dtype)
    lm, sites = model.lm, model.sites
    requests: list[PlannedRequest] = []
    for task in tasks:
        encoded = model.encode_batches(list(task.prompts), batch_size)
        encodings = [enc for _, enc in encoded]
        n_prompts = len(task.prompts)
        answers = [torch.zeros(len(indices), dtype=torch.long) for indices, _ in encoded]
        keys, _ = table_keys(encodings)
        clean_pending = task.clean

        def add(kind, label, cells, traces, capture, down):
            requests.append(PlannedRequest(kind, task.label, label, cells, traces,
                                           len(capture.blob), down,
                                           audit_request(capture.blob).violations))

        if task.cama_layers:
            layers = sorted(int(k) for k in task.cama_layers)
            size = cama_batches_per_request or len(encodings)
            for start in range(0, len(encodings), size):
                chunk = list(zip(encodings[start:start + size],
                                 answers[start:start + size] if clean_pending else
                                 [None] * len(encodings[start:start + size])))
                capture = _Capture()
                residual_sums_session(lm, sites, capture, chunk, layers, keys, hidden)
                n = sum(len(enc["input_ids"]) for enc, _ in chunk)
                shapes = {"residual_sums": ((len(layers), len(keys), hidden), torch.float32)}
                if clean_pending:
                    shapes.update(pred_ids=((n,), torch.int32),
                                  answer_logits=((n,), torch.float32))
                add("cama", f"CAMA sums, batches {start + 1}-{start + len(chunk)} of "
                    f"{len(encodings)}", 0, len(chunk), capture, _result_bytes(**shapes))
            clean_pending = False
        batches = list(zip(encodings, answers))
        if clean_pending:
            capture = _Capture()
            cells_session(lm, sites, capture, [(None, None)], batches)
            add("clean", "full model", 1, len(batches), capture,
                _result_bytes(pred_ids=((n_prompts,), torch.int32),
                              answer_logits=((n_prompts,), torch.float32)))
        items = [(None, as_intervention(c, n_layers), None) for c in task.cells]
        placeholders: dict = {}
        shared_keys = {"cama": keys, "position_mean": position_mean_keys(keys)[0]}
        done = 0
        for chunk in chunk_cells(items, cells_per_request):
            cells = []
            for _, intervention, _ in chunk:
                cama = None
                if intervention.needs_table:
                    ident = (intervention.replacement, intervention.replace_layer)
                    if ident not in placeholders:
                        k = shared_keys[intervention.replacement]
                        placeholders[ident] = CamaLayer(intervention.replace_layer, k,
                                                        torch.zeros(len(k), hidden, dtype=dtype),
                                                        intervention.replacement)
                    cama = placeholders[ident]
                cells.append((intervention, cama))
            capture = _Capture()
            cells_session(lm, sites, capture, cells, batches)
            n = len(cells) * n_prompts
            add("cells", f"cells {done + 1}-{done + len(cells)} of {len(items)}", len(cells),
                len(cells) * len(batches), capture,
                _result_bytes(pred_ids=((n,), torch.int32), answer_logits=((n,), torch.float32)))
            done += len(cells)
            placeholders.clear()  # each request uploads its own layers
    return RemotePlan(model.identity.model_id, n_layers, model.identity.dtype, batch_size,
                      cells_per_request, requests)
