"""The remote client: sends AF1's requests for one model, survives the service's faults, and
accounts for them.

:class:`RemoteClient` serializes a ``with`` block (through :class:`SessionBackend`, an nnsight
backend), delivers it through a transport (``transport.py``), keeps finished results and job ids
in a ledger (``ledger.py``) and counts bytes up and down per request (:class:`RemoteStats`, for
the manifest). Faults (``faults.py``):

* a request over the byte budget, or refused by NDIF with HTTP 413, raises
  :class:`RequestTooLarge` for the caller to split (after a 413 the budget drops below the
  refused size, so later requests are split before they are sent);
* a request NDIF stopped at its execution time-out raises :class:`ExecutionTimedOut` for the
  caller to split, never sent again as it was (later requests as long are split first);
* a job error that would recur (unreadable payload, another module tree, the shipped code
  raising, a model NDIF would not load) stops at once with one line naming the request and the
  cause; NDIF refusing a model it would have loaded on demand names the family's hosted models;
* network errors, other job errors and time-outs are retried with jittered exponential
  backoff; "try again" (HTTP 503, 429) is waited out longer, up to minutes;
* every wait on NDIF is bounded: a websocket silent for ``silence_s`` leads to a poll of the
  job's response route, then to a resubmission; a job its response route does not know for
  ``unknown_after_s`` is given up and its request submitted again; both are recorded in the
  ledger and the stats, as are results whose links expired;
* an overall client time-out bounds the whole job; the ledger is written atomically, so a
  Ctrl-C or a time-out leaves it consistent and a rerun resumes.
"""

from __future__ import annotations

import os
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from nnsight.schema.config import CONFIG
from nnsight.tracing.backend import Backend

from ... import nnsight_internals as internals
from ...errors import UserError
from ...nnsight_internals import RemoteError
from .faults import (ClientTimeout, ExecutionTimedOut, JobUnknown, OnDemandRefused,
                     RemoteRunError, RequestTimeout, RequestTooLarge, ResultExpired,
                     SilentConnection, SplitRequest, busy, deploy_refused,
                     deterministic_failure, execution_timed_out, failure_message, http_status,
                     retry_after, retryable)
from .ledger import RequestLedger
from .transport import LocalTransport, NdifTransport, decode_result, package_version

DEFAULT_CELLS_PER_REQUEST = 32
DEFAULT_MAX_RETRIES = 3
DEFAULT_BACKOFF_S = 2.0
DEFAULT_MAX_BACKOFF_S = 60.0
DEFAULT_POLL_INTERVAL_S = 3.0
# "Try again" (HTTP 503, 429): more attempts, waits up to five minutes (2 s, 4 s, ... 256 s,
# each jittered to 50-100 %: about 8 minutes in all).
DEFAULT_MAX_BUSY_RETRIES = 8
DEFAULT_MAX_BUSY_BACKOFF_S = 300.0
# A live job's websocket is never silent longer than NDIF's execution time-out (1 h: statuses
# come when it is queued, starts and ends), so past this the connection is taken for dead.
DEFAULT_SILENCE_S = 65 * 60.0
# A job NDIF's response route has no record of (HTTP 404) for this long is taken for lost: a
# submitted job has a status within seconds.
DEFAULT_UNKNOWN_AFTER_S = 300.0
# Serialized request size (before compression) above which a request is split: well under
# what HTTP front ends commonly accept (Cloudflare's 100 MB; NDIF's own limit is not published).
DEFAULT_MAX_REQUEST_BYTES = 16_000_000

__all__ = ["RemoteClient", "RemoteRunError", "RemoteStats", "RequestRecord", "RequestTimeout",
           "RequestTooLarge", "SessionBackend", "format_bytes", "serialized_size"]


# -- byte accounting --------------------------------------------------------------------------


@dataclass
class RequestRecord:
    """One request as sent (or as reused from the ledger)."""

    kind: str  # "cama", "clean", "cells", "selfcheck", or a caller's name
    label: str
    cells: int  # configurations evaluated (0 for a CAMA build)
    traces: int  # forward passes on the server
    bytes_up: int  # serialized request, times the uploads it took
    bytes_down: int  # result blob as received
    attempts: int
    seconds: float
    job_id: str | None
    reused: bool = False  # result taken from the ledger: nothing was sent
    resubmitted_from: list[str] = field(default_factory=list)  # jobs whose results expired
    lost_jobs: list[str] = field(default_factory=list)  # jobs given up (silent, unknown)


