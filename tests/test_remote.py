"""The remote (NDIF) path, offline: requests are serialized exactly as for NDIF and executed by
a local stand-in server (in this process with the project hidden, or in a separate process that
cannot import the project), and must give what the local path gives.

Also: the server's import rules on serialized requests, CAMA uploads, retries, the ledger
(resume, submit now and collect later), preflight decisions on canned NDIF answers, the dry run.
"""

import io
import json
import subprocess
import sys
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
import torch
from conftest import wrap_tiny
from nnsight.intervention.backends.remote import RemoteError

import tiny
from interventions import (AF1Plan, NnsightExecutor, UserError, apply_af1, build_cama_table,
                           load_model)
from interventions.mechanisms.plan import Intervention
from interventions.executors.remote.audit import audit_request
from interventions.executors.remote.client import RemoteClient, RemoteRunError
from interventions.executors.remote.executor import RemoteExecutor, load_remote_model
from interventions.executors.remote.preflight import (KEY_URL, NdifAnswers, PlannedTask,
                                                      _Capture, closest_model,
                                                      fetch_ndif_answers, plan_remote_job,
                                                      preflight, preflight_decision)
from interventions.executors.remote.transport import LocalTransport, decode_result

WORKER = Path(__file__).with_name("remote_worker.py")
N_LAYERS = 4


def arithmetic(tokenizer, n=30):
    """``Calculate: A+B=`` prompts of two token lengths (so several batches) and answers."""
    pairs = [(a, b) for a in (3, 7, 12, 25, 41) for b in range(1, 7)][:n]
    prompts = [f"Calculate: {a}+{b}=" for a, b in pairs]
    answers = [tokenizer.convert_tokens_to_ids(str(a + b)[0]) for a, b in pairs]
    return prompts, answers


def af1_cells(table):
    """A grid, the necessity interventions and the AF1 variants, with the table layer each
    needs: ``[(tag, plan_or_intervention, cama)]``."""
    plans = [AF1Plan(w, t) for w in range(N_LAYERS) for t in (1, 2) if w + t <= N_LAYERS]
    plans += [AF1Plan(2, 1, sink=False), AF1Plan(2, 1, wait_ablation="zero"),
              AF1Plan(2, 1, wait_ablation="position_mean"), AF1Plan(1, 2, transfer_peek="all")]
    cells = [(p, p, table.for_intervention(p.intervention(N_LAYERS))) for p in plans]
    necessity = [Intervention({k: ("sink_self", "all")}) for k in range(N_LAYERS)]
    return cells + [(iv, iv, None) for iv in necessity]


def assert_same(expected, got):
    assert np.array_equal(expected.pred_ids, got.pred_ids)
    np.testing.assert_allclose(expected.answer_logits, got.answer_logits, rtol=1e-5, atol=1e-5)


def assert_tables_close(expected, got):
    assert expected.layers == got.layers
    assert torch.equal(expected.keys, got.keys) and torch.equal(expected.counts, got.counts)
    torch.testing.assert_close(got.means, expected.means, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.position_means, expected.position_means, rtol=1e-5, atol=1e-6)
    assert set(got.metadata) == set(expected.metadata)


class Recording:
    """A transport that keeps every request blob and counts calls, around another transport."""

    def __init__(self, inner, failures=()):
        self.inner = inner
        self.name, self.host = "recording", None
        self.failures = list(failures)
        self.blobs = []
        self.calls = {"send": 0, "submit": 0, "poll": 0}

    def _maybe_fail(self):
        if self.failures:
            raise self.failures.pop(0)

    def send(self, blob, compress):
        self.calls["send"] += 1
        self.blobs.append(blob)
        self._maybe_fail()
        return self.inner.send(blob, compress)

    def submit(self, blob, compress):
        self.calls["submit"] += 1
        self.blobs.append(blob)
        self._maybe_fail()
        return self.inner.submit(blob, compress)

    def poll(self, job_id, compress):
        self.calls["poll"] += 1
        return self.inner.poll(job_id, compress)


