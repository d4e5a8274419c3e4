"""The remote (NDIF) path, offline: requests are serialized exactly as for NDIF and executed by
NDIF's own request execution in this process with the project hidden (the ``ndif`` package),
and must give what the local path gives.

Also: what requests carry (the server's import rules, CAMA uploads), the local server's result
format and import rules, preflight decisions on canned NDIF answers, the dry run. Faults are in
test_remote_faults.py, NDIF's server code in other processes and the self-check in
test_remote_server.py.
"""

import io
import os
import sys
from pathlib import Path

import cloudpickle
import pytest
import torch
from conftest import wrap_tiny
from remote_helpers import (N_LAYERS, Recording, af1_cells, arithmetic, assert_same,
                            assert_tables_close, intervention_of, quiet_client, trusted)

import tiny
from interventions import (AF1Plan, NnsightExecutor, UserError, apply_af1, build_cama_table,
                           load_model)
from interventions import nnsight_internals as internals
from interventions.executors.remote.audit import audit_request
from interventions.executors.remote.client import RemoteRunError
from interventions.executors.remote.dryrun import (MeasuringTransport, PlannedTask,
                                                   measure_remote_job)
from interventions.executors.remote.executor import RemoteExecutor, load_remote_model
from interventions.executors.remote.preflight import (KEY_URL, NdifAnswers, closest_model,
                                                      fetch_ndif_answers, preflight,
                                                      preflight_decision)
from interventions.executors.remote.selfcheck import run_self_check
from interventions.executors.remote.transport import decode_result, package_version
from interventions.nnsight_internals import RemoteError, within_tested_range
from interventions.mechanisms.plan import Intervention


# -- the remote path equals the local path --------------------------------------------------------


@pytest.mark.parametrize("arch,attn", [("llama", "sdpa"), ("gpt2", "eager"),
                                       ("gpt_neox", "sdpa"), ("qwen2", "eager")])
