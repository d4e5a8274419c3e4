"""Faults of a real service, through injected transports and through nnsight's own NDIF client
over a fake network: retries with backoff, errors retrying cannot fix, requests over the byte
budget or refused with HTTP 413, expired result links, the overall client time-out, Ctrl-C, and
the ledger that lets a rerun resume.
"""

import importlib.metadata
import json
import threading

import httpx
import pytest
from nnsight.intervention.backends.remote import RemoteError
from remote_helpers import (Recording, af1_cells, assert_same, quiet_client, trusted)

from interventions import UserError
from interventions.executors.remote.client import RemoteClient, RemoteRunError
from interventions.executors.remote.executor import RemoteExecutor
from interventions.executors.remote.faults import (ClientTimeout, ResultExpired,
                                                   deterministic_failure, retryable)


def too_large(url="https://ndif.test/request"):
    """What nnsight's client raises when the HTTP front end refuses a request body."""
    request = httpx.Request("POST", url)
    response = httpx.Response(413, request=request, json={"detail": "Request Entity Too Large"})
    error = RemoteError("Failed to send request: Request Entity Too Large")
    error.__cause__ = httpx.HTTPStatusError("413", request=request, response=response)
    return error


def ledger_state(directory):
    """The ledger's index and what else lies in its directory (tmp files would be debris)."""
    index = json.loads((directory / "requests.json").read_text())
    return index, sorted(p.name for p in directory.iterdir())


# -- retries ---------------------------------------------------------------------------------------


def test_retries_back_off_and_recover(llama, data, llama_reference):
    prompts, answers = data
    reference = llama_reference["clean"]
    transport = Recording(trusted(llama),
                          [ConnectionError("connection reset"), RemoteError("CUDA out of memory")])
    client, sleeps = quiet_client(llama, transport)
    remote = RemoteExecutor(llama, prompts, answers, batch_size=8, client=client)
    assert_same(reference, remote.clean())
    assert sleeps == [2.0, 4.0]
    record = client.stats.requests[-1]
    assert record.attempts == 3 and record.bytes_up == 3 * len(transport.blobs[0])
    stats = client.stats.to_dict()
    assert stats["n_requests"] == 1 and stats["n_attempts"] == 3
    assert stats["bytes_down"] == record.bytes_down > 0
    json.dumps(stats)


def test_retries_are_bounded_and_say_how_to_resume(llama, data):
    prompts, answers = data
    failures = [TimeoutError("read timed out")] * 3
    client, sleeps = quiet_client(llama, Recording(trusted(llama), failures),
                                  max_retries=2, backoff_s=10.0, max_backoff_s=15.0)
    remote = RemoteExecutor(llama, prompts, answers, batch_size=8, client=client)
    with pytest.raises(RemoteRunError, match="after 3 attempts.*rerunning the same command"):
        remote.clean()
    assert sleeps == [10.0, 15.0]


def test_errors_that_retrying_cannot_fix_are_raised_at_once(llama, data):
    prompts, answers = data

    class Refused(Exception):
        def __init__(self):
            self.response = type("Response", (), {"status_code": 401})()

    unauthorized = RemoteError("Failed to send request: Missing or invalid API key")
    unauthorized.__cause__ = Refused()
    for failure, raised, message in (
            (ValueError("a bug"), ValueError, "a bug"),  # not the service's: as it is
            (unauthorized, RemoteRunError,
             "NDIF refused request full model: Failed to send request: Missing or invalid API")):
        transport = Recording(trusted(llama), [failure])
        client, sleeps = quiet_client(llama, transport)
        remote = RemoteExecutor(llama, prompts, answers, batch_size=8, client=client)
        with pytest.raises(raised, match=message):
            remote.clean()
        assert sleeps == [] and transport.calls["send"] == 1


TRACEBACK = "Traceback (most recent call last):\n  File \"<block>\", line 3, in <module>\n"


@pytest.mark.parametrize("message,deterministic", [
    # NDIF 0.1.2's own wording (ndif/services/ray/deployments/modeling/base.py, common/errors.py)
    ("Your request payload could not be read (ModuleNotFoundError: No module named 'x'). It may "
     "be truncated or corrupted in transit.", True),
    ("The model architecture on this server doesn't match the one your code was traced "
     "against: it has no module at 'model.layers.3'.\n\nThis usually means ...", True),
    (TRACEBACK + "KeyError: 'CAMA table has no entry for (position, token) (3, 7)'", True),
    (TRACEBACK + "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", False),
    ("Your job exceeded the execution timeout of 3600s.", False),
    ("Your job was cancelled or preempted by the server.", False),
    ("job failed: CUDA out of memory", False),
])
def test_which_job_errors_are_retried(message, deterministic):
    error = RemoteError(message)
    assert (deterministic_failure(error) is not None) == deterministic
    assert retryable(error) != deterministic
    assert not retryable(too_large())  # a 413 is split, not retried


