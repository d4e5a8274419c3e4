"""CAMA (Context-Aware Mean Ablation) tables: build by streaming, store, check, look up.

``CAMA_k(t, x_t) = E[h_k(x')[t] | x'_t = x_t]``: the mean of the clean model's residual ``h_k`` at
position ``t`` over the data-set prompts whose token at ``t`` equals ``x_t``, among the prompts of
the same token length and group (template), so that positions line up. The table is keyed by
``(position, token id, length, group)`` per layer (:data:`~.traced.KEY_COLUMNS`). It is built
from batched clean forward passes by adding each batch into running float64 sums (memory: the
table plus one batch, never all activations) and stored as safetensors with metadata that ties
it to one model and one data set and says how many prompts stand behind each key.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..errors import UserError
from .traced import (KEY_COLUMNS, KEY_GROUP, KEY_LENGTH, KEY_POSITION, KEY_TOKEN, CamaLayer,
                     accumulate_residuals, prompt_layout, token_keys)

# v1 keyed (position, token) only and mixed prompts of different lengths; v2 adds length, group.
FORMAT = "af1-cama-v2"


class CamaMismatch(UserError):
    """A stored table was built for another model, data set, dtype, attention implementation or
    grouping of the prompts."""


def groups_digest(groups: Sequence[int] | None) -> str:
    """What a table's grouping of the prompts is recorded and cached as: ``"one"`` when every
    prompt is in group 0 (``groups`` ``None``), else 16 hex digits of the sha256 of the
    groups as little-endian int64."""
    if groups is None:
        return "one"
    import hashlib

    import numpy as np

    data = np.asarray(groups, dtype="<i8").tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


class CamaTable:
    """Per-layer means of the clean residual stream keyed by ``(position, token, length, group)``.

    Attributes:
        layers: residual indices ``k`` stored (``h_k`` enters layer ``k``; ``h_L`` is final).
        keys: ``(K, 4)`` int64 ``(position, token_id, length, group)`` (``KEY_COLUMNS``).
        counts: ``(K,)`` int64 number of prompts behind each key.
        means: ``(len(layers), K, D)`` float32.
        position_keys: ``(P, 4)`` int64 keys with token ``-1`` (any); ``position_means``:
            ``(len(layers), P, D)``, the mean over every prompt of that length and group at that
            position whatever its token.
        metadata: ``model``, ``model_fingerprint``, ``dataset_fingerprint``, ``dtype``, and the
            key statistics of :func:`key_statistics`, ...
    """

    def __init__(self, layers, keys, counts, means, position_keys, position_means, metadata):
        self.layers = [int(k) for k in layers]
        self.keys = keys
        self.counts = counts
        self.means = means
        self.position_keys = position_keys
        self.position_means = position_means
        self.metadata = dict(metadata)

    def __repr__(self) -> str:
        return (f"CamaTable({len(self.keys)} keys x layers {self.layers[0]}..{self.layers[-1]}, "
                f"D={self.means.shape[-1]}, dataset {self.metadata.get('dataset_fingerprint')})")

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in
                   (self.keys, self.counts, self.means, self.position_keys, self.position_means))

    def _row(self, layer: int) -> int:
        if layer not in self.layers:
            raise UserError(f"CAMA table has no layer {layer} (it holds {self.layers[0]}.."
                            f"{self.layers[-1]}); rebuild it with that layer")
        return self.layers.index(layer)

    def layer(self, layer: int) -> CamaLayer:
        """The CAMA means of ``h_layer``: what ``apply_af1`` needs for ``l_wait = layer``.

        The means are a copy, not a view: a pickled view carries its whole storage, so a view
        sent with a remote trace would upload every layer of the table.
        """
        return CamaLayer(layer, self.keys, self.means[self._row(layer)].clone(), "cama")

    def position_mean_layer(self, layer: int) -> CamaLayer:
        """Position-only means of ``h_layer`` (the "position mean" alternative to CAMA), per
        prompt length and group like CAMA."""
        return CamaLayer(layer, self.position_keys, self.position_means[self._row(layer)].clone(),
                         "position_mean")

    def for_intervention(self, intervention) -> CamaLayer | None:
        """The table layer an intervention's residual replacement needs (``None`` if none)."""
        if intervention.replacement == "cama":
            return self.layer(intervention.replace_layer)
        if intervention.replacement == "position_mean":
            return self.position_mean_layer(intervention.replace_layer)
        return None

    def lookup(self, layer: int, keys: torch.Tensor) -> torch.Tensor:
        """Means for given keys ``(*S, 4)`` (``(position, token, length, group)``) -> ``(*S, D)``.

        Raises :class:`KeyError` naming the first missing key.
        """
        index = {tuple(key): i for i, key in enumerate(self.keys.tolist())}
        rows = []
        for key in keys.reshape(-1, len(KEY_COLUMNS)).tolist():
            if tuple(key) not in index:
                raise KeyError(f"CAMA table has no entry for {dict(zip(KEY_COLUMNS, key))}")
            rows.append(index[tuple(key)])
        means = self.means[self._row(layer)]
        return means[torch.tensor(rows, dtype=torch.long)].reshape(*keys.shape[:-1], -1)

    @property
    def statistics(self) -> dict:
        """Keys and prompts behind them: see :func:`key_statistics`."""
        return key_statistics(self.keys, self.counts)

    @property
    def groups(self) -> str | None:
        """The grouping it was built with (:func:`groups_digest`); a table that predates the
        record is ``"one"`` when its keys hold group 0 only, else unknown (``None``)."""
        if "groups" in self.metadata:
            return self.metadata["groups"]
        return "one" if not bool((self.keys[:, KEY_GROUP] != 0).any()) else None

    def check(self, model_fingerprint: str | None = None, dataset_fingerprint: str | None = None,
              dtype: str | None = None, layers: Sequence[int] | None = None,
              attn_implementation: str | None = None, groups: str | None = None
              ) -> "CamaTable":
        """Refuse (:class:`CamaMismatch`) a table built for another model (weights), data set,
        dtype, attention implementation or grouping (``groups``: :func:`groups_digest`), or
        lacking ``layers``; arguments left ``None`` are not compared."""
        expected = {"model": ("model_fingerprint", model_fingerprint),
                    "dataset": ("dataset_fingerprint", dataset_fingerprint),
                    "dtype": ("dtype", dtype),
                    "attention implementation": ("attn_implementation", attn_implementation)}
        for what, (field, want) in expected.items():
            have = self.metadata.get(field)
            if want is not None and have != want:
                raise CamaMismatch(f"CAMA table was built for {what} {have!r}, not {want!r}; "
                                   f"rebuild it (or drop --cama-table)")
        if groups is not None and self.groups != groups:
            raise CamaMismatch(f"CAMA table was built with prompt groups {self.groups!r}, not "
                               f"{groups!r} (templates of the data set); rebuild it (or drop "
                               f"--cama-table)")
        missing = sorted(set(layers or ()) - set(self.layers))
        if missing:
            raise CamaMismatch(f"CAMA table lacks layers {missing}; rebuild it with them")
        return self

    def save(self, path: str | os.PathLike) -> Path:
        """Write safetensors atomically (a temporary file renamed into place)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tensors = {"keys": self.keys, "counts": self.counts, "means": self.means.contiguous(),
                   "layers": torch.tensor(self.layers, dtype=torch.long),
                   "position_keys": self.position_keys,
                   "position_means": self.position_means.contiguous()}
        metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in
                    self.metadata.items()}
        save_file(tensors, str(tmp), metadata={**metadata, "format": FORMAT})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CamaTable":
        """Read a table written by :meth:`save`; a clear error for anything else."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"CAMA table {str(path)!r} does not exist")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as err:  # safetensors raises its own error types
            raise UserError(f"{str(path)!r} is not a CAMA table ({err})") from None
        found = metadata.get("format")
        if found != FORMAT and str(found).startswith("af1-cama-"):
            raise CamaMismatch(f"CAMA table {str(path)!r} has the older format {found!r}, whose "
                               f"keys mix prompts of different token lengths; rebuild it "
                               f"(drop --cama-table; this version writes {FORMAT!r})")
        if found != FORMAT:
            raise UserError(f"{str(path)!r} is not a CAMA table (format {found!r}, expected "
                            f"{FORMAT!r})")
        return cls(tensors["layers"].tolist(), tensors["keys"], tensors["counts"],
                   tensors["means"], tensors["position_keys"], tensors["position_means"],
                   metadata)


