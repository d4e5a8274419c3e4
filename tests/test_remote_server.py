"""The server side of remote runs: NDIF's own request execution in a process of its own (equal to
the local path), a server that never resets nnsight's source caches (one trace site, content-
addressed file name), NDIF's rejections, the lines of NDIF's model actor the library copies, the
self-check on arrival (within a bound that follows from the dtype), and the one home of
nnsight's internals. Every request kind through NDIF's sandbox: test_remote_sandbox.py.
"""

import ast
import copy
import linecache
import math
import sys
from pathlib import Path

import cloudpickle
import pytest
import torch
from conftest import wrap_tiny
from nnsight import save
from remote_helpers import (N_LAYERS, WorkerTransport, arithmetic, assert_same,
                            assert_tables_close, intervention_of, needs_ndif, quiet_client,
                            trusted)

import tiny
from interventions import (AF1Plan, NnsightExecutor, UserError, build_cama_table,
                           load_model)
from interventions import nnsight_internals as internals
from interventions.executors.remote import executor as remote_executor
from interventions.executors.remote import selfcheck
from interventions.executors.remote.client import RemoteRunError
from interventions.executors.remote.executor import RemoteExecutor, load_remote_model
from interventions.executors.remote.faults import deterministic_failure
from interventions.executors.remote.selfcheck import run_self_check
from interventions.executors.remote.steps import batch_traces
from interventions.mechanisms.plan import Intervention

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def checkpoint(tmp_path, digit_tok):
    """A tiny Llama on disk: the server loads it with weights, the client without."""
    return tiny.save_tiny_model("llama", tmp_path / "model", digit_tok, "eager")


def models(checkpoint):
    """``(local model with weights, weightless client model)`` of one checkpoint."""
    return (load_model(checkpoint, dtype="float32", device="cpu", attn_implementation="eager"),
            load_remote_model(checkpoint, dtype="float32", attn_implementation="eager"))


def cells_of(table):
    plans = [AF1Plan(1, 2), AF1Plan(2, 1), AF1Plan(3, 1, sink=False),
             AF1Plan(2, 2, wait_ablation="position_mean")]
    cells = [(p, p, table.for_intervention(p.intervention(N_LAYERS))) for p in plans]
    return cells + [("necessity", Intervention({1: ("sink_self", "all")}), None)]


def assert_cells_equal(local, table, got, cells):
    for tag, plan, _ in cells:
        assert_same(local.run(plan, table.for_intervention(intervention_of(plan))), got[tag])


def remote_job_equals_local(client, client_model, reference, prompts, answers):
    """A CAMA build (carrying the clean predictions), then two requests of cells, through
    ``client``, each equal to the local path on ``reference``. Returns the remote and local
    executors and the local table."""
    remote = RemoteExecutor(client_model, prompts, answers, batch_size=8, cells_per_request=4,
                            client=client)
    table = build_cama_table(client_model, prompts, "fp", [1, 2, 3], batch_size=8,
                             progress=False, runner=remote.cama_runner())
    expected = build_cama_table(reference, prompts, "fp", [1, 2, 3], batch_size=8,
                                progress=False)
    assert_tables_close(expected, table)
    local = NnsightExecutor(reference, prompts, answers, batch_size=8)
    assert_same(local.clean(), remote.clean())
    cells = cells_of(table)
    assert_cells_equal(local, expected, dict(remote.run_many(cells)), cells)
    return remote, local, expected


# -- NDIF's request execution in a process of its own --------------------------------------------


@needs_ndif
def test_a_request_runs_in_a_process_that_cannot_import_the_project(tmp_path, checkpoint,
                                                                     digit_tok):
    """Client: a weightless (meta) model. Server: another process running NDIF 0.1.2's own
    request execution on the checkpoint. Predictions identical to the local path, CAMA tables
    within float32 rounding."""
    prompts, answers = arithmetic(digit_tok, n=20)
    reference, client_model = models(checkpoint)
    assert next(client_model.hf.parameters()).device.type == "meta"
    transport = WorkerTransport(checkpoint, tmp_path / "worker", "eager", "float32")
    try:
        assert transport.ready == ["ready", "not-importable"]
        client, _ = quiet_client(client_model, transport, max_retries=0)
        remote_job_equals_local(client, client_model, reference, prompts, answers)
        assert transport.sent == 3  # CAMA (+ clean), two chunks of cells
    finally:
        transport.close()