def test_a_job_error_that_would_recur_stops_at_once_with_one_line(llama, data, llama_table):
    """An exception in the shipped block (here: a CAMA layer without this data set's keys)
    is not retried; one line names the request and the cause."""
    from interventions.mechanisms.plan import AF1Plan
    from interventions.mechanisms.traced import CamaLayer

    prompts, answers = data
    layer = llama_table.layer(2)
    partial = CamaLayer(2, layer.keys[:3], layer.means[:3], "cama")
    transport = Recording(trusted(llama))
    client, sleeps = quiet_client(llama, transport)
    remote = RemoteExecutor(llama, prompts, answers, batch_size=8, client=client)
    with pytest.raises(RemoteRunError) as raised:
        list(remote.run_many([("cell", AF1Plan(2, 1), partial)]))
    message = str(raised.value)
    assert "\n" not in message and "NDIF request cells 1-1 of 1 failed and was not retried" \
        in message
    assert "KeyError" in message
    assert "CAMA table has no entry for (position, token, length, group)" in message
    assert sleeps == [] and transport.calls["send"] == 1


# -- the byte budget and HTTP 413 ----------------------------------------------------------------


def test_requests_over_the_byte_budget_are_split_in_halves(llama, data, llama_table,
                                                           llama_reference):
    prompts, answers = data
    cells = af1_cells(llama_table)[:8]
    whole = Recording(trusted(llama))
    client, _ = quiet_client(llama, whole, compress=False)
    list(RemoteExecutor(llama, prompts, answers, batch_size=8, cells_per_request=8,
                        client=client).run_many(cells))
    (size,) = [len(b) for b in whole.blobs]

    transport = Recording(trusted(llama))
    client, _ = quiet_client(llama, transport, compress=False, max_request_bytes=size - 1)
    got = dict(RemoteExecutor(llama, prompts, answers, batch_size=8, cells_per_request=8,
                              client=client).run_many(cells))
    assert [r.cells for r in client.stats.requests] == [4, 4]
    assert all(len(b) < size for b in transport.blobs) and transport.calls["send"] == 2
    for tag, _, _ in cells:
        assert_same(llama_reference[tag], got[tag])
    client.max_request_bytes = 100  # not even one configuration fits
    with pytest.raises(RemoteRunError, match="with a single configuration.*--max-request-mb"):
        list(RemoteExecutor(llama, prompts, answers, batch_size=8, client=client)
             .run_many(cells[:2]))


def test_http_413_halves_the_request_and_lowers_the_budget(llama, data):
    """A front end refuses bodies over ``limit``: the refused request goes in halves, and the
    budget drops below its size, so the next request, as large, is split before it is sent."""
    from interventions import NnsightExecutor
    from interventions.mechanisms.plan import AF1Plan, Intervention

    prompts, answers = data
    # Eight cells that need no table, twice: two requests of the very same size.
    eight = [AF1Plan(0, 1), AF1Plan(0, 2), AF1Plan(2, 1, wait_ablation="zero"),
             AF1Plan(1, 2, wait_ablation="zero")] + \
        [Intervention({k: ("sink_self", "all")}) for k in range(4)]
    cells = [((copy, i), plan, None) for copy in "ab" for i, plan in enumerate(eight)]

    class FrontEnd(Recording):
        limit = None
        refused = 0

        def send(self, blob, compress):
            if self.limit is not None and len(blob) > self.limit:
                self.refused += 1
                raise too_large()
            return super().send(blob, compress)

    transport = FrontEnd(trusted(llama))
    client, sleeps = quiet_client(llama, transport, compress=False, max_request_bytes=None)
    remote = RemoteExecutor(llama, prompts, answers, batch_size=8, cells_per_request=8,
                            client=client)
    list(remote.run_many(cells[:8]))
    transport.limit = len(transport.blobs[0]) - 1
    got = dict(remote.run_many(cells))
    assert transport.refused == 1 and sleeps == []
    assert client.stats.refused_too_large == 1 and client.max_request_bytes <= transport.limit
    assert [r.cells for r in client.stats.requests[1:]] == [4, 4, 4, 4]
    local = NnsightExecutor(llama, prompts, answers, batch_size=8)
    for (copy, i), plan, _ in cells:
        assert_same(local.run(plan), got[(copy, i)])


# -- the ledger: resume, submit now and collect later, expired results ----------------------------


