"""Tiny random models and in-memory tokenizers for exactness tests.

Every supported architecture gets a 4-layer model built from its config with a fixed seed,
so tests run in milliseconds and need no download. Two tokenizers stand in for the two
number-tokenization families of the spec:

* ``digit_tokenizer()`` splits every character (digits are separate tokens, like SmolLM2/Qwen2),
  adds no BOS;
* ``number_tokenizer()`` keeps whole numbers 0..999 as single tokens and adds a BOS (like Llama-3).
"""

from __future__ import annotations

import string

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

ARCHITECTURES = ("llama", "qwen2", "gpt_neox", "gptj", "gpt2")

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
    raise ValueError(arch)


def tiny_hf_model(arch: str, tokenizer, attn_implementation: str = "eager", seed: int = 0,
                  n_layers: int = 4):
    """A randomly initialised causal LM of ``arch`` in float32, eval mode."""
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