# -- a server that never resets nnsight's source caches (older NDIF) -------------------------------


def first_kind(lm, backend, enc):
    with torch.no_grad(), lm.session(backend=backend):
        with lm.trace(enc):
            first = lm.lm_head.output[:, -1].argmax(-1).save()


def second_kind(lm, backend, enc):
    with torch.no_grad(), lm.session(backend=backend):
        n = 0
        with lm.trace(enc):
            second = lm.lm_head.output[:, -1].argmax(-1).save()


@needs_ndif
def test_a_server_that_never_resets_its_source_cache_runs_every_request(tmp_path, checkpoint,
                                                                        digit_tok):
    prompts, answers = arithmetic(digit_tok, n=20)
    reference, client_model = models(checkpoint)
    transport = WorkerTransport(checkpoint, tmp_path / "worker", "eager", "float32",
                                keep_source_cache=True)
    try:
        client, _ = quiet_client(client_model, transport, max_retries=0)
        enc = client_model.encode(prompts[:2])
        # Requests from two trace sites in one file (the toolkit's layout before): the second
        # kind's nested trace is looked up in the first kind's cached source, and fails.
        first_kind(client_model.lm, client.backend("probe", "first kind"), enc)
        with pytest.raises(RemoteRunError, match="WithBlockNotFoundError"):
            second_kind(client_model.lm, client.backend("probe", "second kind"), enc)

        # From the one trace site, every kind of request runs, in any order, repeatedly.
        assert run_self_check(client, client_model, prompts).passed
        remote, local, expected = remote_job_equals_local(client, client_model, reference,
                                                          prompts, answers)
        cells = cells_of(expected)
        again = build_cama_table(client_model, prompts, "fp", [2], batch_size=8,
                                 progress=False, runner=remote.cama_runner())
        assert_tables_close(build_cama_table(reference, prompts, "fp", [2], batch_size=8,
                                             progress=False), again)
        assert_cells_equal(local, expected, dict(remote.run_many(cells[:2])), cells[:2])
        assert run_self_check(client, client_model, prompts).passed
    finally:
        transport.close()


def tagged_step(sites, state, extra):
    state["ids"].append(sites.root.output.logits[:, -1].argmax(-1) + extra)


def tagged_finish(state):
    return save({"ids": torch.cat(state["ids"])})


@needs_ndif
def test_a_content_addressed_trace_site_keeps_two_versions_apart(tmp_path, checkpoint,
                                                                 digit_tok):
    """Two versions of the trace site at the same installed path, on one never-resetting
    server. Under the plain file name (as Python imports a module) the second version silently
    runs the first one's nested block; under the content-addressed name each runs its own."""
    prompts, _ = arithmetic(digit_tok, n=4)
    reference, client_model = models(checkpoint)
    enc = client_model.encode(prompts)
    with torch.no_grad(), reference.lm.trace(enc):
        truth = reference.lm.lm_head.output[:, -1].argmax(-1).save()
    text = Path(remote_executor.__file__).with_name("trace_site.py").read_text()
    line = "                    step(sites, state, extra)\n"
    assert text.count(line) == 1
    versions = [(text, truth), (text.replace(line, line.replace("extra)", "extra + 100)")),
                                truth + 100)]
    installed = tmp_path / "site-packages" / "trace_site.py"  # every install's same path
    installed.parent.mkdir()

    def plain(source):
        """The trace site compiled under its file name, in a fresh client process."""
        linecache.cache[str(installed)] = (len(source), None, source.splitlines(True),
                                           str(installed))
        internals.forget_sources()  # this client has read no earlier version
        namespace = {}
        exec(compile(source, str(installed), "exec"), namespace)
        return namespace["run_traces"]

    def hashed(source):
        installed.write_text(source)
        return remote_executor.load_trace_site(installed)

    transport = WorkerTransport(checkpoint, tmp_path / "worker", "eager", "float32",
                                keep_source_cache=True)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the steps above ship by value
    try:
        client, _ = quiet_client(client_model, transport, max_retries=0)

        def ids(run_traces):
            saves = run_traces(client_model.lm, client_model.sites,
                               client.backend("probe", "trace site"), batch_traces, tagged_step,
                               tagged_finish, {"batches": [(enc, 0)], "ids": []})
            return saves["result"]["ids"]

        (v1, want1), (v2, want2) = versions
        assert torch.equal(ids(plain(v1)), want1)
        assert torch.equal(ids(plain(v2)), want1)  # silently the first version's block
        assert torch.equal(ids(hashed(v1)), want1)
        assert torch.equal(ids(hashed(v2)), want2)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        internals.forget_sources()
        transport.close()


