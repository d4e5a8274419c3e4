"""The one place that reaches into nnsight beyond its public API (pinned version only).

AF1 needs a few things nnsight does not export: the batch bookkeeping of the running invoke
(for per-invoke masks), the request plumbing of its remote backend (to send an already
serialized request and keep the raw result bytes), and, for the offline stand-in server, the
save set, trace depth and source caches that an NDIF worker manages. Every such name is used
here and nowhere else, so an nnsight upgrade has one file to re-check. Importing this module
checks that the installed nnsight is the pinned one.

Functions that run *inside* a trace (:func:`current_batch_group`) are shipped by value with
remote requests, so they use only their arguments.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.metadata
import linecache
import sys

import nnsight

PINNED_NNSIGHT = "0.8.1"


class NnsightVersionError(ImportError):
    """The installed nnsight is not the version this toolkit is pinned to."""


def check_nnsight_version(installed: str | None = None) -> str:
    """Raise :class:`NnsightVersionError` unless nnsight is :data:`PINNED_NNSIGHT`."""
    installed = installed or importlib.metadata.version("nnsight")
    if installed != PINNED_NNSIGHT:
        raise NnsightVersionError(
            f"this AF1 toolkit needs nnsight=={PINNED_NNSIGHT} (NDIF requires the client's "
            f"nnsight to match the server's, and AF1 uses its internals), but nnsight "
            f"{installed} is installed: `pip install nnsight=={PINNED_NNSIGHT}`")
    return installed


check_nnsight_version()

from nnsight.intervention.backends.remote import RemoteBackend, RemoteError  # noqa: E402
from nnsight.schema.request import RequestModel  # noqa: E402

__all__ = ["PINNED_NNSIGHT", "RemoteError", "RequestModel", "BlobBackend", "check_nnsight_version",
           "current_batch_group", "execute_traced", "hide_project_modules", "isolated_source_cache",
           "persistent_objects", "prepare_env", "request_env", "return_saves", "wrapped_module"]


# -- inside a trace (shipped by value) ------------------------------------------------------


def current_batch_group(interleaver):
    """``(start, total)`` rows of the running invoke when several invokes share the forward,
    else ``None``.

    Reached through the interleaver rather than imported, so a request names no nnsight module
    beyond what the server resolves anyway.
    """
    batcher = getattr(interleaver, "batcher", None)
    if batcher is None or not batcher.batching:
        return None
    mediator_class = type(interleaver.mediators[0])
    group = mediator_class.current("the attention mask").batch_group
    if group is None:
        return None
    return group[0], batcher.total


# -- models ----------------------------------------------------------------------------------


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


class BlobBackend(RemoteBackend):
    """nnsight's ``RemoteBackend``, sending an already serialized request and keeping the raw
    result bytes (for byte counts and the ledger) and the job id of a blocking request."""

    def __init__(self, blob: bytes, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.blob = blob
        self.content: bytes | None = None

    def _serialize(self, tracer) -> bytes:
        return self.blob

    def send(self, request: RequestModel, blob: bytes):
        response = self._post(request, blob)
        self.job_id = response.id
        return self.handle(response)

    def finalize(self, content: bytes):
        self.content = content
        return super().finalize(content)


# -- the stand-in server ---------------------------------------------------------------------


def _installed(path: str | None) -> bool:
    """Whether a module file belongs to an installed package (or is built in)."""
    return path is None or "site-packages" in path or "dist-packages" in path or \
        path.startswith(sys.base_prefix)


class _Refuse(importlib.abc.MetaPathFinder):
    """Makes the named top-level packages unimportable while it is on ``sys.meta_path``."""

    def __init__(self, roots: set[str]):
        self.roots = roots

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.roots:
            raise ModuleNotFoundError(f"No module named {name!r} (not on the server)", name=name)
        return None


@contextlib.contextmanager
def hide_project_modules(lm):
    """Make modules that are not installed packages unimportable, as on a server (nnsight's
    ``remote="local"`` rule): code not shipped by value then fails here as it would there.

    An editable install would import hidden project code again through its own finder, so what
    was hidden from outside the installed packages is refused outright.
    """
    from nnsight.intervention.backends.local import LocalSimulationBackend

    hider = LocalSimulationBackend(lm)
    hidden = hider._hide_local_modules()
    refuse = _Refuse({name.split(".")[0] for name, module in hidden["modules"].items()
                      if not _installed(getattr(module, "__file__", None))})
    sys.meta_path.insert(0, refuse)
    try:
        yield
    finally:
        sys.meta_path.remove(refuse)
        hider._restore(hidden)


@contextlib.contextmanager
def isolated_source_cache():
    """Confine nnsight's source caches to one request, as NDIF's worker does: deserializing
    registers the block's source under the client's filename, and nested traces memoize what
    they parse, so a later request from the same file would otherwise read this one's source."""
    from nnsight.tracing.globals import BLOCKS, SOURCES

    snapshot = dict(linecache.cache), dict(SOURCES), dict(BLOCKS)
    try:
        yield
    finally:
        for cache, state in zip((linecache.cache, SOURCES, BLOCKS), snapshot):
            cache.clear()
            cache.update(state)


def forget_client_source(filename: str) -> None:
    """A server has never read the client's file: nested traces must be found in the shipped
    (re-formatted) source, not in this process's reading of ``filename``."""
    from nnsight.tracing.globals import BLOCKS, SOURCES

    SOURCES.pop(filename, None)
    for key in [k for k in BLOCKS if k[0] == filename]:
        del BLOCKS[key]


def execute_traced(tracer) -> dict:
    """Run a deserialized request's block and return the values it saved (by name)."""
    import torch
    from nnsight.tracing.tracer import _saves, dec, inc

    frame = tracer.info.frame
    inc()
    try:
        with torch.no_grad():
            tracer.execute(tracer.info.code)
        saved = _saves()
        return {name: value for name, value in frame.f_locals.items() if id(value) in saved}
    finally:
        dec()


# Shipped by value with requests (``current_batch_group`` runs inside traces on the server).
nnsight.register(sys.modules[__name__])
