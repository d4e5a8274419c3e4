"""Transports: where a serialized request goes, and how its result comes back.

A transport moves bytes: ``send(blob, compress) -> (content, job_id)`` waits for the result,
``submit(blob, compress) -> job_id`` does not, ``poll(job_id, compress) -> content | None``
collects a submitted job. ``content`` is the result blob as received (see :func:`encode_result`).
A job that failed on the server raises ``RemoteError`` with NDIF's message.

* :class:`NdifTransport`: NDIF, through nnsight's own remote backend.
* :class:`LocalTransport`: this machine plays the server (the offline test of the remote path):
  each request runs through NDIF's own code (the ``ndif`` package, :mod:`.ndif_server`), by
  default on the path an ordinary key takes (its sandbox), with this project unimportable, as on
  NDIF. Without that package a stand-in runs them in-process.
"""

from __future__ import annotations

import concurrent.futures
import importlib.metadata
import io
import os
import traceback
import uuid
import warnings

import torch
from nnsight.schema.config import CONFIG

from ... import nnsight_internals as internals
from ...errors import UserError
from ...nnsight_internals import RemoteError
from .faults import PAYLOAD_UNREADABLE, JobUnknown, ResultExpired
from .ndif_server import NDIF_INSTALL

# -- results as NDIF sends them -----------------------------------------------------------------


def encode_result(result: dict, compress: bool) -> bytes:
    """The saved values as the stand-in server sends them: ``torch.save`` bytes, zstd when
    ``compress`` (NDIF's own encoding, :class:`.ndif_server.ModelActor`, differs only in
    bookkeeping)."""
    buffer = io.BytesIO()
    torch.save(result, buffer, pickle_protocol=4)
    content = buffer.getvalue()
    if compress:
        import zstandard

        content = zstandard.ZstdCompressor(level=6).compress(content)
    return content


def decode_result(content: bytes, compress: bool) -> dict:
    """The saved values from a result blob (what nnsight's ``RemoteBackend.finalize`` does)."""
    if compress:
        import zstandard

        content = zstandard.ZstdDecompressor().decompress(content)
    return torch.load(io.BytesIO(content), map_location="cpu", weights_only=False)


# -- the server side ----------------------------------------------------------------------------

_NDIF: list = []  # whether NDIF's server package imports (looked up once)


def ndif_available() -> bool:
    """Whether NDIF's server code (the ``ndif`` package) is importable; said once, in one line,
    when it is not: the offline server then falls back to the project's stand-in, in-process."""
    if not _NDIF:
        try:
            import ndif.services.ray.deployments.modeling.nns  # noqa: F401
            import ndif.services.ray.sandbox.driver  # noqa: F401

            _NDIF.append(True)
        except ImportError as err:
            _NDIF.append(False)
            print(f"[af1 remote] NDIF's server code is not importable ({err}); the offline "
                  f"server is the project's stand-in, in-process ({NDIF_INSTALL} to use NDIF's "
                  "own, and its sandbox)", flush=True)
    return _NDIF[0]