# -- NDIF's rejections ------------------------------------------------------------------------------


@needs_ndif
def test_ndifs_own_rejections_are_not_retried():
    from ndif.common.errors import ArchitectureMismatchError, PayloadError
    from nnsight.intervention.backends.remote import RemoteError

    payload = RemoteError(str(PayloadError(ModuleNotFoundError("No module named 'helper'"))))
    assert deterministic_failure(payload) == (
        "payload", "Your request payload could not be read (ModuleNotFoundError: No module "
                   "named 'helper')")
    architecture = RemoteError(str(ArchitectureMismatchError("model.layers.3")))
    kind, cause = deterministic_failure(architecture)
    assert kind == "architecture" and cause.endswith("it has no module at 'model.layers.3'.")


@needs_ndif
def test_a_server_model_with_other_modules_fails_the_self_check_with_its_cause(llama, data,
                                                                               digit_tok):
    server = wrap_tiny("llama", digit_tok, "sdpa", n_layers=N_LAYERS - 1)
    client, sleeps = quiet_client(llama, trusted(server))
    check = run_self_check(client, llama, data[0])
    assert not check.passed and check.compared == [] and sleeps == []
    with pytest.raises(UserError) as raised:
        check.check()
    message = str(raised.value)
    assert "\n" not in message and message.startswith("the remote self-check failed: its "
                                                      "request could not run")
    assert "other modules than this client's" in message and "model.layers.3" in message
    assert "likely cause: the server's transformers builds the decoder layers differently" \
        in message


# -- NDIF's model actor: what the library copies of it, pinned to the installed source -------------

# Lines of ndif 0.1.2's model actor (which cannot be built without Ray, Redis and an object
# store) that ndif_server.ModelActor repeats, by file: if NDIF changes one, this fails and the copy
# must follow.
COPIED_FROM_NDIF = {
    "services/ray/deployments/modeling/base.py": [
        "model = HuggingFaceModel.from_model_key(",  # load_server_model: loaded from the key,
        "model._module.requires_grad_(False)",  # inference-only
        "await asyncio.to_thread(self.model._remoteable_set_env, request.env)",  # env first
        "self.model.interleaver.cancel()",  # cleanup after every request
        "data = zstandard.ZstdCompressor(level=3).compress(data)",  # the result's encoding
        "if isinstance(exception, RequestError):\n            return str(exception), False",
        "tracer, deserialize_ms = prepare_traced_block(",  # the trusted path
        "saved = execute_traced_block(tracer, self.dtype)",
        "torch.save(saved, buffer, pickle_module=cpu_pickle_module())",
    ],
    "services/ray/sandbox/model.py": [
        "if request.trusted:\n            return super().execute(request)\n        return "
        "self.run_in_runner(request, None)",  # an ordinary key: the sandbox, no seed
        "connection.send(\n                (request.payload, request.compress, str(self.dtype), "
        "seed, request.env)\n            )",  # what a runner is handed
        "driver = SandboxDriver(\n                self.model,\n                self.dtype,",
        "return driver.pump(connection)",
        "if isinstance(exception, RunnerError):\n            return str(exception), False",
        "self.discard_sandbox()",  # a fresh runner per request
    ],
    "services/ray/sandbox/host.py": [  # RunnerPool._spawn: NDIF's call, a longer time-out
        "return spawn(\n            python=self.python,\n            quiet=self.quiet,\n"
        "            peers=self.peers,\n            model_key=self.model_key,\n"
        "            trust_remote_code=self.trust_remote_code,\n        )",
    ],
}


