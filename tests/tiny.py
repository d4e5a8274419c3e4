"""Tiny random models and in-memory tokenizers for exactness tests.

Every supported architecture gets a 4-layer model built from its config with a fixed seed,
so tests run in milliseconds and need no download. ``ARCHITECTURES`` are tested in full by every
exactness test; ``MORE_ARCHITECTURES`` (families laid out like Llama that differ from the first
ones only in quirks those already cover, and Gemma-3's image-text class) by one compact test
each, to keep the suite's time modest. Two tokenizers stand in for the two
number-tokenization families of the spec:

* ``digit_tokenizer()`` splits every character (digits are separate tokens, like SmolLM2/Qwen2),
  adds no BOS;
* ``number_tokenizer()`` keeps whole numbers 0..999 as single tokens and adds a BOS (like Llama-3).
"""

from __future__ import annotations

import string

import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    CohereConfig,
    Gemma2Config,
    Gemma3TextConfig,
    Gemma3Config,
    GemmaConfig,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    GraniteConfig,
    LlamaConfig,
    MinistralConfig,
    MistralConfig,
    MixtralConfig,
    Olmo2Config,
    OlmoConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
    SmolLM3Config,
    Starcoder2Config,
)

ARCHITECTURES = ("llama", "qwen2", "gpt_neox", "gptj", "gpt2", "mistral", "gemma2",
                 "gemma3_text", "qwen3", "phi3", "olmo2")
MORE_ARCHITECTURES = ("gemma", "gemma3", "qwen3_moe", "ministral", "mixtral", "olmo", "granite",
                      "cohere", "starcoder2", "smollm3")
# Sliding windows of the tiny models: shorter than the test prompts, so they matter.
WINDOW = 4
# Architectures without sdpa (Gemma-2 soft-caps attention scores; transformers refuses it).
ATTN_IMPLEMENTATIONS = {"gemma2": ("eager",)}


def supported_attention(arch: str, preferred: str = "sdpa") -> str:
    """``preferred`` where ``arch`` has it, else the one it has (Gemma-2: eager)."""
    have = ATTN_IMPLEMENTATIONS.get(arch, ("eager", "sdpa"))
    return preferred if preferred in have else have[0]

_CHARS = list(string.digits + string.ascii_letters + " +-=:;?#.,()'")


def digit_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer: every digit is its own token; no BOS is added."""
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<s>", "<unk>"] + _CHARS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", unk_token="<unk>"
    )
    tok.padding_side = "left"
    return tok


def number_tokenizer() -> PreTrainedTokenizerFast:
    """Whole numbers 0..999 are single tokens (a space before a number is its own token);
    a BOS token is prepended to every prompt, as Llama-3's tokenizer does."""
    numbers = [str(n) for n in range(1000)]
    others = [c for c in _CHARS if not c.isdigit()]
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<s>", "<unk>"] + numbers + others)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\d+|."), "isolated")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", unk_token="<unk>"
    )
    tok.padding_side = "left"
    return tok