@dataclass
class RemoteStats:
    """What the remote requests of a job cost. ``to_dict()`` goes into the manifest."""

    backend: str
    host: str | None
    compress: bool
    model_key: str | None = None  # the deployment NDIF was asked for (repo, revision, task)
    server_code: str | None = None  # offline: "ndif <version>"
    server_path: str | None = None  # "sandbox" (an ordinary key) or "trusted"; None: unknown
    max_request_bytes: int | None = None  # the byte budget at the end (lowered by HTTP 413)
    refused_too_large: int = 0  # requests NDIF refused with HTTP 413 (then split)
    max_traces: int | None = None  # forward passes per request (lowered by a time-out)
    execution_timeouts: list[str] = field(default_factory=list)  # requests then split
    self_check: dict | None = None  # see selfcheck.py
    requests: list[RequestRecord] = field(default_factory=list)

    def to_dict(self) -> dict:
        sent = [r for r in self.requests if not r.reused]
        return {
            "backend": self.backend, "host": self.host, "compress": self.compress,
            "model_key": self.model_key, "server_code": self.server_code,
            "server_path": self.server_path, "max_request_bytes": self.max_request_bytes,
            "refused_too_large": self.refused_too_large, "max_traces": self.max_traces,
            "execution_timeouts": self.execution_timeouts, "self_check": self.self_check,
            "n_requests": len(sent), "n_reused": len(self.requests) - len(sent),
            "n_attempts": sum(r.attempts for r in sent),
            "n_resubmitted": sum(len(r.resubmitted_from) for r in sent),
            "n_lost": sum(len(r.lost_jobs) for r in sent),
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


def serialized_size(blob: bytes, compress: bool) -> int:
    """Bytes of a serialized request before compression (what the byte budget limits: the
    same in a dry run, whose placeholder tables would compress unlike real ones)."""
    if not compress:
        return len(blob)
    import zstandard

    size = zstandard.frame_content_size(blob)
    return size if size >= 0 else len(zstandard.ZstdDecompressor().decompress(blob))


def check_max_request_bytes(max_request_bytes: int | None) -> int | None:
    if max_request_bytes is not None and max_request_bytes < 1:
        raise UserError(f"the request byte budget must be positive, got {max_request_bytes}")
    return max_request_bytes


# -- the client: serialization, delivery, faults, accounting --------------------------------------


class RemoteClient:
    """Sends AF1's requests for one model and accounts for them.

    Args:
        model: an :class:`AF1Model` (from :func:`load_remote_model` for NDIF; any model for
            ``backend="local"``).
        backend: ``"remote"`` (NDIF) or ``"local"`` (this machine plays the server, running
            NDIF's own code).
        transport: overrides ``backend`` (tests inject failing or out-of-process transports).
        server_path: ``backend="local"``: ``"sandbox"`` (the path an ordinary key takes on
            NDIF: each request's block in a runner process) or ``"trusted"`` (in-process).
            ``backend="remote"``: the path NDIF will take, for the record (``None``: unknown).
        blocking: wait on each request (NDIF's websocket); ``False`` submits over HTTP and polls
            (job ids then go to the ledger as soon as they exist).
        ledger: directory for finished results and job ids; a rerun with the same ledger reuses
            finished requests and collects submitted ones instead of sending them again.
        max_retries: further attempts after a retryable failure; the wait before attempt
            ``n + 1`` is ``min(max_backoff_s, backoff_s * 2**(n-1))``, jittered to 50-100 %.
        max_busy_retries / max_busy_backoff_s: the same for "try again" (HTTP 503, 429), whose
            ``Retry-After`` is honoured.
        timeout_s: client-side limit on polling one job (non-blocking mode), then retried.
        silence_s: the longest wait for any status on a blocking request's websocket; then the
            job's response route is polled and, if it does not know the job, the request is
            submitted again (``None``: no bound).
        unknown_after_s: how long a polled job may stay unknown to NDIF (HTTP 404) before it
            is given up and its request submitted again.
        overall_timeout_s: client-side limit on everything this client does, from its creation
            (``None``: none); past it a :class:`ClientTimeout` stops the job.
        max_request_bytes: byte budget of one request, serialized, before compression
            (``None``: none); a larger one raises :class:`RequestTooLarge` before it is sent.
        compress: zstd-compress requests and results (default: nnsight's config, on).
        on_demand: a model NDIF has not deployed (:class:`~.preflight.OnDemand`): its refusal
            to load it, before any request succeeded, becomes one line naming hosted models.
        log: one-line progress messages (default: print).
        sleep / clock / jitter: how to wait, what time it is, and a uniform number in [0, 1)
            for the backoff's jitter (tests pass recorders).
    """

    def __init__(self, model, backend: str = "remote", *, transport=None,
                 server_path: str | None = "sandbox", blocking: bool = True,
                 ledger: str | os.PathLike | None = None,
                 max_retries: int = DEFAULT_MAX_RETRIES, backoff_s: float = DEFAULT_BACKOFF_S,
                 max_backoff_s: float = DEFAULT_MAX_BACKOFF_S,
                 max_busy_retries: int = DEFAULT_MAX_BUSY_RETRIES,
                 max_busy_backoff_s: float = DEFAULT_MAX_BUSY_BACKOFF_S,
                 poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
                 timeout_s: float | None = None, silence_s: float | None = DEFAULT_SILENCE_S,
                 unknown_after_s: float = DEFAULT_UNKNOWN_AFTER_S,
                 overall_timeout_s: float | None = None,
                 max_request_bytes: int | None = DEFAULT_MAX_REQUEST_BYTES,
                 compress: bool | None = None, on_demand=None,
                 log: Callable[[str], None] | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic,
                 jitter: Callable[[], float] = random.random):
        if transport is None:
            if backend == "local":
                transport = LocalTransport.for_model(model, server_path or "sandbox")
            elif backend == "remote":
                transport = NdifTransport(model.lm, silence_s=silence_s, server_path=server_path)
            else:
                raise UserError(f"remote backend must be 'remote' or 'local', got {backend!r}")
        if max_retries < 0 or max_busy_retries < 0:
            raise UserError(f"max_retries must be >= 0, got {min(max_retries, max_busy_retries)}")
        self.model = model
        self.transport = transport
        self.blocking = blocking
        self.ledger = RequestLedger(ledger) if ledger is not None else None
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_busy_retries = max_busy_retries
        self.max_busy_backoff_s = max_busy_backoff_s
        self.poll_interval_s = poll_interval_s
        self.timeout_s = timeout_s
        self.unknown_after_s = unknown_after_s
        self.overall_timeout_s = overall_timeout_s
        self.max_request_bytes = check_max_request_bytes(max_request_bytes)
        self.max_traces: int | None = None
        self.compress = CONFIG.API.COMPRESS if compress is None else compress
        self.on_demand = on_demand
        self.log = log or (lambda message: print(message, flush=True))
        self.sleep = sleep
        self.clock = clock
        self.jitter = jitter
        self.deadline = None if overall_timeout_s is None else clock() + overall_timeout_s
        self.stats = RemoteStats(backend=getattr(transport, "name", type(transport).__name__),
                                 host=getattr(transport, "host", None), compress=self.compress,
                                 server_code=getattr(transport, "server_code", None),
                                 server_path=getattr(transport, "server_path", None),
                                 max_request_bytes=self.max_request_bytes)

    def close(self) -> None:
        """Release what the transport holds (the local sandbox's warm runner)."""
        close = getattr(self.transport, "close", None)
        if close is not None:
            close()

    def backoff(self, attempts: int, error: BaseException | None = None) -> float:
        """Seconds to wait after ``attempts`` failed attempts: bounded exponential backoff,
        jittered to 50-100 % so that clients refused together do not return together; longer
        for "try again" (HTTP 503, 429), and never shorter than its ``Retry-After``."""
        is_busy = error is not None and busy(error)
        cap = self.max_busy_backoff_s if is_busy else self.max_backoff_s
        delay = min(cap, self.backoff_s * 2 ** (attempts - 1)) * (0.5 + 0.5 * self.jitter())
        asked = retry_after(error) if is_busy else None
        return min(cap, max(delay, asked)) if asked is not None else delay

    def backend(self, kind: str, label: str, key: str | None = None, cells: int = 0,
                traces: int = 1, submit_only: bool = False, saves: dict | None = None
                ) -> "SessionBackend":
        """An nnsight backend that sends each block it is given as one request of this client:
        ``with model.lm.session(backend=client.backend(...)):`` or ``model.lm.trace(...,
        backend=...)``. Saved values come back into the caller's frame, as with ``remote=True``.

        ``key`` (see :class:`RequestLedger`) names the request's content for the ledger; without
        one the request is never reused. ``cells``/``traces`` are recorded in the stats.
        ``saves`` declares the result's layout (name -> ``(shape, dtype)``): a transport that
        answers without a server (``dryrun.MeasuringTransport``) answers with zeros of it.
        """
        return SessionBackend(self, kind, label, key, cells, traces, submit_only, saves)

    # -- limits

    def check_size(self, blob: bytes, label: str) -> int:
        """The request's size before compression; :class:`RequestTooLarge` over the budget."""
        size = serialized_size(blob, self.compress)
        if self.max_request_bytes is not None and size > self.max_request_bytes:
            raise RequestTooLarge(label, size, self.max_request_bytes)
        return size

    def check_traces(self, traces: int, label: str) -> None:
        """:class:`ExecutionTimedOut` for a request with more forward passes than one that ran
        past NDIF's execution time-out (split before it is sent)."""
        if self.max_traces is not None and traces > self.max_traces:
            raise ExecutionTimedOut(label, traces, self.max_traces)

    def _remaining(self, label: str) -> float | None:
        """Seconds left before the overall time-out; :class:`ClientTimeout` when none are."""
        if self.deadline is None:
            return None
        left = self.deadline - self.clock()
        if left <= 0:
            where = f" in {str(self.ledger.directory)!r}" if self.ledger else ""
            raise ClientTimeout(
                f"the remote job ran past the client time-out of {self.overall_timeout_s:g} s "
                f"(--remote-timeout) at request {label}; finished requests are kept{where} and "
                "finished cells in the results, so rerunning the same command resumes")
        return left

    def _within_deadline(self, label: str, call: Callable, *args):
        """``call(*args)``, given up (:class:`ClientTimeout`) at the overall time-out. The call
        runs in a daemon thread then: a blocking wait on NDIF cannot be interrupted otherwise."""
        left = self._remaining(label)
        if left is None:
            return call(*args)
        outcome: dict = {}

        def run():
            try:
                outcome["value"] = call(*args)
            except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
                outcome["error"] = error

        worker = threading.Thread(target=run, name=f"af1-remote {label}", daemon=True)
        worker.start()
        worker.join(left)
        if worker.is_alive():
            self._remaining(label)  # raises once the deadline has passed
            worker.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def _refused_too_large(self, label: str, size: int, error: BaseException):
        """HTTP 413: lower the budget below this size (later requests split before sending)
        and hand the request back to be split."""
        self.stats.refused_too_large += 1
        budget = size - 1 if self.max_request_bytes is None else min(self.max_request_bytes,
                                                                     size - 1)
        self.max_request_bytes = self.stats.max_request_bytes = budget
        self.log(f"[af1 remote] {label}: NDIF refused {format_bytes(size)} as too large (HTTP "
                 f"413); splitting it, and the request budget is now {format_bytes(budget)}")
        raise RequestTooLarge(label, size, None, by_server=True) from error

    def _timed_out(self, label: str, traces: int, error: BaseException):
        """NDIF's execution time-out: never sent again as it was. Lower the forward-pass budget
        below this request's (later requests split before sending) and hand it back to be
        split."""
        message = " ".join(str(error).split())
        self.stats.execution_timeouts.append(label)
        budget = traces - 1 if self.max_traces is None else min(self.max_traces, traces - 1)
        self.max_traces = self.stats.max_traces = max(budget, 1)
        self.log(f"[af1 remote] {label}: {message} ({traces} forward passes); splitting it, "
                 f"and requests now have at most {self.max_traces} forward passes")
        raise ExecutionTimedOut(label, traces, None, message) from error

    def _stop(self, label: str, error: BaseException):
        """A failure retrying cannot fix: one line naming the request and the cause."""
        self._refused_on_demand(error)
        failure = deterministic_failure(error)
        if failure is not None:
            transformers = package_version("transformers")
            raise RemoteRunError(failure_message(label, *failure, transformers)) from error
        if isinstance(error, RemoteError):
            raise RemoteRunError(f"NDIF refused request {label}: "
                                 f"{' '.join(str(error).split())}") from error
        raise error

    def _refused_on_demand(self, error: BaseException) -> None:
        """For a model NDIF has not deployed, before any request has come back: NDIF refusing
        to load it (or the key's access to it) is one line naming the family's hosted models."""
        if self.on_demand is None or any(not r.reused for r in self.stats.requests):
            return
        if deploy_refused(error) or http_status(error) in (401, 403, 404):
            raise OnDemandRefused(self.on_demand.refusal(" ".join(str(error).split()))) \
                from error

    # -- delivery

    def deliver(self, blob: bytes, kind: str, label: str, key: str | None, cells: int,
                traces: int, saves: dict | None = None) -> tuple[bytes, bool]:
        """Send ``blob`` (with retries) or reuse its ledger result (``saves``: see
        :meth:`backend`).

        Returns ``(content, compress)``: the result blob as received and how it is encoded.
        """
        reused = self.ledger.result(key) if self.ledger and key else None
        if reused is not None:
            self.stats.requests.append(RequestRecord(kind, label, cells, traces, 0, 0, 0, 0.0,
                                                     self.ledger.index[key].get("job_id"),
                                                     reused=True))
            self.log(f"[af1 remote] {label}: reused the finished result in the ledger")
            return reused
        size = self.check_size(blob, label)
        self.check_traces(traces, label)
        expect = getattr(self.transport, "expect", None)
        if expect is not None:  # a transport that answers from the declared layout
            expect(saves)
        started = time.time()
        uploads = attempts = 0
        failures = {"busy": 0, "other": 0}
        expired: list[str] = []
        lost: list[str] = []
        # A submitted job (this run's, or an earlier run's from the ledger) is polled again
        # after a time-out or a network error, and sent again only when it failed on the server,
        # its result expired or NDIF no longer knows it. After a silent websocket the request
        # goes by HTTP and polling, whose statuses NDIF records.
        pending = self.ledger.job(key) if self.ledger and key else None
        polling = not self.blocking
        while True:
            attempts += 1
            try:
                if not polling and pending is None:
                    uploads += 1
                    content, job_id = self._within_deadline(label, self.transport.send, blob,
                                                            self.compress)
                else:
                    if pending is None:
                        uploads += 1
                        pending = self._submit_once(blob, label, key)
                    job_id = pending
                    content = self._wait(pending, label)
                break
            except (ClientTimeout, SplitRequest):
                raise
            except SilentConnection as error:
                polling = True
                self.log(f"[af1 remote] {label}: {error}; asking NDIF's response route about "
                         "the job" + ("" if error.job_id else ", then sending it again"))
                pending = error.job_id
                if pending is not None and self.ledger and key:
                    self.ledger.submitted(key, pending, label)
                self._give_up_after(attempts, label, error)
            except _JobLost as error:
                lost.append(error.job_id)
                self.log(f"[af1 remote] {label}: {error}; giving it up and submitting the "
                         "request again")
                pending = None
                if self.ledger and key:
                    self.ledger.lost(key)
                self._give_up_after(attempts, label, error)
            except ResultExpired as error:
                expired.append(pending)
                self.log(f"[af1 remote] {label}: {error}; resubmitting")
                pending = None
                if self.ledger and key:
                    self.ledger.expired(key)
                if attempts > self.max_retries:
                    raise RemoteRunError(f"NDIF request {label}: results expired {len(expired)} "
                                         "times before they were collected") from error
            except Exception as error:  # noqa: BLE001 - classified below
                if http_status(error) == 413:
                    self._refused_too_large(label, size, error)
                if isinstance(error, RemoteError):
                    pending = None  # the job failed on the server: it is sent again, if at all
                    if self.ledger and key:
                        self.ledger.forget(key)
                if execution_timed_out(error):
                    self._timed_out(label, traces, error)
                if not retryable(error):
                    self._stop(label, error)
                kind_of = "busy" if busy(error) else "other"
                failures[kind_of] += 1
                self._give_up_after(failures[kind_of], label, error, busy=kind_of == "busy",
                                    attempts=attempts)
                delay = self.backoff(failures[kind_of], error)
                self.log(f"[af1 remote] {label}: attempt {attempts} failed "
                         f"({type(error).__name__}: {error}); retrying in {delay:.0f} s")
                left = self._remaining(label)
                self.sleep(delay if left is None else min(delay, left))
        record = RequestRecord(kind, label, cells, traces, uploads * len(blob), len(content),
                               attempts, round(time.time() - started, 3), job_id,
                               resubmitted_from=expired, lost_jobs=lost)
        self.stats.requests.append(record)
        self.stats.model_key = getattr(self.transport, "model_key", None)
        if self.ledger and key:
            self.ledger.done(key, content, self.compress, label, job_id)
        self.log(f"[af1 remote] {label}: {traces} traces, up {format_bytes(record.bytes_up)}, "
                 f"down {format_bytes(record.bytes_down)}, {record.seconds:.1f} s"
                 + (f" ({attempts} attempts)" if attempts > 1 else "")
                 + (f" (resubmitted: the results of {', '.join(expired)} expired)"
                    if expired else "")
                 + (f" (given up: {', '.join(lost)})" if lost else ""))
        return content, self.compress

    def _give_up_after(self, failed: int, label: str, error: BaseException, busy: bool = False,
                       attempts: int | None = None) -> None:
        """Stop (one line saying how to resume) once ``failed`` failures of this kind exceed
        their retries."""
        if failed <= (self.max_busy_retries if busy else self.max_retries):
            return
        self._refused_on_demand(error)
        where = f" in {str(self.ledger.directory)!r}" if self.ledger else ""
        raise RemoteRunError(
            f"NDIF request {label} failed after {attempts or failed} attempts "
            f"({type(error).__name__}: {' '.join(str(error).split())}); finished "
            f"requests are kept{where} and finished cells in the results, so "
            "rerunning the same command resumes") from error

    def _submit_once(self, blob: bytes, label: str, key: str | None) -> str:
        """Submit without waiting; the job id goes to the ledger at once."""
        job_id = self._within_deadline(label, self.transport.submit, blob, self.compress)
        self.log(f"[af1 remote] {label}: submitted job {job_id}")
        if self.ledger and key:
            self.ledger.submitted(key, job_id, label)
        return job_id

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
        size = self.check_size(blob, label)
        self.check_traces(traces, label)
        started = time.time()
        attempts = 0
        failures = {"busy": 0, "other": 0}
        while job_id is None:
            attempts += 1
            try:
                job_id = self._submit_once(blob, label, key)
            except (ClientTimeout, SplitRequest):
                raise
            except Exception as error:  # noqa: BLE001 - classified below
                if http_status(error) == 413:
                    self._refused_too_large(label, size, error)
                if not retryable(error):
                    self._stop(label, error)
                kind_of = "busy" if busy(error) else "other"
                failures[kind_of] += 1
                self._give_up_after(failures[kind_of], label, error, busy=kind_of == "busy",
                                    attempts=attempts)
                self.sleep(self.backoff(failures[kind_of], error))
        self.stats.requests.append(RequestRecord(kind, label, cells, traces,
                                                 attempts * len(blob), 0, attempts,
                                                 round(time.time() - started, 3), job_id))
        return job_id

    def _wait(self, job_id: str, label: str) -> bytes:
        """Poll ``job_id`` until its result comes; :class:`_JobLost` once NDIF has had no
        record of it for ``unknown_after_s``."""
        deadline = None if self.timeout_s is None else self.clock() + self.timeout_s
        unknown_since = None
        while True:
            try:
                content = self.transport.poll(job_id, self.compress)
                unknown_since = None
            except JobUnknown as error:
                now = self.clock()
                unknown_since = now if unknown_since is None else unknown_since
                if error.known_lost or now - unknown_since >= self.unknown_after_s:
                    raise _JobLost(job_id, now - unknown_since) from error
                content = None
            if content is not None:
                return content
            if deadline is not None and self.clock() > deadline:
                raise RequestTimeout(f"job {job_id} did not finish within {self.timeout_s:.0f} s")
            left = self._remaining(label)
            self.sleep(self.poll_interval_s if left is None else min(self.poll_interval_s, left))


class _JobLost(Exception):
    """A polled job NDIF has had no record of for ``unknown_after_s`` (given up)."""

    def __init__(self, job_id: str, seconds: float):
        self.job_id = job_id
        super().__init__(f"NDIF has had no record of job {job_id} for {seconds:.0f} s")


class SessionBackend(Backend):
    """Serializes the block it runs (as NDIF's backend does) and hands it to its client.

    The saved values come back into the caller's frame (like nnsight's ``RemoteBackend``) and
    in ``result``.
    """

    def __init__(self, client: RemoteClient, kind: str, label: str, key: str | None,
                 cells: int, traces: int, submit_only: bool, saves: dict | None = None):
        self.client = client
        self.kind = kind
        self.label = label
        self.key = key
        self.cells = cells
        self.traces = traces
        self.submit_only = submit_only
        self.saves = saves
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
                                                self.cells, self.traces, self.saves)
        self.result = decode_result(content, compress)
        internals.return_saves(tracer, self.result)
        return self.result
