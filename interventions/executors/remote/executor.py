"""The remote executor: AF1 cells and CAMA sums as few, small NDIF requests.

* Every request is sent from the one trace site (``trace_site.py``, loaded here under a
  content-addressed file name); :func:`cells_session` and :func:`residual_sums_session` make the
  two kinds of request from it with the steps in ``steps.py``.
* :class:`RemoteExecutor` packs ``cells_per_request`` configurations x every prompt batch into
  one session request, uploads each CAMA layer a request needs once, and splits a request in
  halves until it fits the byte budget and NDIF's execution time-out (:func:`split_to_fit`).
* :func:`load_remote_model` gives an :class:`AF1Model` without weights (config and tokenizer
  only) for models NDIF hosts.
"""

from __future__ import annotations

import hashlib
import json
import linecache
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from ... import nnsight_internals as internals
from ...errors import UserError
from ...mechanisms.plan import AF1Plan, Intervention, as_intervention
from ...mechanisms.traced import CamaLayer
from ..base import Predictions
from .client import DEFAULT_CELLS_PER_REQUEST, DEFAULT_MAX_RETRIES, RemoteClient, RemoteStats
from .faults import RemoteRunError, SplitRequest
from .received import received_tensor
from .steps import (cell_traces, predictions_finish, predictions_step, residual_sums_step,
                    sum_traces)

# -- the trace site and the two kinds of request ---------------------------------------------------


def load_trace_site(path: Path = Path(__file__).with_name("trace_site.py")) -> Callable:
    """``run_traces`` compiled from ``path`` under ``<path>@<sha256 of its text, 12 hex>``.

    nnsight reads a block's source through ``linecache`` by file name, so the text is registered
    there under that name; a server that keeps its source caches then never confuses two
    versions of the file (see ``trace_site.py``).
    """
    source = path.read_text()
    filename = f"{path}@{hashlib.sha256(source.encode()).hexdigest()[:12]}"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"__name__": f"{__package__}.trace_site", "__file__": filename}
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102 - this package's own file
    return namespace["run_traces"]


run_traces = load_trace_site()


def request_result(saves: dict | None) -> dict | None:
    """The dict ``finish`` saved, from a request's decoded saves (``None`` for a dry run)."""
    return None if saves is None else saves["result"]


def cells_session(lm, sites, backend, cells, batches, groups=None) -> dict | None:
    """One request: every ``(intervention, cama)`` cell on every ``(encoding, answers)`` batch
    (``groups``: each batch's ``(B,)`` CAMA groups, for a table grouped by template).

    Returns ``pred_ids`` int32, ``answer_logits`` and ``answer_logprobs`` float32, each
    ``(len(cells) * N,)`` in cell-major, batch order (N prompts), and where a cell intervenes
    ``kl`` (``KL(clean || cell)`` per prompt, from a clean pass of each batch in the same
    request); ``None`` when ``backend`` only serializes.
    """
    cells = list(cells)
    state = {"cells": cells, "batches": list(batches), "pred_ids": [],
             "answer_logits": [], "groups": None if groups is None else list(groups),
             "kl": any(intervention is not None for intervention, _ in cells)}
    return request_result(run_traces(lm, sites, backend, cell_traces, predictions_step,
                                     predictions_finish, state))


def residual_sums_session(lm, sites, backend, batches, layers, keys, hidden, groups=None
                          ) -> dict | None:
    """One request: clean traces over ``(encoding, answers or None)`` batches, adding each
    token's ``h_k`` to its key's float64 sum on the server (``groups``: as for
    :func:`cells_session`).

    Returns ``residual_sums`` ``(len(layers), K, D)`` float32 and, when the batches carry
    answers, ``pred_ids``/``answer_logits`` as :func:`cells_session` does for one clean cell.
    The sums live in the server's CPU memory (a few hundred MB at most): ``device_map="auto"``
    spreads the layers over GPUs, and no one GPU need hold them all.
    """
    state = {"batches": list(batches), "pred_ids": [], "answer_logits": [],
             "layers": list(layers), "keys": keys, "shape": (len(layers), len(keys), hidden),
             "groups": None if groups is None else list(groups)}
    return request_result(run_traces(lm, sites, backend, sum_traces, residual_sums_step,
                                     predictions_finish, state))


def predictions_layout(n: int, kl: bool) -> dict:
    """What a request saves for ``n`` (configuration, prompt) pairs, name -> ``(shape, dtype)``
    (see ``RemoteClient.backend``): ids, answer logits and log-probabilities, and with ``kl``
    the KL from the clean pass."""
    layout = {"pred_ids": ((n,), torch.int32), "answer_logits": ((n,), torch.float32),
              "answer_logprobs": ((n,), torch.float32)}
    if kl:
        layout["kl"] = ((n,), torch.float32)
    return layout


