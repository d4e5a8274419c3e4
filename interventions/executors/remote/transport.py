"""Transports: where a serialized request goes, and how its result comes back.

A transport moves bytes: ``send(blob, compress) -> (content, job_id)`` waits for the result,
``submit(blob, compress) -> job_id`` does not, ``poll(job_id, compress) -> content | None``
collects a submitted job. ``content`` is the result blob as received (``torch.save`` bytes of the
saved values, zstd when compressed). A job that failed on the server raises ``RemoteError`` with
NDIF's message.

* :class:`NdifTransport`: NDIF, through nnsight's own remote backend.
* :class:`LocalTransport`: this machine plays the server (the offline test of the remote path):
  each request runs through NDIF's own code (the ``ndif`` package, :mod:`.ndif_server`), by
  default on the path an ordinary key takes (its sandbox), with this project unimportable, as on
  NDIF.
* ``dryrun.MeasuringTransport``: measures each request and sends nothing (``--dry-run``).
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import uuid
import warnings

import torch
from nnsight.schema.config import CONFIG

from ... import nnsight_internals as internals
from ...errors import UserError
from .faults import JobUnknown, ResultExpired
from .ndif_server import NDIF_INSTALL, SERVER_PATHS, ModelActor, ndif_missing


def decode_result(content: bytes, compress: bool) -> dict:
    """The saved values from a result blob (what nnsight's ``RemoteBackend.finalize`` does)."""
    if compress:
        import zstandard

        content = zstandard.ZstdDecompressor().decompress(content)
    return torch.load(io.BytesIO(content), map_location="cpu", weights_only=False)


def package_version(name: str) -> str | None:
    """The installed version of a distribution, ``None`` when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def require_ndif() -> None:
    """Refuse, in one line with the install command, to play NDIF's server without its code."""
    missing = ndif_missing()
    if missing is not None:
        raise UserError(f"--remote-backend local runs NDIF's own server code, which is not "
                        f"importable ({missing}); install it with: {NDIF_INSTALL}")


def local_checkpoint(lm) -> str | None:
    """The checkpoint directory an nnsight model was loaded from, ``None`` for one built in
    memory."""
    repo_id = getattr(lm, "repo_id", None)
    return repo_id if repo_id and os.path.isdir(repo_id) else None


class LocalTransport:
    """The server is this machine, running NDIF's own code (:class:`.ndif_server.ModelActor`):
    by default the path an ordinary key takes there (``server_path="sandbox"``: each request's
    block runs in a fresh runner process against a weightless model, the forward pass here), or
    the in-process path of a key with the ``trusted`` tag. A request that fails raises
    ``RemoteError`` with the message NDIF would send. Without the ``ndif`` package: one
    :class:`UserError` line with its install command.

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
        if server_path not in SERVER_PATHS:
            raise UserError(f"the local server path must be one of {', '.join(SERVER_PATHS)}, "
                            f"got {server_path!r}")
        require_ndif()
        self.env = env
        self.model_key = model_key
        self.server_path = server_path
        self.actor = ModelActor(server_lm, server_path, model_key)
        self._jobs: dict[str, bytes] = {}

    @classmethod
    def for_model(cls, model, server_path: str = "sandbox") -> "LocalTransport":
        """A local server for an :class:`AF1Model`. A model loaded from a checkpoint directory
        is loaded again from its model key, as NDIF's model actor loads it; a model built in
        memory serves itself."""
        from .ndif_server import load_server_model

        require_ndif()
        lm = model.lm
        env = internals.request_env(lm)
        checkpoint = local_checkpoint(lm)
        if checkpoint is None:
            if next(model.hf.parameters()).device.type == "meta":
                raise UserError("the local server needs the model's weights: load it from a "
                                "checkpoint directory")
            return cls(lm, server_path, None, env)
        key = internals.model_key(lm)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server = load_server_model(key, getattr(torch, model.identity.dtype))
        return cls(server, server_path, key, env)

    @property
    def server_code(self) -> str:
        """Which code executes requests here, for the manifest."""
        return f"ndif {self.actor.version}"

    def send(self, blob: bytes, compress: bool) -> tuple[bytes, str | None]:
        return self.actor.respond(blob, compress, self.env), None

    def submit(self, blob: bytes, compress: bool) -> str:
        job_id = f"local-{uuid.uuid4().hex}"
        self._jobs[job_id] = self.actor.respond(blob, compress, self.env)
        return job_id

    def poll(self, job_id: str, compress: bool) -> bytes | None:
        """The result of a submitted job; :class:`JobUnknown` for an id this server never saw
        (NDIF answers such a poll with HTTP 404)."""
        if job_id not in self._jobs:
            raise JobUnknown(f"job {job_id} is unknown to this local server", known_lost=True)
        return self._jobs.pop(job_id)

    def close(self) -> None:
        """Stop the sandbox's warm runner, if any."""
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