def tiny_config(arch: str, vocab_size: int, n_layers: int = 4):
    """A small config of the given architecture (hidden 32, 4 heads)."""
    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=0, pad_token_id=0)
    if arch == "llama":
        return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                           num_attention_heads=4, num_key_value_heads=2, **common)
    if arch == "qwen2":
        return Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                           num_attention_heads=4, num_key_value_heads=2, **common)
    if arch == "gpt_neox":
        return GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                             num_attention_heads=4, **common)
    if arch == "gptj":
        return GPTJConfig(n_embd=32, n_layer=n_layers, n_head=4, rotary_dim=4, n_positions=128,
                          **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=32, n_layer=n_layers, n_head=4, n_positions=128, **common)
    common.update(hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                  num_attention_heads=4, num_key_value_heads=2)
    if arch == "mistral":  # every layer slides
        return MistralConfig(sliding_window=WINDOW, **common)
    if arch == "ministral":  # sliding, full, ... by layer_types
        types = ["sliding_attention", "full_attention"] * (n_layers // 2)
        return MinistralConfig(head_dim=8, sliding_window=WINDOW, layer_types=types, **common)
    if arch == "mixtral":  # mixture of experts; every layer slides
        return MixtralConfig(sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2,
                             **common)
    if arch == "starcoder2":  # LayerNorm with biases; every layer slides
        return Starcoder2Config(sliding_window=WINDOW, **common)
    if arch == "smollm3":  # every other layer without rotary (NoPE)
        return SmolLM3Config(no_rope_layer_interval=2, **common)
    if arch == "gemma":
        return GemmaConfig(head_dim=8, **common)
    if arch == "gemma2":  # sliding, full, sliding, full; both soft-caps
        return Gemma2Config(head_dim=8, query_pre_attn_scalar=8, sliding_window=WINDOW,
                            final_logit_softcapping=3.0, attn_logit_softcapping=5.0, **common)
    if arch == "gemma3_text":  # sliding, full, ...; local/global rotary; q/k norms
        return Gemma3TextConfig(head_dim=8, query_pre_attn_scalar=8, sliding_window=WINDOW,
                                sliding_window_pattern=2, final_logit_softcapping=3.0,
                                **common)
    if arch == "gemma3":  # the image-text class (4b and up) with a one-layer vision tower
        special = dict(pad_token_id=0, bos_token_id=1, eos_token_id=0)
        text = {k: v for k, v in common.items() if k not in special}
        text.update(vocab_size=vocab_size + 3, head_dim=8, query_pre_attn_scalar=8,
                    sliding_window=WINDOW, sliding_window_pattern=2, **special)
        vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, image_size=28, patch_size=14)
        return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                            image_token_index=vocab_size, boi_token_index=vocab_size + 1,
                            eoi_token_index=vocab_size + 2)
    if arch == "qwen3":  # full, full, sliding, sliding; q/k norms
        return Qwen3Config(head_dim=8, use_sliding_window=True, sliding_window=WINDOW,
                           max_window_layers=n_layers // 2, **common)
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(head_dim=8, num_experts=4, num_experts_per_tok=2,
                              moe_intermediate_size=16, **common)
    if arch == "phi3":  # fused qkv; every layer slides
        return Phi3Config(sliding_window=WINDOW, **common)
    if arch == "olmo":
        return OlmoConfig(clip_qkv=8.0, **common)
    if arch == "olmo2":  # q/k norms over all heads, post-norms
        return Olmo2Config(**common)
    if arch == "granite":  # scalings in the model's and the head's forward
        return GraniteConfig(embedding_multiplier=3.0, logits_scaling=2.0,
                             residual_multiplier=0.5, attention_multiplier=0.3, **common)
    if arch == "cohere":  # parallel attention/MLP, logit scale
        return CohereConfig(use_qk_norm=True, logit_scale=0.5, **common)
    raise ValueError(arch)


def tiny_hf_model(arch: str, tokenizer, attn_implementation: str = "eager", seed: int = 0,
                  n_layers: int = 4):
    """A randomly initialised causal LM of ``arch`` in float32, eval mode (the calling test is
    skipped for an attention implementation the architecture does not have)."""
    if supported_attention(arch, attn_implementation) != attn_implementation:
        pytest.skip(f"{arch} has no {attn_implementation} attention")
    torch.manual_seed(seed)
    config = tiny_config(arch, len(tokenizer), n_layers=n_layers)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation,
                                             dtype=torch.float32)
    # Random init gives near-uniform attention; sharpen it so masks visibly matter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model.eval()


def save_tiny_model(arch: str, directory, tokenizer=None, attn_implementation: str = "eager",
                    seed: int = 0, n_layers: int = 4) -> str:
    """Write a tiny model and its tokenizer as a local Hugging Face directory."""
    tokenizer = tokenizer or digit_tokenizer()
    model = tiny_hf_model(arch, tokenizer, attn_implementation, seed, n_layers)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)
