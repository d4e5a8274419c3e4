"""AF1 on NDIF: session requests, reductions on the server, retries, byte accounting.

NDIF runs nnsight traces on models it hosts (Llama-3.1-70B, 405B, ...). What travels is the
source of a ``with`` block plus the values it references; what comes back is only what the block
``.save()``\\ s. This module packs AF1's work into few, small requests:

* **Sessions.** :class:`RemoteExecutor` sends a chunk of ``cells_per_request`` configurations x
  every prompt batch as ONE ``model.session()`` request (one queue wait), not one per trace.
* **Reductions where the activations are.** Evaluation saves the argmax id and the answer's logit
  per prompt (never logits); the CAMA build (:meth:`RemoteClient.cama_runner`) accumulates the
  grouped float64 sums on the server and downloads only the sums.
* **Uploads.** Each CAMA layer a chunk needs is uploaded once per request, in the model's dtype,
  as its own tensor (a view of the table would pickle the whole table's storage).
* **Faults.** Network errors, job errors and time-outs are retried with bounded exponential
  backoff; with a ``ledger`` directory finished results and job ids are kept on disk, so a
  rerun resumes, and requests can be submitted without waiting and collected later.
* **Accounting.** Bytes up (the serialized request) and down (the result blob as received) per
  request, in :class:`RemoteStats`, for the manifest.

``backend="local"`` runs every request through the same client path, but the "server" is this
process: the request is serialized exactly as for NDIF, deserialized with the project's modules
hidden (nnsight's ``remote="local"`` rule), executed in a fresh thread the way NDIF's worker does
(saves collected from the block's frame) and its result encoded as NDIF encodes it. This is the
offline test of everything here.

Server rules (see :func:`audit_request`): code that runs inside a trace may import only
:data:`PERMITTED_MODULES`; the request itself references nnsight's own runtime
(:data:`RUNTIME_MODULES`). NDIF runs models in bfloat16 with ``device_map="auto"`` and requires
the client's nnsight version to equal the server's (``interventions.preflight``).
"""

from __future__ import annotations

import ast
import concurrent.futures
import hashlib
import importlib.abc
import io
import json
import linecache
import os
import pickletools
import sys
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from nnsight.intervention.backends.remote import RemoteBackend, RemoteError
from nnsight.schema.config import CONFIG
from nnsight.schema.request import RequestModel
from nnsight.tracing.backend import Backend

from .errors import UserError
from .evaluate import Predictions
from .plan import AF1Plan, Intervention, as_intervention
from .traced import CamaLayer, accumulate_residuals, apply_intervention, last_token_predictions

DEFAULT_CELLS_PER_REQUEST = 32
DEFAULT_MAX_RETRIES = 3
DEFAULT_BACKOFF_S = 2.0
DEFAULT_MAX_BACKOFF_S = 60.0
DEFAULT_POLL_INTERVAL_S = 3.0

# What code running inside a trace may import on NDIF (all in NDIF's execution whitelist;
# ``_operator`` is the C half of ``operator``).
PERMITTED_MODULES = ("torch", "numpy", "math", "einops", "collections", "typing", "operator",
                     "_operator")
# What nnsight's own request format needs to be rebuilt, whatever the trace does. Every entry is
# in NDIF's deserialization whitelist: ``builtins`` and ``copyreg`` (pickle's reconstructors),
# ``cloudpickle`` (classes and modules shipped by value), and the nnsight modules a request names:
# the tracer and its frame stand-in, the source-based function loader, the envoys of the model,
# and ``nnsight.intervention.interleaver`` (``traced._invoke_rows`` reads the running
# ``Mediator``; NDIF lists that module for deserialization, and it is resolved there, not
# imported by the trace). ``_codecs`` is not needed: requests use pickle protocol 4.
RUNTIME_MODULES = ("builtins", "copyreg", "cloudpickle", "nnsight.tracing",
                   "nnsight.intervention.serialization", "nnsight.intervention.envoy",
                   "nnsight.intervention.interleaver", "nnsight.modeling")


class RemoteRunError(UserError):
    """A remote request failed after its retries (network, NDIF job error or time-out)."""


class RequestTimeout(TimeoutError):
    """A submitted job did not finish within the client's ``timeout_s``."""


# -- byte accounting --------------------------------------------------------------------------


@dataclass
class RequestRecord:
    """One request as sent (or as reused from the ledger)."""

    kind: str  # "cama", "clean", "cells", or a caller's name
    label: str
    cells: int  # configurations evaluated (0 for a CAMA build)
    traces: int  # forward passes on the server
    bytes_up: int  # serialized request, times the uploads it took
    bytes_down: int  # result blob as received
    attempts: int
    seconds: float
    job_id: str | None
    reused: bool = False  # result taken from the ledger: nothing was sent


@dataclass
class RemoteStats:
    """What the remote requests of a job cost. ``to_dict()`` goes into the manifest."""

    backend: str
    host: str | None
    compress: bool
    model_key: str | None = None  # the deployment NDIF was asked for (repo, revision, task)
    requests: list[RequestRecord] = field(default_factory=list)

    def to_dict(self) -> dict:
        sent = [r for r in self.requests if not r.reused]
        return {
            "backend": self.backend, "host": self.host, "compress": self.compress,
            "model_key": self.model_key,
            "n_requests": len(sent), "n_reused": len(self.requests) - len(sent),
            "n_attempts": sum(r.attempts for r in sent),
            "bytes_up": sum(r.bytes_up for r in sent),
            "bytes_down": sum(r.bytes_down for r in sent),
            "seconds": round(sum(r.seconds for r in sent), 3),
            "requests": [asdict(r) for r in self.requests],
        }


def format_bytes(n: float) -> str:
    """``1234567`` -> ``"1.2 MB"`` (decimal units, as network sizes are given)."""
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("kB", "MB", "GB"):
        n /= 1000
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}"


# -- results as NDIF sends them -----------------------------------------------------------------


def encode_result(result: dict, compress: bool) -> bytes:
    """The saved values as the server sends them: ``torch.save`` bytes, zstd when ``compress``."""
    buffer = io.BytesIO()
    torch.save(result, buffer, pickle_protocol=4)
    content = buffer.getvalue()
    if compress:
        import zstandard

        content = zstandard.ZstdCompressor(level=6).compress(content)
    return content


def decode_result(content: bytes, compress: bool) -> dict:
    """Inverse of :func:`encode_result` (what nnsight's ``RemoteBackend.finalize`` does)."""
    if compress:
        import zstandard

        content = zstandard.ZstdDecompressor().decompress(content)
    return torch.load(io.BytesIO(content), map_location="cpu", weights_only=False)


# -- transports: where a serialized request goes ------------------------------------------------
#
# A transport moves bytes: ``send(blob, compress) -> (content, job_id)`` waits for the result,
# ``submit(blob, compress) -> job_id`` does not, ``poll(job_id, compress) -> content | None``
# collects a submitted job. ``content`` is the result blob as received (see encode_result).


def _installed(path: str | None) -> bool:
    """Whether a module file belongs to an installed package (or is built in)."""
    return path is None or "site-packages" in path or "dist-packages" in path or \
        path.startswith(sys.base_prefix)


class _Refuse(importlib.abc.MetaPathFinder):
    """Makes the named top-level packages unimportable while it is on ``sys.meta_path``."""

    def __init__(self, roots: set[str]):
        self.roots = roots

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.roots:
            raise ModuleNotFoundError(f"No module named {name!r} (not on the server)", name=name)
        return None


def execute_request(lm, blob: bytes, compress: bool) -> dict:
    """Run a serialized request against ``lm`` the way an NDIF worker does; return the saves.

    Deserializes with the caller's non-installed modules hidden (nnsight's ``remote="local"``
    rule: code not shipped by value fails here as it would on the server), executes the block
    against the deserialized frame and returns the values it saved. Call it in a fresh thread:
    nnsight keeps its save set and trace depth per thread, as a server process does.
    """
    from nnsight.intervention.backends.local import LocalSimulationBackend
    from nnsight.tracing.globals import BLOCKS, SOURCES
    from nnsight.tracing.tracer import _saves, dec, inc

    # As NDIF's worker does per request: deserializing registers the block's source under the
    # client's filename and nested traces memoize what they parse, so confine both to this
    # request (a later request from the same file would otherwise read this one's source).
    snapshot = dict(linecache.cache), dict(SOURCES), dict(BLOCKS)
    hider = LocalSimulationBackend(lm)  # its own hiding rule (pinned nnsight)
    hidden = hider._hide_local_modules()
    # An editable install would import hidden project code again through its own finder:
    # refuse what was hidden from outside the installed packages, as a server cannot import it.
    refuse = _Refuse({name.split(".")[0] for name, module in hidden["modules"].items()
                      if not _installed(getattr(module, "__file__", None))})
    sys.meta_path.insert(0, refuse)
    try:
        tracer = RequestModel.deserialize(blob, lm._remoteable_persistent_objects(), compress)
    finally:
        sys.meta_path.remove(refuse)
        hider._restore(hidden)
    try:
        frame = tracer.info.frame
        # A server has never read the client's file: nested traces must be found in the
        # shipped (re-formatted) source, not in this process's reading of the file.
        filename = frame.f_code.co_filename
        SOURCES.pop(filename, None)
        for key in [k for k in BLOCKS if k[0] == filename]:
            del BLOCKS[key]
        inc()
        try:
            with torch.no_grad():
                tracer.execute(tracer.info.code)
            saved = _saves()
            return {name: value for name, value in frame.f_locals.items() if id(value) in saved}
        finally:
            dec()
    finally:
        for cache, saved_state in zip((linecache.cache, SOURCES, BLOCKS), snapshot):
            cache.clear()
            cache.update(saved_state)


class LocalTransport:
    """The server is this process: :func:`execute_request` on ``server_lm``, in a fresh thread.

    Args:
        server_lm: an nnsight ``TransformersModel`` with weights (the model NDIF would hold).
    """

    name = "local"
    host = None

    def __init__(self, server_lm):
        self.server_lm = server_lm
        self._jobs: dict[str, bytes] = {}

    @classmethod
    def for_model(cls, model) -> "LocalTransport":
        """A local server for an :class:`AF1Model`: the model itself when it has weights, else
        (a model from :func:`load_remote_model`) the same checkpoint loaded with weights."""
        if next(model.hf.parameters()).device.type != "meta":
            return cls(model.lm)
        from nnsight.modeling.transformers import TransformersModel
        from transformers import AutoTokenizer

        lm = model.lm
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server = TransformersModel(
                lm.repo_id, revision=lm.revision, task="text-generation",
                tokenizer=AutoTokenizer.from_pretrained(lm.repo_id, revision=lm.revision),
                dispatch=True, dtype=getattr(torch, model.identity.dtype),
                attn_implementation=model.identity.attn_implementation)
        return cls(server)

    def _run(self, blob: bytes, compress: bool) -> bytes:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            result = pool.submit(execute_request, self.server_lm, blob, compress).result()
        return encode_result(result, compress)

    def send(self, blob: bytes, compress: bool) -> tuple[bytes, str | None]:
        return self._run(blob, compress), None

    def submit(self, blob: bytes, compress: bool) -> str:
        job_id = f"local-{uuid.uuid4().hex}"
        self._jobs[job_id] = self._run(blob, compress)
        return job_id

    def poll(self, job_id: str, compress: bool) -> bytes | None:
        if job_id not in self._jobs:
            raise RemoteError(f"job {job_id} is unknown to this local server")
        return self._jobs.pop(job_id)


class _BlobBackend(RemoteBackend):
    """nnsight's RemoteBackend, sending an already serialized request and keeping the raw
    result bytes (for the byte count and the ledger) and the job id of a blocking request."""

    def __init__(self, blob: bytes, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.blob = blob
        self.content: bytes | None = None

    def _serialize(self, tracer) -> bytes:
        return self.blob

    def send(self, request: RequestModel, blob: bytes):
        response = self._post(request, blob)
        self.job_id = response.id
        return self.handle(response)

    def finalize(self, content: bytes):
        self.content = content
        return super().finalize(content)


class NdifTransport:
    """NDIF through nnsight's own ``RemoteBackend`` (websocket when blocking, HTTP polling when
    not). The model key (repo id, revision, task; canonicalized on the Hub) is made on first use.

    Args:
        lm: the nnsight model (usually meta, from :func:`load_remote_model`).
        host: NDIF URL (default: nnsight's config, ``NDIF_HOST``).
        api_key: default: nnsight's config (``NDIF_API_KEY`` or ``nnsight.login()``).
    """

    name = "ndif"

    def __init__(self, lm, host: str | None = None, api_key: str | None = None):
        self.lm = lm
        self.host = host or CONFIG.API.HOST
        self.api_key = api_key
        self._model_key: str | None = None

    @property
    def model_key(self) -> str:
        if self._model_key is None:
            self._model_key = self.lm.to_model_key()
        return self._model_key

    def _backend(self, blob: bytes, compress: bool, job_id: str | None = None,
                 blocking: bool = True) -> _BlobBackend:
        backend = _BlobBackend(blob, self.model_key, host=self.host, api_key=self.api_key,
                               env=self.lm._remoteable_get_env(), blocking=blocking,
                               job_id=job_id)
        backend.compress = compress  # the blob was serialized with this flag
        return backend

    def send(self, blob: bytes, compress: bool) -> tuple[bytes, str | None]:
        backend = self._backend(blob, compress)
        backend.request(RequestModel(model_key=self.model_key, compress=compress,
                                     env=backend.env), None)
        return backend.content, backend.job_id

    def submit(self, blob: bytes, compress: bool) -> str:
        backend = self._backend(blob, compress, blocking=False)
        backend.submit(None)
        return backend.job_id

    def poll(self, job_id: str, compress: bool) -> bytes | None:
        backend = self._backend(b"", compress, job_id=job_id, blocking=False)
        backend.poll(None)
        return backend.content


def _retryable(error: BaseException) -> bool:
    """Network errors, NDIF job errors and time-outs are worth another try; a client error the
    server refused (4xx other than 408/429: bad key, bad request) is not."""
    cause = error.__cause__
    response = getattr(cause, "response", None)
    if response is not None and 400 <= response.status_code < 500 and \
            response.status_code not in (408, 429):
        return False
    if isinstance(error, (RemoteError, OSError)):  # OSError: connection, socket, TimeoutError
        return True
    try:
        import httpx

        if isinstance(error, httpx.HTTPError):
            return True
    except ImportError:  # pragma: no cover - httpx comes with nnsight
        pass
    try:
        import websocket

        return isinstance(error, websocket.WebSocketException)
    except ImportError:  # pragma: no cover - websocket-client comes with nnsight
        return False


# -- the ledger: finished results and job ids on disk --------------------------------------------


class RequestLedger:
    """Results and job ids of remote requests, kept on disk so that a rerun resumes.

    ``<directory>/requests.json`` maps a request key to its job id, state and encoding;
    ``<directory>/<key>.result`` holds a finished result blob as received. Keys describe the
    request's content (model, inputs, configurations, tables), so the same work maps to the same
    key in a new process.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.index_path = self.directory / "requests.json"
        try:
            self.index: dict = json.loads(self.index_path.read_text())
        except FileNotFoundError:
            self.index = {}
        except ValueError:
            raise UserError(f"{str(self.index_path)!r} is not a request ledger; remove it or "
                            "choose another ledger directory") from None

    def _save(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.index_path.with_name(f".{self.index_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.index, indent=1, sort_keys=True))
        tmp.replace(self.index_path)

    def result(self, key: str) -> tuple[bytes, bool] | None:
        """``(content, compress)`` of a finished request, or ``None``."""
        entry = self.index.get(key)
        path = self.directory / f"{key}.result"
        if entry is None or entry.get("state") != "done" or not path.is_file():
            return None
        return path.read_bytes(), bool(entry["compress"])

    def job(self, key: str) -> str | None:
        entry = self.index.get(key)
        return entry.get("job_id") if entry and entry.get("state") == "submitted" else None

    def submitted(self, key: str, job_id: str, label: str) -> None:
        self.index[key] = {"state": "submitted", "job_id": job_id, "label": label,
                           "submitted": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self._save()

    def forget(self, key: str) -> None:
        """Drop a job that failed on the server, so the request is sent again."""
        if self.index.pop(key, None) is not None:
            self._save()

    def done(self, key: str, content: bytes, compress: bool, label: str,
             job_id: str | None) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{key}.result"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(content)
        tmp.replace(path)
        self.index[key] = {"state": "done", "job_id": job_id, "label": label,
                           "compress": compress, "bytes": len(content)}
        self._save()


# -- the client: serialization, delivery with retries, accounting ---------------------------------


class RemoteClient:
    """Sends AF1's requests for one model and accounts for them.

    Args:
        model: an :class:`AF1Model` (from :func:`load_remote_model` for NDIF; any model for
            ``backend="local"``).
        backend: ``"remote"`` (NDIF) or ``"local"`` (this process plays the server).
        transport: overrides ``backend`` (tests inject failing or out-of-process transports).
        blocking: wait on each request (NDIF's websocket); ``False`` submits over HTTP and polls
            (job ids then go to the ledger as soon as they exist).
        ledger: directory for finished results and job ids; a rerun with the same ledger reuses
            finished requests and collects submitted ones instead of sending them again.
        max_retries: further attempts after a retryable failure; the wait before attempt
            ``n + 1`` is ``min(max_backoff_s, backoff_s * 2**(n-1))``.
        timeout_s: client-side limit on polling one job (non-blocking mode), then retried.
        compress: zstd-compress requests and results (default: nnsight's config, on).
        log: one-line progress messages (default: print).
        sleep: how to wait between retries and polls (tests pass a recorder).
    """

    def __init__(self, model, backend: str = "remote", *, transport=None, blocking: bool = True,
                 ledger: str | os.PathLike | None = None,
                 max_retries: int = DEFAULT_MAX_RETRIES, backoff_s: float = DEFAULT_BACKOFF_S,
                 max_backoff_s: float = DEFAULT_MAX_BACKOFF_S,
                 poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
                 timeout_s: float | None = None, compress: bool | None = None,
                 log: Callable[[str], None] | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        if transport is None:
            if backend == "local":
                transport = LocalTransport.for_model(model)
            elif backend == "remote":
                transport = NdifTransport(model.lm)
            else:
                raise UserError(f"remote backend must be 'remote' or 'local', got {backend!r}")
        if max_retries < 0:
            raise UserError(f"max_retries must be >= 0, got {max_retries}")
        self.model = model
        self.transport = transport
        self.blocking = blocking
        self.ledger = RequestLedger(ledger) if ledger is not None else None
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.poll_interval_s = poll_interval_s
        self.timeout_s = timeout_s
        self.compress = CONFIG.API.COMPRESS if compress is None else compress
        self.log = log or (lambda message: print(message, flush=True))
        self.sleep = sleep
        self.stats = RemoteStats(backend=getattr(transport, "name", type(transport).__name__),
                                 host=getattr(transport, "host", None), compress=self.compress)

    def backend(self, kind: str, label: str, key: str | None = None, cells: int = 0,
                traces: int = 1, submit_only: bool = False) -> "SessionBackend":
        """An nnsight backend that sends each block it is given as one request of this client:
        ``with model.lm.session(backend=client.backend(...)):`` or ``model.lm.trace(...,
        backend=...)``. Saved values come back into the caller's frame, as with ``remote=True``.

        ``key`` (see :class:`RequestLedger`) names the request's content for the ledger; without
        one the request is never reused. ``cells``/``traces`` are recorded in the stats.
        """
        return SessionBackend(self, kind, label, key, cells, traces, submit_only)

    def deliver(self, blob: bytes, kind: str, label: str, key: str | None, cells: int,
                traces: int) -> tuple[bytes, bool]:
        """Send ``blob`` (with retries) or reuse its ledger result.

        Returns ``(content, compress)``: the result blob as received and how it is encoded.
        """
        reused = self.ledger.result(key) if self.ledger and key else None
        if reused is not None:
            self.stats.requests.append(RequestRecord(kind, label, cells, traces, 0, 0, 0, 0.0,
                                                     self.ledger.index[key].get("job_id"),
                                                     reused=True))
            self.log(f"[af1 remote] {label}: reused the finished result in the ledger")
            return reused
        started = time.time()
        uploads = attempts = 0
        # A submitted job (this run's, or an earlier run's from the ledger) is polled again
        # after a time-out or a network error, and sent again only when it failed on the server.
        pending = self.ledger.job(key) if self.ledger and key else None
        while True:
            attempts += 1
            try:
                if self.blocking and pending is None:
                    uploads += 1
                    content, job_id = self.transport.send(blob, self.compress)
                else:
                    if pending is None:
                        uploads += 1
                        pending = self.transport.submit(blob, self.compress)
                        self.log(f"[af1 remote] {label}: submitted job {pending}")
                        if self.ledger and key:
                            self.ledger.submitted(key, pending, label)
                    job_id = pending
                    content = self._wait(pending)
                break
            except Exception as error:  # noqa: BLE001 - classified by _retryable
                if not _retryable(error):
                    raise
                if isinstance(error, RemoteError):
                    pending = None
                    if self.ledger and key:
                        self.ledger.forget(key)
                if attempts > self.max_retries:
                    where = f" in {str(self.ledger.directory)!r}" if self.ledger else ""
                    raise RemoteRunError(
                        f"NDIF request {label} failed after {attempts} attempts "
                        f"({type(error).__name__}: {error}); finished requests are kept"
                        f"{where} and finished cells in the results, so rerunning the same "
                        "command resumes") from error
                delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempts - 1))
                self.log(f"[af1 remote] {label}: attempt {attempts} failed "
                         f"({type(error).__name__}: {error}); retrying in {delay:.0f} s")
                self.sleep(delay)
        record = RequestRecord(kind, label, cells, traces, uploads * len(blob), len(content),
                               attempts, round(time.time() - started, 3), job_id)
        self.stats.requests.append(record)
        self.stats.model_key = getattr(self.transport, "model_key", None)
        if self.ledger and key:
            self.ledger.done(key, content, self.compress, label, job_id)
        self.log(f"[af1 remote] {label}: {traces} traces, up {format_bytes(record.bytes_up)}, "
                 f"down {format_bytes(record.bytes_down)}, {record.seconds:.1f} s"
                 + (f" ({attempts} attempts)" if attempts > 1 else ""))
        return content, self.compress

    def submit(self, blob: bytes, kind: str, label: str, key: str, cells: int,
               traces: int) -> str:
        """Submit ``blob`` without waiting (with retries); the job id goes to the ledger and
        the upload to the stats (its download is counted when it is collected)."""
        if self.ledger is None:
            raise UserError("submitting without waiting needs a ledger directory to keep the "
                            "job ids in")
        if self.ledger.result(key) is not None:
            return self.ledger.index[key].get("job_id") or "done"
        job_id = self.ledger.job(key)
        if job_id is not None:
            return job_id
        started = time.time()
        attempts = 0
        while job_id is None:
            attempts += 1
            try:
                job_id = self.transport.submit(blob, self.compress)
            except Exception as error:  # noqa: BLE001 - classified by _retryable
                if not _retryable(error):
                    raise
                if attempts > self.max_retries:
                    raise RemoteRunError(f"submitting NDIF request {label} failed after "
                                         f"{attempts} attempts ({error})") from error
                self.sleep(min(self.max_backoff_s, self.backoff_s * 2 ** (attempts - 1)))
        self.ledger.submitted(key, job_id, label)
        self.stats.requests.append(RequestRecord(kind, label, cells, traces,
                                                 attempts * len(blob), 0, attempts,
                                                 round(time.time() - started, 3), job_id))
        self.log(f"[af1 remote] {label}: submitted job {job_id} (up {format_bytes(len(blob))})")
        return job_id

    def _wait(self, job_id: str) -> bytes:
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        while True:
            content = self.transport.poll(job_id, self.compress)
            if content is not None:
                return content
            if deadline is not None and time.monotonic() > deadline:
                raise RequestTimeout(f"job {job_id} did not finish within {self.timeout_s:.0f} s")
            self.sleep(self.poll_interval_s)

    def cama_runner(self, batches_per_request: int | None = None, answer_ids=None,
                    on_predictions: Callable[[list], None] | None = None):
        """A runner for ``cama.build_cama_table(..., runner=...)`` that sums on NDIF.

        Each request runs clean traces over up to ``batches_per_request`` batches (default: all
        in one request) and accumulates the grouped float64 sums on the server; only the sums
        come back (as float32, which holds bf16 activations' sums exactly enough and halves the
        download). With ``answer_ids`` (one ``(B,)`` tensor per batch) the same passes also save
        the clean predictions, handed to ``on_predictions`` (see
        :meth:`RemoteExecutor.cama_runner`), so the full model costs no request of its own.
        """
        return _RemoteCamaRunner(self, batches_per_request, answer_ids, on_predictions)


class SessionBackend(Backend):
    """Serializes the block it runs (as NDIF's backend does) and hands it to its client.

    The saved values come back into the caller's frame (like nnsight's ``RemoteBackend``) and
    in ``result``.
    """

    def __init__(self, client: RemoteClient, kind: str, label: str, key: str | None,
                 cells: int, traces: int, submit_only: bool):
        self.client = client
        self.kind = kind
        self.label = label
        self.key = key
        self.cells = cells
        self.traces = traces
        self.submit_only = submit_only
        self.result: dict | None = None
        self.job_id: str | None = None

    def __call__(self, tracer) -> dict | None:
        from nnsight.ndif import pull_env
        from nnsight.tracing.tracer import mark
        from nnsight.tracing.util import push

        pull_env()  # registers non-installed modules for by-value pickling, as NDIF's path does
        blob = RequestModel.serialize(tracer, self.client.compress)
        if self.submit_only:
            self.job_id = self.client.submit(blob, self.kind, self.label, self.key,
                                             self.cells, self.traces)
            return None
        content, compress = self.client.deliver(blob, self.kind, self.label, self.key,
                                                self.cells, self.traces)
        self.result = decode_result(content, compress)
        for value in self.result.values():
            mark(value)  # an enclosing trace keeps only marked values
        push(tracer.info.frame, self.result)
        return self.result


# -- what runs on the server ----------------------------------------------------------------------
#
# These functions hold the ``with`` blocks that are shipped. A block ships its source and the
# values it names (here: the function's arguments, the traced/plan functions, ``torch``), so each
# takes exactly what the server needs as arguments and nothing else (never ``self``). No comment
# or blank line inside a block: nnsight ships it re-formatted, and nested traces are found by line.


def cells_session(lm, sites, backend, cells, batches):
    """One request: every ``(intervention, cama)`` cell on every ``(encoding, answers)`` batch.

    Saves ``pred_ids`` int32 and ``answer_logits`` float32, each ``(len(cells) * N,)`` in
    cell-major, batch order (N prompts). The inner ``no_grad`` runs on the server too, so no
    autograd graph grows across the session.
    """
    with torch.no_grad(), lm.session(backend=backend):
        with torch.no_grad():
            id_parts = []
            logit_parts = []
            for intervention, cama in cells:
                for enc, answers in batches:
                    with lm.trace(enc):
                        if intervention is not None:
                            apply_intervention(sites, intervention, cama)
                        ids, logits = last_token_predictions(sites, answers)
                        id_parts.append(ids.to(torch.int32))
                        logit_parts.append(logits.float())
            pred_ids = torch.cat(id_parts).save()
            answer_logits = torch.cat(logit_parts).save()


def residual_sums_session(lm, sites, backend, batches, layers, keys, hidden):
    """One request: clean traces over ``(encoding, answers or None)`` batches, adding each
    token's ``h_k`` to its key's float64 sum on the server.

    Saves ``residual_sums`` ``(len(layers), K, D)`` float32 and, when the batches carry answers,
    ``pred_ids``/``answer_logits`` as :func:`cells_session` does for one clean cell. The sums
    live in the server's CPU memory (a few hundred MB at most): ``device_map="auto"`` spreads
    the layers over GPUs, and no one GPU need hold them all.
    """
    with torch.no_grad(), lm.session(backend=backend):
        with torch.no_grad():
            sums = torch.zeros(len(layers), len(keys), hidden, dtype=torch.float64)
            id_parts = []
            logit_parts = []
            for enc, answers in batches:
                with lm.trace(enc):
                    accumulate_residuals(sites, layers, keys, sums)
                    if answers is not None:
                        ids, logits = last_token_predictions(sites, answers)
                        id_parts.append(ids.to(torch.int32))
                        logit_parts.append(logits.float())
            residual_sums = sums.float().save()
            if id_parts:
                pred_ids = torch.cat(id_parts).save()
                answer_logits = torch.cat(logit_parts).save()


# -- request keys ---------------------------------------------------------------------------------


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _request_key(model, kind: str, content: Any) -> str:
    """A content key for the ledger: the model, the request kind and a JSON description."""
    text = json.dumps([model.identity.fingerprint, model.identity.dtype, kind, content],
                      sort_keys=True, default=str)
    return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:24]}"


def _batches_digest(batches) -> str:
    tensors = []
    for enc, answers in batches:
        tensors += [enc["input_ids"], enc["attention_mask"]]
        if answers is not None:
            tensors.append(answers)
    return _digest(*tensors)


def _intervention_digest(intervention: Intervention | None) -> Any:
    if intervention is None:
        return None
    return [sorted((k, list(v)) for k, v in intervention.rules.items()),
            intervention.replace_layer, intervention.replacement]


# -- the CAMA build on NDIF -----------------------------------------------------------------------


class _RemoteCamaRunner:
    """See :meth:`RemoteClient.cama_runner`."""

    def __init__(self, client: RemoteClient, batches_per_request: int | None, answer_ids,
                 on_predictions):
        if batches_per_request is not None and batches_per_request < 1:
            raise UserError(f"batches per request must be >= 1, got {batches_per_request}")
        self.client = client
        self.batches_per_request = batches_per_request
        self.answer_ids = answer_ids
        self.on_predictions = on_predictions

    def __call__(self, model, encodings, layers, keys, progress=True) -> torch.Tensor:
        answers = self.answer_ids if self.answer_ids is not None else [None] * len(encodings)
        batches = list(zip(encodings, answers))
        size = self.batches_per_request or len(batches)
        chunks = [batches[i:i + size] for i in range(0, len(batches), size)]
        layers = [int(k) for k in layers]
        hidden = model.hf.config.hidden_size
        total = torch.zeros(len(layers), len(keys), hidden, dtype=torch.float64)
        predictions = []
        for n, chunk in enumerate(chunks, 1):
            label = f"CAMA sums, batches {(n - 1) * size + 1}-{(n - 1) * size + len(chunk)} " \
                    f"of {len(batches)}"
            key = _request_key(model, "cama", [layers, _digest(keys), _batches_digest(chunk)])
            backend = self.client.backend("cama", label, key, traces=len(chunk))
            residual_sums_session(model.lm, model.sites, backend, chunk, layers, keys, hidden)
            total += backend.result["residual_sums"].double()
            if "pred_ids" in backend.result:
                predictions.append((backend.result["pred_ids"], backend.result["answer_logits"]))
        if self.on_predictions is not None and predictions:
            self.on_predictions(predictions)
        return total


# -- the executor ---------------------------------------------------------------------------------


def chunk_cells(items: Sequence, cells_per_request: int) -> list[list]:
    """Group cells into requests of at most ``cells_per_request``.

    ``items`` are ``(tag, intervention, cama)``; they are ordered (stably) by the table layer
    they need, so a request uploads as few distinct layers as possible.
    """
    if cells_per_request < 1:
        raise UserError(f"cells per request must be >= 1, got {cells_per_request}")
    def need(item):
        intervention = item[1]
        if intervention is None or not intervention.needs_table:
            return (0, -1)
        return (1 if intervention.replacement == "cama" else 2, intervention.replace_layer)

    ordered = sorted(items, key=need)
    return [ordered[i:i + cells_per_request] for i in range(0, len(ordered), cells_per_request)]


class RemoteExecutor:
    """Evaluates interventions on one data set through NDIF (or the local stand-in), with the
    :class:`interventions.NnsightExecutor` interface.

    Args:
        model: an :class:`AF1Model` (:func:`load_remote_model` for NDIF).
        prompts / answer_ids: the data set; batch_size: prompts per forward pass.
        backend: ``"remote"`` or ``"local"`` (ignored when ``client`` is given).
        cells_per_request: configurations per request; a request runs
            ``cells x n_batches`` traces.
        max_retries: see :class:`RemoteClient` (ignored when ``client`` is given).
        client: a shared :class:`RemoteClient` (one per job, so its ``stats`` cover the job).
        client_options: further :class:`RemoteClient` arguments (``ledger``, ``blocking``, ...).
    """

    name = "nnsight-remote"

    def __init__(self, model, prompts: Sequence[str], answer_ids: Sequence[int],
                 batch_size: int = 32, backend: str = "remote",
                 cells_per_request: int = DEFAULT_CELLS_PER_REQUEST,
                 max_retries: int = DEFAULT_MAX_RETRIES, client: RemoteClient | None = None,
                 **client_options):
        if cells_per_request < 1:
            raise UserError(f"cells per request must be >= 1, got {cells_per_request}")
        self.model = model
        self.client = client or RemoteClient(model, backend, max_retries=max_retries,
                                             **client_options)
        self.cells_per_request = cells_per_request
        self.n_prompts = len(prompts)
        self.answer_ids = torch.as_tensor(np.asarray(answer_ids), dtype=torch.long)
        self.batches = model.encode_batches(prompts, batch_size)
        self._inputs = [(enc, self.answer_ids[indices]) for indices, enc in self.batches]
        self._inputs_digest = _batches_digest(self._inputs)
        self._clean: Predictions | None = None

    @property
    def stats(self) -> RemoteStats:
        return self.client.stats

    # -- the executor interface

    def clean(self) -> Predictions:
        """Predictions of the unmodified model (no request when a CAMA build on these batches
        already computed them, see :meth:`cama_runner`)."""
        if self._clean is None:
            self._clean = self._evaluate([(None, None)], "clean", "full model")[0]
        return self._clean

    def run(self, plan: AF1Plan | Intervention, cama: CamaLayer | None = None) -> Predictions:
        """Predictions under one plan or intervention (one request)."""
        intervention = as_intervention(plan, self.model.n_layers)
        return self._evaluate([(intervention, cama)], "cells", repr(plan))[0]

    def run_many(self, cells: Iterable[tuple[Any, AF1Plan | Intervention, CamaLayer | None]]
                 ) -> Iterator[tuple[Any, Predictions]]:
        """Evaluate ``(tag, plan_or_intervention, cama_layer)`` cells, ``cells_per_request`` per
        request; yields ``(tag, predictions)`` chunk by chunk as each request finishes."""
        chunks = self._chunks(cells)
        total = sum(len(c) for c in chunks)
        done = 0
        for chunk in chunks:
            label = f"cells {done + 1}-{done + len(chunk)} of {total}"
            preds = self._evaluate([(iv, cama) for _, iv, cama in chunk], "cells", label)
            done += len(chunk)
            for (tag, _, _), p in zip(chunk, preds):
                yield tag, p

    def submit(self, cells: Iterable[tuple[Any, AF1Plan | Intervention, CamaLayer | None]]
               ) -> list[str]:
        """Submit every chunk of ``cells`` without waiting; returns the job ids (kept in the
        client's ledger). Collect later with :meth:`run_many` on the same cells and ledger."""
        chunks = self._chunks(cells)
        total = sum(len(c) for c in chunks)
        jobs, done = [], 0
        for chunk in chunks:
            label = f"cells {done + 1}-{done + len(chunk)} of {total}"
            jobs.append(self._evaluate([(iv, cama) for _, iv, cama in chunk], "cells", label,
                                       submit_only=True))
            done += len(chunk)
        return jobs

    def cama_runner(self, batches_per_request: int | None = None):
        """A remote CAMA runner for this data set whose requests also compute :meth:`clean`.

        Use it as ``cached_cama_table(..., batch_size=<this executor's>, runner=...)`` with the
        executor's prompts: the table's clean passes are the full model's passes, so their
        predictions are saved alongside the sums. On other prompts the runner only sums.
        """
        def runner(model, encodings, layers, keys, progress=True):
            same = len(encodings) == len(self._inputs) and all(
                torch.equal(enc["input_ids"], mine["input_ids"])
                for enc, (mine, _) in zip(encodings, self._inputs))
            answers = [a for _, a in self._inputs] if same else None
            return _RemoteCamaRunner(self.client, batches_per_request, answers,
                                     self._take_clean)(model, encodings, layers, keys, progress)

        return runner

    # -- internals

    def _chunks(self, cells) -> list[list]:
        n_layers = self.model.n_layers
        items = [(tag, as_intervention(plan, n_layers), cama) for tag, plan, cama in cells]
        return chunk_cells(items, self.cells_per_request)

    def _take_clean(self, predictions: list) -> None:
        self._clean = self._assemble(torch.cat([p for p, _ in predictions]),
                                     torch.cat([a for _, a in predictions]), 1)[0]

    def _upload_cells(self, cells) -> tuple[list, list]:
        """The cells as they travel: each distinct table layer once (the same object wherever
        it is used, so the request pickles it once), its means a copy in the model's dtype.

        Returns the cells ``[(intervention, cama)]`` and a description of each for the request key.
        """
        dtype = getattr(torch, self.model.identity.dtype)
        layers: dict = {}
        keys: dict = {}
        out, described = [], []
        for intervention, cama in cells:
            ident = None
            if cama is not None:
                ident = (cama.kind, cama.layer, _digest(cama.keys, cama.means))
                if ident not in layers:
                    shared = keys.setdefault(_digest(cama.keys), cama.keys.detach().cpu().clone())
                    layers[ident] = CamaLayer(cama.layer, shared,
                                              cama.means.detach().to("cpu", dtype, copy=True),
                                              cama.kind)
                cama = layers[ident]
            out.append((intervention, cama))
            described.append([_intervention_digest(intervention), ident])
        return out, described

    def _evaluate(self, cells, kind: str, label: str, submit_only: bool = False):
        cells, described = self._upload_cells(cells)
        key = _request_key(self.model, kind, [self._inputs_digest, described])
        backend = self.client.backend(kind, label, key, cells=len(cells),
                                      traces=len(cells) * len(self._inputs),
                                      submit_only=submit_only)
        cells_session(self.model.lm, self.model.sites, backend, cells, self._inputs)
        if submit_only:
            return backend.job_id
        return self._assemble(backend.result["pred_ids"], backend.result["answer_logits"],
                              len(cells))

    def _assemble(self, pred_ids: torch.Tensor, answer_logits: torch.Tensor, n_cells: int
                  ) -> list[Predictions]:
        """Split cell-major, batch-ordered saves into per-cell :class:`Predictions`."""
        if len(pred_ids) != n_cells * self.n_prompts or len(answer_logits) != len(pred_ids):
            raise RemoteError(f"the server returned {len(pred_ids)} predictions for "
                              f"{n_cells} cells x {self.n_prompts} prompts")
        pred_ids = pred_ids.long().numpy()
        answer_logits = answer_logits.float().numpy()
        out, pos = [], 0
        for _ in range(n_cells):
            pred = np.zeros(self.n_prompts, dtype=np.int64)
            logit = np.zeros(self.n_prompts, dtype=np.float32)
            for indices, _ in self.batches:
                pred[indices] = pred_ids[pos:pos + len(indices)]
                logit[indices] = answer_logits[pos:pos + len(indices)]
                pos += len(indices)
            out.append(Predictions(pred, logit))
        return out


# -- models without weights -----------------------------------------------------------------------


def load_remote_model(spec: str, *, revision: str | None = None, dtype: str = "bfloat16",
                      attn_implementation: str = "sdpa"):
    """An :class:`AF1Model` for a model NDIF runs: the architecture on the meta device (no
    weights), its config and tokenizer.

    Args:
        spec: a Hub id (``meta-llama/Llama-3.1-8B``; config and tokenizer come from the Hub) or a
            local checkpoint directory (same code path; for offline tests with ``backend="local"``).
        revision: Hub revision; the model key sent to NDIF names it (default: the repo's main).
        dtype: the dtype the server runs (NDIF: bfloat16). CAMA tables are uploaded in it.
        attn_implementation: sent with every request (nnsight puts it in the request env).

    Identity: ``model_id`` is the repo id and ``revision`` the Hub commit of its config (or the
    revision asked for), so ``fingerprint`` is ``repo@commit``; a local directory is identified
    by its weight files' hash as in :func:`interventions.load_model`.
    """
    from nnsight.modeling.transformers import TransformersModel
    from transformers import AutoTokenizer

    from .adapters import adapter_for, check_attention
    from .models import (DTYPES, AF1Model, ModelIdentity, _first_line, _locate, _weights_sha256,
                         left_padding)

    check_attention(attn_implementation)
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use {', '.join(DTYPES)}")
    source, location = _locate(spec)
    if source not in ("hub", "local"):
        raise UserError(f"remote runs need a Hub id (NDIF serves Hub checkpoints), not "
                        f"{spec!r}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(location, revision=revision)
            lm = TransformersModel(location, revision=revision, task="text-generation",
                                   tokenizer=tokenizer, dtype=DTYPES[dtype],
                                   attn_implementation=attn_implementation)
    except OSError as err:
        raise UserError(f"cannot load the config of {spec!r}: {_first_line(err)}") from None
    hf = lm._module
    config = hf.config
    adapter = adapter_for(config)
    left_padding(tokenizer)
    identity = ModelIdentity(
        spec=spec, source="ndif" if source == "hub" else "local",
        model_id=spec if source == "hub" else str(Path(location).resolve()),
        revision=(getattr(config, "_commit_hash", None) or revision or "main")
        if source == "hub" else None,
        weights_sha256=None if source == "hub" else _weights_sha256(Path(location)),
        architecture=config.model_type, n_layers=len(adapter.layer_modules(hf)), dtype=dtype,
        device="ndif", attn_implementation=config._attn_implementation)
    return AF1Model(lm, hf, tokenizer, adapter, identity)


# -- server rules ---------------------------------------------------------------------------------


@dataclass
class RequestAudit:
    """What a serialized request makes the server import.

    Attributes:
        globals: ``(module, name)`` of every class/function the payload references by name
            (pickle ``GLOBAL``/``STACK_GLOBAL``) and every module it rebuilds (cloudpickle's
            ``subimport``, as ``(module, "<module>")``).
        imports: modules named by ``import`` statements in the source it ships.
        violations: references outside :data:`PERMITTED_MODULES` and :data:`RUNTIME_MODULES`.
    """

    globals: set
    imports: set
    violations: list


def _allowed(module: str, allowed: Sequence[str]) -> bool:
    return any(module == a or module.startswith(a + ".") for a in allowed)


def audit_request(blob: bytes, compress: bool = False,
                  permitted: Sequence[str] = PERMITTED_MODULES,
                  runtime: Sequence[str] = RUNTIME_MODULES) -> RequestAudit:
    """Check a serialized request against the server's import rules, without running it.

    Walks the pickle opcodes (tracking the strings pushed and memoized, so ``STACK_GLOBAL``
    resolves to its module and name) and parses every shipped string that is Python source
    for ``import`` statements. Classes and functions pickled by value are fine: only what the
    server must import is checked.
    """
    if compress:
        import zstandard

        blob = zstandard.ZstdDecompressor().decompress(blob)
    mark = object()
    stack: list = []
    memo: dict = {}
    refs: set = set()
    strings: list[str] = []
    for op, arg, _ in pickletools.genops(blob):
        name = op.name
        if name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE",
                    "SHORT_BINSTRING", "BINSTRING", "STRING"):
            stack.append(arg)
            strings.append(arg)
        elif name == "MARK":
            stack.append(mark)
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = stack[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo[arg])
        elif name == "GLOBAL":
            module, qualname = arg.split(" ", 1)
            refs.add((module, qualname))
            stack.append((module, qualname))
        elif name == "STACK_GLOBAL":
            qualname = stack.pop()
            module = stack.pop()
            refs.add((module, qualname))
            stack.append((module, qualname))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            n = int(name[-1])
            items = tuple(stack[-n:])
            del stack[-n:]
            stack.append(items)
        elif name == "TUPLE":
            start = len(stack) - 1 - stack[::-1].index(mark)
            items = tuple(stack[start + 1:])
            del stack[start:]
            stack.append(items)
        elif name == "EMPTY_TUPLE":
            stack.append(())
        elif name == "REDUCE":
            args = stack.pop()
            func = stack.pop()
            # cloudpickle rebuilds a module reference as subimport(name)
            if (isinstance(func, tuple) and len(func) == 2 and func[1] == "subimport"
                    and isinstance(args, tuple) and args and isinstance(args[0], str)):
                refs.add((args[0], "<module>"))
            stack.append(None)
        elif name == "POP" and stack and stack[-1] is mark:
            stack.pop()
        elif pickletools.markobject in op.stack_before:
            start = len(stack) - 1 - stack[::-1].index(mark)
            del stack[start:]
            extra = len(op.stack_before) - 2  # items below the mark (e.g. the list of APPENDS)
            if extra:
                del stack[-extra:]
            stack.extend([None] * len(op.stack_after))
        else:
            if op.stack_before:
                del stack[-len(op.stack_before):]
            stack.extend([None] * len(op.stack_after))
    imports: set = set()
    for text in strings:
        if "import" not in text:
            continue
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imports.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                imports.add("." * node.level + (node.module or ""))
    violations = sorted(f"{m}.{n}" for m, n in refs
                        if not _allowed(m, tuple(permitted) + tuple(runtime)))
    violations += sorted(f"import {m}" for m in imports if not _allowed(m, permitted))
    return RequestAudit(refs, imports, violations)