def package_version(name: str) -> str | None:
    """The installed version of a distribution, ``None`` when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _traceback_text(error: BaseException) -> str:
    return "".join(traceback.format_exception(type(error), error, error.__traceback__))


def stand_in_request(lm, blob: bytes, compress: bool) -> bytes:
    """Run a serialized request against ``lm`` without NDIF's package: nnsight's
    ``RequestModel`` with the source caches confined to the request, the block run as NDIF's
    ``execute_traced_block`` runs it, the project unimportable meanwhile."""
    with internals.isolated_source_cache():
        internals.forget_sources()
        with internals.hide_project_modules():
            try:
                tracer = internals.RequestModel.deserialize(
                    blob, internals.persistent_objects(lm), compress)
            except Exception as error:  # noqa: BLE001 - classified as NDIF classifies it
                raise _Unreadable(f"{PAYLOAD_UNREADABLE} ({type(error).__name__}: "
                                  f"{error}).") from error
            saved = internals.execute_traced(tracer)
    return encode_result(saved, compress)


class _Unreadable(Exception):
    """The stand-in's rejection of a request it cannot deserialize, worded as NDIF's."""


def local_checkpoint(lm) -> str | None:
    """The checkpoint directory an nnsight model was loaded from, ``None`` for one built in
    memory."""
    repo_id = getattr(lm, "repo_id", None)
    return repo_id if repo_id and os.path.isdir(repo_id) else None


class LocalTransport:
    """The server is this machine, running NDIF's own code (:mod:`.ndif_server`): by default
    the path an ordinary key takes there (``server_path="sandbox"``: each request's block runs
    in a fresh runner process against a weightless model, the forward pass here), or the
    in-process path of a key with the ``trusted`` tag. Requests run in a fresh thread, as in
    NDIF's actor; one that fails raises ``RemoteError`` with the message NDIF would send.
    Without the ``ndif`` package the project's stand-in runs them in-process.

    Args:
        server_lm: the nnsight model with weights NDIF would hold (inference-only: its
            parameters no longer require grad, as NDIF's actor leaves them).
        server_path: ``"sandbox"`` or ``"trusted"``.
        model_key: the key runners build their meta model from (``None``: a model built in
            memory; the runner's module ids resolve to ``None``).
        env: the per-request environment the client sends (applied before each request).
    """

    name = "local"
    host = None

    def __init__(self, server_lm, server_path: str = "sandbox", model_key: str | None = None,
                 env: dict | None = None):
        from .ndif_server import SERVER_PATHS

        if server_path not in SERVER_PATHS:
            raise UserError(f"the local server path must be one of {', '.join(SERVER_PATHS)}, "
                            f"got {server_path!r}")
        self.server_lm = server_lm
        self.env = env
        self.model_key = model_key
        self._jobs: dict[str, bytes] = {}
        self.actor = None
        internals.wrapped_module(server_lm).requires_grad_(False)  # as NDIF's actor loads it
        if ndif_available():
            from .ndif_server import ModelActor

            self.actor = ModelActor(server_lm, server_path, model_key)
        self.server_path = server_path if self.actor is not None else "trusted"

    @classmethod
    def for_model(cls, model, server_path: str = "sandbox") -> "LocalTransport":
        """A local server for an :class:`AF1Model`. A model loaded from a checkpoint directory
        is loaded again from its model key, as NDIF's model actor loads it; a model built in
        memory serves itself."""
        lm = model.lm
        env = internals.request_env(lm)
        checkpoint = local_checkpoint(lm)
        if checkpoint is None or not ndif_available():
            if next(model.hf.parameters()).device.type == "meta":
                raise UserError("the local server needs the model's weights: load it from a "
                                "checkpoint directory")
            return cls(lm, server_path, None, env)
        from .ndif_server import load_server_model

        key = internals.model_key(lm)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server = load_server_model(key, getattr(torch, model.identity.dtype))
        return cls(server, server_path, key, env)

    @property
    def server_code(self) -> str:
        """Which code executes requests here, for the manifest."""
        return f"ndif {self.actor.version}" if self.actor is not None else "stand-in"

    def _execute(self, blob: bytes, compress: bool) -> bytes:
        if self.actor is not None:
            return self.actor.run(blob, compress, self.env)
        internals.apply_env(self.server_lm, self.env)
        return stand_in_request(self.server_lm, blob, compress)

    def _error_text(self, error: BaseException) -> str:
        if self.actor is not None:
            return self.actor.error_text(error)
        return str(error) if isinstance(error, _Unreadable) else _traceback_text(error)

    def _run(self, blob: bytes, compress: bool) -> bytes:
        # A fresh thread per request: nnsight keeps its save set and trace depth per thread,
        # as a server process does (NDIF's actor runs each request on a worker thread).
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            try:
                return pool.submit(self._execute, blob, compress).result()
            except Exception as error:  # noqa: BLE001 - a job error, reported as NDIF does
                raise RemoteError(self._error_text(error)) from error

    def send(self, blob: bytes, compress: bool) -> tuple[bytes, str | None]:
        return self._run(blob, compress), None

    def submit(self, blob: bytes, compress: bool) -> str:
        job_id = f"local-{uuid.uuid4().hex}"
        self._jobs[job_id] = self._run(blob, compress)
        return job_id

    def poll(self, job_id: str, compress: bool) -> bytes | None:
        """The result of a submitted job; :class:`JobUnknown` for an id this server never saw
        (NDIF answers such a poll with HTTP 404)."""
        if job_id not in self._jobs:
            raise JobUnknown(f"job {job_id} is unknown to this local server", known_lost=True)
        return self._jobs.pop(job_id)

    def close(self) -> None:
        """Stop the sandbox's warm runner, if any."""
        if self.actor is not None:
            self.actor.close()


class NdifTransport:
    """NDIF through nnsight's own ``RemoteBackend`` (websocket when blocking, HTTP polling when
    not). The model key (repo id, revision, task; canonicalized on the Hub) is made on first use.

    Args:
        lm: the nnsight model (usually meta, from :func:`load_remote_model`).
        host: NDIF URL (default: nnsight's config, ``NDIF_HOST``).
        api_key: default: nnsight's config (``NDIF_API_KEY`` or ``nnsight.login()``).
        silence_s: the longest wait for a frame on the websocket before
            :class:`~interventions.nnsight_internals.SilentConnection` (``None``: no bound).
        server_path: the path the key takes there (``"sandbox"``, ``"trusted"``; from its tags,
            see preflight), for the manifest.
    """

    name = "ndif"

    def __init__(self, lm, host: str | None = None, api_key: str | None = None,
                 silence_s: float | None = None, server_path: str | None = None):
        self.lm = lm
        self.host = host or CONFIG.API.HOST
        self.api_key = api_key
        self.silence_s = silence_s
        self.server_path = server_path
        self._model_key: str | None = None

    @property
    def model_key(self) -> str:
        if self._model_key is None:
            self._model_key = internals.model_key(self.lm)
        return self._model_key

    def _backend(self, blob: bytes, compress: bool, job_id: str | None = None,
                 blocking: bool = True) -> internals.BlobBackend:
        backend = internals.BlobBackend(blob, self.model_key, host=self.host,
                                        api_key=self.api_key, env=internals.request_env(self.lm),
                                        blocking=blocking, job_id=job_id,
                                        silence_s=self.silence_s)
        backend.compress = compress  # the blob was serialized with this flag
        return backend

    def send(self, blob: bytes, compress: bool) -> tuple[bytes, str | None]:
        backend = self._backend(blob, compress)
        backend.request(internals.RequestModel(model_key=self.model_key, compress=compress,
                                              env=backend.env), None)
        return backend.content, backend.job_id

    def submit(self, blob: bytes, compress: bool) -> str:
        backend = self._backend(blob, compress, blocking=False)
        backend.submit(None)
        return backend.job_id

    def poll(self, job_id: str, compress: bool) -> bytes | None:
        """The result of a submitted job, ``None`` while it runs. A job NDIF has no record of
        (HTTP 404 from its response route) raises :class:`JobUnknown`; a finished job whose
        result link no longer works (NDIF's links expire) raises :class:`ResultExpired`."""
        import httpx
        from nnsight.schema.response import Status

        backend = self._backend(b"", compress, job_id=job_id, blocking=False)
        try:
            backend.poll(None)
        except httpx.HTTPStatusError as error:
            if backend.status == Status.COMPLETED and error.response.status_code in (
                    403, 404, 410):
                raise ResultExpired(f"the result of job {job_id} can no longer be downloaded "
                                    f"(HTTP {error.response.status_code})") from error
            raise
        if backend.status is None:  # nnsight answers None for a 404: no status recorded
            raise JobUnknown(f"NDIF has no record of job {job_id} (HTTP 404)")
        return backend.content