def test_a_rerun_resumes_from_the_ledger(tmp_path, llama, data, llama_table, llama_reference):
    prompts, answers = data
    cells = af1_cells(llama_table)

    class DiesAfter(Recording):
        def send(self, blob, compress):
            if self.calls["send"] >= 1:
                self.calls["send"] += 1
                raise ConnectionError("network down")
            return super().send(blob, compress)

    first, _ = quiet_client(llama, DiesAfter(trusted(llama)),
                            ledger=tmp_path / "ledger", max_retries=1)
    remote = RemoteExecutor(llama, prompts, answers, batch_size=8, cells_per_request=8,
                            client=first)
    done = []
    with pytest.raises(RemoteRunError):
        for tag, preds in remote.run_many(cells):
            done.append(tag)
    assert len(done) == 8  # the first request finished and was yielded

    transport = Recording(trusted(llama))
    second, _ = quiet_client(llama, transport, ledger=tmp_path / "ledger")
    remote = RemoteExecutor(llama, prompts, answers, batch_size=8, cells_per_request=8,
                            client=second)
    got = dict(remote.run_many(cells))
    assert transport.calls["send"] == 1  # only the unfinished request was sent again
    assert [r.reused for r in second.stats.requests] == [True, False]
    assert second.stats.to_dict()["n_reused"] == 1
    for tag, _, _ in cells:
        assert_same(llama_reference[tag], got[tag])


def test_submit_now_collect_later(tmp_path, llama, data, llama_table, llama_reference):
    prompts, answers = data
    cells = af1_cells(llama_table)
    server = trusted(llama)  # holds the submitted jobs, as NDIF would

    transport = Recording(server)
    client, _ = quiet_client(llama, transport, blocking=False, ledger=tmp_path / "ledger")
    jobs = RemoteExecutor(llama, prompts, answers, batch_size=8, cells_per_request=8,
                          client=client).submit(cells)
    assert len(jobs) == 2 and transport.calls == {"send": 0, "submit": 2, "poll": 0}
    ledger = json.loads((tmp_path / "ledger" / "requests.json").read_text())
    assert sorted(e["job_id"] for e in ledger.values()) == sorted(jobs)

    later = Recording(server)
    client, _ = quiet_client(llama, later, blocking=False, ledger=tmp_path / "ledger")
    got = dict(RemoteExecutor(llama, prompts, answers, batch_size=8, cells_per_request=8,
                              client=client).run_many(cells))
    assert later.calls == {"send": 0, "submit": 0, "poll": 2}
    assert sorted(r.job_id for r in client.stats.requests) == sorted(jobs)
    for tag, _, _ in cells:
        assert_same(llama_reference[tag], got[tag])


@pytest.mark.parametrize("with_ledger", [True, False])
def test_a_job_that_never_finishes_times_out_and_is_polled_again(tmp_path, llama, data,
                                                                 with_ledger):
    prompts, answers = data

    class Stuck(Recording):
        def poll(self, job_id, compress):
            self.calls["poll"] += 1
            return None

    transport = Stuck(trusted(llama))
    client, sleeps = quiet_client(llama, transport, blocking=False, timeout_s=0.0,
                                  max_retries=2, ledger=tmp_path / "l" if with_ledger else None)
    with pytest.raises(RemoteRunError, match="did not finish"):
        RemoteExecutor(llama, prompts, answers, batch_size=8, client=client).clean()
    assert transport.calls["submit"] == 1 and transport.calls["poll"] == 3


def test_a_job_that_failed_on_the_server_is_submitted_again(llama, data, llama_reference):
    prompts, answers = data

    class FailsOnce(Recording):
        def poll(self, job_id, compress):
            self.calls["poll"] += 1
            if self.calls["poll"] == 1:
                self.inner.poll(job_id, compress)
                raise RemoteError("job failed: CUDA out of memory")
            return self.inner.poll(job_id, compress)

    transport = FailsOnce(trusted(llama))
    client, sleeps = quiet_client(llama, transport, blocking=False)
    clean = RemoteExecutor(llama, prompts, answers, batch_size=8, client=client).clean()
    assert_same(llama_reference["clean"], clean)
    assert transport.calls == {"send": 0, "submit": 2, "poll": 2} and sleeps == [2.0]


