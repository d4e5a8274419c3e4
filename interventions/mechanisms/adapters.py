"""Per-architecture knowledge: where the decoder layers are and how a layer receives its inputs.

This is the one module that knows architecture quirks. Everything else asks an
:class:`ArchAdapter` (by ``config.model_type``) and works on what it returns.

Facts encoded here (transformers 5.x; 4.x differs where noted and is handled generically):
* Decoder layers: ``model.layers`` (Llama, Qwen2), ``gpt_neox.layers`` (GPT-NeoX/Pythia),
  ``transformer.h`` (GPT-J, GPT-2).
* The residual stream enters every layer as its first positional argument.
* The 4D attention mask reaches Llama/Qwen2/NeoX/GPT-J layers by keyword, GPT-2 blocks by
  position, at an index that differs between transformers versions: it is resolved from the
  block's signature here, outside any trace (``inspect`` is not allowed on NDIF).
* Layer outputs are tensors in transformers 5.x, tuples in 4.x for GPT-2/NeoX/GPT-J; readers take
  ``out[0]`` of a tuple.
* Only ``eager`` and ``sdpa`` attention take a custom 4D mask; flash attention cannot.
* Outside the layers (for code that runs the layers itself, ``interventions.fast``): ``h_0`` is
  the token embedding, plus GPT-2's absolute position embedding of the position ids; Llama,
  Qwen2, GPT-NeoX and GPT-J layers take ``position_embeddings`` from one model-level rotary
  module (GPT-J's is a ``(sin, cos)`` pair, the others ``(cos, sin)``: passed through as
  returned); the final norm is ``model.norm`` / ``gpt_neox.final_layer_norm`` / ``transformer.ln_f``
  and the head ``lm_head`` everywhere. Every layer takes ``attention_mask`` and
  ``position_ids`` by keyword (GPT-2's positional slot is only how its own model calls it).
* Keys and values reach attention through a cache object the layer is given (``cache=``;
  GPT-NeoX: ``layer_past=``): every supported attention calls ``cache.update(key_states,
  value_states, layer_idx, ...)`` with its post-rotary ``(B, H_kv, S, head_dim)`` keys and values
  and attends over the pair it returns, so any object with that method can record them or
  prepend others (no Hugging Face cache class is involved).
* Qwen2 may give some layers a sliding-window mask (``config.layer_types``); every other
  supported family attends causally to every earlier token in every layer.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from .. import nnsight_internals as internals
from ..errors import UserError
from .traced import ModelSites

MASKABLE_ATTENTION = ("eager", "sdpa")


@dataclass(frozen=True)
class ArchAdapter:
    """Where things are in one architecture family.

    Attributes:
        name: adapter name (``"llama"``, ``"qwen2"``, ``"gpt_neox"``, ``"gptj"``, ``"gpt2"``).
        model_types: ``config.model_type`` values served by this adapter.
        layers_path: dotted path from the causal-LM module to the decoder-layer list.
        attention_name: attribute of a decoder layer holding its self-attention module.
        examples: model families known to use it (for error messages and docs).
        embed_path: dotted path to the token embedding.
        final_norm_path: dotted path to the norm between the last layer and the head.
        rotary_path: dotted path to the model-level rotary module whose output the layers take
            as ``position_embeddings``, or ``None`` (GPT-2).
        position_embed_path: dotted path to an absolute position embedding added to ``h_0``,
            or ``None``.
        lm_head_path: dotted path to the output head.
        cache_kwarg: keyword under which a layer takes its key/value cache.
    """

    name: str
    model_types: tuple[str, ...]
    layers_path: str
    attention_name: str
    examples: str
    embed_path: str
    final_norm_path: str
    rotary_path: str | None = None
    position_embed_path: str | None = None
    lm_head_path: str = "lm_head"
    cache_kwarg: str = "cache"

    def layer_modules(self, module: torch.nn.Module) -> torch.nn.ModuleList:
        """The decoder layers of a Hugging Face causal LM (plain modules, no nnsight)."""
        return _get_path(module, self.layers_path)

    def attention_module(self, layer: torch.nn.Module) -> torch.nn.Module:
        """The self-attention submodule of one decoder layer."""
        return getattr(layer, self.attention_name)

    def mask_slot(self, module: torch.nn.Module) -> tuple[int | None, str]:
        """Positional index (excluding ``self``) and keyword of ``attention_mask`` in a layer call.

        The index says where the mask sits *if* the caller passes it positionally; traced code
        uses it only when the call actually has that many positional arguments.
        """
        # The class's function, not the bound method: nnsight wraps instances' forward.
        layer_class = type(self.layer_modules(module)[0])
        params = [p for p in inspect.signature(layer_class.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        names = [p.name for p in params][1:]  # drop self
        if "attention_mask" not in names:
            return None, "attention_mask"
        return names.index("attention_mask"), "attention_mask"

    def sites(self, lm, attn_implementation: str) -> ModelSites:
        """The :class:`ModelSites` of an nnsight-wrapped model of this architecture."""
        index, name = self.mask_slot(internals.wrapped_module(lm))
        return ModelSites(lm, list(_get_path(lm, self.layers_path)), index, name,
                          attn_implementation)

    # -- running the layers directly (plain Hugging Face modules, no nnsight) --------------

    def embed(self, module: torch.nn.Module, input_ids: torch.Tensor,
              position_ids: torch.Tensor) -> torch.Tensor:
        """``h_0`` as the model computes it: ``(B, T)`` ids and positions -> ``(B, T, D)``.

        Embedding dropout is left out: models are evaluated in eval mode.
        """
        hidden = _get_path(module, self.embed_path)(input_ids)
        if self.position_embed_path is not None:
            positional = _get_path(module, self.position_embed_path)(position_ids)
            hidden = hidden + positional.to(hidden.device)  # the order GPT-2 adds them in
        return hidden

    def position_embeddings(self, module: torch.nn.Module, hidden: torch.Tensor,
                            position_ids: torch.Tensor):
        """What the layers take as ``position_embeddings`` for ``(B, S)`` position ids (a pair
        of ``(B, S, head_dim)`` tensors from the rotary module), or ``None`` without rotary.

        ``hidden`` (``(B, S, D)``) only gives the dtype and device.
        """
        if self.rotary_path is None:
            return None
        return _get_path(module, self.rotary_path)(hidden, position_ids=position_ids)

    def call_layer(self, layer: torch.nn.Module, hidden: torch.Tensor, mask: torch.Tensor,
                   position_ids: torch.Tensor, position_embeddings, cache=None) -> torch.Tensor:
        """Run one decoder layer: ``(B, S, D)`` -> ``(B, S, D)``.

        Args:
            mask: ``(B, 1, S, P + S)``, boolean (sdpa) or additive float (eager), built for this
                call (``P`` keys prepended by ``cache``, else 0); the layer never sees the
                model's own mask.
            position_ids: ``(B, S)`` the tokens' original positions.
            position_embeddings: from :meth:`position_embeddings` for the same positions.
            cache: ``None`` or an object with ``update(key_states, value_states, layer_idx,
                **kwargs) -> (keys, values)`` (see the module docstring).
        """
        kwargs = {"attention_mask": mask, "position_ids": position_ids}
        if position_embeddings is not None:
            kwargs["position_embeddings"] = position_embeddings
        if cache is not None:
            kwargs[self.cache_kwarg] = cache
        out = layer(hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def logits(self, module: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and head: ``(..., D)`` residual ``h_L`` -> ``(..., V)`` logits."""
        normed = _get_path(module, self.final_norm_path)(hidden)
        return _get_path(module, self.lm_head_path)(normed)

    def attention_window(self, config) -> int | None:
        """The smallest sliding attention window any layer uses, or ``None`` when every layer
        attends to every earlier token (then a causal mask is the model's own mask)."""
        layer_types = getattr(config, "layer_types", None) or ()
        if "sliding_attention" in layer_types:
            return getattr(config, "sliding_window", None)
        return None