@needs_ndif
def test_the_copied_lines_of_ndifs_model_actor_are_ndifs():
    import importlib.util

    from interventions.executors.remote import ndif_server

    root = Path(importlib.util.find_spec("ndif").submodule_search_locations[0])
    for name, lines in COPIED_FROM_NDIF.items():
        text = (root / name).read_text()
        missing = [line for line in lines if line not in text]
        assert missing == [], f"ndif's {name} changed: {missing}"
    assert ndif_server.RESULT_ZSTD_LEVEL == 3 and ndif_server.ndif_version() == "0.1.2"


def test_a_checkpoints_model_key_is_the_one_nnsight_forms(tmp_path, digit_tok):
    from nnsight.modeling.transformers import TransformersModel

    checkpoint = str(tiny.save_tiny_model("llama", tmp_path / "m", digit_tok, "eager"))
    lm = TransformersModel(checkpoint, task="text-generation", tokenizer=digit_tok)
    assert internals.model_key(lm) == internals.model_key_of_checkpoint(checkpoint)


# -- the self-check on arrival ---------------------------------------------------------------------


@pytest.mark.parametrize("arch,attn", [("llama", "sdpa"), ("gpt2", "eager"),
                                       ("gpt_neox", "sdpa"), ("qwen2", "eager"),
                                       ("gptj", "eager")])
def test_the_self_check_passes_where_the_interventions_work(arch, attn, digit_tok):
    model = wrap_tiny(arch, digit_tok, attn)
    prompts, _ = arithmetic(digit_tok)
    client, _ = quiet_client(model, trusted(model))
    check = run_self_check(client, model, prompts)
    assert check.passed and check.check() is check
    values = {c["check"]: c["value"] for c in check.compared}
    assert values["all_allowed"] == values["before_write"] == values["write_error"] == 0.0
    assert values["sink_self"] > 0 and values["write_change"] > 0
    record = check.to_dict()
    assert record["write_layer"] == N_LAYERS // 2 and record["n_prompts"] == 2
    assert [r.kind for r in client.stats.requests] == ["selfcheck"]


def test_the_self_check_catches_a_mask_slot_the_layers_ignore(llama, data):
    """A mask put where the server's layers do not read it leaves the logits unchanged."""
    from interventions.mechanisms.traced import ModelSites

    sites = llama.sites
    model = copy.copy(llama)  # the slot as a client with another transformers might resolve it
    model.sites = ModelSites(sites.root, sites.layers, None, "not_the_mask",
                             sites.attn_implementation)
    client, _ = quiet_client(model, trusted(llama))
    check = run_self_check(client, model, data[0], server_transformers="9.9.9")
    failed = [c["check"] for c in check.compared if not c["passed"]]
    assert not check.passed and failed == ["sink_self"]
    bound = f"{3 * math.sqrt(N_LAYERS + 1) * torch.finfo(torch.float32).eps:.3g}"
    with pytest.raises(UserError, match=r"a sink-and-self mask at every layer changes the logits "
                                        r"does not hold \(sink_self = 0, relative to the clean "
                                        rf"magnitude; bound {bound} for float32, expected > "
                                        rf"{bound}\); likely cause: the attention-mask slot "
                                        r"resolved on the client \(argument None or keyword "
                                        r"'not_the_mask'\)"):
        check.check()
    with pytest.raises(UserError, match=r"transformers \S+ here, 9\.9\.9 on the server"):
        check.check()


def test_the_self_check_catches_a_write_that_lands_elsewhere(monkeypatch, llama, data):
    """Were the table rows of the written positions other than expected (here: counted from
    the padding instead of the first real token), the comparison fails."""
    rows_of = selfcheck._expected_rows

    def shifted(encoding, keys):
        rows = rows_of(encoding, keys)
        return torch.roll(rows, 1, dims=1)

    monkeypatch.setattr(selfcheck, "_expected_rows", shifted)
    client, _ = quiet_client(llama, trusted(llama))
    check = run_self_check(client, llama, data[0])
    assert [c["check"] for c in check.compared if not c["passed"]] == ["write_error"]
    with pytest.raises(UserError, match="layer w receives the CAMA row of every non-sink token "
                                        ".*likely cause: the server's transformers builds the "
                                        "decoder layers differently"):
        check.check()