def range_label(noun: str, start: int, n: int, total: int) -> str:
    """``"cells 33-64 of 114"``: items ``start .. start+n-1`` (0-based) of ``total``."""
    return f"{noun} {start + 1}-{start + n} of {total}"


def split_to_fit(items: Sequence, send: Callable[[Sequence, int], Any], what: str
                 ) -> Iterator[tuple[Sequence, Any]]:
    """``send(part, start)`` for consecutive parts covering ``items`` in order: all of them at
    once, or, for a part whose request must be split (:class:`~.faults.SplitRequest`: over the
    byte budget or refused with HTTP 413, or past NDIF's execution time-out), its two halves in
    turn, recursively. Yields ``(part, send's result)``; ``start`` is the part's offset in
    ``items``.

    A single item that must still be split is an error (``what`` names the items, e.g.
    ``"configuration"``).
    """
    pending = [(0, list(items))]
    while pending:
        start, part = pending.pop(0)
        try:
            result = send(part, start)
        except SplitRequest as error:
            if len(part) == 1:
                raise RemoteRunError(error.single_item_error(what)) from None
            half = (len(part) + 1) // 2
            pending[:0] = [(start, part[:half]), (start + half, part[half:])]
            continue
        yield part, result


# -- request keys ---------------------------------------------------------------------------------


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _request_key(model, kind: str, content: Any) -> str:
    """A content key for the ledger: the model, the request kind and a JSON description."""
    text = json.dumps([model.identity.fingerprint, model.identity.dtype, kind, content],
                      sort_keys=True, default=str)
    return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:24]}"


def _groups_digest(groups) -> str:
    """``""`` for a data set of one group, else the digest of each batch's groups."""
    return "" if groups is None else "groups-" + _digest(*groups)


def _batches_digest(batches) -> str:
    tensors = []
    for enc, answers in batches:
        tensors += [enc["input_ids"], enc["attention_mask"]]
        if answers is not None:
            tensors.append(answers)
    return _digest(*tensors)


def _intervention_digest(intervention: Intervention | None) -> Any:
    if intervention is None:
        return None
    return [sorted((k, list(v)) for k, v in intervention.rules.items()),
            intervention.replace_layer, intervention.replacement]


# -- the CAMA build on NDIF -----------------------------------------------------------------------


class _RemoteCamaRunner:
    """Sums the grouped clean residuals on the server (see :meth:`RemoteExecutor.cama_runner`).

    Each request runs clean traces over up to ``batches_per_request`` batches (default: all in
    one request) and only the float32 sums come back. With ``answer_ids`` (one ``(B,)`` tensor
    per batch) the same passes also save the clean predictions, handed to ``on_predictions``.
    """

    def __init__(self, client: RemoteClient, batches_per_request: int | None, answer_ids,
                 on_predictions):
        if batches_per_request is not None and batches_per_request < 1:
            raise UserError(f"batches per request must be >= 1, got {batches_per_request}")
        self.client = client
        self.batches_per_request = batches_per_request
        self.answer_ids = answer_ids
        self.on_predictions = on_predictions

    def __call__(self, model, encodings, layers, keys, progress=True, groups=None
                 ) -> torch.Tensor:
        answers = self.answer_ids if self.answer_ids is not None else [None] * len(encodings)
        # (batch, its groups) pairs, so that a split request keeps each batch's groups.
        batches = list(zip(zip(encodings, answers), groups or [None] * len(encodings)))
        size = self.batches_per_request or len(batches)
        layers = [int(k) for k in layers]
        hidden = model.hf.config.get_text_config().hidden_size
        total = torch.zeros(len(layers), len(keys), hidden, dtype=torch.float64)
        predictions = []

        def send(part, start):
            label = range_label("CAMA sums, batches", start, len(part), len(batches))
            inputs = [batch for batch, _ in part]
            part_groups = None if groups is None else [g for _, g in part]
            content = [layers, _digest(keys), _batches_digest(inputs)]
            if part_groups is not None:  # keys of ungrouped requests stay as they were
                content.append(_groups_digest(part_groups))
            key = _request_key(model, "cama", content)
            saves = {"residual_sums": (tuple(total.shape), torch.float32)}
            if self.answer_ids is not None:  # the clean predictions ride along
                saves.update(predictions_layout(sum(len(e["input_ids"]) for e, _ in inputs),
                                                kl=False))
            backend = self.client.backend("cama", label, key, traces=len(part), saves=saves)
            return residual_sums_session(model.lm, model.sites, backend, inputs, layers, keys,
                                         hidden, part_groups)

        for first in range(0, len(batches), size):
            for _, result in split_to_fit(batches[first:first + size],
                                          lambda part, start: send(part, first + start),
                                          "batch"):
                total += received_tensor(result["residual_sums"], "CAMA sums",
                                         tuple(total.shape), "float").double()
                if "pred_ids" in result:
                    predictions.append((result["pred_ids"], result["answer_logits"],
                                        result.get("answer_logprobs")))
        if self.on_predictions is not None and predictions:
            self.on_predictions(predictions)
        return total


