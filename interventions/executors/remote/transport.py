"""Transports: where a serialized request goes, and how its result comes back.

A transport moves bytes: ``send(blob, compress) -> (content, job_id)`` waits for the result,
``submit(blob, compress) -> job_id`` does not, ``poll(job_id, compress) -> content | None``
collects a submitted job. ``content`` is the result blob as received (see :func:`encode_result`).

* :class:`NdifTransport`: NDIF, through nnsight's own remote backend.
* :class:`LocalTransport`: this process plays the server (the offline test of the remote path):
  the request is deserialized with the project's modules hidden and executed as an NDIF
  worker would.
"""

from __future__ import annotations

import concurrent.futures
import io
import uuid
import warnings

import torch
from nnsight.schema.config import CONFIG

from ... import nnsight_internals as internals
from ...nnsight_internals import RemoteError

# -- results as NDIF sends them -----------------------------------------------------------------


def encode_result(result: dict, compress: bool) -> bytes:
    """The saved values as the server sends them: ``torch.save`` bytes, zstd when ``compress``."""
    buffer = io.BytesIO()
    torch.save(result, buffer, pickle_protocol=4)
    content = buffer.getvalue()
    if compress:
        import zstandard

        content = zstandard.ZstdCompressor(level=6).compress(content)
    return content


def decode_result(content: bytes, compress: bool) -> dict:
    """Inverse of :func:`encode_result` (what nnsight's ``RemoteBackend.finalize`` does)."""
    if compress:
        import zstandard

        content = zstandard.ZstdDecompressor().decompress(content)
    return torch.load(io.BytesIO(content), map_location="cpu", weights_only=False)


# -- transports ---------------------------------------------------------------------------------


def execute_request(lm, blob: bytes, compress: bool) -> dict:
    """Run a serialized request against ``lm`` the way an NDIF worker does; return the saves.

    Deserializes with the caller's non-installed modules hidden (nnsight's ``remote="local"``
    rule: code not shipped by value fails here as it would on the server), executes the block
    against the deserialized frame and returns the values it saved. Call it in a fresh thread:
    nnsight keeps its save set and trace depth per thread, as a server process does.
    """
    with internals.isolated_source_cache():
        with internals.hide_project_modules(lm):
            tracer = internals.RequestModel.deserialize(blob, internals.persistent_objects(lm),
                                                        compress)
        internals.forget_client_source(tracer.info.frame.f_code.co_filename)
        return internals.execute_traced(tracer)


class LocalTransport:
    """The server is this process: :func:`execute_request` on ``server_lm``, in a fresh thread.

    Args:
        server_lm: an nnsight ``TransformersModel`` with weights (the model NDIF would hold).
    """

    name = "local"
    host = None

    def __init__(self, server_lm):
        self.server_lm = server_lm
        self._jobs: dict[str, bytes] = {}

    @classmethod
    def for_model(cls, model) -> "LocalTransport":
        """A local server for an :class:`AF1Model`: the model itself when it has weights, else
        (a model from :func:`load_remote_model`) the same checkpoint loaded with weights."""
        if next(model.hf.parameters()).device.type != "meta":
            return cls(model.lm)
        from nnsight.modeling.transformers import TransformersModel
        from transformers import AutoTokenizer

        lm = model.lm
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server = TransformersModel(
                lm.repo_id, revision=lm.revision, task="text-generation",
                tokenizer=AutoTokenizer.from_pretrained(lm.repo_id, revision=lm.revision),
                dispatch=True, dtype=getattr(torch, model.identity.dtype),
                attn_implementation=model.identity.attn_implementation)
        return cls(server)

    def _run(self, blob: bytes, compress: bool) -> bytes:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            result = pool.submit(execute_request, self.server_lm, blob, compress).result()
        return encode_result(result, compress)

    def send(self, blob: bytes, compress: bool) -> tuple[bytes, str | None]:
        return self._run(blob, compress), None

    def submit(self, blob: bytes, compress: bool) -> str:
        job_id = f"local-{uuid.uuid4().hex}"
        self._jobs[job_id] = self._run(blob, compress)
        return job_id

    def poll(self, job_id: str, compress: bool) -> bytes | None:
        if job_id not in self._jobs:
            raise RemoteError(f"job {job_id} is unknown to this local server")
        return self._jobs.pop(job_id)


class NdifTransport:
    """NDIF through nnsight's own ``RemoteBackend`` (websocket when blocking, HTTP polling when
    not). The model key (repo id, revision, task; canonicalized on the Hub) is made on first use.

    Args:
        lm: the nnsight model (usually meta, from :func:`load_remote_model`).
        host: NDIF URL (default: nnsight's config, ``NDIF_HOST``).
        api_key: default: nnsight's config (``NDIF_API_KEY`` or ``nnsight.login()``).
    """

    name = "ndif"

    def __init__(self, lm, host: str | None = None, api_key: str | None = None):
        self.lm = lm
        self.host = host or CONFIG.API.HOST
        self.api_key = api_key
        self._model_key: str | None = None

    @property
    def model_key(self) -> str:
        if self._model_key is None:
            self._model_key = self.lm.to_model_key()
        return self._model_key

    def _backend(self, blob: bytes, compress: bool, job_id: str | None = None,
                 blocking: bool = True) -> internals.BlobBackend:
        backend = internals.BlobBackend(blob, self.model_key, host=self.host, api_key=self.api_key,
                               env=internals.request_env(self.lm), blocking=blocking,
                               job_id=job_id)
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
        backend = self._backend(b"", compress, job_id=job_id, blocking=False)
        backend.poll(None)
        return backend.content


def _retryable(error: BaseException) -> bool:
    """Network errors, NDIF job errors and time-outs are worth another try; a client error the
    server refused (4xx other than 408/429: bad key, bad request) is not."""
    cause = error.__cause__
    response = getattr(cause, "response", None)
    if response is not None and 400 <= response.status_code < 500 and \
            response.status_code not in (408, 429):
        return False
    if isinstance(error, (RemoteError, OSError)):  # OSError: connection, socket, TimeoutError
        return True
    try:
        import httpx

        if isinstance(error, httpx.HTTPError):
            return True
    except ImportError:  # pragma: no cover - httpx comes with nnsight
        pass
    try:
        import websocket

        return isinstance(error, websocket.WebSocketException)
    except ImportError:  # pragma: no cover - websocket-client comes with nnsight
        return False

