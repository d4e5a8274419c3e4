"""What can go wrong with a remote request, and which failures are worth another try.

NDIF reports a failed job as one status message (nnsight raises it as ``RemoteError``). Its
server (``ndif`` 0.1.2) writes two kinds: a *sentence* when it rejected the request (the payload
could not be read, or the model's module tree differs from the client's: ``RequestError``), and
a *traceback* when the shipped code raised. Both fail the same way every time, so they are not
retried (:func:`deterministic_failure`); a preemption, running out of GPU memory or the network
are (:func:`retryable`), and "try again" (HTTP 503, 429) is waited out longer (:func:`busy`).
Two failures are answered by splitting the request (:class:`SplitRequest`): HTTP 413 (too large,
:class:`RequestTooLarge`) and NDIF's execution time-out (:class:`ExecutionTimedOut`). A job NDIF
no longer knows (HTTP 404 from its response route, :class:`JobUnknown`) or a connection that
stays silent (:class:`~interventions.nnsight_internals.SilentConnection`) is given up and the
request sent again. NDIF refusing to load a model on demand is :class:`OnDemandRefused`.
"""

from __future__ import annotations

from ...errors import UserError
from ...nnsight_internals import RemoteError, SilentConnection  # noqa: F401 - re-exported

# How NDIF 0.1.2 words its rejections (``ndif.common.errors``).
PAYLOAD_UNREADABLE = "Your request payload could not be read"
ARCHITECTURE_MISMATCH = "The model architecture on this server doesn't match"
TRACEBACK = "Traceback (most recent call last)"
# Failures inside the block that another try can cure: memory taken by other jobs.
TRANSIENT_IN_BLOCK = ("out of memory", "OutOfMemoryError")
# NDIF's execution time-out (``BaseModelDeployment.run``): "Your job exceeded the execution
# timeout of 3600.0s." The same request would time out again: it is split instead.
EXECUTION_TIMEOUT = "Your job exceeded the execution timeout"
# NDIF could not load the model for this request (``Processor.start``: "Could not deploy this
# model. <reason>"); for a model it has not deployed, a key without on-demand access.
DEPLOY_REFUSED = "Could not deploy this model"
# HTTP statuses that mean "busy, try again later": waited out with longer backoff.
BUSY_STATUSES = (429, 503)


class RemoteRunError(UserError):
    """A remote request failed: after its retries, or at once when retrying cannot help."""


class ClientTimeout(RemoteRunError):
    """The job ran past the client's overall time-out (``--remote-timeout``)."""


class RequestTimeout(TimeoutError):
    """A submitted job did not finish within the client's ``timeout_s`` for one job."""


class ResultExpired(RemoteError):
    """A finished job's result can no longer be downloaded (its link expired): resubmit."""


class JobUnknown(Exception):
    """NDIF has no record of a job (its response route answers HTTP 404). ``known_lost``: the
    server cannot come to know it (a local server that never saw it), so waiting is pointless;
    NDIF's 404 may precede a job's first status, and is waited out for a while."""

    def __init__(self, message: str, known_lost: bool = False):
        super().__init__(message)
        self.known_lost = known_lost


class OnDemandRefused(RemoteRunError):
    """NDIF refused to load a model it has not deployed (a key without on-demand access)."""


class SplitRequest(Exception):
    """A request to be sent again in halves (see ``executor.split_to_fit``)."""

    def single_item_error(self, what: str) -> str:
        """The one line when not even one ``what`` (configuration, batch) passes."""
        raise NotImplementedError


class RequestTooLarge(SplitRequest):
    """A request over the byte budget, refused here before sending or by NDIF (HTTP 413).

    Attributes:
        label: the request; size: its serialized bytes before compression; budget: the limit
            it broke (``None`` when NDIF refused it); by_server: refused with HTTP 413.
    """

    def __init__(self, label: str, size: int, budget: int | None, by_server: bool = False):
        self.label, self.size, self.budget, self.by_server = label, size, budget, by_server
        where = "NDIF refused it (HTTP 413)" if by_server else f"the budget is {budget} bytes"
        super().__init__(f"request {label} is {size} bytes before compression; {where}")

    def single_item_error(self, what: str) -> str:
        limit = "NDIF refused it (HTTP 413):" if self.by_server else \
            f"the request budget is {self.budget} bytes: raise --max-request-mb or"
        return (f"request {self.label} is {self.size} bytes before compression with a single "
                f"{what}, and {limit} lower --batch-size")