# -- the executor ---------------------------------------------------------------------------------


def check_cells_per_request(cells_per_request: int) -> int:
    """Refuse fewer than one configuration per request."""
    if cells_per_request < 1:
        raise UserError(f"cells per request (--cells-per-request) must be >= 1, got "
                        f"{cells_per_request}")
    return cells_per_request


def chunk_cells(items: Sequence, cells_per_request: int) -> list[list]:
    """Group cells into requests of at most ``cells_per_request``.

    ``items`` are ``(tag, intervention, cama)``; they are ordered (stably) by the table layer
    they need, so a request uploads as few distinct layers as possible.
    """
    check_cells_per_request(cells_per_request)

    def need(item):
        intervention = item[1]
        if intervention is None or not intervention.needs_table:
            return (0, -1)
        return (1 if intervention.replacement == "cama" else 2, intervention.replace_layer)

    ordered = sorted(items, key=need)
    return [ordered[i:i + cells_per_request] for i in range(0, len(ordered), cells_per_request)]


class RemoteExecutor:
    """Evaluates interventions on one data set through NDIF (or NDIF's code run here), with the
    :class:`interventions.NnsightExecutor` interface.

    Args:
        model: an :class:`AF1Model` (:func:`load_remote_model` for NDIF).
        prompts / answer_ids: the data set; batch_size: prompts per forward pass.
        backend: ``"remote"`` or ``"local"`` (ignored when ``client`` is given).
        cells_per_request: configurations per request; a request runs
            ``cells x n_batches`` traces.
        max_retries: see :class:`RemoteClient` (ignored when ``client`` is given).
        client: a shared :class:`RemoteClient` (one per job, so its ``stats`` cover the job).
        groups: ``(N,)`` CAMA group of each prompt, for a table grouped by template (see
            :class:`interventions.NnsightExecutor`); sent with each batch.
        client_options: further :class:`RemoteClient` arguments (``ledger``, ``blocking``, ...).
    """

    name = "nnsight-remote"

    def __init__(self, model, prompts: Sequence[str], answer_ids: Sequence[int],
                 batch_size: int = 32, backend: str = "remote",
                 cells_per_request: int = DEFAULT_CELLS_PER_REQUEST,
                 max_retries: int = DEFAULT_MAX_RETRIES, client: RemoteClient | None = None,
                 groups: Sequence[int] | None = None, **client_options):
        check_cells_per_request(cells_per_request)
        self.model = model
        self.client = client or RemoteClient(model, backend, max_retries=max_retries,
                                             **client_options)
        self.cells_per_request = cells_per_request
        self.n_prompts = len(prompts)
        self.answer_ids = torch.as_tensor(np.asarray(answer_ids), dtype=torch.long)
        self.batches = model.encode_batches(prompts, batch_size)
        self._inputs = [(enc, self.answer_ids[indices]) for indices, enc in self.batches]
        self._groups = None
        if groups is not None:
            groups = torch.as_tensor(np.asarray(groups), dtype=torch.long)
            self._groups = [groups[indices] for indices, _ in self.batches]
        self._inputs_digest = _batches_digest(self._inputs) + _groups_digest(self._groups)
        self._clean: Predictions | None = None

    @property
    def stats(self) -> RemoteStats:
        return self.client.stats

    # -- the executor interface

    def clean(self) -> Predictions:
        """Predictions of the unmodified model (no request when a CAMA build on these batches
        already computed them, see :meth:`cama_runner`)."""
        if self._clean is None:
            self._clean = self._evaluate([(None, None)], "clean", "full model")[0]
        return self._clean

    def run(self, plan: AF1Plan | Intervention, cama: CamaLayer | None = None) -> Predictions:
        """Predictions under one plan or intervention (one request)."""
        intervention = as_intervention(plan, self.model.n_layers)
        return self._evaluate([(intervention, cama)], "cells", repr(plan))[0]

    def run_many(self, cells: Iterable[tuple[Any, AF1Plan | Intervention, CamaLayer | None]]
                 ) -> Iterator[tuple[Any, Predictions]]:
        """Evaluate ``(tag, plan_or_intervention, cama_layer)`` cells, ``cells_per_request`` per
        request (fewer where a request would exceed the byte budget); yields
        ``(tag, predictions)`` request by request as each finishes."""
        for part, preds in self._requests(cells, submit_only=False):
            for (tag, _, _), p in zip(part, preds):
                yield tag, p

    def submit(self, cells: Iterable[tuple[Any, AF1Plan | Intervention, CamaLayer | None]]
               ) -> list[str]:
        """Submit every request of ``cells`` without waiting; returns the job ids (kept in the
        client's ledger). Collect later with :meth:`run_many` on the same cells and ledger."""
        return [job_id for _, job_id in self._requests(cells, submit_only=True)]

    def cama_runner(self, batches_per_request: int | None = None):
        """A remote CAMA runner for this data set whose requests also compute :meth:`clean`.

        Use it as ``cached_cama_table(..., batch_size=<this executor's>, runner=...)`` with the
        executor's prompts: the table's clean passes are the full model's passes, so their
        predictions are saved alongside the sums. On other prompts the runner only sums.
        """
        def runner(model, encodings, layers, keys, progress=True, groups=None):
            same = len(encodings) == len(self._inputs) and all(
                torch.equal(enc["input_ids"], mine["input_ids"])
                for enc, (mine, _) in zip(encodings, self._inputs))
            answers = [a for _, a in self._inputs] if same else None
            return _RemoteCamaRunner(self.client, batches_per_request, answers,
                                     self._take_clean)(model, encodings, layers, keys, progress,
                                                       groups)

        return runner

    # -- internals

    def _requests(self, cells, submit_only: bool) -> Iterator[tuple[list, Any]]:
        """The requests of ``cells``: chunks of ``cells_per_request``, each halved until it fits
        the byte budget. Yields ``(cells of the request, predictions or its job id)``."""
        n_layers = self.model.n_layers
        items = [(tag, as_intervention(plan, n_layers), cama) for tag, plan, cama in cells]
        chunks = chunk_cells(items, self.cells_per_request)
        total = sum(len(c) for c in chunks)
        first = 0
        for chunk in chunks:
            def send(part, start, offset=first):
                label = range_label("cells", offset + start, len(part), total)
                return self._evaluate([(iv, cama) for _, iv, cama in part], "cells", label,
                                      submit_only)

            yield from split_to_fit(chunk, send, "configuration")
            first += len(chunk)

    def _take_clean(self, predictions: list) -> None:
        logprobs = [lp for _, _, lp in predictions]
        self._clean = self._assemble(torch.cat([p for p, _, _ in predictions]),
                                     torch.cat([a for _, a, _ in predictions]), 1,
                                     None if None in logprobs else torch.cat(logprobs))[0]

    def _upload_cells(self, cells) -> tuple[list, list]:
        """The cells as they travel: each distinct table layer once (the same object wherever
        it is used, so the request pickles it once), its means a copy in the model's dtype.

        Returns the cells ``[(intervention, cama)]`` and a description of each for the request key.
        """
        dtype = getattr(torch, self.model.identity.dtype)
        layers: dict = {}
        keys: dict = {}
        out, described = [], []
        for intervention, cama in cells:
            ident = None
            if cama is not None:
                ident = (cama.kind, cama.layer, _digest(cama.keys, cama.means))
                if ident not in layers:
                    shared = keys.setdefault(_digest(cama.keys), cama.keys.detach().cpu().clone())
                    layers[ident] = CamaLayer(cama.layer, shared,
                                              cama.means.detach().to("cpu", dtype, copy=True),
                                              cama.kind)
                cama = layers[ident]
            out.append((intervention, cama))
            described.append([_intervention_digest(intervention), ident])
        return out, described

    def _evaluate(self, cells, kind: str, label: str, submit_only: bool = False):
        cells, described = self._upload_cells(cells)
        key = _request_key(self.model, kind, [self._inputs_digest, described])
        reference = any(iv is not None for iv, _ in cells)  # a clean pass per batch (KL)
        backend = self.client.backend(kind, label, key, cells=len(cells),
                                      traces=(len(cells) + reference) * len(self._inputs),
                                      submit_only=submit_only,
                                      saves=predictions_layout(len(cells) * self.n_prompts,
                                                               kl=reference))
        result = cells_session(self.model.lm, self.model.sites, backend, cells, self._inputs,
                               self._groups)
        if submit_only:
            return backend.job_id
        return self._assemble(result["pred_ids"], result["answer_logits"], len(cells),
                              result.get("answer_logprobs"), result.get("kl"))

    def _assemble(self, pred_ids: torch.Tensor, answer_logits: torch.Tensor, n_cells: int,
                  answer_logprobs: torch.Tensor | None = None, kl: torch.Tensor | None = None
                  ) -> list[Predictions]:
        """Split cell-major, batch-ordered saves into per-cell :class:`Predictions` (a
        result without ``answer_logprobs``/``kl``, e.g. from an older ledger, has none).
        Every field is checked (:func:`received_tensor`): one value per cell and prompt."""
        n = n_cells * self.n_prompts
        fields = [received_tensor(pred_ids, "predictions", (n,), "int"),
                  received_tensor(answer_logits, "answer logits", (n,), "float"),
                  None if answer_logprobs is None else
                  received_tensor(answer_logprobs, "answer log-probabilities", (n,), "float"),
                  None if kl is None else received_tensor(kl, "KL divergences", (n,), "float")]
        fields = [None if f is None else f.numpy() for f in fields]
        out, pos = [], 0
        for _ in range(n_cells):
            per_cell = [None if f is None else np.zeros(self.n_prompts, f.dtype) for f in fields]
            for indices, _ in self.batches:
                for mine, theirs in zip(per_cell, fields):
                    if theirs is not None:
                        mine[indices] = theirs[pos:pos + len(indices)]
                pos += len(indices)
            pred, logit, logprob, divergence = per_cell
            out.append(Predictions(pred.astype(np.int64), logit.astype(np.float32),
                                   None if logprob is None else logprob.astype(np.float32),
                                   None if divergence is None else divergence.astype(np.float32)))
        return out