def quiet_client(model, transport, **options):
    sleeps = []
    client = RemoteClient(model, transport=transport, log=lambda message: None,
                          sleep=sleeps.append, **options)
    return client, sleeps


@pytest.fixture(scope="module")
def llama(digit_tok):
    return wrap_tiny("llama", digit_tok, "sdpa")


@pytest.fixture(scope="module")
def data(digit_tok):
    return arithmetic(digit_tok)


@pytest.fixture(scope="module")
def llama_table(llama, data):
    return build_cama_table(llama, data[0], "fp", batch_size=8, progress=False)


@pytest.fixture(scope="module")
def llama_reference(llama, data, llama_table):
    """The local path's predictions for every cell of :func:`af1_cells` (and ``"clean"``)."""
    local = NnsightExecutor(llama, *data, batch_size=8)
    reference = {tag: local.run(plan, cama) for tag, plan, cama in af1_cells(llama_table)}
    reference["clean"] = local.clean()
    return reference


# -- the remote path equals the local path --------------------------------------------------------


@pytest.mark.parametrize("arch,attn", [("llama", "sdpa"), ("gpt2", "eager"),
                                       ("gpt_neox", "sdpa"), ("qwen2", "eager")])
def test_remote_path_equals_local_path(arch, attn, digit_tok):
    model = wrap_tiny(arch, digit_tok, attn)
    prompts, answers = arithmetic(digit_tok)
    layers = list(range(N_LAYERS + 1))
    local = NnsightExecutor(model, prompts, answers, batch_size=8)
    local_table = build_cama_table(model, prompts, "fp", layers, batch_size=8, progress=False)

    client, _ = quiet_client(model, Recording(LocalTransport.for_model(model)))
    remote = RemoteExecutor(model, prompts, answers, batch_size=8, cells_per_request=6,
                            client=client)
    remote_table = build_cama_table(model, prompts, "fp", layers, batch_size=8, progress=False,
                                    runner=remote.cama_runner())
    assert_tables_close(local_table, remote_table)
    n_requests = len(client.stats.requests)
    assert_same(local.clean(), remote.clean())
    assert len(client.stats.requests) == n_requests  # the clean pass rode on the CAMA request

    cells = af1_cells(remote_table)
    got = dict(remote.run_many(cells))
    for tag, plan, cama in cells:
        assert_same(local.run(plan, local_table.for_intervention(
            plan.intervention(N_LAYERS) if isinstance(plan, AF1Plan) else plan)), got[tag])
    assert len(client.stats.requests) == 1 + -(-len(cells) // 6)
    assert client.transport.calls["send"] == len(client.stats.requests)


def test_a_request_runs_in_a_process_that_cannot_import_the_project(tmp_path, digit_tok):
    """Client: a weightless (meta) model from a checkpoint directory. Server: another process
    that loads the checkpoint with transformers + nnsight and deserializes with nnsight's
    RequestModel. Same results as the local path on the same checkpoint."""
    checkpoint = tiny.save_tiny_model("llama", tmp_path / "model", digit_tok, "eager")
    prompts, answers = arithmetic(digit_tok, n=20)
    reference = load_model(checkpoint, dtype="float32", device="cpu", attn_implementation="eager")
    client_model = load_remote_model(checkpoint, dtype="float32", attn_implementation="eager")
    assert next(client_model.hf.parameters()).device.type == "meta"

    transport = WorkerTransport(checkpoint, tmp_path, "eager", "float32")
    try:
        assert transport.ready == ["ready", "not-importable"]
        client, _ = quiet_client(client_model, transport, max_retries=0)
        remote = RemoteExecutor(client_model, prompts, answers, batch_size=8,
                                cells_per_request=4, client=client)
        layers = [1, 2, 3]
        table = build_cama_table(client_model, prompts, "fp", layers, batch_size=8,
                                 progress=False, runner=remote.cama_runner())
        expected_table = build_cama_table(reference, prompts, "fp", layers, batch_size=8,
                                          progress=False)
        assert_tables_close(expected_table, table)
        local = NnsightExecutor(reference, prompts, answers, batch_size=8)
        assert_same(local.clean(), remote.clean())
        plans = [AF1Plan(1, 2), AF1Plan(2, 1), AF1Plan(3, 1, sink=False),
                 AF1Plan(2, 2, wait_ablation="position_mean")]
        cells = [(p, p, table.for_intervention(p.intervention(N_LAYERS))) for p in plans]
        cells.append(("necessity", Intervention({1: ("sink_self", "all")}), None))
        got = dict(remote.run_many(cells))
        for tag, plan, _ in cells:
            intervention = plan.intervention(N_LAYERS) if isinstance(plan, AF1Plan) else plan
            assert_same(local.run(plan, expected_table.for_intervention(intervention)), got[tag])
        assert transport.sent == 3  # CAMA (+ clean), two chunks of cells
    finally:
        transport.close()


def test_nnsights_own_remote_local_backend_runs_the_same_requests(llama, data, llama_table,
                                                                   llama_reference):
    """The blocks this toolkit ships also pass nnsight's own ``remote="local"`` simulation."""
    from nnsight.intervention.backends.local import LocalSimulationBackend

    from interventions.executors.remote.executor import cells_session

    class Simulation(LocalSimulationBackend):
        def __call__(self, tracer):
            super().__call__(tracer)  # pushes the saves into the caller's frame
            self.result = {k: tracer.info.frame.f_locals[k]
                           for k in ("pred_ids", "answer_logits")}

    cells = af1_cells(llama_table)
    client, _ = quiet_client(llama, LocalTransport.for_model(llama))
    remote = RemoteExecutor(llama, *data, batch_size=8, client=client)
    backend = Simulation(llama.lm)
    cells_session(llama.lm, llama.sites, backend,
                  [(plan if isinstance(plan, Intervention) else plan.intervention(N_LAYERS), cama)
                   for _, plan, cama in cells], remote._inputs)
    got = remote._assemble(backend.result["pred_ids"], backend.result["answer_logits"],
                           len(cells))
    for (tag, _, _), preds in zip(cells, got):
        assert_same(llama_reference[tag], preds)


class WorkerTransport:
    """Sends each request to tests/remote_worker.py, a server process of its own."""

    name, host = "worker", None

    def __init__(self, checkpoint, directory, attn, dtype):
        self.directory = Path(directory)
        self.log = open(self.directory / "worker.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), str(checkpoint), attn, dtype], cwd=self.directory,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.ready = self.proc.stdout.readline().split()
        self.sent = 0

    def send(self, blob, compress):
        self.sent += 1
        request = self.directory / f"{self.sent}.request"
        result = self.directory / f"{self.sent}.result"
        request.write_bytes(blob)
        self.proc.stdin.write(f"{request} {result} {int(compress)}\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        if answer != "ok":
            raise RemoteError(answer or (self.directory / "worker.log").read_text()[-2000:])
        return result.read_bytes(), None

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.log.close()


@pytest.mark.slow
def test_smollm2_remote_path_equals_local_path():
    from tasks import build_task

    model = load_model("smollm2", device="cpu")
    build = build_task(model.tokenizer, task="A+B", style="calculate")
    prompts, answers = build.dataset["prompt"], build.dataset["answer_token_id"]
    layers = [19, 20]
    local = NnsightExecutor(model, prompts, answers)
    local_table = build_cama_table(model, prompts, "fp", layers, progress=False)
    client, _ = quiet_client(model, LocalTransport.for_model(model))
    remote = RemoteExecutor(model, prompts, answers, client=client)
    table = build_cama_table(model, prompts, "fp", layers, progress=False,
                             runner=remote.cama_runner())
    assert_tables_close(local_table, table)
    assert_same(local.clean(), remote.clean())
    plans = [AF1Plan(20, 4), AF1Plan(19, 3), AF1Plan(20, 4, wait_ablation="zero"),
             AF1Plan(20, 4, transfer_peek="all")]
    cells = [(p, p, table.for_intervention(p.intervention(model.n_layers))) for p in plans]
    cells.append(("necessity", Intervention({15: ("sink_self", "all")}), None))
    got = dict(remote.run_many(cells))
    for tag, plan, _ in cells:
        intervention = plan.intervention(model.n_layers) if isinstance(plan, AF1Plan) else plan
        assert_same(local.run(plan, local_table.for_intervention(intervention)), got[tag])
    assert len(client.stats.requests) == 2


# -- what a request carries -----------------------------------------------------------------------


def test_requests_import_only_what_the_server_permits(llama, data, llama_table):
    prompts, answers = data
    table = llama_table
    transport = Recording(LocalTransport.for_model(llama))
    client, _ = quiet_client(llama, transport)
    remote = RemoteExecutor(llama, prompts, answers, batch_size=8, client=client)
    build_cama_table(llama, prompts, "fp", [2], batch_size=8, progress=False,
                     runner=remote.cama_runner())
    list(remote.run_many(af1_cells(table)))
    for blob in transport.blobs:
        audit = audit_request(blob, compress=client.compress)
        assert audit.violations == []
        assert audit.imports == set()
        modules = {module for module, _ in audit.globals}
        assert "torch" in modules and not any(m.startswith(("interventions", "tasks"))
                                              for m in modules)


def _sneaky(x):
    import subprocess  # noqa: F401 - what the audit must catch in shipped source

    return x


def test_audit_flags_imports_the_server_refuses(llama):
    import os

    capture = _Capture()
    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    try:
        with llama.lm.session(backend=capture):
            value = _sneaky(os.getcwd())
    finally:
        cloudpickle.unregister_pickle_by_value(module)
    audit = audit_request(capture.blob)
    assert "os.<module>" in audit.violations
    assert "import subprocess" in audit.violations
    assert "subprocess" in audit.imports


def test_cama_layers_travel_once_per_request_in_the_model_dtype(digit_tok, data):
    prompts, answers = data
    hf = tiny.tiny_hf_model("llama", digit_tok, "sdpa").to(torch.bfloat16)
    from interventions.mechanisms.models import wrap_model

    model = wrap_model(hf, digit_tok)
    assert model.identity.dtype == "bfloat16"
    table = build_cama_table(model, prompts, "fp", batch_size=8, progress=False)
    # a table layer is a copy: pickling it carries its means and the keys, not the whole table
    layer_bytes = len(cloudpickle.dumps(table.layer(2)))
    assert layer_bytes < table.means[0].nbytes + table.keys.nbytes + 4000 < table.means.nbytes

    def upload(plans):
        transport = Recording(LocalTransport.for_model(model))
        client, _ = quiet_client(model, transport, compress=False)
        remote = RemoteExecutor(model, prompts, answers, batch_size=8, client=client)
        list(remote.run_many([(p, p, table.for_intervention(p.intervention(N_LAYERS)))
                              for p in plans]))
        assert len(transport.blobs) == 1
        return len(transport.blobs[0])

    layer_bf16 = table.means[0].numel() * 2
    one = upload([AF1Plan(2, 1)])
    same_layer = upload([AF1Plan(2, 1), AF1Plan(2, 2), AF1Plan(2, 1, sink=False),
                         AF1Plan(2, 2, sink=False), AF1Plan(2, 1, transfer_peek="all")])
    two_layers = upload([AF1Plan(2, 1), AF1Plan(1, 1)])
    assert same_layer - one < layer_bf16 / 4  # four more cells, no more table
    assert layer_bf16 <= two_layers - one < layer_bf16 + 4000  # one more layer, in bf16


# -- faults: retries, the ledger, submitting now and collecting later -----------------------------


def test_retries_back_off_and_recover(llama, data, llama_reference):
    prompts, answers = data
    reference = llama_reference["clean"]
    transport = Recording(LocalTransport.for_model(llama),
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
    client, sleeps = quiet_client(llama, Recording(LocalTransport.for_model(llama), failures),
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
    for failure in (ValueError("a bug"), unauthorized):
        transport = Recording(LocalTransport.for_model(llama), [failure])
        client, sleeps = quiet_client(llama, transport)
        remote = RemoteExecutor(llama, prompts, answers, batch_size=8, client=client)
        with pytest.raises(type(failure)):
            remote.clean()
        assert sleeps == [] and transport.calls["send"] == 1


def test_a_rerun_resumes_from_the_ledger(tmp_path, llama, data, llama_table, llama_reference):
    prompts, answers = data
    cells = af1_cells(llama_table)

    class DiesAfter(Recording):
        def send(self, blob, compress):
            if self.calls["send"] >= 1:
                self.calls["send"] += 1
                raise ConnectionError("network down")
            return super().send(blob, compress)

    first, _ = quiet_client(llama, DiesAfter(LocalTransport.for_model(llama)),
                            ledger=tmp_path / "ledger", max_retries=1)
    remote = RemoteExecutor(llama, prompts, answers, batch_size=8, cells_per_request=8,
                            client=first)
    done = []
    with pytest.raises(RemoteRunError):
        for tag, preds in remote.run_many(cells):
            done.append(tag)
    assert len(done) == 8  # the first request finished and was yielded

    transport = Recording(LocalTransport.for_model(llama))
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
    server = LocalTransport.for_model(llama)  # holds the submitted jobs, as NDIF would

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

    transport = Stuck(LocalTransport.for_model(llama))
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

    transport = FailsOnce(LocalTransport.for_model(llama))
    client, sleeps = quiet_client(llama, transport, blocking=False)
    clean = RemoteExecutor(llama, prompts, answers, batch_size=8, client=client).clean()
    assert_same(llama_reference["clean"], clean)
    assert transport.calls == {"send": 0, "submit": 2, "poll": 2} and sleeps == [2.0]


# -- the local stand-in server --------------------------------------------------------------------


def test_local_server_result_is_what_ndif_sends(llama, data):
    prompts, answers = data
    transport = Recording(LocalTransport.for_model(llama))
    client, _ = quiet_client(llama, transport, compress=True)
    RemoteExecutor(llama, prompts, answers, batch_size=8, client=client).clean()
    content, _ = transport.inner.send(transport.blobs[0], True)
    result = decode_result(content, True)
    assert set(result) == {"pred_ids", "answer_logits"}  # the saves only, not the inputs
    assert result["pred_ids"].dtype == torch.int32 and result["pred_ids"].shape == (len(prompts),)
    with pytest.raises(Exception):
        torch.load(io.BytesIO(content), weights_only=False)  # compressed on the wire


def test_local_server_refuses_code_a_server_could_not_import(tmp_path, llama, monkeypatch):
    """Code importable here only through a finder (as an editable install makes the project
    importable) is refused, as on a server where it is not installed."""
    import importlib.abc
    import importlib.util

    (tmp_path / "helper_mod.py").write_text("def double(x):\n    return x * 2\n")

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "helper_mod":
                return importlib.util.spec_from_file_location(name, tmp_path / "helper_mod.py")
            return None

    monkeypatch.setattr(sys, "meta_path", [Finder()] + sys.meta_path)
    monkeypatch.delitem(sys.modules, "helper_mod", raising=False)
    from helper_mod import double

    client, _ = quiet_client(llama, LocalTransport.for_model(llama))
    enc = llama.encode(["Calculate: 3+4="])
    lm = llama.lm  # the block may name the nnsight model, not the AF1Model around it
    with pytest.raises(ModuleNotFoundError, match="helper_mod"):
        with llama.lm.trace(enc, backend=client.backend("probe", "helper")):
            logits = double(lm.output.logits).save()
    sys.modules.pop("helper_mod", None)
    # The project itself is such code: naming an AF1Model (not model.sites / model.lm) inside a
    # block ships a reference to interventions.mechanisms.models, which NDIF does not have.
    with pytest.raises(ModuleNotFoundError, match="interventions"):
        with llama.lm.trace(enc, backend=client.backend("probe", "af1model")):
            apply_af1(llama.sites, AF1Plan(0, 2))
            ids = lm.output.logits[:, -1].argmax(-1).save()
    sites = llama.sites
    with llama.lm.trace(enc, backend=client.backend("probe", "sites")):
        apply_af1(sites, AF1Plan(0, 2))
        ids = lm.output.logits[:, -1].argmax(-1).save()
    assert ids.shape == (1,)


def test_remote_model_has_no_weights_and_names_its_checkpoint(tmp_path, digit_tok):
    checkpoint = tiny.save_tiny_model("gpt2", tmp_path / "gpt2", digit_tok, "eager")
    model = load_remote_model(checkpoint, attn_implementation="eager")
    assert {p.device.type for p in model.hf.parameters()} == {"meta"}
    assert model.identity.dtype == "bfloat16" and model.identity.device == "ndif"
    assert model.identity.architecture == "gpt2" and model.n_layers == N_LAYERS
    assert model.identity.fingerprint == load_model(checkpoint, device="cpu").identity.fingerprint
    assert model.lm._remoteable_get_env() == {"attn_implementation": "eager"}
    with pytest.raises(UserError, match="Hub id"):
        load_remote_model("smollm2")


# -- preflight ------------------------------------------------------------------------------------


def deployment(repo, level="HOT", state="RUNNING", revision="main"):
    return {"repo_id": repo, "revision": revision, "deployment_level": level,
            "application_state": state, "model_key": f"nnsight...TransformersModel:{repo}"}


STATUS = {"deployments": {str(i): d for i, d in enumerate([
    deployment("meta-llama/Llama-3.1-8B"), deployment("meta-llama/Llama-3.1-8B-Instruct"),
    deployment("meta-llama/Llama-3.1-70B"), deployment("meta-llama/Llama-3.3-70B-Instruct"),
    deployment("openai-community/gpt2"), deployment("EleutherAI/gpt-j-6b", "COLD", "NOT_STARTED"),
    deployment("meta-llama/Llama-3.1-405B-Instruct", "WARM", "DEPLOYING"),
])}}
ENV = {"python_version": "3.11.7", "packages": {"nnsight": "0.8.1"}}


def answers(**changes):
    base = dict(api_key_present=True, client_version="0.8.1", server_env=ENV, status=STATUS,
                host="https://api.ndif.us")
    return NdifAnswers(**{**base, **changes})


def test_preflight_missing_key_says_how_to_set_it():
    result = preflight_decision("meta-llama/Llama-3.1-8B", answers(api_key_present=False))
    assert len(result.errors) == 1
    message = result.errors[0]
    assert "NDIF_API_KEY" in message and "nnsight.login()" in message and KEY_URL in message
    with pytest.raises(UserError, match="NDIF_API_KEY"):
        preflight("meta-llama/Llama-3.1-8B", answers=answers(api_key_present=False))


def test_preflight_version_mismatch_names_both_versions():
    env = {"packages": {"nnsight": "0.9.0"}}
    result = preflight_decision("meta-llama/Llama-3.1-8B", answers(server_env=env))
    assert result.errors == [result.errors[0]]
    assert "0.8.1" in result.errors[0] and "0.9.0" in result.errors[0]
    assert "pip install nnsight==0.9.0" in result.errors[0]


def test_preflight_unknown_model_lists_hosted_models_and_suggests_the_closest():
    result = preflight_decision("meta-llama/Meta-Llama-3-8B", answers())
    (message,) = result.errors
    assert "does not host meta-llama/Meta-Llama-3-8B" in message
    assert "closest hosted model is meta-llama/Llama-3.1-8B (`--model meta-llama/Llama-3.1-8B`)" \
        in message
    assert "openai-community/gpt2" in message and "gpt-j" not in message  # running ones only
    assert closest_model("EleutherAI/pythia-70m", ["openai-community/gpt2"]) is None


def test_preflight_hosted_but_not_running_and_wrong_revision():
    result = preflight_decision("meta-llama/Llama-3.1-405B-Instruct", answers())
    assert "not running now (WARM/DEPLOYING)" in result.errors[0]
    result = preflight_decision("meta-llama/Llama-3.1-8B", answers(), revision="abc123")
    assert "at revision main, not abc123" in result.errors[0]


def test_preflight_accepts_a_running_model_and_reports_unreachable_ndif():
    result = preflight_decision("Meta-Llama/Llama-3.1-8B", answers())
    assert result.ok and result.deployment["repo_id"] == "meta-llama/Llama-3.1-8B"
    result = preflight_decision("meta-llama/Llama-3.1-8B",
                                answers(status=None, server_env=None, error="timed out"))
    assert result.errors == ["cannot reach NDIF at https://api.ndif.us (timed out); check the "
                             "network (and NDIF_HOST) or https://discuss.ndif.us"]


def test_preflight_asks_nothing_without_a_key(monkeypatch):
    from nnsight import ndif
    from nnsight.schema.config import CONFIG

    monkeypatch.setattr(CONFIG.API, "APIKEY", None)
    monkeypatch.setattr(ndif, "status", lambda raw=False: pytest.fail("asked NDIF"))
    got = fetch_ndif_answers()
    assert not got.api_key_present and got.status is None and got.client_version == "0.8.1"


# -- the dry run ----------------------------------------------------------------------------------


def test_dry_run_plans_exactly_the_requests_a_run_sends(llama, data):
    prompts, answers = data
    plans = [AF1Plan(w, t) for w in range(N_LAYERS) for t in (1, 2) if w + t <= N_LAYERS]
    necessity = [Intervention({k: ("sink_self", "all")}) for k in range(N_LAYERS)]
    layers = sorted({p.l_wait for p in plans if p.l_wait > 0})
    plan = plan_remote_job(llama, [PlannedTask("A+B", prompts, plans + necessity, layers)],
                           batch_size=8, cells_per_request=5)
    text = str(plan)
    assert text.splitlines()[-1] == "nothing was sent"
    assert "total: 4 requests, 11 configurations" in text

    transport = Recording(LocalTransport.for_model(llama))
    client, _ = quiet_client(llama, transport, compress=False)
    remote = RemoteExecutor(llama, prompts, answers, batch_size=8, cells_per_request=5,
                            client=client)
    table = build_cama_table(llama, prompts, "fp", layers, batch_size=8, progress=False,
                             runner=remote.cama_runner())
    remote.clean()
    list(remote.run_many([(p, p, table.for_intervention(p.intervention(N_LAYERS)))
                          for p in plans] + [(iv, iv, None) for iv in necessity]))
    sent = client.stats.requests
    assert [(r.kind, r.cells, r.traces) for r in plan.requests] == \
        [(r.kind, r.cells, r.traces) for r in sent]
    for planned, actual in zip(plan.requests, sent):
        # serialized as it is sent (uncompressed); pickling bookkeeping varies by a few bytes
        assert abs(planned.bytes_up - actual.bytes_up) <= 64
        assert abs(planned.bytes_down - actual.bytes_down) <= 0.05 * actual.bytes_down + 200
        assert planned.violations == []
    assert plan.to_dict()["n_requests"] == 4


# -- nnsight's NDIF client, over a fake network ---------------------------------------------------


class FakeNdif:
    """NDIF's HTTP and websocket endpoints as nnsight's RemoteBackend uses them; each request is
    executed by a local stand-in server and its result served from a fake object store."""

    def __init__(self, server, fail_posts=0):
        from nnsight.schema.response import ResponseModel, Status

        self.Response, self.Status = ResponseModel, Status
        self.server = server
        self.fail_posts = fail_posts
        self.posts, self.results = [], {}
        self.sockets = self.polls = 0

    def _status(self, job_id, status, data=None):
        return self.Response(id=job_id, status=status, data=data).model_dump_json()

    def run(self, blob, compress):
        job_id = f"job-{len(self.posts) - 1}"  # posts already holds this one
        self.results[f"https://store/{job_id}"] = self.server.send(blob, compress)[0]
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
                import httpx

                if ndif.fail_posts:
                    ndif.fail_posts -= 1
                    raise httpx.ConnectError("connection refused")
                blob = files["blob"][1]
                meta = json.loads(data["data"])
                ndif.posts.append({"url": url, "headers": headers, "meta": meta, "blob": blob})
                job_id = ndif.run(blob, meta["compress"])
                return Reply(text=ndif._status(job_id, ndif.Status.RECEIVED))

            def get(self, url, headers=None):
                ndif.polls += 1
                job_id = url.rsplit("/", 1)[1]
                return Reply(text=ndif._status(job_id, ndif.Status.COMPLETED,
                                               f"https://store/{job_id}"))

            def stream(self, method, url):
                import contextlib

                return contextlib.nullcontext(Reply(content=ndif.results[url]))

        return Client()

    def create_connection(self, url, header=None):
        ndif = self
        self.sockets += 1

        class Socket:
            frames = [json.dumps({"session_id": "session-1"})]

            def recv(self):
                if not self.frames:  # after the POST: the job's completion
                    job_id = f"job-{len(ndif.posts) - 1}"
                    return ndif._status(job_id, ndif.Status.COMPLETED, f"https://store/{job_id}")
                return self.frames.pop(0)

            def settimeout(self, seconds):
                pass

            def close(self):
                pass

        return Socket()


@pytest.mark.parametrize("blocking", [True, False])
def test_ndif_transport_through_nnsights_client_on_a_fake_network(monkeypatch, blocking, llama,
                                                                  data, llama_reference):
    import httpx
    import websocket
    from nnsight.schema.config import CONFIG

    from interventions.executors.remote.transport import NdifTransport

    ndif = FakeNdif(LocalTransport.for_model(llama), fail_posts=1)
    monkeypatch.setattr(httpx, "Client", ndif.client)
    monkeypatch.setattr(websocket, "create_connection", ndif.create_connection)
    monkeypatch.setattr(CONFIG.APP, "REMOTE_LOGGING", False)
    transport = NdifTransport(llama.lm, host="https://ndif.test", api_key="key-123")
    transport._model_key = "nnsight.modeling.transformers.TransformersModel:{}"  # no Hub here
    client, sleeps = quiet_client(llama, transport, blocking=blocking)
    remote = RemoteExecutor(llama, *data, batch_size=8, client=client)
    assert_same(llama_reference["clean"], remote.clean())
    assert sleeps == [2.0]  # the refused connection was retried
    (post,) = ndif.posts
    assert post["url"] == "https://ndif.test/request"
    assert post["headers"]["ndif-api-key"] == "key-123"
    assert post["headers"]["nnsight-version"] == "0.8.1"
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


def test_cama_cache_builds_only_the_layers_asked_and_reuses_a_full_table(tmp_path, llama, data):
    from interventions.mechanisms.cama import cached_cama_table

    prompts, _ = data
    table, path, cached = cached_cama_table(llama, prompts, "fp", tmp_path, 8, False, layers=[2])
    assert table.layers == [2] and not cached
    again, path_again, cached = cached_cama_table(llama, prompts, "fp", tmp_path, 8, False,
                                                  layers=[2])
    assert cached and path_again == path
    full, full_path, _ = cached_cama_table(llama, prompts, "fp", tmp_path, 8, False)
    assert full.layers == list(range(N_LAYERS + 1)) and full_path != path
    subset, subset_path, cached = cached_cama_table(llama, prompts, "fp", tmp_path, 8, False,
                                                    layers=[1, 3])
    assert cached and subset_path == full_path
