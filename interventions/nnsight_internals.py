"""The one place that reaches into nnsight beyond its public API (pinned version only).

AF1 needs a few things nnsight does not export: the batch bookkeeping of the running invoke
(for per-invoke masks), the request plumbing of its remote backend (to send an already
serialized request and keep the raw result bytes), and, for the offline server, nnsight's
source caches (a server process starts with them empty). Every such name is used here and
nowhere else (``tests/test_remote_server.py`` checks it), so an nnsight upgrade has one file to
re-check. Importing this module refuses no nnsight: NDIF decides which version it serves, and
preflight compares the two (an nnsight outside :data:`TESTED_NNSIGHT` only warns here).

Imports nothing of this project, so a process that cannot import it (``tests/remote_worker.py``)
loads this file by path.

Functions that run *inside* a trace (:func:`current_batch_group`) are shipped by value with
remote requests, so they use only their arguments.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.metadata
import json
import os
import re
import sys
import warnings

import nnsight

# The nnsight CI installs and every test runs with, and the releases the package declares
# (pyproject.toml): the 0.8 line, whose remote tests passed under each release listed in the
# docs/remote.md.
PINNED_NNSIGHT = "0.8.1"
TESTED_NNSIGHT = ("0.8.0", "0.9")  # >= first, < second


def nnsight_version() -> str:
    """The installed nnsight's version (what NDIF compares with its own)."""
    return importlib.metadata.version("nnsight")


def within_tested_range(version: str) -> bool:
    """Whether ``version`` lies in :data:`TESTED_NNSIGHT` (a pre-release of 0.8.0 does not)."""
    def parts(text):
        return tuple(int(p) for p in re.findall(r"\d+", text)[:3])
    low, high = TESTED_NNSIGHT
    return parts(low) <= parts(version) < parts(high) and not re.search(r"[a-z]", version)


def warn_outside_tested_range(installed: str | None = None) -> str:
    """One warning (never a refusal) when nnsight lies outside :data:`TESTED_NNSIGHT`: a dry
    run and the preflight, which names the release NDIF needs, must still work."""
    installed = installed or nnsight_version()
    if not within_tested_range(installed):
        warnings.warn(f"nnsight {installed} is installed; this AF1 toolkit is tested with "
                      f"nnsight>={TESTED_NNSIGHT[0]},<{TESTED_NNSIGHT[1]} (CI: "
                      f"{PINNED_NNSIGHT}); --remote checks it against NDIF's before any work",
                      stacklevel=2)
    return installed


warn_outside_tested_range()

from nnsight.intervention.backends.remote import RemoteBackend, RemoteError  # noqa: E402
from nnsight.schema.request import RequestModel  # noqa: E402

__all__ = ["PINNED_NNSIGHT", "TESTED_NNSIGHT", "RemoteError", "RequestModel", "BlobBackend",
           "SilentConnection", "apply_env", "block_locals", "cancel_interleaving",
           "current_batch_group", "forget_sources", "hide_project_modules", "model_key",
           "model_key_of_checkpoint", "nnsight_version",
           "persistent_objects", "prepare_env", "project_roots", "request_env", "return_saves",
           "warn_outside_tested_range", "within_tested_range", "wrapped_module"]


# -- inside a trace (shipped by value) ------------------------------------------------------


def current_batch_group(root):
    """``(start, total)`` rows of the running invoke when several invokes share the forward of
    the model whose root envoy is ``root``, else ``None``.

    Read from the running mediators of its interleaver only (no ``interleaver.batcher``: NDIF's
    sandbox runner interleaves without one). The mediator class is reached through the
    interleaver rather than imported, so a request names no nnsight module beyond what the
    server resolves anyway.
    """
    mediators = root.interleaver.mediators
    if not mediators:
        return None
    mediator = type(mediators[0]).current("the attention mask")
    group = mediator.batch_group
    if group is None:
        return None
    groups = [m.batch_group for m in mediator.interleaver.mediators if m.batch_group is not None]
    if len(groups) < 2:
        return None
    return group[0], max(start + size for start, size in groups)