# -- models without weights -----------------------------------------------------------------------


def load_remote_model(spec: str, *, revision: str | None = None, dtype: str = "bfloat16",
                      attn_implementation: str | None = None):
    """An :class:`AF1Model` for a model NDIF runs: the architecture on the meta device (no
    weights), its config and tokenizer.

    Args:
        spec: a Hub id (``meta-llama/Llama-3.1-8B``; config and tokenizer come from the Hub) or a
            local checkpoint directory (same code path; for offline tests with ``backend="local"``).
        revision: Hub revision; the model key sent to NDIF names it (default: the repo's main).
        dtype: the dtype the server runs (NDIF: bfloat16). CAMA tables are uploaded in it.
        attn_implementation: sent with every request (nnsight puts it in the request env);
            ``None``: the family's first choice, as in :func:`interventions.load_model`.

    Identity: ``model_id`` is the repo id and ``revision`` the Hub commit of its config (or the
    revision asked for), so ``fingerprint`` is ``repo@commit``; a local directory is identified
    by its weight files' hash as in :func:`interventions.load_model`.
    """
    from nnsight.modeling.transformers import TransformersModel
    from transformers import AutoConfig, AutoTokenizer

    from ...mechanisms.adapters import check_attention
    from ...mechanisms.models import (DTYPES, AF1Model, ModelIdentity, architecture_and_attention,
                                      first_line, left_padding, locate_model, weights_sha256)

    check_attention(attn_implementation)
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use {', '.join(DTYPES)}")
    source, location = locate_model(spec)
    if source not in ("hub", "local"):
        raise UserError(f"remote runs need a Hub id (NDIF serves Hub checkpoints), not "
                        f"{spec!r}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = AutoConfig.from_pretrained(location, revision=revision)
            tokenizer = AutoTokenizer.from_pretrained(location, revision=revision)
            adapter, attn_implementation = architecture_and_attention(config, attn_implementation)
            lm = TransformersModel(location, revision=revision, task="text-generation",
                                   tokenizer=tokenizer, dtype=DTYPES[dtype],
                                   attn_implementation=attn_implementation)
    except OSError as err:
        raise UserError(f"cannot load the config of {spec!r}: {first_line(err)}") from None
    hf = internals.wrapped_module(lm)
    config = hf.config
    left_padding(tokenizer)
    identity = ModelIdentity(
        spec=spec, source="ndif" if source == "hub" else "local",
        model_id=spec if source == "hub" else str(Path(location).resolve()),
        revision=(getattr(config, "_commit_hash", None) or revision or "main")
        if source == "hub" else None,
        weights_sha256=None if source == "hub" else weights_sha256(Path(location)),
        architecture=config.model_type, n_layers=len(adapter.layer_modules(hf)), dtype=dtype,
        device="ndif", attn_implementation=config._attn_implementation)
    return AF1Model(lm, hf, tokenizer, adapter, identity)


