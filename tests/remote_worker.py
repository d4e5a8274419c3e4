"""An NDIF worker in a process of its own, for tests: NDIF's own request execution (the ``ndif``
package: ``BackendRequestModel.deserialize``, ``prepare_traced_block``, ``execute_traced_block``
inside ``block_scope``, the result encoded as its model actor encodes it) against a checkpoint
loaded with transformers and nnsight only. The project cannot be imported here.

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

import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402
import zstandard  # noqa: E402
from nnsight.modeling.transformers import TransformersModel  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402


def serve(checkpoint: str, attn_implementation: str, dtype: str, keep_source_cache: bool) -> None:
    try:
        from ndif.common.errors import RequestError
        from ndif.common.schema.request import BackendRequestModel
        from ndif.services.ray.deployments.modeling.nns import (block_scope,
                                                                execute_traced_block,
                                                                prepare_traced_block)
        from ndif.services.ray.deployments.modeling.util import cpu_pickle_module
    except ImportError as err:
        print(f"unavailable {err}", flush=True)
        return
    try:
        import interventions  # noqa: F401

        project = "importable"
    except ModuleNotFoundError:
        project = "not-importable"
    model = TransformersModel(checkpoint, task="text-generation",
                              tokenizer=AutoTokenizer.from_pretrained(checkpoint), dispatch=True,
                              dtype=getattr(torch, dtype),
                              attn_implementation=attn_implementation)
    print(f"ready {project}", flush=True)
    for line in sys.stdin:
        request_path, result_path, compress = line.split()
        compress = compress == "1"
        try:
            with contextlib.nullcontext() if keep_source_cache else block_scope():
                tracer, _ = prepare_traced_block(model, Path(request_path).read_bytes(), compress,
                                                 deserialize=BackendRequestModel.deserialize)
                saved = execute_traced_block(tracer, getattr(torch, dtype))
            buffer = io.BytesIO()
            torch.save(saved, buffer, pickle_module=cpu_pickle_module())
            content = buffer.getvalue()
            if compress:
                content = zstandard.ZstdCompressor(level=3).compress(content)
            Path(result_path).write_bytes(content)
            answer = {"ok": True}
        except Exception as err:  # noqa: BLE001 - reported to the client as NDIF reports it
            text = str(err) if isinstance(err, RequestError) else "".join(
                traceback.format_exception(type(err), err, err.__traceback__))
            answer = {"ok": False, "error": text}
        finally:
            model.interleaver.cancel()  # what NDIF's actor does after every request
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    serve(*sys.argv[1:4], keep_source_cache="--keep-source-cache" in sys.argv[4:])
