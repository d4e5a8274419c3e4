"""CAMA (Context-Aware Mean Ablation) tables: build by streaming, store, check, look up.

``CAMA_k(t, x_t) = E[h_k(x')[t] | x'_t = x_t]``: the mean of the clean model's residual ``h_k`` at
position ``t`` over the data-set prompts whose token at ``t`` equals ``x_t``. The table is keyed
by ``(position, token id)`` per layer. It is built from batched clean forward passes by adding
each batch into running float64 sums (memory: the table plus one batch, never all activations)
and stored as safetensors with metadata that ties it to one model and one data set.
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
from .traced import CamaLayer, accumulate_residuals, prompt_layout

FORMAT = "af1-cama-v1"


class CamaMismatch(UserError):
    """A stored table was built for another model, data set or dtype."""


class CamaTable:
    """Per-layer means of the clean residual stream keyed by ``(position, token)``.

    Attributes:
        layers: residual indices ``k`` stored (``h_k`` enters layer ``k``; ``h_L`` is final).
        keys: ``(K, 2)`` int64 ``(position, token_id)``.
        counts: ``(K,)`` int64 number of (prompt, position) pairs behind each key.
        means: ``(len(layers), K, D)`` float32.
        position_keys: ``(P,)`` int64 positions; ``position_means``: ``(len(layers), P, D)``,
            the mean over every prompt at that position whatever its token.
        metadata: ``model``, ``model_fingerprint``, ``dataset_fingerprint``, ``dtype``, ...
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
        """Position-only means of ``h_layer`` (the "position mean" alternative to CAMA)."""
        keys = torch.stack([self.position_keys, torch.full_like(self.position_keys, -1)], -1)
        return CamaLayer(layer, keys, self.position_means[self._row(layer)].clone(),
                         "position_mean")

    def for_intervention(self, intervention) -> CamaLayer | None:
        """The table layer an intervention's residual replacement needs (``None`` if none)."""
        if intervention.replacement == "cama":
            return self.layer(intervention.replace_layer)
        if intervention.replacement == "position_mean":
            return self.position_mean_layer(intervention.replace_layer)
        return None

    def lookup(self, layer: int, positions: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Means for given positions and tokens (any equal shapes ``S``) -> ``(*S, D)``.

        Raises :class:`KeyError` naming the first missing ``(position, token)``.
        """
        index = {(int(p), int(t)): i for i, (p, t) in enumerate(self.keys.tolist())}
        rows = []
        for p, t in zip(positions.reshape(-1).tolist(), tokens.reshape(-1).tolist()):
            if (p, t) not in index:
                raise KeyError(f"CAMA table has no entry for (position {p}, token {t})")
            rows.append(index[(p, t)])
        means = self.means[self._row(layer)]
        return means[torch.tensor(rows, dtype=torch.long)].reshape(*positions.shape, -1)

    def check(self, model_fingerprint: str | None = None, dataset_fingerprint: str | None = None,
              dtype: str | None = None, layers: Sequence[int] | None = None) -> "CamaTable":
        """Refuse (:class:`CamaMismatch`) a table built for another model, data set or dtype."""
        expected = {"model_fingerprint": model_fingerprint,
                    "dataset_fingerprint": dataset_fingerprint, "dtype": dtype}
        for field, want in expected.items():
            have = self.metadata.get(field)
            if want is not None and have != want:
                raise CamaMismatch(f"CAMA table was built for {field.split('_')[0]} {have!r}, "
                                   f"not {want!r}; rebuild it (or drop --cama-table)")
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
        if metadata.get("format") != FORMAT:
            raise UserError(f"{str(path)!r} is not a CAMA table (format "
                            f"{metadata.get('format')!r}, expected {FORMAT!r})")
        return cls(tensors["layers"].tolist(), tensors["keys"], tensors["counts"],
                   tensors["means"], tensors["position_keys"], tensors["position_means"],
                   metadata)


def table_keys(encodings: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ``(position, token)`` of the real tokens in the batches, sorted, and its count.

    Returns ``keys (K, 2)`` int64 and ``counts (K,)`` int64.
    """
    pairs = []
    for enc in encodings:
        real, positions = prompt_layout(enc["input_ids"], enc["attention_mask"])
        pairs.append(torch.stack([positions[real], enc["input_ids"][real]], -1))
    keys, counts = torch.cat(pairs).unique(dim=0, return_counts=True)
    return keys, counts


def local_residual_sums(model, encodings: Sequence[dict], layers: Sequence[int],
                        keys: torch.Tensor, progress: bool = True) -> torch.Tensor:
    """The default runner of :func:`build_cama_table`: clean traces on the local model.

    Args:
        encodings: the batches (``input_ids``/``attention_mask`` ``(B, T)``, left padded).
        layers: ascending residual indices ``k`` in ``0..L``.
        keys: ``(K, 2)`` int64 table keys (every key of the real tokens of ``encodings``).
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
        for enc in bar:
            with model.lm.trace(enc) as tracer:
                accumulate_residuals(model.sites, layers, keys_dev, sums)
                # The table needs no logits: stop before the head (it would compute
                # (B, T, V) logits, most of the build's peak memory).
                tracer.stop()
    return sums.cpu()


def build_cama_table(model, prompts: Sequence[str], dataset_fingerprint: str,
                     layers: Sequence[int] | None = None, batch_size: int = 32,
                     progress: bool = True, runner=None) -> CamaTable:
    """Build the CAMA table of ``model`` over ``prompts`` from clean forward passes.

    Args:
        model: an :class:`interventions.AF1Model`.
        prompts: the CAMA data set (its ``prompt`` column).
        dataset_fingerprint: the data set's fingerprint (``tasks.task_fingerprint``).
        layers: residual indices ``k`` in ``0..L`` to store (default: all).
        runner: what runs the clean passes, called as ``runner(model, encodings, layers, keys,
            progress)`` and returning the ``(len(layers), K, D)`` float64 sums per key (see
            :func:`local_residual_sums`, the default; ``RemoteClient.cama_runner`` sums on NDIF).
            Keys, counts and means are made here whatever runs the passes.
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
    encodings = [enc for _, enc in model.encode_batches(prompts, batch_size)]
    keys, counts = table_keys(encodings)
    sums = (runner or local_residual_sums)(model, encodings, layers, keys, progress)
    hidden = sums.shape[-1]
    means = (sums / counts.to(sums)[None, :, None]).float().cpu()
    position_keys, position_index = keys[:, 0].unique(return_inverse=True)
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
        "layers": json.dumps(layers),
        "n_prompts": str(len(prompts)),
        "batch_size": str(batch_size),
        "seconds": f"{time.time() - started:.2f}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return CamaTable(layers, keys, counts, means, position_keys, position_means, metadata)


def cama_cache_path(model, dataset_fingerprint: str, root: Path,
                    layers: Sequence[int] | None = None) -> Path:
    """Cache location of the table for (model weights, data set, dtype), and for a subset of
    layers when ``layers`` is given (the full table's path otherwise)."""
    import hashlib

    model_key = hashlib.sha256(model.identity.fingerprint.encode()).hexdigest()[:16]
    name = f"{model_key}-{dataset_fingerprint}-{model.identity.dtype}"
    if layers is not None:
        subset = json.dumps(sorted({int(k) for k in layers}))
        name += f"-layers-{hashlib.sha256(subset.encode()).hexdigest()[:12]}"
    return root / "cama" / f"{name}.safetensors"


def cached_cama_table(model, prompts: Sequence[str], dataset_fingerprint: str, root: Path,
                      batch_size: int = 32, progress: bool = True, runner=None,
                      layers: Sequence[int] | None = None) -> tuple[CamaTable, Path, bool]:
    """Load the cached table for (model, data set, dtype) or build and cache it (``runner``:
    see :func:`build_cama_table`).

    ``layers`` builds only those layers (a remote build downloads every layer it builds, so a
    job that needs one layer should not fetch all of them); a cached full table serves any
    subset.

    Returns ``(table, path, was_cached)``.
    """
    full = cama_cache_path(model, dataset_fingerprint, root)
    candidates = [full] if layers is None else [full, cama_cache_path(
        model, dataset_fingerprint, root, layers)]
    for path in candidates:
        if path.is_file():
            table = CamaTable.load(path).check(model.identity.fingerprint, dataset_fingerprint,
                                               model.identity.dtype, layers)
            return table, path, True
    table = build_cama_table(model, prompts, dataset_fingerprint, layers, batch_size=batch_size,
                             progress=progress, runner=runner)
    table.save(candidates[-1])
    return table, candidates[-1], False
