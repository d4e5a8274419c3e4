"""NDIF's server, run here: what its model actor does with a request, on either path a key can
take (``ndif`` 0.1.2).

* **sandbox**, an ordinary key's path: the request's block runs in a fresh runner process
  (``ndif.services.ray.sandbox``: ``host.Pool``/``spawn``, ``runner.py``) against a weightless
  (meta) model built from the model key, and the forward pass runs here, driven over a socket by
  NDIF's ``SandboxDriver``: every activation the block reads or writes crosses it.
* **trusted**, a key with the ``trusted`` tag (``ndif/services/api/auth.py``): the block runs
  in-process (``prepare_traced_block`` / ``execute_traced_block`` inside ``block_scope``).

What is NDIF's own code and what is a copy. The driver, runner, pool, deserialization, block
execution and result pickling are NDIF's, called here. NDIF's model actor itself
(``deployments/modeling/base.py``, ``sandbox/model.py``) cannot be constructed without Ray,
Redis and an object store, so the few lines of it that decide what a request meets are copied
into :class:`ModelActor`: the load (``from_model_key``, then ``requires_grad_(False)``), the
per-request environment applied before each request, the payload handed to a runner, the
error text, the result's zstd level and the clean-up after each request.
``tests/test_remote_server.py`` pins each copied line against the installed ``ndif`` source.

Imports nothing of this project beyond :mod:`interventions.nnsight_internals` (itself free of
project imports), so ``tests/remote_worker.py``, a process that cannot import the project, loads
this file and that one by path and runs the very same code.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import importlib.metadata
import io
import json
import shutil
import sys
import tempfile
import traceback
import weakref
from pathlib import Path

import torch

if __package__:
    from ... import nnsight_internals as internals
else:  # loaded by path where this project cannot be imported (tests/remote_worker.py)
    import nnsight_internals as internals  # noqa: F811

NDIF_INSTALL = "pip install --no-deps --ignore-requires-python ndif==0.1.2"
SERVER_PATHS = ("sandbox", "trusted")
# NDIF's result encoding (``BaseModelDeployment.prepare_result``).
RESULT_ZSTD_LEVEL = 3

# A runner's interpreter: python, started in its own directory, that cannot import the project
# (``-m <module> args`` as host.spawn calls it; the editable install would otherwise find the
# project from anywhere). The runner's own stderr (not the block's: that comes back as PRINT
# events) goes to runner.log there: with this transformers a runner cannot build its meta model
# and says so once per runner (its module ids then resolve to None, which NDIF's runner allows).
RUNNER_BOOTSTRAP = """import importlib.abc, os, runpy, sys
class NotOnTheServer(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {roots}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not on the server)", name=name)
sys.meta_path.insert(0, NotOnTheServer())
os.chdir(os.path.dirname(os.path.abspath(__file__)))
log = open("runner.log", "a", buffering=1)
os.dup2(log.fileno(), 2)
sys.stderr = log
module = sys.argv[2]
sys.argv = [module] + sys.argv[3:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def ndif_version() -> str | None:
    """The installed ``ndif`` (NDIF's server package), ``None`` when it is not installed."""
    try:
        return importlib.metadata.version("ndif")
    except importlib.metadata.PackageNotFoundError:
        return None


def ndif_missing() -> str | None:
    """Why NDIF's server code (the ``ndif`` package) cannot be imported; ``None`` when it can."""
    try:
        import ndif.services.ray.deployments.modeling.nns  # noqa: F401
        import ndif.services.ray.sandbox.driver  # noqa: F401
    except ImportError as err:
        return str(err)
    return None


def load_server_model(model_key: str, dtype: torch.dtype):
    """The model as NDIF's model actor loads it (``BaseModelDeployment.load_from_disk``): the
    wrapper class named by the key, dispatched, in ``dtype`` (:class:`ModelActor` makes it
    inference-only)."""
    from nnsight.modeling.huggingface import HuggingFaceModel

    return HuggingFaceModel.from_model_key(model_key, dispatch=True,
                                           dtype=str(dtype).removeprefix("torch."))


def runner_python(directory: Path, roots: set[str]) -> str:
    """An executable that starts a sandbox runner unable to import ``roots`` (this project's
    top-level packages), in ``directory``; for ``host.spawn(python=...)``."""
    directory.mkdir(parents=True, exist_ok=True)
    bootstrap = directory / "runner_bootstrap.py"
    bootstrap.write_text(RUNNER_BOOTSTRAP.format(roots=json.dumps(sorted(roots))))
    python = directory / "python-without-the-project"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{bootstrap}" "$@"\n')
    python.chmod(0o755)
    return str(python)


class ModelActor:
    """NDIF's model actor without Ray, queue, metrics or object store: runs serialized requests
    against ``lm`` on one of :data:`SERVER_PATHS` and answers as NDIF answers the client.

    The glue between a client and NDIF's code, the one copy: the library's local backend
    (``transport.LocalTransport``) and the tests' worker process (``tests/remote_worker.py``)
    both make one (:meth:`load`) and call :meth:`respond`.

    Args:
        lm: the loaded nnsight model (:func:`load_server_model`, or a model of the caller's);
            made inference-only (no parameter requires grad), as NDIF's actor leaves it.
        path: ``"sandbox"`` (an ordinary key) or ``"trusted"``.
        model_key: what runners build their meta model from (sandbox path; ``None``: module ids
            resolve to ``None`` there, as on a runner started without one).
        isolate: in-process only: empty nnsight's source caches and make this project
            unimportable while a trusted request deserializes and runs, as in a server process.
        keep_source_cache: leave out ``block_scope`` (an older NDIF whose worker never reset
            nnsight's source caches; trusted path only).
        pool_size: runners kept warm (NDIF keeps 7; one hides a spawn behind each request here).
    """

    def __init__(self, lm, path: str = "sandbox", model_key: str | None = None,
                 isolate: bool = True, keep_source_cache: bool = False, pool_size: int = 1):
        from ndif.common.errors import RequestError
        from ndif.services.ray.sandbox.driver import RunnerError

        if path not in SERVER_PATHS:
            raise ValueError(f"server path must be one of {SERVER_PATHS}, got {path!r}")
        internals.wrapped_module(lm).requires_grad_(False)
        self.lm = lm
        self.path = path
        self.model_key = model_key
        self.dtype = next(internals.wrapped_module(lm).parameters()).dtype
        self.isolate = isolate
        self.keep_source_cache = keep_source_cache
        self.pool_size = pool_size
        self.version = ndif_version()
        self._rejections = (RequestError, RunnerError)
        self._pool = None

    @classmethod
    def load(cls, model_key: str, dtype: torch.dtype, path: str = "sandbox", **options
             ) -> "ModelActor":
        """An actor serving the model of ``model_key`` loaded as NDIF loads it
        (:func:`load_server_model`); ``options`` as for the constructor."""
        return cls(load_server_model(model_key, dtype), path, model_key, **options)

    def respond(self, payload: bytes, compress: bool, env: dict | None) -> bytes:
        """What the client receives for one request: the result blob (:meth:`run`), run on a
        fresh thread as NDIF's actor runs each request (nnsight keeps its save set and trace
        depth per thread), or ``RemoteError`` with the job's ERROR message as NDIF sends it."""
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            try:
                return pool.submit(self.run, payload, compress, env).result()
            except Exception as error:  # noqa: BLE001 - a job error, reported as NDIF does
                raise internals.RemoteError(self.error_text(error)) from error

    # -- NDIF's BaseModelDeployment.run / execute / cleanup, minus the actor's world

    def run(self, payload: bytes, compress: bool, env: dict | None) -> bytes:
        """One request: apply its environment, run its block, and return the result blob as
        NDIF sends it (``torch.save`` of the saved values, zstd level 3 when ``compress``).
        Raises what the block (or NDIF's rejection of the request) raised."""
        internals.apply_env(self.lm, env)
        try:
            data = self._sandboxed(payload, compress, env) if self.path == "sandbox" else \
                self._in_process(payload, compress)
        finally:
            internals.cancel_interleaving(self.lm)  # BaseModelDeployment.cleanup
        if compress:
            import zstandard

            data = zstandard.ZstdCompressor(level=RESULT_ZSTD_LEVEL).compress(data)
        return data

    def _in_process(self, payload: bytes, compress: bool) -> bytes:
        from ndif.common.schema.request import BackendRequestModel
        from ndif.services.ray.deployments.modeling.nns import (block_scope,
                                                                execute_traced_block,
                                                                prepare_traced_block)
        from ndif.services.ray.deployments.modeling.util import cpu_pickle_module

        scope = contextlib.nullcontext() if self.keep_source_cache else block_scope()
        with scope:
            if self.isolate:
                internals.forget_sources()  # a server process has read none of the client's
            with internals.hide_project_modules() if self.isolate else contextlib.nullcontext():
                tracer, _ = prepare_traced_block(self.lm, payload, compress,
                                                 deserialize=BackendRequestModel.deserialize)
                saved = execute_traced_block(tracer, self.dtype)
        buffer = io.BytesIO()
        torch.save(saved, buffer, pickle_module=cpu_pickle_module())
        return buffer.getvalue()

    def _sandboxed(self, payload: bytes, compress: bool, env: dict | None) -> bytes:
        """``SandboxHost.run_in_runner``: a fresh runner per request, handed ``(payload,
        compress, dtype, seed, env)``; NDIF's driver runs the model for it."""
        from ndif.services.ray.sandbox.driver import SandboxDriver

        sandbox = self._runners().acquire(timeout=120)
        connection = sandbox.connection()
        try:
            connection.send((payload, compress, str(self.dtype), None, env))
            data, _ = SandboxDriver(self.lm, self.dtype).pump(connection)
        finally:
            connection.close()
            sandbox.stop()  # SandboxHost.cleanup: the runner is discarded
        return data

    def _runners(self):
        if self._pool is None:
            python = runner_python(_runner_directory(), internals.project_roots())
            self._pool = _pool_class()(size=self.pool_size, python=python, quiet=True,
                                       model_key=self.model_key)
            weakref.finalize(self, self._pool.close)  # an actor dropped unclosed stops them too
        return self._pool

    def error_text(self, error: BaseException) -> str:
        """The job's ERROR message as NDIF writes it (``format_error``): a rejection's
        sentence, a runner's pre-formatted traceback, else the traceback."""
        if isinstance(error, self._rejections):
            return str(error)
        return "".join(traceback.format_exception(type(error), error, error.__traceback__))

    def close(self) -> None:
        """Stop the warm runners (``SandboxHost.close``)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None


# How long a runner may take to start (import torch and nnsight, try its meta model). NDIF's
# pool allows 30 s, sized for a GPU node; a busy 2-core machine can take longer.
RUNNER_START_S = 300.0


def _pool_class():
    """NDIF's runner pool, its runners allowed :data:`RUNNER_START_S` to start."""
    from ndif.services.ray.sandbox.host import Pool, spawn

    class RunnerPool(Pool):
        def _spawn(self):
            return spawn(python=self.python, quiet=self.quiet, peers=self.peers,
                         model_key=self.model_key, trust_remote_code=self.trust_remote_code,
                         timeout=RUNNER_START_S)

    return RunnerPool


_RUNNER_DIRECTORY: list[Path] = []


def _runner_directory() -> Path:
    """This process's directory for runner files (removed at exit: a runner a pool is still
    warming may start there after its pool closed)."""
    if not _RUNNER_DIRECTORY:
        directory = Path(tempfile.mkdtemp(prefix="af1-ndif-runner-"))
        atexit.register(shutil.rmtree, directory, True)
        _RUNNER_DIRECTORY.append(directory)
    return _RUNNER_DIRECTORY[0]