ADAPTERS: dict[str, ArchAdapter] = {
    adapter.name: adapter
    for adapter in (
        ArchAdapter("llama", ("llama",), "model.layers", "self_attn",
                    "Llama-3, Llama-3.1, SmolLM2", embed_path="model.embed_tokens",
                    final_norm_path="model.norm", rotary_path="model.rotary_emb"),
        ArchAdapter("qwen2", ("qwen2",), "model.layers", "self_attn", "Qwen2, Qwen2.5",
                    embed_path="model.embed_tokens", final_norm_path="model.norm",
                    rotary_path="model.rotary_emb"),
        ArchAdapter("gpt_neox", ("gpt_neox",), "gpt_neox.layers", "attention", "Pythia",
                    embed_path="gpt_neox.embed_in", final_norm_path="gpt_neox.final_layer_norm",
                    rotary_path="gpt_neox.rotary_emb", cache_kwarg="layer_past"),
        ArchAdapter("gptj", ("gptj",), "transformer.h", "attn", "GPT-J",
                    embed_path="transformer.wte", final_norm_path="transformer.ln_f",
                    rotary_path="transformer.rotary_emb"),
        ArchAdapter("gpt2", ("gpt2",), "transformer.h", "attn", "GPT-2",
                    embed_path="transformer.wte", final_norm_path="transformer.ln_f",
                    position_embed_path="transformer.wpe"),
    )
}


def supported_architectures() -> str:
    """One line naming what is supported, for error messages and ``--help``."""
    return ", ".join(f"{a.name} ({a.examples})" for a in ADAPTERS.values())


def adapter_for(config) -> ArchAdapter:
    """The adapter for a model config; a clear :class:`UserError` when unsupported."""
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS.values():
        if model_type in adapter.model_types:
            return adapter
    raise UserError(
        f"unsupported architecture {model_type!r}; supported: {supported_architectures()}"
    )


def check_attention(attn_implementation: str) -> str:
    """Refuse attention implementations that cannot take the per-layer 4D masks of ABP."""
    if attn_implementation not in MASKABLE_ATTENTION:
        raise UserError(
            f"attention implementation {attn_implementation!r} cannot take the custom 4D masks "
            f"AF1 needs; use one of {', '.join(MASKABLE_ATTENTION)}"
        )
    return attn_implementation


def _get_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj
