"""The remote client: sends AF1's requests for one model, with retries, and accounts for them.

:class:`RemoteClient` serializes a ``with`` block (through :class:`SessionBackend`, an nnsight
backend), delivers it through a transport (``transport.py``) with bounded exponential backoff,
keeps finished results and job ids in a ledger (``ledger.py``) and counts bytes up and down per
request (:class:`RemoteStats`, for the manifest).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from nnsight.schema.config import CONFIG
from nnsight.tracing.backend import Backend

from ... import nnsight_internals as internals
from ...errors import UserError
from ...nnsight_internals import RemoteError
from .ledger import RequestLedger
from .transport import LocalTransport, NdifTransport, _retryable, decode_result

DEFAULT_CELLS_PER_REQUEST = 32
DEFAULT_MAX_RETRIES = 3
DEFAULT_BACKOFF_S = 2.0
DEFAULT_MAX_BACKOFF_S = 60.0
DEFAULT_POLL_INTERVAL_S = 3.0


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

    def backoff(self, attempts: int) -> float:
        """Seconds to wait after ``attempts`` failed attempts (bounded exponential backoff)."""
        return min(self.max_backoff_s, self.backoff_s * 2 ** (attempts - 1))

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
                delay = self.backoff(attempts)
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
                self.sleep(self.backoff(attempts))
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
        internals.prepare_env()
        blob = internals.RequestModel.serialize(tracer, self.client.compress)
        if self.submit_only:
            self.job_id = self.client.submit(blob, self.kind, self.label, self.key,
                                             self.cells, self.traces)
            return None
        content, compress = self.client.deliver(blob, self.kind, self.label, self.key,
                                                self.cells, self.traces)
        self.result = decode_result(content, compress)
        internals.return_saves(tracer, self.result)
        return self.result


