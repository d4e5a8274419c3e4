"""How task prompts tokenize: a fast batch encoder, the answer-token rule and the sink rule.

**Answer-token rule.** The answer's tokens are what the tokenizer produces for the answer when it
follows the prompt: with ``add_special_tokens=True`` throughout, ``tokenize(prompt + answer)``
must equal ``tokenize(prompt) + answer_ids`` with at least one answer token (exactly one where
only single-token answers are kept). Where that fails and the prompt ends with whitespace, the
whitespace moves into the answer (BPE tokenizers like GPT-2's write ``"is 7"`` as ``["is",
" 7"]``): the model reads the same text, only the prompt's end moves.

**Sink rule.** Position 0 (the sink every query may read) must be the same token in every prompt
of a data set; :func:`bos_prefix` says what to prepend when it is not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Encoder = Callable[[Sequence[str]], list[list[int]]]


def encoder(tokenizer: "PreTrainedTokenizerBase") -> Encoder:
    """A batch encoder equal to ``tokenizer(texts, add_special_tokens=True)["input_ids"]``.

    Uses the Rust backend directly when that is provably the same call (about 3x faster: no
    Python ``BatchEncoding`` per text); otherwise the tokenizer itself.
    """

    def via_tokenizer(texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return tokenizer(list(texts), add_special_tokens=True)["input_ids"]

    probe = ["Calculate: 12+34=46", "The sum of 3 and 4 is 7"]
    reference = via_tokenizer(probe)  # also resets padding/truncation left by earlier calls
    # Special tokens, less an unknown token that is not also EOS (text the vocabulary cannot
    # write reads as it; build_task refuses such answers with that reason).
    special = set(getattr(tokenizer, "all_special_ids", []) or []) - (
        {getattr(tokenizer, "unk_token_id", None)} - {getattr(tokenizer, "eos_token_id", None)})
    if reference[0] and reference[0][-1] in special:
        raise ValueError("tokenizer appends a special token after the text (e.g. EOS); prompts "
                         "must end with their own last token for last-token scoring")
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if (backend is None or backend.padding is not None or backend.truncation is not None
            or not hasattr(backend, "encode_batch_fast")
            or backend.encode_special_tokens != bool(getattr(tokenizer, "split_special_tokens", False))):
        return via_tokenizer

    def via_backend(texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in backend.encode_batch_fast(list(texts), add_special_tokens=True)]

    return via_backend if via_backend(probe) == reference else via_tokenizer


@dataclass(frozen=True)
class AnswerCheck:
    """The answer-token rule applied to ``n`` (prompt, answer) pairs.

    Attributes:
        ok: ``(n,)`` bool, the pair obeys the rule (after moving whitespace where that helps).
        moved: ``(n,)`` bool, trailing prompt whitespace moved into the answer.
        prompt_ids: per pair, the token ids of the final prompt (``[]`` where not ok).
        answer_ids: per pair, the answer's token ids after it (``()`` where not ok).
    """

    ok: np.ndarray
    moved: np.ndarray
    prompt_ids: list[list[int]]
    answer_ids: list[tuple[int, ...]]


def _split(full: list[int], prompt: list[int], max_answer_tokens: int | None):
    """The answer ids if ``full`` is ``prompt`` followed by 1..max answer tokens, else None."""
    extra = len(full) - len(prompt)
    if extra < 1 or (max_answer_tokens is not None and extra > max_answer_tokens):
        return None
    return tuple(full[len(prompt):]) if full[:len(prompt)] == prompt else None


def check_answers(encode: Encoder, prompts: Sequence[str], answers: Sequence[str],
                  max_answer_tokens: int | None = None) -> AnswerCheck:
    """Apply the answer-token rule (module docstring) to each (prompt, answer) pair.

    ``max_answer_tokens=1`` keeps single-token answers only; ``None`` any number of tokens.
    """
    n = len(prompts)
    ok = np.zeros(n, dtype=bool)
    moved = np.zeros(n, dtype=bool)
    prompt_ids: list[list[int]] = [[] for _ in range(n)]
    answer_ids: list[tuple[int, ...]] = [() for _ in range(n)]
    full = encode([p + a for p, a in zip(prompts, answers)])
    plain = encode(prompts)
    retry: list[int] = []
    for i, (f, p) in enumerate(zip(full, plain)):
        split = _split(f, p, max_answer_tokens)
        if split is not None:
            ok[i], prompt_ids[i], answer_ids[i] = True, p, split
        elif prompts[i] != prompts[i].rstrip():
            retry.append(i)
    if retry:
        stripped = encode([prompts[i].rstrip() for i in retry])
        for i, p in zip(retry, stripped):
            split = _split(full[i], p, max_answer_tokens)
            if split is not None:
                ok[i], moved[i], prompt_ids[i], answer_ids[i] = True, True, p, split
    return AnswerCheck(ok, moved, prompt_ids, answer_ids)


def move_whitespace(prompt: str, answer: str, moved: bool) -> tuple[str, str]:
    """``(prompt, answer)`` with the prompt's trailing whitespace moved into the answer."""
    if not moved:
        return prompt, answer
    body = prompt.rstrip()
    return body, prompt[len(body):] + answer


def sink_tokens(input_ids: Sequence[Sequence[int]]) -> set[int]:
    """The distinct tokens at position 0 (the sink) over a data set's prompts."""
    return {int(ids[0]) for ids in input_ids if len(ids)}


def bos_prefix(tokenizer: "PreTrainedTokenizerBase", template: str) -> str:
    """The text to put before every prompt so that its first token is the tokenizer's BOS.

    For a data set whose position 0 differs between prompts (e.g. ``{A}+{B}=`` on a tokenizer
    that adds no BOS: the sink would be operand A). Raises :class:`ValueError` with the fix when
    the tokenizer has no BOS token.
    """
    bos, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    if not bos or bos_id is None:
        example = "Calculate: " + template
        raise ValueError(
            f"position 0 (the sink, which every query may read) is not the same token in every "
            f"prompt of template {template!r}, and the tokenizer has no BOS token to put first; "
            f"use a template that starts with a constant word, e.g. {example!r}")
    if tokenizer(bos, add_special_tokens=False)["input_ids"] != [bos_id]:
        _refuse_bos(tokenizer)
    return bos


def check_bos_first(input_ids: Sequence[Sequence[int]], tokenizer: "PreTrainedTokenizerBase"
                    ) -> None:
    """Refuse prompts given a BOS prefix that do not start with the BOS id."""
    if sink_tokens(input_ids) != {tokenizer.bos_token_id}:
        _refuse_bos(tokenizer)


def _refuse_bos(tokenizer) -> None:
    raise ValueError(f"the tokenizer does not read the text {tokenizer.bos_token!r} as its BOS "
                     f"token (id {tokenizer.bos_token_id}) at the start of a prompt, so it cannot "
                     f"serve as a constant sink; use a template that starts with a constant word")
