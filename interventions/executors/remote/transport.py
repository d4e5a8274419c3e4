"""Transports: where a serialized request goes, and how its result comes back.

A transport moves bytes: ``send(blob, compress) -> (content, job_id)`` waits for the result,
``submit(blob, compress) -> job_id`` does not, ``poll(job_id, compress) -> content | None``
collects a submitted job. ``content`` is the result blob as received (see :func:`encode_result`).
A job that failed on the server raises ``RemoteError`` with NDIF's message.

* :class:`NdifTransport`: NDIF, through nnsight's own remote backend.
* :class:`LocalTransport`: this process plays the server (the offline test of the remote path):
  each request runs through NDIF's own request execution (the ``ndif`` package), with this
  project unimportable, as on NDIF. Without that package a stand-in does the same.
"""

from __future__ import annotations

import concurrent.futures
import importlib.metadata
import io
import traceback
import uuid
import warnings

import torch
from nnsight.schema.config import CONFIG

from ... import nnsight_internals as internals
from ...nnsight_internals import RemoteError
from .faults import PAYLOAD_UNREADABLE, ResultExpired

NDIF_INSTALL = "pip install --no-deps --ignore-requires-python ndif==0.1.2"

# -- results as NDIF sends them -----------------------------------------------------------------


def encode_result(result: dict, compress: bool) -> bytes:
    """The saved values as the stand-in server sends them: ``torch.save`` bytes, zstd when
    ``compress`` (NDIF's own encoding, :func:`ndif_server`, differs only in bookkeeping)."""
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


class NdifServerCode:
    """NDIF's own request execution (``ndif`` 0.1.2, ``services/ray/deployments/modeling``):
    what its model actor does with a request, minus the queue, metrics and object store."""

    def __init__(self):
        from ndif.common.errors import RequestError
        from ndif.common.schema.request import BackendRequestModel
        from ndif.services.ray.deployments.modeling.nns import (block_scope,
                                                                execute_traced_block,
                                                                prepare_traced_block)
        from ndif.services.ray.deployments.modeling.util import cpu_pickle_module

        self.version = package_version("ndif")
        self.RequestError = RequestError
        self.deserialize = BackendRequestModel.deserialize
        self.block_scope = block_scope
        self.prepare = prepare_traced_block
        self.execute = execute_traced_block
        self.pickle_module = cpu_pickle_module

    def run(self, lm, blob: bytes, compress: bool, dtype: torch.dtype) -> bytes:
        """Deserialize and run one request against ``lm``; the result blob as NDIF sends it
        (``torch.save`` with NDIF's pickle module, zstd level 3 when ``compress``)."""
        with self.block_scope():
            internals.forget_sources()  # a server process has read none of the client's files
            with internals.hide_project_modules():
                tracer, _ = self.prepare(lm, blob, compress, deserialize=self.deserialize)
                saved = self.execute(tracer, dtype)
        buffer = io.BytesIO()
        torch.save(saved, buffer, pickle_module=self.pickle_module())
        content = buffer.getvalue()
        if compress:
            import zstandard

            content = zstandard.ZstdCompressor(level=3).compress(content)
        return content

    def error_text(self, error: BaseException) -> str:
        """The job's ERROR message as NDIF writes it: a rejection's sentence, else the
        traceback."""
        if isinstance(error, self.RequestError):
            return str(error)
        return _traceback_text(error)


_NDIF: list = []  # NdifServerCode, or None when the package is missing (looked up once)


def ndif_server() -> NdifServerCode | None:
    """NDIF's request execution, or ``None`` (said once, in one line) when the ``ndif`` package
    is not installed; the offline server then falls back to the project's stand-in."""
    if not _NDIF:
        try:
            _NDIF.append(NdifServerCode())
        except ImportError as err:
            _NDIF.append(None)
            print(f"[af1 remote] NDIF's server code is not importable ({err}); the offline "
                  f"server is the project's stand-in ({NDIF_INSTALL} to use NDIF's own)",
                  flush=True)
    return _NDIF[0]


def package_version(name: str) -> str | None:
    """The installed version of a distribution, ``None`` when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _traceback_text(error: BaseException) -> str:
    return "".join(traceback.format_exception(type(error), error, error.__traceback__))


def execute_request(lm, blob: bytes, compress: bool) -> bytes:
    """Run a serialized request against ``lm`` as an NDIF worker does; the result blob.

    With NDIF's code (:func:`ndif_server`) when installed, else the stand-in: nnsight's
    ``RequestModel`` with the source caches confined to the request, and the block run as
    NDIF's ``execute_traced_block`` runs it. Either way the project is unimportable meanwhile
    (code not shipped by value fails here as it would on the server), and nothing is added
    around the block (NDIF adds no ``no_grad``). Call it in a fresh thread: nnsight keeps its
    save set and trace depth per thread, as a server process does.
    """
    server = ndif_server()
    dtype = next(internals.wrapped_module(lm).parameters()).dtype
    if server is not None:
        return server.run(lm, blob, compress, dtype)
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


def server_error_text(error: BaseException) -> str:
    """A server-side failure as NDIF reports it to the client (see :mod:`.faults`)."""
    server = ndif_server()
    if server is not None:
        return server.error_text(error)
    return str(error) if isinstance(error, _Unreadable) else _traceback_text(error)


class LocalTransport:
    """The server is this process: :func:`execute_request` on ``server_lm``, in a fresh thread.
    A request that fails there raises ``RemoteError`` with the message NDIF would send.

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
        internals.wrapped_module(server).requires_grad_(False)  # as NDIF does after loading
        return cls(server)

    @property
    def server_code(self) -> str:
        """Which code executes requests here, for the manifest."""
        server = ndif_server()
        return f"ndif {server.version}" if server is not None else "stand-in"

    def _run(self, blob: bytes, compress: bool) -> bytes:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            try:
                return pool.submit(execute_request, self.server_lm, blob, compress).result()
            except Exception as error:  # noqa: BLE001 - a job error, reported as NDIF does
                raise RemoteError(server_error_text(error)) from error

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
        """The result of a submitted job, ``None`` while it runs. A finished job whose result
        link no longer works (NDIF's links expire) raises :class:`ResultExpired`."""
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
        return backend.content