def test_an_expired_result_is_resubmitted_and_recorded(tmp_path, llama, data, llama_table,
                                                        llama_reference):
    """``--submit``, then collecting after NDIF's result links expired: each request is
    submitted again, and the ledger and the stats say which jobs expired."""
    prompts, answers = data
    cells = af1_cells(llama_table)
    server = trusted(llama)
    client, _ = quiet_client(llama, Recording(server), blocking=False, ledger=tmp_path / "l")
    old = RemoteExecutor(llama, prompts, answers, batch_size=8, cells_per_request=8,
                         client=client).submit(cells)

    class Expired(Recording):
        def poll(self, job_id, compress):
            self.calls["poll"] += 1
            if job_id in old:
                raise ResultExpired(f"the result of job {job_id} can no longer be downloaded")
            return self.inner.poll(job_id, compress)

    later = Expired(server)
    client, sleeps = quiet_client(llama, later, blocking=False, ledger=tmp_path / "l")
    got = dict(RemoteExecutor(llama, prompts, answers, batch_size=8, cells_per_request=8,
                              client=client).run_many(cells))
    assert later.calls == {"send": 0, "submit": 2, "poll": 4} and sleeps == []
    assert sorted(j for r in client.stats.requests for j in r.resubmitted_from) == sorted(old)
    assert client.stats.to_dict()["n_resubmitted"] == 2
    index, _ = ledger_state(tmp_path / "l")
    assert sorted(j for e in index.values() for j in e["expired_jobs"]) == sorted(old)
    assert {e["state"] for e in index.values()} == {"done"}
    for tag, _, _ in cells:
        assert_same(llama_reference[tag], got[tag])


# -- the overall client time-out and Ctrl-C ------------------------------------------------------


def test_the_overall_time_out_stops_a_blocking_wait(llama, data):
    prompts, answers = data
    release = threading.Event()

    class Hangs(Recording):
        def send(self, blob, compress):
            self.calls["send"] += 1
            release.wait()
            raise ConnectionError("gone")

    client, _ = quiet_client(llama, Hangs(trusted(llama)),
                             overall_timeout_s=0.2)
    try:
        with pytest.raises(ClientTimeout) as raised:
            RemoteExecutor(llama, prompts, answers, batch_size=8, client=client).clean()
    finally:
        release.set()
    assert isinstance(raised.value, UserError) and "\n" not in str(raised.value)
    assert "client time-out of 0.2 s (--remote-timeout) at request full model" in \
        str(raised.value) and "rerunning the same command resumes" in str(raised.value)


def test_the_overall_time_out_keeps_a_submitted_job_for_the_rerun(tmp_path, llama, data,
                                                                  llama_reference):
    prompts, answers = data
    now = [0.0]

    class Stuck(Recording):
        def poll(self, job_id, compress):
            self.calls["poll"] += 1
            return None

    def sleep(seconds):
        now[0] += seconds

    server = trusted(llama)
    stuck = Stuck(server)
    client = RemoteClient(llama, transport=stuck, blocking=False, ledger=tmp_path / "l",
                          overall_timeout_s=60.0, poll_interval_s=7.0, log=lambda m: None,
                          sleep=sleep, clock=lambda: now[0])
    with pytest.raises(ClientTimeout):
        RemoteExecutor(llama, prompts, answers, batch_size=8, client=client).clean()
    assert stuck.calls["submit"] == 1 and now[0] == 60.0  # the last wait was cut to the deadline
    index, files = ledger_state(tmp_path / "l")
    assert [e["state"] for e in index.values()] == ["submitted"] and files == ["requests.json"]

    later = Recording(server)
    client, _ = quiet_client(llama, later, blocking=False, ledger=tmp_path / "l")
    clean = RemoteExecutor(llama, prompts, answers, batch_size=8, client=client).clean()
    assert later.calls == {"send": 0, "submit": 0, "poll": 1}  # collected, not sent again
    assert_same(llama_reference["clean"], clean)