def table_keys(encodings: Sequence[dict], groups: Sequence[torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every key ``(position, token, length, group)`` of the real tokens in the batches, sorted,
    and the number of prompts behind it.

    Args:
        encodings: batches with ``input_ids``/``attention_mask`` ``(B, T)``.
        groups: per batch, the ``(B,)`` group of each prompt, or ``None`` (all group 0).
    Returns:
        ``keys (K, 4)`` int64 and ``counts (K,)`` int64.
    """
    found = []
    for i, enc in enumerate(encodings):
        real, positions = prompt_layout(enc["input_ids"], enc["attention_mask"])
        keys = token_keys(enc["input_ids"], real, positions, None if groups is None else groups[i])
        found.append(keys[real])
    keys, counts = torch.cat(found).unique(dim=0, return_counts=True)
    return keys, counts


def position_mean_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The position-only keys of a table's ``keys (K, 4)``: the same keys with token ``-1``
    (any), distinct and sorted, ``(P, 4)``, and for each table key its row among them ``(K,)``."""
    any_token = keys.clone()
    any_token[:, KEY_TOKEN] = -1
    return any_token.unique(dim=0, return_inverse=True)


def key_statistics(keys: torch.Tensor, counts: torch.Tensor) -> dict:
    """How well a table's means are supported: the number of keys, the smallest and the median
    number of prompts behind a key, and the prompts per token length (a length's prompts are
    the counts of its sink keys)."""
    sink = keys[:, KEY_POSITION] == 0
    per_length: dict[str, int] = {}
    for length, count in zip(keys[sink, KEY_LENGTH].tolist(), counts[sink].tolist()):
        per_length[str(length)] = per_length.get(str(length), 0) + count
    return {"key_layout": list(KEY_COLUMNS), "n_keys": len(keys),
            "n_groups": len(keys[:, KEY_GROUP].unique()) if len(keys) else 0,
            "prompts_per_key_min": int(counts.min()) if len(counts) else 0,
            # The usual median (mean of the two middle counts), not torch's lower middle one.
            "prompts_per_key_median": float(counts.double().quantile(0.5)) if len(counts)
            else 0.0,
            "keys_of_one_prompt_share": float((counts == 1).double().mean()) if len(counts)
            else 0.0,
            "prompts_per_length": per_length}


def sparse_keys_warning(table: "CamaTable") -> str | None:
    """One line when most of a table's keys average over a single prompt (``None`` otherwise):
    there CAMA writes back each token's own clean state, and the wait stage removes nothing."""
    stats = table.statistics
    if stats["keys_of_one_prompt_share"] <= 0.5:
        return None
    median = stats["prompts_per_key_median"]
    return (f"{stats['keys_of_one_prompt_share']:.0%} of the {stats['n_keys']} CAMA keys average "
            f"over a single prompt (median {median:g} prompt{'' if median == 1 else 's'} per "
            f"key): "
            f"there CAMA is the token's own clean state and the wait stage removes nothing; "
            f"prompts that share a template and length make it meaningful")


def local_residual_sums(model, encodings: Sequence[dict], layers: Sequence[int],
                        keys: torch.Tensor, progress: bool = True,
                        groups: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """The default runner of :func:`build_cama_table`: clean traces on the local model.

    Args:
        encodings: the batches (``input_ids``/``attention_mask`` ``(B, T)``, left padded).
        layers: ascending residual indices ``k`` in ``0..L``.
        keys: ``(K, 4)`` int64 table keys (every key of the real tokens of ``encodings``).
        groups: per batch, the ``(B,)`` group of each prompt, or ``None``.
    Returns:
        ``(len(layers), K, D)`` float64 sums of the clean ``h_k`` per key, on the CPU.
    """
    # GPT-2/GPT-J configs alias n_embd to this; multimodal configs keep it in the text config
    hidden = model.hf.config.get_text_config().hidden_size
    device = model.device
    sums = torch.zeros(len(layers), len(keys), hidden, dtype=torch.float64, device=device)
    keys_dev = keys.to(device)
    bar = tqdm(encodings, desc="CAMA table", unit="batch", disable=not progress, leave=False)
    with torch.no_grad():
        for i, enc in enumerate(bar):
            batch_groups = None if groups is None else groups[i].to(device)
            with model.lm.trace(enc) as tracer:
                accumulate_residuals(model.sites, layers, keys_dev, sums, batch_groups)
                # The table needs no logits: stop before the head (it would compute
                # (B, T, V) logits, most of the build's peak memory).
                tracer.stop()
    return sums.cpu()


def build_cama_table(model, prompts: Sequence[str], dataset_fingerprint: str,
                     layers: Sequence[int] | None = None, batch_size: int = 32,
                     progress: bool = True, runner=None,
                     groups: Sequence[int] | None = None) -> CamaTable:
    """Build the CAMA table of ``model`` over ``prompts`` from clean forward passes.

    Args:
        model: an :class:`interventions.AF1Model`.
        prompts: the CAMA data set (its ``prompt`` column).
        dataset_fingerprint: the data set's fingerprint (``tasks.task_fingerprint``).
        layers: residual indices ``k`` in ``0..L`` to store (default: all).
        runner: what runs the clean passes, called as ``runner(model, encodings, layers, keys,
            progress, groups)`` (``groups``: one ``(B,)`` tensor per batch, or ``None``) and
            returning the ``(len(layers), K, D)`` float64 sums per key (see
            :func:`local_residual_sums`, the default; ``RemoteClient.cama_runner`` sums on NDIF).
            Keys, counts and means are made here whatever runs the passes.
        groups: the group of each prompt (e.g. its template's index) for a data set of several
            templates; ``None`` (one template) puts every prompt in group 0. Prompts are always
            grouped by their token length too. Traces that use a table built with groups must
            pass each prompt's group (``apply_af1(..., groups=)``; the executors' ``groups=``).
    Returns:
        a :class:`CamaTable` (float32 means of float64 sums).
    """
    n_layers = model.n_layers
    layers = sorted(set(range(n_layers + 1) if layers is None else layers))
    if not layers or layers[0] < 0 or layers[-1] > n_layers:
        raise UserError(f"CAMA layers must lie in 0..{n_layers}, got {layers}")
    if len(prompts) == 0:
        raise UserError("cannot build a CAMA table from an empty data set")
    started = time.time()
    batches = model.encode_batches(prompts, batch_size)
    encodings = [enc for _, enc in batches]
    batch_groups = None
    if groups is not None:
        if len(groups) != len(prompts):
            raise ValueError(f"groups has {len(groups)} entries for {len(prompts)} prompts")
        groups = torch.as_tensor(groups, dtype=torch.long)
        if bool((groups < 0).any()):
            raise ValueError("groups must be >= 0")
        batch_groups = [groups[torch.tensor(indices)] for indices, _ in batches]
    keys, counts = table_keys(encodings, batch_groups)
    sums = (runner or local_residual_sums)(model, encodings, layers, keys, progress,
                                           batch_groups)
    hidden = sums.shape[-1]
    means = (sums / counts.to(sums)[None, :, None]).float().cpu()
    position_keys, position_index = position_mean_keys(keys)
    position_sums = torch.zeros(len(layers), len(position_keys), hidden, dtype=torch.float64)
    position_sums.index_add_(1, position_index, sums.cpu())
    position_counts = torch.zeros(len(position_keys), dtype=torch.float64).index_add_(
        0, position_index, counts.double())
    position_means = (position_sums / position_counts[None, :, None]).float()
    metadata = {
        "model": model.identity.model_id,
        "model_fingerprint": model.identity.fingerprint,
        "dataset_fingerprint": dataset_fingerprint,
        "dtype": model.identity.dtype,
        "attn_implementation": model.identity.attn_implementation,
        "groups": groups_digest(None if groups is None else groups.tolist()),
        "layers": json.dumps(layers),
        "n_prompts": str(len(prompts)),
        "batch_size": str(batch_size),
        **{name: json.dumps(value) for name, value in key_statistics(keys, counts).items()},
        "seconds": f"{time.time() - started:.2f}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return CamaTable(layers, keys, counts, means, position_keys, position_means, metadata)


def cama_cache_path(model, dataset_fingerprint: str, root: Path,
                    layers: Sequence[int] | None = None,
                    groups: Sequence[int] | None = None) -> Path:
    """Cache location of the table for (model weights, data set, dtype, attention
    implementation, grouping of the prompts), and for a subset of layers when ``layers`` is
    given (the full table's path otherwise): everything the means depend on."""
    import hashlib

    model_key = hashlib.sha256(model.identity.fingerprint.encode()).hexdigest()[:16]
    # The format is part of the name: a table of an older key layout is never found.
    name = (f"{model_key}-{dataset_fingerprint}-{model.identity.dtype}-"
            f"{model.identity.attn_implementation}-groups-{groups_digest(groups)}-{FORMAT}")
    if layers is not None:
        subset = json.dumps(sorted({int(k) for k in layers}))
        name += f"-layers-{hashlib.sha256(subset.encode()).hexdigest()[:12]}"
    return root / "cama" / f"{name}.safetensors"


def cached_cama_table(model, prompts: Sequence[str], dataset_fingerprint: str, root: Path,
                      batch_size: int = 32, progress: bool = True, runner=None,
                      layers: Sequence[int] | None = None,
                      groups: Sequence[int] | None = None) -> tuple[CamaTable, Path, bool]:
    """Load the cached table for (model weights, data set, dtype, attention implementation,
    groups) or build and cache it (``runner``, ``groups``: see :func:`build_cama_table`).

    ``layers`` builds only those layers (a remote build downloads every layer it builds, so a
    job that needs one layer should not fetch all of them); a cached full table serves any
    subset.

    Returns ``(table, path, was_cached)``.
    """
    full = cama_cache_path(model, dataset_fingerprint, root, groups=groups)
    candidates = [full] if layers is None else [full, cama_cache_path(
        model, dataset_fingerprint, root, layers, groups)]
    for path in candidates:
        if path.is_file():
            table = CamaTable.load(path).check(
                model.identity.fingerprint, dataset_fingerprint, model.identity.dtype, layers,
                model.identity.attn_implementation, groups_digest(groups))
            return table, path, True
    table = build_cama_table(model, prompts, dataset_fingerprint, layers, batch_size=batch_size,
                             progress=progress, runner=runner, groups=groups)
    table.save(candidates[-1])
    return table, candidates[-1], False
