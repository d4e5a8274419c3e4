"""An NDIF worker in a process of its own, for tests: NDIF's own request execution through the
library's model actor, the same glue the library's local backend uses
(``interventions/executors/remote/ndif_server.py``, ``ModelActor.load`` / ``respond``: the model
loaded from its key as NDIF's actor loads it, the per-request environment applied,
``prepare_traced_block`` / ``execute_traced_block`` inside ``block_scope``, the result encoded as
NDIF encodes it), on NDIF's trusted path. The project cannot be imported here: that file and
``interventions/nnsight_internals.py``, both free of project imports, are loaded by path.

``--keep-source-cache`` leaves out ``block_scope``: an older NDIF whose worker never resets
nnsight's source caches between requests.

Usage: python remote_worker.py <checkpoint dir> <attn implementation> <dtype> [--keep-source-cache]

It first prints ``ready <what importing the project gave>`` (or ``unavailable <why>`` and exits
when ``ndif`` is not installed), then for each stdin line ``<request file> <result file>
<compress 0|1>`` writes the result and prints one JSON line: ``{"ok": true}`` or
``{"ok": false, "error": <the job's ERROR message as NDIF sends it>}``.
"""

import importlib.abc
import sys
from pathlib import Path

# The project's top-level modules (and the tests' helpers) do not exist on a server. The project
# may be installed in editable mode, so refuse them before any other import can find them.
PROJECT = {"interventions", "tasks", "figures", "run", "tiny", "conftest", "reference",
           "remote_helpers"}
ROOT = Path(__file__).resolve().parent.parent


class _NotOnTheServer(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in PROJECT:
            raise ModuleNotFoundError(f"No module named {name!r} (not installed on the server)",
                                      name=name)
        return None


sys.meta_path.insert(0, _NotOnTheServer())
sys.path[:] = [p for p in sys.path
               if p and Path(p).resolve() not in (ROOT, ROOT / "tests")]

import importlib.util  # noqa: E402
import json  # noqa: E402

import torch  # noqa: E402

LIBRARY = ROOT / "interventions"


def load_by_path(name: str, path: Path):
    """A module of the library, imported from its file under ``name`` (not as part of the
    project, which this process cannot import)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def serve(checkpoint: str, attn_implementation: str, dtype: str, keep_source_cache: bool) -> None:
    try:
        import interventions  # noqa: F401

        project = "importable"
    except ModuleNotFoundError:
        project = "not-importable"
    internals = load_by_path("nnsight_internals", LIBRARY / "nnsight_internals.py")
    server = load_by_path("ndif_server", LIBRARY / "executors" / "remote" / "ndif_server.py")
    missing = server.ndif_missing()
    if missing is not None:
        print(f"unavailable {missing}", flush=True)
        return
    model_key = internals.model_key_of_checkpoint(checkpoint)
    actor = server.ModelActor.load(model_key, getattr(torch, dtype), "trusted", isolate=False,
                                   keep_source_cache=keep_source_cache)
    env = {"attn_implementation": attn_implementation}
    print(f"ready {project}", flush=True)
    for line in sys.stdin:
        request_path, result_path, compress = line.split()
        try:
            content = actor.respond(Path(request_path).read_bytes(), compress == "1", env)
            Path(result_path).write_bytes(content)
            answer = {"ok": True}
        except internals.RemoteError as err:  # the job's ERROR message, as NDIF sends it
            answer = {"ok": False, "error": str(err)}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    serve(*sys.argv[1:4], keep_source_cache="--keep-source-cache" in sys.argv[4:])