@pytest.mark.parametrize("where", ["sending", "writing the ledger", "polling"])
def test_ctrl_c_leaves_the_ledger_consistent_and_a_rerun_resumes(tmp_path, monkeypatch, where,
                                                                 llama, data, llama_table,
                                                                 llama_reference):
    prompts, answers = data
    cells = af1_cells(llama_table)
    server = trusted(llama)
    blocking = where != "polling"

    class Interrupted(Recording):
        def send(self, blob, compress):
            if where == "sending" and self.calls["send"] == 1:
                raise KeyboardInterrupt
            return super().send(blob, compress)

        def poll(self, job_id, compress):
            if self.calls["poll"] == 1:
                raise KeyboardInterrupt
            return super().poll(job_id, compress)

    if where == "writing the ledger":  # the second request's result is on disk, its index not
        from pathlib import Path

        replace = Path.replace
        writes = []

        def interrupted_replace(self, target):
            writes.append(Path(target).name)
            if writes.count("requests.json") == 2 and Path(target).name == "requests.json":
                raise KeyboardInterrupt
            return replace(self, target)

        monkeypatch.setattr(Path, "replace", interrupted_replace)
    client, _ = quiet_client(llama, Interrupted(server), blocking=blocking,
                             ledger=tmp_path / "l")
    remote = RemoteExecutor(llama, prompts, answers, batch_size=8, cells_per_request=8,
                            client=client)
    with pytest.raises(KeyboardInterrupt):
        list(remote.run_many(cells))
    monkeypatch.undo()
    index, files = ledger_state(tmp_path / "l")
    assert not [f for f in files if f.endswith(".tmp")]
    done = [k for k, e in index.items() if e["state"] == "done"]
    assert len(done) == 1 and all(f"{k}.result" in files for k in done)
    if where == "polling":  # the second request's job id is kept, to be collected
        assert sorted(e["state"] for e in index.values()) == ["done", "submitted"]

    transport = Recording(server)
    client, _ = quiet_client(llama, transport, blocking=blocking, ledger=tmp_path / "l")
    got = dict(RemoteExecutor(llama, prompts, answers, batch_size=8, cells_per_request=8,
                              client=client).run_many(cells))
    assert [r.reused for r in client.stats.requests] == [True, False]
    assert transport.calls["send" if blocking else "poll"] == 1
    assert transport.calls["submit"] == 0  # a kept job id is polled, not submitted again
    for tag, _, _ in cells:
        assert_same(llama_reference[tag], got[tag])


# -- nnsight's NDIF client, over a fake network ---------------------------------------------------


class FakeNdif:
    """NDIF's HTTP and websocket endpoints as nnsight's RemoteBackend uses them; each request is
    executed by a local server and its result served from a fake object store.

    Faults: the first ``fail_posts`` POSTs fail to connect; a body over ``max_body`` bytes is
    refused with HTTP 413; the links of the first ``expire`` results answer 403, as an expired
    presigned link does; the first ``silent_sockets`` websockets say nothing after the session
    id (a half-open connection); the response route answers HTTP 404 for the ``unknown`` jobs
    (NDIF records no status there for a job posted with a websocket session).
    """

    def __init__(self, server, fail_posts=0, max_body=None, expire=0, silent_sockets=0,
                 unknown=()):
        from nnsight.schema.response import ResponseModel, Status

        self.Response, self.Status = ResponseModel, Status
        self.server = server
        self.fail_posts, self.max_body, self.expire = fail_posts, max_body, expire
        self.silent_sockets, self.unknown = silent_sockets, set(unknown)
        self.posts, self.results, self.expired = [], {}, set()
        self.sockets = self.polls = self.refused = self.unknown_polls = 0

    def _status(self, job_id, status, data=None):
        return self.Response(id=job_id, status=status, data=data).model_dump_json()

    def run(self, blob, compress):
        job_id = f"job-{len(self.posts) - 1}"  # posts already holds this one
        url = f"https://store/{job_id}"
        self.results[url] = self.server.send(blob, compress)[0]
        if self.expire:
            self.expire -= 1
            self.expired.add(url)
        return job_id

    def client(self, *args, **kwargs):
        ndif = self

        class Reply:
            def __init__(self, status_code=200, text="", content=b""):
                self.status_code, self.text, self.content = status_code, text, content
                self.headers = {"Content-Length": str(len(content))}

            def raise_for_status(self):
                pass

            def iter_bytes(self, chunk_size):
                yield from (self.content[i:i + chunk_size]
                            for i in range(0, len(self.content), chunk_size))

        class Client:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def post(self, url, data, files, headers):
                if ndif.fail_posts:
                    ndif.fail_posts -= 1
                    raise httpx.ConnectError("connection refused")
                blob = files["blob"][1]
                if ndif.max_body is not None and len(blob) > ndif.max_body:
                    ndif.refused += 1
                    return httpx.Response(413, request=httpx.Request("POST", url),
                                          json={"detail": "Request Entity Too Large"})
                meta = json.loads(data["data"])
                ndif.posts.append({"url": url, "headers": headers, "meta": meta, "blob": blob})
                job_id = ndif.run(blob, meta["compress"])
                return Reply(text=ndif._status(job_id, ndif.Status.RECEIVED))

            def get(self, url, headers=None):
                ndif.polls += 1
                job_id = url.rsplit("/", 1)[1]
                if job_id in ndif.unknown:
                    ndif.unknown_polls += 1
                    return Reply(status_code=404)
                return Reply(text=ndif._status(job_id, ndif.Status.COMPLETED,
                                               f"https://store/{job_id}"))

            def stream(self, method, url):
                import contextlib

                if url in ndif.expired:
                    return contextlib.nullcontext(
                        httpx.Response(403, request=httpx.Request(method, url),
                                       text="<Error><Code>AccessDenied</Code><Message>Request "
                                            "has expired</Message></Error>"))
                return contextlib.nullcontext(Reply(content=ndif.results[url]))

        return Client()

    def create_connection(self, url, header=None, timeout=None):
        import websocket

        ndif = self
        self.sockets += 1

        silent = self.silent_sockets > 0
        self.silent_sockets -= silent

        class Socket:
            frames = [json.dumps({"session_id": "session-1"})]

            def recv(self):
                if not self.frames and silent:
                    raise websocket.WebSocketTimeoutException("timed out")
                if not self.frames:  # after the POST: the job's completion
                    job_id = f"job-{len(ndif.posts) - 1}"
                    return ndif._status(job_id, ndif.Status.COMPLETED, f"https://store/{job_id}")
                return self.frames.pop(0)

            def settimeout(self, seconds):
                pass

            def close(self):
                pass

        return Socket()


