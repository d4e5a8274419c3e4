"""Per-architecture knowledge: where the decoder layers are and how a layer receives its inputs.

This is the one module that knows architecture quirks. Everything else asks an
:class:`ArchAdapter` (by ``config.model_type``) and works on what it returns.

Facts encoded here (transformers 5.x; 4.x differs where noted and is handled generically):
* Decoder layers: ``model.layers`` (Llama and every family laid out like it: Qwen2/3, Mistral,
  Gemma 1-3, Phi-3, OLMo 1-2, Granite, Cohere, ...), ``model.language_model.layers`` (Gemma-3
  image-text checkpoints), ``gpt_neox.layers`` (GPT-NeoX/Pythia), ``transformer.h`` (GPT-J,
  GPT-2).
* The residual stream enters every layer as its first positional argument.
* The 4D attention mask reaches every layer by keyword except GPT-2 blocks, which take it by
  position, at an index that differs between transformers versions: it is resolved from the
  block's signature here, outside any trace (``inspect`` is not allowed on NDIF).
* Layer outputs are tensors in transformers 5.x, tuples in 4.x for GPT-2/NeoX/GPT-J; readers take
  ``out[0]`` of a tuple.
* Only ``eager`` and ``sdpa`` attention take a custom 4D mask; flash attention cannot. Gemma-2
  has no sdpa (its attention soft-caps scores; transformers refuses to load it with sdpa).
* Outside the layers (for code that runs the layers itself, ``executors.fast``): ``h_0`` is
  the token embedding, plus GPT-2's absolute position embedding of the position ids, times
  Granite's ``config.embedding_multiplier`` (Gemma's ``sqrt(hidden)`` is inside its embedding
  module); the rotary families take ``position_embeddings`` from one model-level rotary module
  (GPT-J's is a ``(sin, cos)`` pair, the others ``(cos, sin)``: passed through as returned;
  Gemma-3's takes the layer type, ``rotary_emb(x, position_ids, layer_type)``, and each layer
  gets its own type's pair); the final norm is ``model.norm`` / ``gpt_neox.final_layer_norm``
  / ``transformer.ln_f`` and the head ``lm_head`` everywhere; the causal LM then divides the
  logits by ``config.logits_scaling`` (Granite), multiplies them by ``config.logit_scale``
  (Cohere) or soft-caps them by ``config.final_logit_softcapping`` (Gemma-2, Gemma-3 text).
  Every layer takes ``attention_mask`` and ``position_ids`` by keyword (GPT-2's positional slot
  is only how its own model calls it).
* Keys and values reach attention through a cache object the layer is given (``cache=``;
  GPT-NeoX: ``layer_past=``): every supported attention calls ``cache.update(key_states,
  value_states, layer_idx, ...)`` with its post-rotary ``(B, H_kv, S, head_dim)`` keys and values
  and attends over the pair it returns, so any object with that method can record them or
  prepend others (no Hugging Face cache class is involved).
* Sliding windows. A sliding layer's query at column ``q`` reads keys ``q - w < k <= q``
  (``masking_utils.sliding_window_overlay``: ``w`` keys including itself; columns equal
  positions for real tokens under left padding). The window is only in the mask the model
  builds. Which layers slide is decided by each model's forward (``window_rule``):
  ``"layer_types"`` (Qwen2, Qwen3, Gemma-2, Gemma-3, Ministral, SmolLM3: a layer whose
  ``config.layer_types`` entry is ``"sliding_attention"`` gets ``config.sliding_window``) or
  ``"config"`` (Mistral, Mixtral, Phi-3, Qwen3-MoE, StarCoder2: every layer slides whenever
  ``config.sliding_window`` is set, and ``MistralConfig`` sets 4096 by default; Mistral ignores
  ``layer_types``). AF1's masks are intersected with each layer's window.
* Rotary embeddings whose frequencies depend on the longest position in the call (``longrope``:
  Phi-3 long-context checkpoints; ``dynamic``) give the same result for one token as for the
  whole prompt only while prompts fit the original context
  (:meth:`ArchAdapter.rotary_length_limit`).
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
    """Where things are in one architecture family, and what its forward does around them.

    Attributes:
        name: adapter name (``"llama"``, ``"gemma2"``, ``"gpt2"``, ...).
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
        window_rule: ``"layer_types"``, ``"config"`` or ``None``: which layers attend within
            ``config.sliding_window`` (see the module docstring).
        rotary_per_layer_type: the rotary module takes the layer type as a third argument and
            each layer gets its own type's embeddings (Gemma-3).
        embed_multiplier: config attribute ``h_0`` is multiplied by in the model's forward.
        logit_divisor / logit_multiplier / logit_softcap: config attributes the causal LM's
            forward applies to the head's output (in this order; a ``None`` value is skipped).
        attn_implementations: the maskable attention implementations the family has, the
            one to use when the user names none first.
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
    window_rule: str | None = None
    rotary_per_layer_type: bool = False
    embed_multiplier: str | None = None
    logit_divisor: str | None = None
    logit_multiplier: str | None = None
    logit_softcap: str | None = None
    attn_implementations: tuple[str, ...] = ("sdpa", "eager")

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
        module = internals.wrapped_module(lm)
        index, name = self.mask_slot(module)
        layers = list(_get_path(lm, self.layers_path))
        return ModelSites(lm, layers, index, name, attn_implementation,
                          self.layer_windows(module.config, len(layers)))

    # -- what the model's forward decides per layer (read from the config) ------------------

    def layer_types(self, config, n_layers: int) -> list[str]:
        """``config.layer_types`` (of the text config, for multimodal models), or
        ``"full_attention"`` for every layer where it is absent."""
        types = getattr(config.get_text_config(), "layer_types", None)
        return list(types) if types else ["full_attention"] * n_layers

    def layer_windows(self, config, n_layers: int) -> list[int | None]:
        """Per layer, the sliding window ``w`` of its own attention (a query reads keys
        ``q - w < k <= q``), or ``None`` where it reads every earlier token."""
        window = getattr(config.get_text_config(), "sliding_window", None)
        if window is None or self.window_rule is None:
            return [None] * n_layers
        if self.window_rule == "config":
            return [window] * n_layers
        return [window if kind == "sliding_attention" else None
                for kind in self.layer_types(config, n_layers)]

    def rotary_length_limit(self, module: torch.nn.Module) -> int | None:
        """The longest prompt (in tokens) for which the rotary frequencies do not depend on how
        many positions one call holds, or ``None`` when they never do.

        ``longrope`` switches to its long factors once the largest position id in a call
        reaches ``original_max_position_embeddings``; ``dynamic`` rescales beyond the original
        context. Below that, one token's rotary equals its row of the whole prompt's.
        """
        if self.rotary_path is None:
            return None
        rotary = _get_path(module, self.rotary_path)
        kinds = getattr(rotary, "rope_type", None) or "default"
        params = getattr(getattr(rotary, "config", None), "rope_parameters", None) or {}
        limits = []
        for layer_type, kind in (kinds.items() if isinstance(kinds, dict) else [(None, kinds)]):
            if kind == "longrope":
                own = params[layer_type] if layer_type is not None else params
                limits.append(int(own["original_max_position_embeddings"]))
            elif "dynamic" in kind:
                limits.append(int(rotary.original_max_seq_len))
        return min(limits, default=None)

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
        if self.embed_multiplier is not None:
            hidden = hidden * getattr(module.config.get_text_config(), self.embed_multiplier)
        return hidden

    def position_embeddings(self, module: torch.nn.Module, hidden: torch.Tensor,
                            position_ids: torch.Tensor) -> list:
        """What each layer takes as ``position_embeddings`` for ``(B, S)`` position ids: one
        entry per layer, a pair of ``(B, S, head_dim)`` tensors from the rotary module (the
        same object for every layer of one type), or ``None`` without rotary.

        ``hidden`` (``(B, S, D)``) only gives the dtype and device.
        """
        n_layers = len(self.layer_modules(module))
        if self.rotary_path is None:
            return [None] * n_layers
        rotary = _get_path(module, self.rotary_path)
        if not self.rotary_per_layer_type:
            return [rotary(hidden, position_ids=position_ids)] * n_layers
        types = self.layer_types(module.config, n_layers)
        by_type = {kind: rotary(hidden, position_ids, kind) for kind in set(types)}
        return [by_type[kind] for kind in types]

    def call_layer(self, layer: torch.nn.Module, hidden: torch.Tensor, mask: torch.Tensor,
                   position_ids: torch.Tensor, position_embeddings, cache=None) -> torch.Tensor:
        """Run one decoder layer: ``(B, S, D)`` -> ``(B, S, D)``.

        Args:
            mask: ``(B, 1, S, P + S)``, boolean (sdpa) or additive float (eager), built for this
                call (``P`` keys prepended by ``cache``, else 0); the layer never sees the
                model's own mask, so a sliding window must already be in it.
            position_ids: ``(B, S)`` the tokens' original positions.
            position_embeddings: this layer's entry of :meth:`position_embeddings` for the same
                positions.
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
        """Final norm, head and the causal LM's own scaling of the head's output: ``(..., D)``
        residual ``h_L`` -> ``(..., V)`` logits, as ``model(...).logits``."""
        normed = _get_path(module, self.final_norm_path)(hidden)
        logits = _get_path(module, self.lm_head_path)(normed)
        config = module.config.get_text_config()
        if self.logit_divisor is not None:
            logits = logits / getattr(config, self.logit_divisor)
        if self.logit_multiplier is not None:
            logits = logits * getattr(config, self.logit_multiplier)
        cap = getattr(config, self.logit_softcap) if self.logit_softcap is not None else None
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits


def _llama_like(name: str, examples: str, **quirks) -> ArchAdapter:
    """A family laid out like Llama: ``model.layers[k].self_attn``, ``model.embed_tokens``,
    ``model.norm``, ``model.rotary_emb``, ``lm_head``; ``model_type`` equal to ``name``."""
    return ArchAdapter(name, (name,), "model.layers", "self_attn", examples,
                       embed_path="model.embed_tokens", final_norm_path="model.norm",
                       rotary_path="model.rotary_emb", **quirks)


ADAPTERS: dict[str, ArchAdapter] = {
    adapter.name: adapter
    for adapter in (
        _llama_like("llama", "Llama-3, Llama-3.1, SmolLM2"),
        _llama_like("qwen2", "Qwen2, Qwen2.5", window_rule="layer_types"),
        _llama_like("qwen3", "Qwen3", window_rule="layer_types"),
        _llama_like("qwen3_moe", "Qwen3-MoE", window_rule="config"),
        _llama_like("mistral", "Mistral", window_rule="config"),
        _llama_like("ministral", "Ministral", window_rule="layer_types"),
        _llama_like("mixtral", "Mixtral", window_rule="config"),
        _llama_like("phi3", "Phi-3, Phi-3.5, Phi-4", window_rule="config"),
        _llama_like("gemma", "Gemma"),
        _llama_like("gemma2", "Gemma-2", window_rule="layer_types",
                    logit_softcap="final_logit_softcapping", attn_implementations=("eager",)),
        _llama_like("gemma3_text", "Gemma-3 270m and 1b", window_rule="layer_types",
                    rotary_per_layer_type=True, logit_softcap="final_logit_softcapping"),
        # Gemma-3 4b/12b/27b load as Gemma3ForConditionalGeneration: the text model sits under
        # model.language_model, and its forward applies no final soft-cap. Text prompts only.
        ArchAdapter("gemma3", ("gemma3",), "model.language_model.layers", "self_attn",
                    "Gemma-3 4b, 12b, 27b (text prompts)", window_rule="layer_types",
                    rotary_per_layer_type=True, embed_path="model.language_model.embed_tokens",
                    final_norm_path="model.language_model.norm",
                    rotary_path="model.language_model.rotary_emb"),
        _llama_like("olmo", "OLMo"),
        _llama_like("olmo2", "OLMo-2"),
        _llama_like("granite", "Granite-3", embed_multiplier="embedding_multiplier",
                    logit_divisor="logits_scaling"),
        _llama_like("cohere", "Command-R", logit_multiplier="logit_scale"),
        _llama_like("starcoder2", "StarCoder2", window_rule="config"),
        _llama_like("smollm3", "SmolLM3", window_rule="layer_types"),
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
    """The adapter for a model config; a clear :class:`UserError` when unsupported (an unknown
    ``model_type``, or a Gemma-3 embedding model, whose attention is bidirectional)."""
    model_type = getattr(config, "model_type", None)
    if getattr(config.get_text_config(), "use_bidirectional_attention", False):
        raise UserError(
            f"this {model_type} checkpoint uses bidirectional attention (an embedding model, "
            f"not a causal LM), which AF1's causal stages do not apply to"
        )
    for adapter in ADAPTERS.values():
        if model_type in adapter.model_types:
            return adapter
    raise UserError(
        f"unsupported architecture {model_type!r}; supported: {supported_architectures()}"
    )


def check_attention(attn_implementation: str | None, adapter: ArchAdapter | None = None
                    ) -> str | None:
    """Refuse attention implementations that cannot take the per-layer 4D masks of ABP, or
    that the architecture does not have (``None``, the family's default, passes)."""
    if attn_implementation is None:
        return None
    if attn_implementation not in MASKABLE_ATTENTION:
        raise UserError(
            f"attention implementation {attn_implementation!r} cannot take the custom 4D masks "
            f"AF1 needs; use one of {', '.join(MASKABLE_ATTENTION)}"
        )
    if adapter is not None and attn_implementation not in adapter.attn_implementations:
        raise UserError(
            f"{adapter.name} models cannot run {attn_implementation} attention in "
            f"transformers; use --attn {' or '.join(adapter.attn_implementations)}, or leave "
            f"--attn out"
        )
    return attn_implementation


def choose_attention(adapter: ArchAdapter, requested: str | None) -> tuple[str, str | None]:
    """The attention implementation to load: ``requested`` (checked), or where the user named
    none the family's first choice (sdpa; eager for Gemma-2). Returns it and, when that first
    choice is not sdpa, one line saying so."""
    if requested is not None:
        return check_attention(requested, adapter), None
    chosen = adapter.attn_implementations[0]
    note = None if chosen == "sdpa" else (
        f"{adapter.name} has no sdpa attention in transformers; loading it with {chosen}")
    return chosen, note


def _get_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj
