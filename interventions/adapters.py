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
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from .errors import UserError
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
    """

    name: str
    model_types: tuple[str, ...]
    layers_path: str
    attention_name: str
    examples: str

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
        index, name = self.mask_slot(lm._module)
        return ModelSites(lm, list(_get_path(lm, self.layers_path)), index, name,
                          attn_implementation)


ADAPTERS: dict[str, ArchAdapter] = {
    adapter.name: adapter
    for adapter in (
        ArchAdapter("llama", ("llama",), "model.layers", "self_attn",
                    "Llama-3, Llama-3.1, SmolLM2"),
        ArchAdapter("qwen2", ("qwen2",), "model.layers", "self_attn", "Qwen2, Qwen2.5"),
        ArchAdapter("gpt_neox", ("gpt_neox",), "gpt_neox.layers", "attention", "Pythia"),
        ArchAdapter("gptj", ("gptj",), "transformer.h", "attn", "GPT-J"),
        ArchAdapter("gpt2", ("gpt2",), "transformer.h", "attn", "GPT-2"),
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
