"""What can go wrong with a remote request, and which failures are worth another try.

NDIF reports a failed job as one status message (nnsight raises it as ``RemoteError``). Its
server (``ndif`` 0.1.2) writes two kinds: a *sentence* when it rejected the request (the payload
could not be read, or the model's module tree differs from the client's: ``RequestError``), and
a *traceback* when the shipped code raised. Both fail the same way every time, so they are not
retried (:func:`deterministic_failure`); a time-out, a preemption, running out of GPU memory or
the network are (:func:`retryable`). An HTTP 413 means the request is too large: the client
splits it (:class:`RequestTooLarge`).
"""

from __future__ import annotations

from ...errors import UserError
from ...nnsight_internals import RemoteError

# How NDIF 0.1.2 words its rejections (``ndif.common.errors``).
PAYLOAD_UNREADABLE = "Your request payload could not be read"
ARCHITECTURE_MISMATCH = "The model architecture on this server doesn't match"
TRACEBACK = "Traceback (most recent call last)"
# Failures inside the block that another try can cure: memory taken by other jobs.
TRANSIENT_IN_BLOCK = ("out of memory", "OutOfMemoryError")


class RemoteRunError(UserError):
    """A remote request failed: after its retries, or at once when retrying cannot help."""


class ClientTimeout(RemoteRunError):
    """The job ran past the client's overall time-out (``--remote-timeout``)."""


class RequestTimeout(TimeoutError):
    """A submitted job did not finish within the client's ``timeout_s`` for one job."""


class ResultExpired(RemoteError):
    """A finished job's result can no longer be downloaded (its link expired): resubmit."""


class RequestTooLarge(Exception):
    """A request over the byte budget, refused here before sending or by NDIF (HTTP 413).

    Attributes:
        label: the request; size: its serialized bytes before compression; budget: the limit
            it broke (``None`` when NDIF refused it); by_server: refused with HTTP 413.
    """

    def __init__(self, label: str, size: int, budget: int | None, by_server: bool = False):
        self.label, self.size, self.budget, self.by_server = label, size, budget, by_server
        where = "NDIF refused it (HTTP 413)" if by_server else f"the budget is {budget} bytes"
        super().__init__(f"request {label} is {size} bytes before compression; {where}")


def http_status(error: BaseException) -> int | None:
    """The HTTP status behind a transport error (nnsight wraps ``httpx`` errors), if any."""
    for candidate in (error, error.__cause__):
        response = getattr(candidate, "response", None)
        status = getattr(response, "status_code", None)
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
    elif kind == "architecture":
        here = f" from transformers {transformers} here" if transformers else ""
        why = ("NDIF's copy of the model has other modules than this client's: its transformers "
               f"builds the model differently{here} (compare with `python -c 'from nnsight "
               "import ndif; print(ndif.compare())'`)")
    else:
        why = "the code shipped with it raised on the server, and would again"
    return f"NDIF request {label} failed and was not retried ({why}): {cause}"