# -- nnsight's internals have one home -------------------------------------------------------------

# interventions/nnsight_internals.py is the one file that reaches into nnsight beyond its public
# API. Elsewhere (interventions/, figures/, tasks/, run.py, tests/) the scan below refuses:
# * an attribute nnsight keeps internal, though not all its names start with "_";
# * in a file that imports nnsight, any attribute starting with "_" (not a dunder) that the
#   project does not define itself (def/class _x, _x = ..., obj._x = ...), less FOREIGN_PRIVATE;
# * an import of nnsight's internal modules, or of an underscore name from nnsight.
NNSIGHT_INTERNALS = {"interleaver", "mediators", "current", "f_locals", "batcher", "_module",
                     "_saves", "_hide_local_modules", "_ID_CACHE"}
NNSIGHT_INTERNAL_PREFIXES = ("_remoteable_",)
NNSIGHT_INTERNAL_MODULES = {"nnsight.tracing.globals", "nnsight.tracing.tracer"}
# Underscore attributes of other libraries' objects, each with its reason.
FOREIGN_PRIVATE = {
    "_attn_implementation": "transformers' config: the attention implementation it resolved, "
                            "recorded nowhere else",
}
SCANNED = ["interventions", "figures", "tasks", "run.py", "tests"]


def scanned_files() -> list[Path]:
    found = []
    for name in SCANNED:
        path = ROOT / name
        found += [path] if path.is_file() else sorted(path.rglob("*.py"))
    return found


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def defined_private_names(trees) -> set[str]:
    """Underscore names the project defines: functions, classes, assigned names and attributes
    it assigns (``self._x = ...``, ``cls._x = ...``, ``obj._x = ...``)."""
    names = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
    return {name for name in names if is_private(name)}


def nnsight_internal_uses(tree, own: set[str]) -> list[str]:
    """``"line: what"`` for every reach into nnsight's internals in a parsed file (code only:
    comments and strings do not count); ``own``: the project's own underscore names."""
    imports_nnsight = any(
        isinstance(node, ast.Import) and any(a.name.split(".")[0] == "nnsight" for a in node.names)
        or isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "nnsight"
        for node in ast.walk(tree))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            name = node.attr
            internal = name in NNSIGHT_INTERNALS or name.startswith(NNSIGHT_INTERNAL_PREFIXES)
            owner = node.value.id if isinstance(node.value, ast.Name) else None
            foreign = (imports_nnsight and is_private(name) and owner not in ("self", "cls")
                       and name not in own and name not in FOREIGN_PRIVATE)
            if internal or foreign:
                found.append(f"{node.lineno}: .{name}")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""]
            names = [a.name for a in node.names] if isinstance(node, ast.ImportFrom) else []
            if set(modules) & NNSIGHT_INTERNAL_MODULES or (
                    modules[0].split(".")[0] == "nnsight" and any(map(is_private, names))):
                found.append(f"{node.lineno}: import of {', '.join(modules)}")
    return found


def test_nnsights_internals_are_used_only_in_nnsight_internals():
    home = ROOT / "interventions" / "nnsight_internals.py"
    trees = {path: ast.parse(path.read_text(), str(path)) for path in scanned_files()}
    own = defined_private_names(trees.values())
    assert FOREIGN_PRIVATE.keys().isdisjoint(own)  # else it needs no exception
    elsewhere = {str(path.relative_to(ROOT)): nnsight_internal_uses(tree, own)
                 for path, tree in trees.items() if path != home}
    assert {f: uses for f, uses in elsewhere.items() if uses} == {}
    at_home = " ".join(nnsight_internal_uses(trees[home], own))
    for name in (".current", "._module", "._remoteable_persistent_objects", ".interleaver",
                 ".f_locals", "._ID_CACHE", "import of nnsight.tracing.globals"):
        assert name in at_home  # the scan sees them where they are