def fake_network(monkeypatch, llama, ndif, silence_s=None):
    """An NdifTransport that reaches ``ndif`` through nnsight's own client code."""
    import websocket
    from nnsight.schema.config import CONFIG

    from interventions.executors.remote.transport import NdifTransport

    monkeypatch.setattr(httpx, "Client", ndif.client)
    monkeypatch.setattr(websocket, "create_connection", ndif.create_connection)
    monkeypatch.setattr(CONFIG.APP, "REMOTE_LOGGING", False)
    transport = NdifTransport(llama.lm, host="https://ndif.test", api_key="key-123",
                              silence_s=silence_s)
    transport._model_key = "nnsight.modeling.transformers.TransformersModel:{}"  # no Hub here
    return transport


@pytest.mark.parametrize("blocking", [True, False])
def test_ndif_transport_through_nnsights_client_on_a_fake_network(monkeypatch, blocking, llama,
                                                                  data, llama_reference):
    ndif = FakeNdif(trusted(llama), fail_posts=1)
    transport = fake_network(monkeypatch, llama, ndif)
    client, sleeps = quiet_client(llama, transport, blocking=blocking)
    remote = RemoteExecutor(llama, *data, batch_size=8, client=client)
    assert_same(llama_reference["clean"], remote.clean())
    assert sleeps == [2.0]  # the refused connection was retried
    (post,) = ndif.posts
    assert post["url"] == "https://ndif.test/request"
    assert post["headers"]["ndif-api-key"] == "key-123"
    assert post["headers"]["nnsight-version"] == importlib.metadata.version("nnsight")
    assert post["meta"]["model_key"] == transport.model_key
    assert post["meta"]["env"] == {"attn_implementation": "sdpa"}
    record = client.stats.requests[-1]
    assert record.job_id == "job-0" and record.attempts == 2
    assert record.bytes_up == 2 * len(post["blob"])  # two uploads began
    assert record.bytes_down == len(ndif.results["https://store/job-0"])
    stats = client.stats.to_dict()
    assert (stats["backend"], stats["host"], stats["model_key"]) == \
        ("ndif", "https://ndif.test", transport.model_key)
    # blocking: one websocket per attempt, no polling; else submitted over HTTP and polled
    assert (ndif.sockets, ndif.polls) == ((2, 0) if blocking else (0, 1))




def test_413_and_expired_links_through_nnsights_client(monkeypatch, llama, data, llama_table,
                                                      llama_reference):
    """The refusal and the expired link as nnsight's client meets them: a request refused with
    HTTP 413 goes in halves; a result whose link answers 403 is submitted again."""
    from interventions.mechanisms.plan import AF1Plan

    prompts, answers = data
    # Two cells with a CAMA layer each: a request of one carries half the tables.
    cells = [(p, p, llama_table.for_intervention(p.intervention(4)))
             for p in (AF1Plan(1, 1), AF1Plan(3, 1))]
    # Sizes of the whole request and of each half. The same request need not serialize to the
    # same number of bytes twice (cloudpickle 3 differs by a few bytes), so the limit lies
    # halfway between the larger half and the whole, not one byte under the whole.
    measure = FakeNdif(trusted(llama))
    client, _ = quiet_client(llama, fake_network(monkeypatch, llama, measure))
    for part in (cells, cells[:1], cells[1:]):
        list(RemoteExecutor(llama, prompts, answers, batch_size=8, client=client).run_many(part))
    whole, *halves = [len(post["blob"]) for post in measure.posts]
    assert max(halves) < whole
    limit = (max(halves) + whole) // 2

    ndif = FakeNdif(trusted(llama), max_body=limit, expire=1)
    client, sleeps = quiet_client(llama, fake_network(monkeypatch, llama, ndif), blocking=False)
    got = dict(RemoteExecutor(llama, prompts, answers, batch_size=8, client=client)
               .run_many(cells))
    assert ndif.refused == 1 and sleeps == []
    assert [r.cells for r in client.stats.requests] == [1, 1]
    first, second = client.stats.requests
    assert first.resubmitted_from == ["job-0"] and first.job_id == "job-1"
    assert second.resubmitted_from == [] and len(ndif.posts) == 3
    for tag, _, _ in cells:
        assert_same(llama_reference[tag], got[tag])


