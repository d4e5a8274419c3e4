"""The arithmetic tasks on each family's way of writing numbers, with the tokenizers that can be
built offline: the tiny tokenizers (digits like SmolLM2/Qwen2; whole numbers to 999 with a BOS,
like Llama-3), SmolLM2's own, and transformers' real GPT-2 (GPT-J) and GPT-NeoX (Pythia)
tokenizer classes over a small byte-level BPE whose merges make every number to 99 one token and
only some beyond (the real vocabularies are learnt on text and cannot be loaded here: what they
hold beyond 99 is decided at build time, and the build counts what it drops).

Expected rows are computed here by calling the tokenizer on each candidate, independently of the
builder's batched, sampled path.
"""

from __future__ import annotations

import itertools

import pytest
from transformers import GPT2Tokenizer, GPTNeoXTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

import tiny
from tasks import build_task, default_operand_range, number_mode, single_token_numbers

SPACE = bytes_to_unicode()[ord(" ")]  # how byte-level BPE writes a space ("Ġ")


def byte_level_bpe(tokenizer_class):
    """A ``tokenizer_class`` (GPT2Tokenizer or GPTNeoXTokenizer) over all 256 bytes, with merges
    for every number 10..149, bare and after a space. BPE applies merges by rank, so a number
    such as 110 ("1", "10" after the earlier merge of "10") stays split: like a learnt vocabulary,
    coverage beyond 99 has gaps."""
    vocab = {"<|endoftext|>": 0}
    for byte in range(256):
        vocab.setdefault(bytes_to_unicode()[byte], len(vocab))
    merges = []

    def merge(left, right):
        merges.append((left, right))
        vocab.setdefault(left + right, len(vocab))

    for digit in "0123456789":
        merge(SPACE, digit)
    for n in range(10, 150):
        text = str(n)
        for prefix in ("", SPACE):
            merge(prefix + text[:-1], text[-1])
    return tokenizer_class(vocab=vocab, merges=merges)


def is_single(tok, prompt: str, answer: str) -> bool:
    """The answer-token rule by the tokenizer's own calls (trailing prompt space moved into the
    answer where only that makes it hold)."""
    for p, a in ((prompt, answer), (prompt.rstrip(), prompt[len(prompt.rstrip()):] + answer)):
        whole, head = tok(p + a)["input_ids"], tok(p)["input_ids"]
        if len(whole) == len(head) + 1 and whole[:len(head)] == head:
            return True
    return False


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from interventions import load_model

    return load_model("smollm2", device="cpu").tokenizer


@pytest.mark.parametrize("make, mode, limit", [
    (tiny.digit_tokenizer, "digits", 9),
    (tiny.number_tokenizer, "multi", 999),
    (lambda: byte_level_bpe(GPT2Tokenizer), "partial", None),
    (lambda: byte_level_bpe(GPTNeoXTokenizer), "partial", None)])
def test_number_mode_and_default_range_per_family(make, mode, limit):
    tok = make()
    # The largest n with every number 0..n one token, found here number by number.
    contexts = ("Calculate: 1+1=", "The sum of 1 and 1 is ")
    expected = next((n - 1 for n in range(1000)
                     if not all(is_single(tok, c, str(n)) for c in contexts)), 999)
    assert single_token_numbers(tok) == expected
    assert limit is None or expected == limit
    assert number_mode(tok) == mode
    assert default_operand_range(tok) == ((1, 9) if mode == "digits" else (1, 99))


def test_smollm2_writes_numbers_in_digits(smollm2_tokenizer):
    assert single_token_numbers(smollm2_tokenizer) == 9
    assert number_mode(smollm2_tokenizer) == "digits"
    build = build_task(smollm2_tokenizer, "A+B-C")
    assert build.operand_range == (1, 9)
    # Every kept result is one digit; every one-digit result of 1..9 operands is kept.
    kept = sum(1 for a, b, c in itertools.product(range(1, 10), repeat=3) if 0 <= a + b - c <= 9)
    assert build.n_prompts == kept


@pytest.mark.parametrize("tokenizer_class", [GPT2Tokenizer, GPTNeoXTokenizer])
def test_partial_vocabularies_keep_the_sums_whose_result_is_one_token(tokenizer_class):
    tok = byte_level_bpe(tokenizer_class)
    build = build_task(tok, "A+B", n_prompts=60, seed=3)
    assert build.operand_range == (1, 99)
    single = [(a, b) for a, b in itertools.product(range(1, 100), repeat=2)
              if is_single(tok, f"Calculate: {a}+{b}=", str(a + b))]
    assert build.n_candidates == 99 * 99 and build.n_dropped == 99 * 99 - len(single)
    assert 0 < build.n_dropped < 99 * 99 - 99 * 99 // 2  # sums past the vocabulary's gaps
    rows = build.dataset
    assert set(zip(rows["A"], rows["B"])) <= set(single) and len(rows) == 60
    for row in rows:
        assert tok(row["prompt"] + row["answer"])["input_ids"] == (
            row["input_ids"] + [row["answer_token_id"]])
    # Neither class adds a BOS: a template that starts with an operand gets the BOS text
    # prepended as the sink; a trailing space moves into the answer (" 62").
    symbolic = build_task(tok, "A+B", style="symbolic", n_prompts=20).dataset
    assert all(p.startswith("<|endoftext|>") and ids[0] == 0
               for p, ids in zip(symbolic["prompt"], symbolic["input_ids"]))
    words = build_task(tok, "A+B", style="words", n_prompts=20).dataset
    assert all(a.startswith(" ") and not p.endswith(" ")
               for p, a in zip(words["prompt"], words["answer"]))


def test_three_operands_on_whole_number_tokens_keep_every_result():
    build = build_task(tiny.number_tokenizer(), "A+B+C", n_prompts=50)
    assert build.operand_range == (1, 99) and build.n_dropped == 0  # results to 297: one token
    assert build.n_candidates == 99 ** 3


def test_a_tokenizer_without_single_token_answers_is_refused_with_the_reason():
    with pytest.raises(ValueError) as err:
        build_task(tiny.digit_tokenizer(), "A+B", operand_range=(10, 20), answer_tokens="single")
    message = str(err.value)
    assert "no prompt whose answer is a single token" in message
    # The reason: how the first candidate's prompt and answer tokenize.
    assert "'Calculate: 10+10='" in message and "'2', '0'" in message


def test_an_answer_read_as_the_unknown_token_is_refused():
    # A vocabulary without digits: every number reads as <unk>, one token, but no answer.
    tok = tiny.digit_tokenizer()
    vocab = {t: i for t, i in tok.get_vocab().items() if not t.isdigit()}
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    no_digits = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>",
                                        unk_token="<unk>", pad_token="<pad>")
    with pytest.raises(ValueError, match="unknown token"):
        build_task(no_digits, "A+B")