def test_the_nnsight_guard_catches_a_new_use():
    own = {"_inputs", "_assemble"}
    clean = ("import nnsight\n"
             "class Tool:\n"
             "    def run(self, executor, config):\n"
             "        self._cache = executor._inputs, executor._assemble\n"
             "        return config._attn_implementation, model.__class__\n")
    assert nnsight_internal_uses(ast.parse(clean), own) == []
    new = clean + ("def reach(lm, tracer):\n"
                   "    lm._envoy_cache.clear()\n"  # an underscore name nnsight has, new here
                   "    return tracer.info.frame.f_locals, lm.interleaver.mediators\n"
                   "from nnsight.intervention.envoy import _private\n"
                   "from nnsight.tracing.globals import Globals\n")
    assert sorted(nnsight_internal_uses(ast.parse(new), own)) == [
        "10: import of nnsight.tracing.globals", "7: ._envoy_cache", "8: .f_locals",
        "8: .interleaver", "8: .mediators", "9: import of nnsight.intervention.envoy"]
    # Without an nnsight import, an underscore attribute is another library's business.
    assert sorted(nnsight_internal_uses(ast.parse(new.replace("import nnsight\n", "")
                                                  .replace("from nnsight", "from other")),
                                        own)) == ["7: .f_locals", "7: .interleaver", "7: .mediators"]


def test_self_check_bounds_follow_the_dtype():
    """``3 * sqrt(n + 1) * eps``: a value at the bound passes, one just beyond fails; a change
    must exceed the same bound."""
    from interventions.executors.remote.selfcheck import judge, rounding_bound

    eps = 2.0 ** -7  # bfloat16
    logits, states = 3 * math.sqrt(33) * eps, 3 * math.sqrt(17) * eps
    assert rounding_bound("bfloat16", 32) == logits
    assert rounding_bound("float32", 4) == 3 * math.sqrt(5) * torch.finfo(torch.float32).eps
    at = {"all_allowed": logits, "sink_self": logits * 1.01, "before_write": states,
          "write_error": 0.0, "write_change": 1.0}
    assert all(c["passed"] for c in judge(at, "bfloat16", 32, 16))
    beyond = {**at, "all_allowed": logits * 1.01, "sink_self": logits}
    assert [c["check"] for c in judge(beyond, "bfloat16", 32, 16) if not c["passed"]] == \
        ["all_allowed", "sink_self"]


@pytest.mark.parametrize("ulps,passes", [(1, True), (12, False)])
def test_a_bfloat16_self_check_passes_within_its_bound_and_fails_beyond(ulps, passes,
                                                                        digit_tok, data):
    """A server whose forward passes differ as a GPU's may: every trace's logits moved by
    ``ulps`` units of bfloat16 rounding of their row's largest value, in turn up and down (the
    clean and the all-allowed trace then differ by twice that). One unit passes the bound of
    ``3 * sqrt(L + 1) * eps`` = 6.7 units; twelve fail, and the one line names the comparison, its value,
    the bound and the dtype."""
    from interventions.mechanisms.models import wrap_model

    hf = tiny.tiny_hf_model("llama", digit_tok, "sdpa").to(torch.bfloat16)
    model = wrap_model(hf, digit_tok)
    eps = torch.finfo(torch.bfloat16).eps
    sign = [1.0]

    def nondeterministic(module, args, out):
        sign[0] = -sign[0]
        scale = out.abs().amax(-1, keepdim=True)
        return out + sign[0] * ulps * eps * scale

    handle = hf.lm_head.register_forward_hook(nondeterministic)
    try:
        client, _ = quiet_client(model, trusted(model))
        check = run_self_check(client, model, data[0])
    finally:
        handle.remove()
    values = {c["check"]: c for c in check.compared}
    bound = 3 * math.sqrt(N_LAYERS + 1) * eps
    assert values["all_allowed"]["bound"] == bound and check.dtype == "bfloat16"
    assert values["all_allowed"]["value"] > 0  # the passes differ, as on a GPU
    assert check.passed == passes
    if passes:
        assert check.check() is check
        return
    assert [c["check"] for c in check.compared if not c["passed"]] == ["all_allowed"]
    with pytest.raises(UserError) as raised:
        check.check()
    message = str(raised.value)
    value = values["all_allowed"]["value"]
    assert "\n" not in message and message.startswith(
        "the remote self-check failed: an explicit all-allowed mask at every layer reproduces "
        f"the clean logits does not hold (all_allowed = {value:.3g}, relative to the clean "
        f"magnitude; bound {bound:.3g} for bfloat16, expected <= {bound:.3g})")