# -- NDIF's execution time-out, silent connections, lost jobs, "try again" ------------------------


TIMEOUT = "Your job exceeded the execution timeout of 3600.0s."  # NDIF 0.1.2's words


class TimesOut(Recording):
    """A server whose execution time-out a request of more than ``limit`` forward passes
    exceeds (each prompt batch of a configuration is one forward pass; ``traces`` is set to the
    request's count as the client delivers it)."""

    def __init__(self, inner, limit):
        super().__init__(inner)
        self.limit, self.traces, self.timed_out = limit, None, []

    def send(self, blob, compress):
        if self.traces > self.limit:
            self.calls["send"] += 1
            self.timed_out.append(self.traces)
            raise RemoteError(TIMEOUT)
        return super().send(blob, compress)


def test_an_execution_time_out_splits_the_request_recursively_and_is_recorded(
        llama, data, llama_table, llama_reference):
    """Never sent again as it was: halved until it fits (down to one configuration), later
    requests split before they are sent, and the stats name the requests that timed out."""
    prompts, answers = data
    # 8 configurations x 5 batches, plus each batch's clean pass (the continuous measures'
    # reference): 45 forward passes; one configuration is 10.
    cells = af1_cells(llama_table)[:8]
    transport = TimesOut(trusted(llama), limit=10)
    client, sleeps = quiet_client(llama, transport)
    original = client.deliver

    def deliver(blob, kind, label, key, n_cells, traces, *rest):
        transport.traces = traces
        return original(blob, kind, label, key, n_cells, traces, *rest)

    client.deliver = deliver
    remote = RemoteExecutor(llama, prompts, answers, batch_size=8, cells_per_request=8,
                            client=client)
    got = dict(remote.run_many(cells))
    # 45 -> 25 -> 15 -> 10 forward passes: three time-outs, each split, none retried as it was
    assert transport.timed_out == [45, 25, 15] and sleeps == []
    assert [r.cells for r in client.stats.requests] == [1] * 8
    stats = client.stats.to_dict()
    assert stats["execution_timeouts"] == ["cells 1-8 of 8", "cells 1-4 of 8", "cells 1-2 of 8"]
    assert stats["max_traces"] == 14 and client.max_traces == 14
    for tag, _, _ in cells:
        assert_same(llama_reference[tag], got[tag])
    # A single configuration that times out is one line: nothing left to split.
    transport.limit = 0
    with pytest.raises(RemoteRunError, match=r"ran past NDIF's execution time-out with a single "
                                             r"configuration \(10 forward passes; Your job "
                                             r"exceeded the execution timeout of 3600\.0s\.\)"):
        list(RemoteExecutor(llama, prompts, answers, batch_size=8, client=client)
             .run_many(cells[:1]))


def test_a_job_unknown_past_the_bound_is_given_up_resubmitted_and_recorded(
        tmp_path, llama, data, llama_table, llama_reference):
    """``--submit``, then collecting a job NDIF no longer knows (HTTP 404 from its response
    route): polled until ``unknown_after_s``, then given up (said in the log), submitted again
    and recorded in the ledger and the stats."""
    from interventions.executors.remote.faults import JobUnknown

    prompts, answers = data
    cells = af1_cells(llama_table)[:2]
    server = trusted(llama)
    client, _ = quiet_client(llama, Recording(server), blocking=False, ledger=tmp_path / "l")
    (old,) = RemoteExecutor(llama, prompts, answers, batch_size=8, client=client).submit(cells)
    server._jobs.clear()  # NDIF lost it
    now, logged = [0.0], []

    class Lost(Recording):
        """NDIF's response route: HTTP 404 says nothing about whether the job may yet appear."""

        def poll(self, job_id, compress):
            self.calls["poll"] += 1
            try:
                return self.inner.poll(job_id, compress)
            except JobUnknown as error:
                now[0] += 100.0  # each poll a hundred seconds later
                raise JobUnknown(str(error)) from None

    later = Lost(server)
    client = RemoteClient(llama, transport=later, blocking=False, ledger=tmp_path / "l",
                          unknown_after_s=250.0, log=logged.append, sleep=lambda s: None,
                          clock=lambda: now[0])
    got = dict(RemoteExecutor(llama, prompts, answers, batch_size=8, client=client).run_many(
        cells))
    for tag, _, _ in cells:
        assert_same(llama_reference[tag], got[tag])
    # first unknown at 100 s, still at 200, 300, 400 s: given up once 250 s have passed, then
    # resubmitted, and the new job collected at the fifth poll
    assert later.calls == {"send": 0, "submit": 1, "poll": 5}
    assert any(f"NDIF has had no record of job {old} for 300 s; giving it up and submitting "
               "the request again" in line for line in logged)
    (record,) = client.stats.requests
    assert record.lost_jobs == [old] and client.stats.to_dict()["n_lost"] == 1
    index, _ = ledger_state(tmp_path / "l")
    (entry,) = index.values()
    assert entry["lost_jobs"] == [old] and entry["state"] == "done"