# -- models ----------------------------------------------------------------------------------


def cancel_interleaving(lm) -> None:
    """Stop whatever a request left running in ``lm``'s interleaver (NDIF's cleanup after
    every request, ``model.interleaver.cancel()``)."""
    lm.interleaver.cancel()


def block_locals(tracer) -> dict:
    """The local variables of the frame a traced block ran in (where nnsight's backends put
    the saved values back)."""
    return tracer.info.frame.f_locals


def wrapped_module(lm):
    """The plain ``torch.nn.Module`` behind an nnsight model."""
    return lm._module


def persistent_objects(lm) -> dict:
    """The objects a request refers to by name instead of by value (the model's envoys)."""
    return lm._remoteable_persistent_objects()


def request_env(lm) -> dict:
    """The per-request environment nnsight sends with a request (e.g. the attention
    implementation)."""
    return lm._remoteable_get_env()


def apply_env(lm, env: dict | None) -> None:
    """Apply a request's environment to a server's model, as NDIF's model actor does before
    every request (``self.model._remoteable_set_env(request.env)``)."""
    lm._remoteable_set_env(env)


def model_key_of_checkpoint(directory: str, task: str = "text-generation") -> str:
    """The key of the nnsight model NDIF would load from a checkpoint ``directory``, formed by
    nnsight from the class and its own fields (no model is built)."""
    from nnsight.modeling.transformers import TransformersModel
    from nnsight.util import to_import_path

    return f"{to_import_path(TransformersModel)}:" + json.dumps(
        {"repo_id": directory, "revision": None, "task": task})


def model_key(lm) -> str:
    """The key NDIF knows the model by (``module.Class:{"repo_id", "revision", "task"}``), as
    nnsight forms it: the Hub's canonical spelling of the repo id (one Hub call, cached). A
    local checkpoint directory is its own canonical id, so its key needs no Hub."""
    from nnsight.modeling import huggingface

    repo_id = getattr(lm, "repo_id", None)
    if repo_id and os.path.isdir(repo_id):
        huggingface._ID_CACHE.setdefault(repo_id, repo_id)
    return lm.to_model_key()


# -- the client side of a request ------------------------------------------------------------


def prepare_env() -> None:
    """Register non-installed modules for by-value pickling, as nnsight's remote path does
    before it serializes."""
    from nnsight.ndif import pull_env

    pull_env()


def return_saves(tracer, result: dict) -> None:
    """Hand a request's saved values back to the caller's frame, as ``remote=True`` does
    (an enclosing trace keeps only values marked as saved)."""
    from nnsight.tracing.tracer import mark
    from nnsight.tracing.util import push

    for value in result.values():
        mark(value)
    push(tracer.info.frame, result)


class SilentConnection(TimeoutError):
    """NDIF's websocket said nothing for ``seconds`` (a half-open connection looks the same as
    a long wait). ``job_id``: the job, when the request was already posted."""

    def __init__(self, job_id: str | None, seconds: float):
        self.job_id, self.seconds = job_id, seconds
        super().__init__(f"no status from NDIF for {seconds:g} s on the websocket"
                         + (f" (job {job_id})" if job_id else ""))