class ExecutionTimedOut(SplitRequest):
    """A request with more forward passes than NDIF's execution time-out allows: it timed out
    there (``by_server``), or it has more traces than one that did (``budget``).

    Attributes:
        label: the request; traces: its forward passes; budget: the most traces a request may
            have now (``None`` when NDIF timed it out); message: NDIF's, when it did.
    """

    def __init__(self, label: str, traces: int, budget: int | None, message: str = ""):
        self.label, self.traces, self.budget, self.message = label, traces, budget, message
        self.by_server = budget is None
        why = f"NDIF timed it out ({message})" if self.by_server else \
            f"a request of more than {budget} ran past NDIF's execution time-out"
        super().__init__(f"request {label} has {traces} forward passes; {why}")

    def single_item_error(self, what: str) -> str:
        return (f"request {self.label} ran past NDIF's execution time-out with a single {what} "
                f"({self.traces} forward passes; {' '.join(self.message.split())}): lower "
                "--batch-size or --n-prompts")


def execution_timed_out(error: BaseException) -> bool:
    """Whether a job error is NDIF's execution time-out."""
    return isinstance(error, RemoteError) and str(error).strip().startswith(EXECUTION_TIMEOUT)


def deploy_refused(error: BaseException) -> bool:
    """Whether a job error is NDIF refusing to load the model."""
    return isinstance(error, RemoteError) and str(error).strip().startswith(DEPLOY_REFUSED)


def busy(error: BaseException) -> bool:
    """HTTP 503 or 429 ("try again"): waited out with longer backoff."""
    return http_status(error) in BUSY_STATUSES


def retry_after(error: BaseException) -> float | None:
    """Seconds the server asked to wait (``Retry-After``), if it said."""
    for candidate in (error, error.__cause__):
        headers = getattr(getattr(candidate, "response", None), "headers", None)
        value = headers.get("Retry-After") if headers is not None else None
        if value is not None:
            try:
                return float(value)
            except ValueError:
                return None
    return None


def http_status(error: BaseException) -> int | None:
    """The HTTP status behind a transport error (nnsight wraps ``httpx`` errors), if any."""
    for candidate in (error, error.__cause__):
        response = getattr(candidate, "response", None)
        # httpx errors carry a response; a refused websocket handshake its status itself
        for status in (getattr(response, "status_code", None),
                       getattr(candidate, "status_code", None)):
            if isinstance(status, int):
                return status
    return None


def deterministic_failure(error: BaseException) -> tuple[str, str] | None:
    """``(kind, cause)`` of a job failure that would recur on every try, else ``None``.

    ``kind`` is ``"payload"`` (the server could not read the request), ``"architecture"`` (its
    model has modules other than the client's) or ``"block"`` (the shipped code raised); ``cause``
    is one line: the server's reason, or the traceback's last line.
    """
    if not isinstance(error, RemoteError) or isinstance(error, ResultExpired):
        return None
    text = str(error).strip()
    if text.startswith(PAYLOAD_UNREADABLE):
        return "payload", text.split(". ", 1)[0]
    if text.startswith(ARCHITECTURE_MISMATCH):
        return "architecture", text.split("\n", 1)[0]
    if text.startswith(DEPLOY_REFUSED):
        return "deploy", text
    if TRACEBACK in text and not any(word in text for word in TRANSIENT_IN_BLOCK):
        last = [line.strip() for line in text.splitlines() if line.strip()][-1]
        return "block", last
    return None


def retryable(error: BaseException) -> bool:
    """Network errors, NDIF job errors that may not recur and time-outs are worth another try;
    a client error the server refused (4xx other than 408/429: bad key, bad request) is not."""
    status = http_status(error)
    if status is not None and 400 <= status < 500 and status not in (408, 429):
        return False
    if deterministic_failure(error) is not None:
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


def failure_message(label: str, kind: str, cause: str, transformers: str | None = None) -> str:
    """The one ``error:`` line for a job failure that retrying cannot fix."""
    cause = " ".join(cause.split())
    if kind == "payload":
        why = ("NDIF could not read it: code named inside a trace must be shipped by value "
               "(nnsight.register), and client and server nnsight must agree")
    elif kind == "deploy":
        why = "NDIF could not load the model"
    elif kind == "architecture":
        here = f" from transformers {transformers} here" if transformers else ""
        why = ("NDIF's copy of the model has other modules than this client's: its transformers "
               f"builds the model differently{here} (compare with `python -c 'from nnsight "
               "import ndif; print(ndif.compare())'`)")
    else:
        why = "the code shipped with it raised on the server, and would again"
    return f"NDIF request {label} failed and was not retried ({why}): {cause}"
