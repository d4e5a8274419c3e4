"""A stand-in NDIF worker in a process of its own, for tests. The project cannot be imported here.

It loads a checkpoint with transformers and nnsight only, then serves requests: for each line
``<request file> <result file> <compress 0|1>`` on stdin it deserializes the request with
nnsight's ``RequestModel`` against its own model, runs it the way NDIF's worker does (the
block's saved values are collected from its frame), writes them with ``torch.save`` (zstd when
compressed) and answers ``ok`` or ``error <message>`` on stdout. It first answers
``ready <what importing the project gave>``.

Usage: python remote_worker.py <checkpoint dir> <attn implementation> <dtype>
"""

import importlib.abc
import sys
from pathlib import Path

# The project's top-level modules (and the tests' helpers) do not exist on a server. The project
# may be installed in editable mode, so refuse them before any other import can find them.
PROJECT = {"interventions", "tasks", "figures", "run", "tiny", "conftest", "reference"}
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

import io  # noqa: E402
import linecache  # noqa: E402

import torch  # noqa: E402
from nnsight.modeling.transformers import TransformersModel  # noqa: E402
from nnsight.schema.request import RequestModel  # noqa: E402
from nnsight.tracing.globals import BLOCKS, SOURCES  # noqa: E402
from nnsight.tracing.tracer import _saves, dec, inc  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402


def serve(checkpoint: str, attn_implementation: str, dtype: str) -> None:
    try:
        import interventions  # noqa: F401

        project = "importable"
    except ModuleNotFoundError:
        project = "not-importable"
    model = TransformersModel(checkpoint, task="text-generation",
                              tokenizer=AutoTokenizer.from_pretrained(checkpoint), dispatch=True,
                              dtype=getattr(torch, dtype),
                              attn_implementation=attn_implementation)
    persistent = model._remoteable_persistent_objects()
    print(f"ready {project}", flush=True)
    for line in sys.stdin:
        request_path, result_path, compress = line.split()
        compress = compress == "1"
        # Each request's source stays its own (NDIF's worker does the same): deserializing
        # registers it under the client's filename, and nested traces memoize what they parse.
        snapshot = dict(linecache.cache), dict(SOURCES), dict(BLOCKS)
        try:
            tracer = RequestModel.deserialize(Path(request_path).read_bytes(), persistent,
                                              compress)
            frame = tracer.info.frame
            inc()
            try:
                with torch.no_grad():
                    tracer.execute(tracer.info.code)
                saved = _saves()
                result = {k: v for k, v in frame.f_locals.items() if id(v) in saved}
            finally:
                dec()
            buffer = io.BytesIO()
            torch.save(result, buffer)
            content = buffer.getvalue()
            if compress:
                import zstandard

                content = zstandard.ZstdCompressor().compress(content)
            Path(result_path).write_bytes(content)
            print("ok", flush=True)
        except Exception as err:  # noqa: BLE001 - reported to the client like an NDIF job error
            print(f"error {type(err).__name__}: {err}".replace("\n", " "), flush=True)
        finally:
            for cache, state in zip((linecache.cache, SOURCES, BLOCKS), snapshot):
                cache.clear()
                cache.update(state)


if __name__ == "__main__":
    serve(*sys.argv[1:4])