def test_503_backs_off_with_jitter_for_minutes_and_honours_retry_after(llama, data,
                                                                       llama_reference):
    prompts, answers = data

    def busy(retry_after=None):
        request = httpx.Request("POST", "https://ndif.test/request")
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
        response = httpx.Response(503, request=request, headers=headers,
                                  json={"detail": "try again"})
        error = RemoteError("Failed to send request: try again")
        error.__cause__ = httpx.HTTPStatusError("503", request=request, response=response)
        return error

    # Eight refusals: more than the 3 retries of other failures, within the 8 of "try again".
    failures = [busy() for _ in range(6)] + [busy(retry_after=250), busy()]
    jitter = iter([0.0, 1.0, 0.5, 0.0, 1.0, 0.5, 0.0, 1.0])
    transport = Recording(trusted(llama), failures)
    client, sleeps = quiet_client(llama, transport, jitter=lambda: next(jitter))
    clean = RemoteExecutor(llama, prompts, answers, batch_size=8, client=client).clean()
    assert_same(llama_reference["clean"], clean)
    # 2 s doubling, capped at 300 s, each jittered to 50-100 %; Retry-After (250 s) raises one
    steps = [2, 4, 8, 16, 32, 64, 128, 256]
    factors = [0.5, 1.0, 0.75, 0.5, 1.0, 0.75, 0.5, 1.0]
    expected = [s * f for s, f in zip(steps, factors)]
    expected[6] = 250.0
    assert sleeps == pytest.approx(expected)
    assert client.stats.requests[-1].attempts == 9
    # A ninth refusal is one too many.
    transport = Recording(trusted(llama), [busy() for _ in range(9)])
    client, sleeps = quiet_client(llama, transport)
    with pytest.raises(RemoteRunError, match="failed after 9 attempts"):
        RemoteExecutor(llama, prompts, answers, batch_size=8, client=client).clean()
    assert len(sleeps) == 8 and max(sleeps) == 256.0


def test_a_silent_websocket_falls_back_to_polling_then_resubmits(monkeypatch, tmp_path, llama,
                                                                 data, llama_reference):
    """Through nnsight's client on a fake network: the job is posted, then the websocket
    says nothing for ``silence_s``. The client asks NDIF's response route about the job (a
    blocking job has no record there: HTTP 404), gives it up, submits the request again over
    HTTP and polls it; the ledger and the stats record the lost job."""
    ndif = FakeNdif(trusted(llama), silent_sockets=1, unknown=["job-0"])
    transport = fake_network(monkeypatch, llama, ndif, silence_s=0.01)
    now, logged = [0.0], []

    def sleep(seconds):
        now[0] += seconds

    client = RemoteClient(llama, transport=transport, ledger=tmp_path / "l", log=logged.append,
                          sleep=sleep, clock=lambda: now[0], unknown_after_s=10.0,
                          poll_interval_s=3.0, jitter=lambda: 1.0)
    clean = RemoteExecutor(llama, *data, batch_size=8, client=client).clean()
    assert_same(llama_reference["clean"], clean)
    assert ndif.sockets == 1 and [p["meta"].get("session_id") or None for p in ndif.posts] == \
        ["session-1", None]  # the second post is a submission without a websocket
    assert ndif.unknown_polls == 5  # 0, 3, 6, 9, 12 s: past the 10 s bound
    assert any("no status from NDIF for 0.01 s on the websocket (job job-0); asking NDIF's "
               "response route about the job" in line for line in logged)
    (record,) = client.stats.requests
    assert record.lost_jobs == ["job-0"] and record.job_id == "job-1" and record.attempts == 3
    index, _ = ledger_state(tmp_path / "l")
    (entry,) = index.values()
    assert entry["lost_jobs"] == ["job-0"] and entry["state"] == "done"