class BlobBackend(RemoteBackend):
    """nnsight's ``RemoteBackend``, sending an already serialized request and keeping the raw
    result bytes (for byte counts and the ledger) and the job id of a blocking request.

    ``silence_s`` bounds every wait on the websocket (nnsight's own waits without end): no
    frame for that long raises :class:`SilentConnection`."""

    def __init__(self, blob: bytes, *args, silence_s: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.blob = blob
        self.silence_s = silence_s
        self.content: bytes | None = None

    def request(self, request: RequestModel, tracer):
        """nnsight's blocking request (subscribe, post, read statuses until COMPLETED) with
        every read bounded by ``silence_s``."""
        import json

        import websocket
        from nnsight.schema.response import Status

        connection = websocket.create_connection(
            f"{self.ws_host}/subscribe",
            header={"ndif-api-key": self.api_key} if self.api_key else None,
            timeout=self.silence_s)
        try:
            request.session_id = json.loads(connection.recv())["session_id"]
            self.send(request, self._serialize(tracer))
            while True:
                try:
                    message = connection.recv()
                except websocket.WebSocketTimeoutException as error:
                    raise SilentConnection(getattr(self, "job_id", None),
                                           self.silence_s) from error
                response = self.parse(message)
                result = self.handle(response)
                if response.status == Status.COMPLETED:
                    return result
        finally:
            connection.close()

    def _serialize(self, tracer) -> bytes:
        return self.blob

    def send(self, request: RequestModel, blob: bytes):
        response = self._post(request, blob)
        self.job_id = response.id
        return self.handle(response)

    def finalize(self, content: bytes):
        self.content = content
        return super().finalize(content)


# -- the server side of a request (NDIF's code) -------------------------------------------------


def _installed(path: str | None) -> bool:
    """Whether a module file belongs to an installed package (or is built in, or synthetic:
    ``torch.ops`` names a relative ``_ops.py``)."""
    return path is None or not os.path.isabs(path) or "site-packages" in path or \
        "dist-packages" in path or path.startswith(sys.base_prefix)


# Never hidden: the entry point, and NDIF's own package (the server itself, wherever installed).
_SERVER_SIDE = {"__main__", "__mp_main__", "ndif"}
# Imported afresh for the server: a server process has its own cloudpickle, whose record of the
# classes it rebuilt by value is its own. Shared, the server would rebuild the client's classes
# in place (cloudpickle resets a known class's methods to the rebuilt ones).
_SERVER_OWN = {"cloudpickle"}


class _Refuse(importlib.abc.MetaPathFinder):
    """Makes the named top-level packages unimportable while it is on ``sys.meta_path``."""

    def __init__(self, roots: set[str]):
        self.roots = roots

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.roots:
            raise ModuleNotFoundError(f"No module named {name!r} (not on the server)", name=name)
        return None


def project_roots() -> set[str]:
    """Top-level names of the loaded modules a server would not have: every module that is not
    an installed package (this project, and the tests' helpers), less the server's own."""
    return {name.split(".")[0] for name, module in list(sys.modules.items())
            if not _installed(getattr(module, "__file__", None))} - _SERVER_SIDE


@contextlib.contextmanager
def hide_project_modules():
    """Make every module that is not an installed package unimportable, as on a server
    (nnsight's ``remote="local"`` rule): code not shipped by value then fails here as it would
    there. Such modules leave ``sys.modules`` and are refused outright (an editable install
    would otherwise import them again through its own finder); cloudpickle is imported afresh;
    all come back on exit.
    """
    roots = project_roots()
    hidden = {name: sys.modules.pop(name) for name in list(sys.modules)
              if name.split(".")[0] in roots | _SERVER_OWN}
    refuse = _Refuse(roots)
    sys.meta_path.insert(0, refuse)
    try:
        yield
    finally:
        sys.meta_path.remove(refuse)
        sys.modules.update(hidden)


def forget_sources() -> None:
    """Empty nnsight's source caches, as in a server process that has read no client file.

    In-process, the client's own capture has cached its real files there; a server looks its
    nested traces up in the shipped (re-formatted) source instead. Call it only inside a scope
    that restores the caches afterwards (NDIF's ``block_scope``), or the client's next capture
    would read the shipped text.
    """
    from nnsight.tracing.globals import BLOCKS, SOURCES

    SOURCES.clear()
    BLOCKS.clear()


# Shipped by value with requests (``current_batch_group`` runs inside traces on the server).
nnsight.register(sys.modules[__name__])