def test_remote_path_equals_local_path(arch, attn, digit_tok):
    """Predictions identical, CAMA tables within float32 rounding, with the server running
    NDIF's own execution code (where installed: CI installs it)."""
    model = wrap_tiny(arch, digit_tok, attn)
    prompts, answers = arithmetic(digit_tok)
    layers = list(range(N_LAYERS + 1))
    local = NnsightExecutor(model, prompts, answers, batch_size=8)
    local_table = build_cama_table(model, prompts, "fp", layers, batch_size=8, progress=False)

    client, _ = quiet_client(model, Recording(trusted(model)))
    assert client.transport.inner.server_code == "ndif 0.1.2"
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
        assert_same(local.run(plan, local_table.for_intervention(intervention_of(plan))),
                    got[tag])
    assert len(client.stats.requests) == 1 + -(-len(cells) // 6)
    assert client.transport.calls["send"] == len(client.stats.requests)


def test_without_ndif_the_local_backend_is_one_error_line_with_the_install_command(
        monkeypatch, llama):
    for name in ["ndif"] + [m for m in sys.modules if m.startswith("ndif.")]:
        monkeypatch.setitem(sys.modules, name, None)  # as if it were not installed
    with pytest.raises(UserError) as raised:
        trusted(llama)
    message = str(raised.value)
    assert "\n" not in message and message.startswith("--remote-backend local runs NDIF's own")
    assert message.endswith("install it with: pip install --no-deps --ignore-requires-python "
                            "ndif==0.1.2")


def test_nnsights_own_remote_local_backend_runs_the_same_requests(llama, data, llama_table,
                                                                   llama_reference):
    """The requests this toolkit ships also pass nnsight's own ``remote="local"`` simulation."""
    from nnsight.intervention.backends.local import LocalSimulationBackend

    from interventions.executors.remote.executor import cells_session

    class Simulation(LocalSimulationBackend):
        def __call__(self, tracer):
            super().__call__(tracer)  # pushes the saves into the caller's frame
            self.result = {"result": internals.block_locals(tracer)["result"]}

    cells = af1_cells(llama_table)
    client, _ = quiet_client(llama, trusted(llama))
    remote = RemoteExecutor(llama, *data, batch_size=8, client=client)
    result = cells_session(llama.lm, llama.sites, Simulation(llama.lm),
                           [(intervention_of(plan), cama) for _, plan, cama in cells],
                           remote._inputs)
    got = remote._assemble(result["pred_ids"], result["answer_logits"], len(cells))
    for (tag, _, _), preds in zip(cells, got):
        assert_same(llama_reference[tag], preds)


@pytest.mark.slow
def test_smollm2_remote_path_equals_local_path():
    from tasks import build_task

    model = load_model("smollm2", device="cpu")
    build = build_task(model.tokenizer, task="A+B", style="calculate")
    prompts, answers = build.dataset["prompt"], build.dataset["answer_token_id"]
    layers = [19, 20]
    local = NnsightExecutor(model, prompts, answers)
    local_table = build_cama_table(model, prompts, "fp", layers, progress=False)
    client, _ = quiet_client(model, trusted(model))
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
    transport = Recording(trusted(llama))
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

    transport = Recording(MeasuringTransport())
    client, _ = quiet_client(llama, transport, compress=False)
    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    try:
        with llama.lm.session(backend=client.backend("test", "sneaky")):
            value = _sneaky(os.getcwd())
    finally:
        cloudpickle.unregister_pickle_by_value(module)
    (blob,) = transport.blobs
    audit = audit_request(blob)
    assert transport.inner.measured[0].violations == audit.violations  # what a dry run says
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
        transport = Recording(trusted(model))
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


# -- the local server -----------------------------------------------------------------------------


def test_local_server_result_is_what_ndif_sends(llama, data):
    prompts, answers = data
    transport = Recording(trusted(llama))
    client, _ = quiet_client(llama, transport, compress=True)
    RemoteExecutor(llama, prompts, answers, batch_size=8, client=client).clean()
    content, _ = transport.inner.send(transport.blobs[0], True)
    saves = decode_result(content, True)
    assert set(saves) == {"result"}  # the saves only, not the inputs or the state
    result = saves["result"]
    assert set(result) == {"pred_ids", "answer_logits", "answer_logprobs"}
    assert result["pred_ids"].dtype == torch.int32 and result["pred_ids"].shape == (len(prompts),)
    assert result["answer_logprobs"].dtype == torch.float32
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

    client, _ = quiet_client(llama, trusted(llama))
    enc = llama.encode(["Calculate: 3+4="])
    lm = llama.lm  # the block may name the nnsight model, not the AF1Model around it
    with pytest.raises(RemoteRunError, match="could not read it.*No module named 'helper_mod'"):
        with llama.lm.trace(enc, backend=client.backend("probe", "helper")):
            logits = double(lm.output.logits).save()
    sys.modules.pop("helper_mod", None)
    # The project itself is such code: naming an AF1Model (not model.sites / model.lm) inside a
    # block ships a reference to interventions.mechanisms.models, which NDIF does not have.
    with pytest.raises(RemoteRunError, match="No module named 'interventions"):
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
    assert internals.request_env(model.lm) == {"attn_implementation": "eager"}
    with pytest.raises(UserError, match="Hub id"):
        load_remote_model("smollm2")


# -- preflight ------------------------------------------------------------------------------------


def deployment(repo, level="HOT", state="RUNNING", revision="main", task="text-generation"):
    """One entry of NDIF's ``/status`` as its controller writes it (a COLD entry, downloaded
    only, has the repo id and the level alone)."""
    if level == "COLD":
        return {"repo_id": repo, "deployment_level": "COLD"}
    return {"repo_id": repo, "revision": revision, "deployment_level": level,
            "application_state": state, "task": task,
            "model_key": f"nnsight...TransformersModel:{repo}"}


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
    env = {"packages": {"nnsight": "0.8.2"}}
    result = preflight_decision("meta-llama/Llama-3.1-8B", answers(server_env=env))
    assert result.errors == [
        "nnsight 0.8.1 here but 0.8.2 on NDIF, which requires them to match: `pip install "
        "nnsight==0.8.2`, or pass --allow-nnsight-mismatch to try anyway"]
    allowed = preflight_decision("meta-llama/Llama-3.1-8B", answers(server_env=env),
                                 allow_nnsight_mismatch=True)
    assert allowed.ok and any("--allow-nnsight-mismatch: trying anyway" in w
                              for w in allowed.warnings)
    planned = preflight("meta-llama/Llama-3.1-8B", answers=answers(server_env=env), dry_run=True)
    assert planned.summary.endswith("; the run needs `pip install nnsight==0.8.2`)")
    assert planned.warnings == []


def test_preflight_unknown_model_lists_hosted_models_and_suggests_the_closest():
    result = preflight_decision("meta-llama/Meta-Llama-3-8B", answers())
    (message,) = result.errors
    assert "does not host meta-llama/Meta-Llama-3-8B" in message
    assert "closest hosted model is meta-llama/Llama-3.1-8B (`--model meta-llama/Llama-3.1-8B`)" \
        in message
    assert "openai-community/gpt2" in message and "gpt-j" not in message  # running ones only
    assert closest_model("EleutherAI/pythia-70m", ["openai-community/gpt2"]) is None


def test_preflight_wrong_revision():
    result = preflight_decision("meta-llama/Llama-3.1-8B", answers(), revision="abc123")
    assert "at revision main, not abc123" in result.errors[0]


@pytest.mark.parametrize("repo,states", [("EleutherAI/gpt-j-6b", "COLD"),
                                         ("meta-llama/Llama-3.1-405B-Instruct",
                                          "WARM/DEPLOYING")])
def test_a_model_listed_but_not_deployed_proceeds_with_its_note(repo, states):
    """NDIF lists it (COLD: downloaded; or still deploying): the run goes on, with one note,
    and knows which hosted models to name if NDIF will not load it."""
    result = preflight_decision(repo, answers())
    assert result.ok and result.on_demand is not None
    (note,) = result.notes
    assert note.startswith(f"NDIF lists {repo} but has not deployed it ({states}); the run goes "
                           "on and NDIF loads it on demand, so the first request (the self-check)"
                           " may wait while it loads; keys without on-demand access are refused")
    checked = preflight(repo, answers=answers(), dry_run=True)
    assert checked.summary.startswith(f"passed (NDIF lists {repo};")
    assert checked.summary.endswith("; loaded on demand)")


def test_the_users_command_on_a_cold_listing_and_its_refusal():
    """``--model meta-llama/Meta-Llama-3-8B``: listed COLD it proceeds; NDIF refusing to load
    it becomes one line naming the running models of its family, closest first."""
    status = {"deployments": {**STATUS["deployments"],
                              "cold": deployment("meta-llama/Meta-Llama-3-8B", "COLD")}}
    result = preflight_decision("meta-llama/Meta-Llama-3-8B", answers(status=status))
    assert result.ok and result.notes
    family = result.on_demand.family
    assert family[0] == "meta-llama/Llama-3.1-8B" and "openai-community/gpt2" not in family
    assert set(family) == {"meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct",
                           "meta-llama/Llama-3.1-70B", "meta-llama/Llama-3.3-70B-Instruct"}
    line = result.on_demand.refusal("Could not deploy this model. Not permitted.")
    assert "\n" not in line and line == (
        "NDIF did not load meta-llama/Meta-Llama-3-8B on demand (Could not deploy this model. "
        "Not permitted.): it has not deployed this model, and keys without on-demand access "
        f"are refused; hosted models of the same family: {', '.join(family)} (e.g. `--model "
        "meta-llama/Llama-3.1-8B`)")


def test_an_on_demand_refusal_stops_the_first_request_with_one_line(llama, data):
    """The refusal arrives as NDIF's job error (or an HTTP 403 on the post): not retried, not
    taken for a failed self-check; a refusal after a request came back is an ordinary error."""
    from interventions.executors.remote.faults import OnDemandRefused
    from interventions.executors.remote.preflight import OnDemand

    on_demand = OnDemand("meta-llama/Meta-Llama-3-8B", (("meta-llama/Llama-3.1-8B", None),))
    refused = RemoteError("Could not deploy this model. Your key may not load models on demand.")
    transport = Recording(trusted(llama), [refused])
    client, sleeps = quiet_client(llama, transport, on_demand=on_demand)
    with pytest.raises(OnDemandRefused) as raised:
        run_self_check(client, llama, data[0])
    assert str(raised.value).startswith("NDIF did not load meta-llama/Meta-Llama-3-8B on demand "
                                        "(Could not deploy this model. Your key may not load")
    assert "hosted models of the same family: meta-llama/Llama-3.1-8B" in str(raised.value)
    assert sleeps == [] and transport.calls["send"] == 1
    assert run_self_check(client, llama, data[0]).passed  # loaded after all: proceeds
    transport.failures.append(refused)
    with pytest.raises(RemoteRunError) as raised:
        RemoteExecutor(llama, *data, batch_size=8, client=client).clean()
    assert not isinstance(raised.value, OnDemandRefused)


def test_models_are_matched_as_ndif_keys_them(monkeypatch):
    """The Hub's spelling of the repo id (asked for when NDIF is asked), the revision, and
    text-generation deployments only; the key's tags name the path NDIF takes."""
    from interventions.executors.remote import preflight as module

    status = {"deployments": {
        "a": deployment("meta-llama/Llama-3.1-8B", revision="main"),
        "b": deployment("meta-llama/Llama-3.1-8B", revision="abc123"),
        "c": deployment("openai-community/gpt2", task="text-classification")}}
    canned = answers(status=status, key_tags=["trusted"])
    monkeypatch.setattr(module, "fetch_ndif_answers", lambda: canned)
    monkeypatch.setattr(module, "canonical_repo_id",
                        lambda repo: {"meta-llama/llama-3.1-8b": "meta-llama/Llama-3.1-8B"}
                        .get(repo, repo))
    result = preflight("meta-llama/llama-3.1-8b", revision="abc123")
    assert result.deployment["revision"] == "abc123" and result.server_path == "trusted"
    assert preflight_decision("meta-llama/Llama-3.1-8B", answers(key_tags=[])).server_path \
        == "sandbox"
    (message,) = preflight_decision("openai-community/gpt2", canned).errors
    assert message.startswith("NDIF does not host openai-community/gpt2")


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
    assert not got.api_key_present and got.status is None
    assert got.client_version == internals.nnsight_version()


def test_preflight_transformers_drift_is_an_error_unless_allowed():
    here = package_version("transformers")
    major, minor = here.split(".")[:2]
    other = f"{major}.{int(minor) + 1}.0"
    env = {"packages": {"nnsight": "0.8.1", "transformers": other}}
    (message,) = preflight_decision("meta-llama/Llama-3.1-8B", answers(server_env=env)).errors
    assert f"transformers {here} here but {other} on NDIF" in message
    assert "--allow-version-drift" in message and "\n" not in message
    allowed = preflight_decision("meta-llama/Llama-3.1-8B", answers(server_env=env),
                                 allow_version_drift=True)
    assert allowed.ok and any(f"{other} on NDIF" in w for w in allowed.warnings)
    patch = {"packages": {"nnsight": "0.8.1", "transformers": f"{major}.{minor}.999"}}
    same = preflight_decision("meta-llama/Llama-3.1-8B", answers(server_env=patch))
    assert same.ok and any("transformers" in w for w in same.warnings)  # a patch: a warning


def test_a_dry_run_needs_neither_a_key_nor_a_reachable_ndif():
    offline = [({"api_key_present": False}, "no NDIF API key"),
               ({"status": None, "server_env": None, "error": "connection refused"},
                "NDIF unreachable at https://api.ndif.us (connection refused)")]
    for missing, reason in offline:
        assert preflight("meta-llama/Llama-3.1-8B", answers=answers(**missing),
                         dry_run=True).summary == f"not checked: {reason}"
        with pytest.raises(UserError):  # a real run still needs both
            preflight("meta-llama/Llama-3.1-8B", answers=answers(**missing))
    checked = preflight("meta-llama/Llama-3.1-8B", answers=answers(), dry_run=True)
    assert checked.summary.startswith("passed")
    with pytest.raises(UserError, match="does not host"):  # what NDIF answered still counts
        preflight("meta-llama/Meta-Llama-3-8B", answers=answers(), dry_run=True)


# -- the dry run ----------------------------------------------------------------------------------


@pytest.mark.parametrize("split", [False, True])
def test_dry_run_plans_exactly_the_requests_a_run_sends(llama, data, split):
    """Same requests (kind, label, configurations, traces, bytes up) as the run, the
    self-check included; with a byte budget just under the largest request, both split it
    alike. Downloads are estimated from the saved tensors' sizes."""
    prompts, answers = data
    plans = [AF1Plan(w, t) for w in range(N_LAYERS) for t in (1, 2) if w + t <= N_LAYERS]
    necessity = [Intervention({k: ("sink_self", "all")}) for k in range(N_LAYERS)]
    layers = sorted({p.l_wait for p in plans if p.l_wait > 0})
    task = PlannedTask("A+B", prompts, plans + necessity, layers, answer_ids=answers)
    budget = None
    if split:
        whole = measure_remote_job(llama, [task], batch_size=8, cells_per_request=5,
                                   max_request_bytes=None, self_check_prompts=prompts)
        # Under the largest request, and no request close to it.
        budget = max(r.bytes_up for r in whole.requests) - 300
        assert all(abs(r.bytes_up - budget) > 100 for r in whole.requests)
    plan = measure_remote_job(llama, [task], batch_size=8, cells_per_request=5,
                              max_request_bytes=budget, self_check_prompts=prompts)
    text = str(plan)
    assert text.splitlines()[-1] == "nothing was sent"
    n = len(plan.requests)
    assert n == 6 if split else n == 5  # self-check, CAMA (+ clean), cells 5 + 5 + 1
    assert f"total: {n} requests, 11 configurations" in text

    transport = Recording(trusted(llama))
    client, _ = quiet_client(llama, transport, compress=False, max_request_bytes=budget)
    assert run_self_check(client, llama, prompts).passed
    remote = RemoteExecutor(llama, prompts, answers, batch_size=8, cells_per_request=5,
                            client=client)
    table = build_cama_table(llama, prompts, "fp", layers, batch_size=8, progress=False,
                             runner=remote.cama_runner())
    remote.clean()
    list(remote.run_many([(p, p, table.for_intervention(p.intervention(N_LAYERS)))
                          for p in plans] + [(iv, iv, None) for iv in necessity]))
    sent = client.stats.requests
    # The executor made the dry run's requests: the same requests, byte for byte in size
    # (serialized as sent, uncompressed; a dry run's CAMA means are zeros of the same shape).
    assert [(r.kind, r.label, r.cells, r.traces, r.bytes_up) for r in plan.requests] == \
        [(r.kind, r.label, r.cells, r.traces, r.bytes_up) for r in sent]
    for planned, actual in zip(plan.requests, sent):
        assert abs(planned.bytes_down - actual.bytes_down) <= 0.05 * actual.bytes_down + 200
        assert planned.violations == []
        assert budget is None or actual.bytes_up <= budget
    assert plan.to_dict()["n_requests"] == n


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


# -- nnsight's version: declared, pinned in CI, never refused at import ---------------------------


def test_nnsight_is_declared_as_the_tested_range_and_pinned_in_ci():
    from interventions.nnsight_internals import PINNED_NNSIGHT, TESTED_NNSIGHT

    root = Path(__file__).resolve().parent.parent
    low, high = TESTED_NNSIGHT
    assert f'"nnsight>={low},<{high}"' in (root / "pyproject.toml").read_text()
    assert f"nnsight=={PINNED_NNSIGHT}" in (root / ".ci" / "run").read_text()
    assert within_tested_range(PINNED_NNSIGHT) and within_tested_range("0.8.0")
    assert not within_tested_range("0.9.0") and not within_tested_range("0.8.0rc1")


def test_another_nnsight_is_not_refused_at_import():
    """A process whose nnsight reports 0.9.2 imports the toolkit and the remote path (one
    warning), so that --dry-run and the preflight, which names the release NDIF needs, work."""
    import subprocess

    code = ("import importlib.metadata as m, warnings; real = m.version; "
            "m.version = lambda name: '0.9.2' if name == 'nnsight' else real(name); "
            "warnings.simplefilter('always'); "
            "import interventions.executors.remote.preflight, run; print('imported')")
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0 and done.stdout.strip() == "imported", done.stderr
    assert "nnsight 0.9.2 is installed; this AF1 toolkit is tested with nnsight>=0.8.0,<0.9" \
        in done.stderr
