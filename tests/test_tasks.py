"""Tests of the task builder: filtering, the answer-token rule, sampling, fingerprints, storage.

Expected counts are computed here with plain loops, independently of the numpy code under test.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "tests"):  # as conftest.py does; also when run on its own
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from tokenizers import Regex, Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from tasks import (  # noqa: E402
    STYLES,
    TASKS,
    TaskBuild,
    build_task,
    default_operand_range,
    expand_answer_prefixes,
    load_task,
    number_mode,
    save_task,
    task_fingerprint,
    template_for,
)
from tasks.store import COLUMNS, task_metadata  # noqa: E402
from tiny import digit_tokenizer, number_tokenizer  # noqa: E402

_CHARS = [chr(c) for c in range(32, 127)]


def _wordlevel(extra_tokens: list[str], pattern: str) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer over printable ASCII plus ``extra_tokens``, split by ``pattern``."""
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<s>", "<unk>"] + _CHARS + extra_tokens)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                   unk_token="<unk>")


def gpt2_like_tokenizer() -> PreTrainedTokenizerFast:
    """Like GPT-2's BPE: a space merges into the digit after it ("is 7" -> "i", "s", " 7")."""
    return _wordlevel([" " + d for d in "0123456789"], r" ?\d|.")


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=True)["input_ids"]


def _result(task: str, operands: tuple[int, ...]) -> int:
    value = operands[0]
    for op, x in zip([c for c in task if c in "+-"], operands[1:]):
        value = value + x if op == "+" else value - x
    return value


def _expected_rows(task: str, lo: int, hi: int, max_result: int) -> tuple[int, list[tuple]]:
    """(candidates, kept operand tuples) by brute force: results >= 0, kept if <= max_result."""
    k = 3 if len(task) == 5 else 2
    candidates, kept = 0, []
    for ops in itertools.product(range(lo, hi + 1), repeat=k):
        r = _result(task, ops)
        if r >= 0:
            candidates += 1
            if r <= max_result:
                kept.append(ops)
    return candidates, kept


def _operands(ds) -> list[tuple]:
    if ds[0]["C"] == -1:
        return list(zip(ds["A"], ds["B"]))
    return list(zip(ds["A"], ds["B"], ds["C"]))


def _assert_rule(tok, ds, single=True) -> None:
    """Every row obeys the answer-token rule, checked with the tokenizer's own __call__, and its
    input_ids are what the tokenizer makes of its prompt."""
    for row in ds:
        p = _ids(tok, row["prompt"])
        assert _ids(tok, row["prompt"] + row["answer"]) == p + row["answer_token_ids"], row
        assert row["answer_token_id"] == row["answer_token_ids"][0]
        assert len(row["answer_token_ids"]) == 1 or not single
        assert row["input_ids"] == p and row["n_tokens"] == len(p)
        assert "".join(tok.convert_ids_to_tokens(row["answer_token_ids"])) == row["answer"]
        # An expanded row (teacher forcing) answers with the rest of its source's answer.
        whole = row["answer"].strip() if row.get("answer_step", 0) == 0 else None
        assert str(row["answer_value"]) == whole or (
            whole is None and str(row["answer_value"]).endswith(row["answer"].strip()))


# ------------------------------------------------------------------ modes and ranges

def test_number_mode_and_default_range():
    assert number_mode(digit_tokenizer()) == "digits"
    assert default_operand_range(digit_tokenizer()) == (1, 9)
    assert number_mode(number_tokenizer()) == "multi"
    assert default_operand_range(number_tokenizer()) == (1, 99)
    assert number_mode(gpt2_like_tokenizer()) == "digits"


# ------------------------------------------------------------------ filtering counts

def test_digit_a_plus_b_keeps_the_36_single_digit_sums():
    tok = digit_tokenizer()
    build = build_task(tok, "A+B")
    n_cand, kept = _expected_rows("A+B", 1, 9, 9)
    assert (n_cand, len(kept)) == (81, 36)
    assert isinstance(build, TaskBuild)
    assert build.operand_range == (1, 9)
    assert build.n_candidates == 81 and build.n_dropped == 45 and build.n_sampled_out == 0
    assert _operands(build.dataset) == kept
    assert build.dataset["answer_value"] == [a + b for a, b in kept]
    assert build.summary() == ("A+B/calculate: 36 prompts, operands 1..9 (81 candidates, "
                               "45 dropped: answer not a single token)")
    _assert_rule(tok, build.dataset)


def test_digit_a_minus_b_keeps_45():
    tok = digit_tokenizer()
    build = build_task(tok, "A-B")
    n_cand, kept = _expected_rows("A-B", 1, 9, 9)
    assert len(kept) == 45 == n_cand
    assert (build.n_candidates, build.n_dropped, len(build.dataset)) == (45, 0, 45)
    assert _operands(build.dataset) == kept
    assert min(build.dataset["answer_value"]) == 0  # A == B gives 0, a valid answer
    _assert_rule(tok, build.dataset)


def test_number_tokenizer_keeps_all_9801_sums():
    tok = number_tokenizer()
    build = build_task(tok, "A+B")  # default range (1, 99) in multi mode
    assert build.operand_range == (1, 99)
    assert len(build.dataset) == 9801 == 99 * 99
    assert build.n_dropped == 0
    ds = build.dataset
    # The single-token check with the tokenizer itself, on a spread of rows.
    _assert_rule(tok, ds.select(range(0, 9801, 97)))
    row = ds[9800]
    assert (row["A"], row["B"], row["answer"], row["expression"]) == (99, 99, "198", "99+99")
    assert _ids(tok, row["prompt"])[0] == tok.bos_token_id  # BOS counted in n_tokens


@pytest.mark.parametrize("task", ["A+B+C", "A+B-C", "A-B+C", "A-B-C"])
def test_three_operand_counts(task):
    tok = digit_tokenizer()
    build = build_task(tok, task)
    n_cand, kept = _expected_rows(task, 1, 9, 9)
    assert build.n_candidates == n_cand
    assert build.n_dropped == n_cand - len(kept)
    assert _operands(build.dataset) == kept
    assert all(v >= 0 for v in build.dataset["answer_value"])
    assert build.dataset[0]["operators"] == task[1] + task[3]
    _assert_rule(tok, build.dataset)


def test_a_minus_b_minus_c_keeps_only_non_negative_results():
    build = build_task(digit_tokenizer(), "A-B-C")
    count = sum(1 for a in range(1, 10) for b in range(1, 10) for c in range(1, 10) if a - b - c >= 0)
    assert count == 120
    assert len(build.dataset) == count and build.n_candidates == count and build.n_dropped == 0
    row = build.dataset[-1]  # rows are in operand order
    assert (row["A"], row["B"], row["C"], row["answer_value"]) == (9, 8, 1, 0)
    assert row["expression"] == "9-8-1" and row["prompt"] == "Calculate: 9-8-1="
    assert max(build.dataset["answer_value"]) == 7  # 9-1-1


def test_three_operands_over_1_to_99_sampled():
    build = build_task(number_tokenizer(), "A+B+C", n_prompts=300, seed=1)
    assert build.n_candidates == 99 ** 3 and build.n_dropped == 0
    assert len(build.dataset) == 300 and build.n_sampled_out == 99 ** 3 - 300
    _assert_rule(number_tokenizer(), build.dataset)


# ------------------------------------------------------------------ styles and templates

@pytest.mark.parametrize("style", sorted(STYLES))
@pytest.mark.parametrize("task", ["A+B", "A-B"])
def test_every_style_builds_on_digit_tokenizer(task, style):
    tok = digit_tokenizer()
    build = build_task(tok, task, style=style)
    ds = build.dataset
    _, kept = _expected_rows(task, 1, 9, 9)
    assert _operands(ds) == kept
    template = template_for(task, style)
    assert set(ds["template"]) == {template} and set(ds["style"]) == {style}
    # Digits and spaces are separate tokens here, so no whitespace moves: prompt = template text,
    # after the BOS where the template starts with an operand (the sink must be one token).
    bos = "<s>" if style == "symbolic" else ""
    assert build.bos_prepended == (style == "symbolic")
    assert ds["prompt"] == [bos + template.format(A=a, B=b) for a, b in kept]
    assert len({ids[0] for ids in ds["input_ids"]}) == 1
    assert ds["answer"] == [str(v) for v in ds["answer_value"]]
    _assert_rule(tok, ds)


def test_style_texts():
    assert template_for("A+B", "calculate") == "Calculate: {A}+{B}="
    assert template_for("A+B", "words") == "The sum of {A} and {B} is "
    assert template_for("A-B", "instruction") == "If you subtract {B} from {A}, you will get "
    assert template_for("A+B-C", "code") == "a = {A}; b = {B}; c = {C}; print(a + b - c) # should print "
    assert template_for("A-B+C", "symbolic") == "{A}-{B}+{C}="
    assert set(TASKS) == {"A+B", "A-B", "A+B+C", "A+B-C", "A-B+C", "A-B-C"}
    assert {s for s in STYLES if "A+B+C" in STYLES[s]} == {"symbolic", "calculate", "code"}


def test_custom_template_and_subtract_order():
    tok = digit_tokenizer()
    build = build_task(tok, "A-B", template="Take {B} from {A}: ")
    row = build.dataset[0]
    assert row["style"] == "custom" and row["template"] == "Take {B} from {A}: "
    assert row["prompt"] == f"Take {row['B']} from {row['A']}: "
    assert row["answer_value"] == row["A"] - row["B"]
    assert build.summary().startswith("A-B/custom: 45 prompts")


@pytest.mark.parametrize("task,template,fragment", [
    ("A+B", "What is the sum?", "has no slots"),
    ("A+B", "{A} plus something = ", "lacks slot {B}"),
    ("A+B", "{A}+{B}+{D}=", "unknown slot {D}"),
    ("A+B", "{A}+{B}+{C}=", "slot {C} but task A+B has two operands"),
    ("A+B+C", "{A}+{B}=", "lacks slot {C}"),
    ("A+B", "{A}+{A}+{B}=", "slot {A} 2 times"),
    ("A+B", "{}+{B}=", "positional slot"),
    ("A+B", "{A:>3}+{B}=", "formatted slot"),
    ("A+B", "{A}+{B}={", "malformed"),
])
def test_template_validation(task, template, fragment):
    with pytest.raises(ValueError) as err:
        build_task(digit_tokenizer(), task, template=template)
    message = str(err.value)
    assert fragment in message and "expects" in message and "\n" not in message


def test_unknown_task_and_style():
    tok = digit_tokenizer()
    with pytest.raises(ValueError, match=r"unknown task 'A\*B'; valid tasks: A\+B, A-B, A\+B\+C"):
        build_task(tok, "A*B")
    with pytest.raises(ValueError, match=r"unknown style 'poem'; valid styles: symbolic, words"):
        build_task(tok, "A+B", style="poem")
    with pytest.raises(ValueError, match=r"style 'story' does not exist .* styles for it: "
                                         r"symbolic, code, calculate"):
        build_task(tok, "A+B+C", style="story")
    with pytest.raises(ValueError, match="operand_range"):
        build_task(tok, "A+B", operand_range=(5, 2))
    with pytest.raises(ValueError, match="n_prompts"):
        build_task(tok, "A+B", n_prompts=0)


def test_empty_after_filter_is_a_clear_error():
    # Every sum of operands 5..9 is >= 10: two digit tokens, so nothing single-token is left.
    with pytest.raises(ValueError) as err:
        build_task(digit_tokenizer(), "A+B", operand_range=(5, 9), answer_tokens="single")
    message = str(err.value)
    assert "no prompt whose answer is a single token" in message
    assert "25 candidates" in message and "all dropped" in message and "\n" not in message


# ------------------------------------------------------------------ the answer-token rule

def test_whitespace_moves_into_the_answer_for_gpt2_like_bpe():
    tok = gpt2_like_tokenizer()
    words = build_task(tok, "A+B", style="words").dataset
    _, kept = _expected_rows("A+B", 1, 9, 9)
    assert _operands(words) == kept  # " 10" is two tokens here: sums up to 9 survive
    row = words[0]
    assert row["prompt"] == "The sum of 1 and 1 is" and row["answer"] == " 2"
    assert tok.convert_ids_to_tokens(row["answer_token_id"]) == " 2"
    assert task_metadata(words)["n_whitespace_moved"] == len(words)
    _assert_rule(tok, words)
    # After "=" there is no whitespace to move: the bare digit is the answer.
    symbolic = build_task(tok, "A+B", style="symbolic").dataset
    assert symbolic[0]["prompt"] == "<s>1+1=" and symbolic[0]["answer"] == "2"
    _assert_rule(tok, symbolic)


def test_no_whitespace_move_where_space_is_its_own_token():
    tok = number_tokenizer()
    ds = build_task(tok, "A+B", style="words", operand_range=(1, 20)).dataset
    assert all(p.endswith("is ") for p in ds["prompt"])
    assert ds["answer"] == [str(v) for v in ds["answer_value"]]
    assert task_metadata(ds)["n_whitespace_moved"] == 0
    _assert_rule(tok, ds.select(range(0, len(ds), 7)))


def test_sampled_path_falls_back_when_a_representative_misleads():
    # "2+B+C=R" (A = 2) becomes one unknown pre-token: the answer is not a single token there,
    # although it is for A != 2 with the same C and result.
    tok = _wordlevel([], r"2\+\d\+\d=\d|.")
    expected = [ops for ops in _expected_rows("A+B+C", 1, 9, 9)[1] if ops[0] != 2]
    exact = build_task(tok, "A+B+C")
    sampled = build_task(tok, "A+B+C", n_prompts=80)
    for build in (exact, sampled):
        assert _operands(build.dataset) == expected
        assert build.n_dropped == 729 - len(expected)
        _assert_rule(tok, build.dataset)
    assert task_fingerprint(exact.dataset) == task_fingerprint(sampled.dataset)


@pytest.mark.parametrize("make", [digit_tokenizer, number_tokenizer, gpt2_like_tokenizer])
@pytest.mark.parametrize("style", ["words", "code", "calculate"])
def test_sampled_path_agrees_with_exact_path(make, style):
    tok = make()
    for task in ("A+B", "A-B+C"):
        rng = (1, 12)
        kwargs = dict(style=style, operand_range=rng)
        if task not in STYLES[style]:  # a three-operand task in a two-operand style
            kwargs["template"] = "The value of {A} minus {B} plus {C} is "
        exact = build_task(tok, task, **kwargs)
        fast = build_task(tok, task, n_prompts=10 ** 9, **kwargs)
        assert task_fingerprint(exact.dataset) == task_fingerprint(fast.dataset)
        assert (exact.n_dropped, fast.n_sampled_out) == (fast.n_dropped, 0)


# ------------------------------------------------------------------ sampling

def test_n_prompts_sampling_is_seeded_and_sorted():
    tok = number_tokenizer()
    a = build_task(tok, "A+B", n_prompts=50, seed=3)
    b = build_task(tok, "A+B", n_prompts=50, seed=3)
    c = build_task(tok, "A+B", n_prompts=50, seed=4)
    assert len(a.dataset) == 50 and a.n_sampled_out == 9801 - 50
    assert a.dataset.to_dict() == b.dataset.to_dict()
    assert task_fingerprint(a.dataset) == task_fingerprint(b.dataset)
    assert _operands(a.dataset) != _operands(c.dataset)
    assert task_fingerprint(a.dataset) != task_fingerprint(c.dataset)
    assert _operands(a.dataset) == sorted(_operands(a.dataset))
    full = set(_operands(build_task(tok, "A+B").dataset))
    assert set(_operands(a.dataset)) <= full
    assert "9751 sampled out by n_prompts" in a.summary()
    # Asking for more than exist keeps everything.
    everything = build_task(digit_tokenizer(), "A+B", n_prompts=1000)
    assert len(everything.dataset) == 36 and everything.n_sampled_out == 0


# ------------------------------------------------------------------ metadata, fingerprint, storage

def test_metadata_records_how_the_task_was_made():
    tok = digit_tokenizer()
    build = build_task(tok, "A-B", style="story", n_prompts=10, seed=7)
    meta = json.loads(build.dataset.info.description)
    assert meta == task_metadata(build.dataset)
    assert meta["task"] == "A-B" and meta["style"] == "story" and meta["seed"] == 7
    assert meta["template"] == template_for("A-B", "story")
    assert meta["operand_range"] == [1, 9] and meta["n_prompts"] == 10
    assert (meta["n_candidates"], meta["n_dropped"], meta["n_sampled_out"]) == (45, 0, 35)
    assert meta["tokenizer"]["vocab_size"] == len(tok)
    assert len(meta["tokenizer"]["sha256"]) == 64
    assert build.dataset.column_names == list(COLUMNS)


def test_fingerprint_survives_save_and_load(tmp_path):
    build = build_task(digit_tokenizer(), "A+B-C", n_prompts=100, seed=2)
    fp = task_fingerprint(build.dataset)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert build.fingerprint == fp
    save_task(build, tmp_path / "t")
    loaded = load_task(tmp_path / "t")
    assert task_fingerprint(loaded) == fp
    assert loaded.to_dict() == build.dataset.to_dict()
    assert task_metadata(loaded) == task_metadata(build.dataset)
    save_task(loaded, tmp_path / "again")  # a Dataset is accepted too
    assert task_fingerprint(load_task(tmp_path / "again")) == fp


def test_fingerprint_is_stable_across_processes(tmp_path):
    build = build_task(digit_tokenizer(), "A+B", style="question")
    save_task(build, tmp_path / "t")
    code = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "tests")!r}]
        from tasks import build_task, load_task, task_fingerprint
        from tiny import digit_tokenizer
        print(task_fingerprint(load_task({str(tmp_path / 't')!r})))
        print(task_fingerprint(build_task(digit_tokenizer(), "A+B", style="question").dataset))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=tmp_path)
    assert out.stdout.split() == [build.fingerprint, build.fingerprint]


def test_fingerprint_changes_with_content_and_tokenizer():
    tok = digit_tokenizer()
    ds = build_task(tok, "A+B").dataset
    fp = task_fingerprint(ds)
    # One answer id changed.
    changed = ds.map(lambda r, i: {"answer_token_id": r["answer_token_id"] + (i == 5)}, with_indices=True)
    assert task_fingerprint(changed) != fp
    # One prompt changed.
    edited = ds.map(lambda r, i: {"prompt": r["prompt"] + ("!" if i == 0 else "")}, with_indices=True)
    assert task_fingerprint(edited) != fp
    # A row fewer, rows reordered (an indices mapping, not a rewritten table).
    assert task_fingerprint(ds.select(range(len(ds) - 1))) != fp
    assert task_fingerprint(ds.select(list(reversed(range(len(ds)))))) != fp
    assert task_fingerprint(ds.select(range(len(ds)))) == fp
    # Same rows, another tokenizer: the vocabulary differs, so does the fingerprint.
    other = _wordlevel([], r".")
    assert [r["prompt"] for r in build_task(other, "A+B").dataset] == ds["prompt"]
    assert task_fingerprint(build_task(other, "A+B").dataset) != fp


def test_tokenizer_hash_ignores_padding_state():
    tok = digit_tokenizer()
    before = task_fingerprint(build_task(tok, "A+B").dataset)
    tok(["1+1=", "12+3="], padding=True)  # transformers switches the backend's padding on
    assert task_fingerprint(build_task(tok, "A+B").dataset) == before


def test_load_task_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no saved task at"):
        load_task(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no saved task at"):
        load_task(tmp_path / "empty")


# ------------------------------------------------------------------ the sink

def test_operand_first_template_gets_the_bos_as_sink():
    tok = digit_tokenizer()  # adds no BOS; its bos_token is "<s>"
    build = build_task(tok, "A-B", template="{A} minus {B} is ")
    ds = build.dataset
    assert build.bos_prepended and "BOS prepended as the sink" in build.summary()
    assert all(p.startswith("<s>") for p in ds["prompt"])
    assert {ids[0] for ids in ds["input_ids"]} == {tok.bos_token_id}
    # BOS + the prompt's own tokens, nothing merged across the boundary.
    assert all(ids[1:] == _ids(tok, p[len("<s>"):]) for ids, p in zip(ds["input_ids"], ds["prompt"]))
    assert task_metadata(ds)["sink"] == {"token_id": tok.bos_token_id, "token": "<s>",
                                         "bos_prepended": True, "prefix": "<s>"}
    _assert_rule(tok, ds)


def test_constant_first_word_and_automatic_bos_need_nothing():
    digits = build_task(digit_tokenizer(), "A+B", style="calculate")
    assert not digits.bos_prepended
    assert task_metadata(digits.dataset)["sink"]["token"] == "C"
    numbers = build_task(number_tokenizer(), "A+B", style="symbolic", operand_range=(1, 20))
    assert not numbers.bos_prepended and numbers.dataset[0]["prompt"] == "1+1="
    assert {ids[0] for ids in numbers.dataset["input_ids"]} == {number_tokenizer().bos_token_id}


def test_one_operand_value_is_a_constant_sink():
    ds = build_task(digit_tokenizer(), "A+B", style="symbolic", operand_range=(4, 4),
                    answer_tokens="single").dataset
    assert ds["prompt"] == ["4+4="]  # position 0 is the same token in every prompt


def test_no_bos_to_prepend_is_refused_with_the_fix():
    tok = PreTrainedTokenizerFast(tokenizer_object=_wordlevel([], r".").backend_tokenizer,
                                  pad_token="<pad>", unk_token="<unk>")
    assert tok.bos_token is None
    with pytest.raises(ValueError) as err:
        build_task(tok, "A+B", style="symbolic")
    message = str(err.value)
    assert "not the same token in every prompt" in message and "no BOS" in message
    assert "'Calculate: {A}+{B}='" in message and "\n" not in message


def test_bos_text_that_does_not_read_as_bos_is_refused():
    tok = digit_tokenizer()
    tok.bos_token = "<x>"  # not a special token: reads as '<', 'x', '>'
    with pytest.raises(ValueError, match="does not read the text '<x>' as its BOS token"):
        build_task(tok, "A+B", style="symbolic")


# ------------------------------------------------------------------ answers of several tokens

def test_explicit_range_on_digit_tokenizer_keeps_multi_token_answers():
    tok = digit_tokenizer()
    build = build_task(tok, "A+B", operand_range=(10, 99), n_prompts=300, seed=2)
    ds = build.dataset
    assert build.answer_tokens == "any" and build.n_candidates == 90 * 90
    assert build.n_dropped == 0 and len(ds) == 300
    # Sums 20..198: two digits below 100, three from 100 on; counted here with plain loops.
    expected = {2: 0, 3: 0}
    for a in range(10, 100):
        for b in range(10, 100):
            expected[len(str(a + b))] += 1
    exact = build_task(tok, "A+B", operand_range=(10, 99))
    assert task_metadata(exact.dataset)["n_answer_tokens"] == {str(k): v for k, v in expected.items()}
    assert build.summary().endswith("answers of 2-3 tokens")
    _assert_rule(tok, ds, single=False)
    assert all(len(ids) == len(str(v)) for ids, v in zip(ds["answer_token_ids"], ds["answer_value"]))
    # The default range keeps the spec's single-digit results, counting what it drops.
    assert build_task(tok, "A+B").answer_tokens == "single"
    # Where numbers are single tokens an explicit range changes nothing.
    assert build_task(number_tokenizer(), "A+B", operand_range=(10, 99)).answer_tokens == "single"


def test_multi_token_answers_with_moved_whitespace():
    tok = gpt2_like_tokenizer()  # " 15" -> " 1", "5"
    ds = build_task(tok, "A+B", style="words", operand_range=(5, 9)).dataset
    row = ds[-1]  # 9 + 9
    assert row["prompt"] == "The sum of 9 and 9 is" and row["answer"] == " 18"
    assert tok.convert_ids_to_tokens(row["answer_token_ids"]) == [" 1", "8"]
    _assert_rule(tok, ds, single=False)


@pytest.mark.parametrize("make,style", [(digit_tokenizer, "calculate"),
                                        (gpt2_like_tokenizer, "words"),
                                        (digit_tokenizer, "symbolic")])
def test_expanded_prefixes_are_valid_rows(make, style):
    tok = make()
    base = build_task(tok, "A+B", style=style, operand_range=(3, 60), n_prompts=40, seed=5).dataset
    ds = expand_answer_prefixes(base, tok)
    assert len(ds) == sum(len(ids) for ids in base["answer_token_ids"])
    _assert_rule(tok, ds, single=False)
    for row in ds:
        source = base[row["source_row"]]
        step = row["answer_step"]
        # The prompt is the source prompt plus the answer's first `step` tokens, as text and ids.
        assert row["prompt"] + row["answer"] == source["prompt"] + source["answer"]
        assert row["input_ids"] == source["input_ids"] + source["answer_token_ids"][:step]
        assert row["answer_token_id"] == source["answer_token_ids"][step]
    assert ds["source_row"] == sorted(ds["source_row"])
    assert task_metadata(ds)["expanded_from"] == task_fingerprint(base)


def test_expanding_single_token_answers_changes_nothing():
    tok = digit_tokenizer()
    base = build_task(tok, "A+B").dataset
    ds = expand_answer_prefixes(base, tok)
    assert ds["prompt"] == base["prompt"] and set(ds["answer_step"]) == {0}
    assert task_fingerprint(ds) == task_fingerprint(base)  # same prompts, same CAMA table


def test_answer_no_text_prefix_produces_is_refused():
    # "12" is one token only before "3" ("123" -> "12", "3"; "12" alone -> "1", "2").
    tok = _wordlevel(["12"], r"12(?=3)|.")
    base = build_task(tok, "A+B", template="Calculate: {A}+{B}=", operand_range=(61, 62),
                      answer_tokens="any").dataset
    assert "123" in base["answer"]
    with pytest.raises(ValueError, match="no prefix of its text tokenizes to its first 1"):
        expand_answer_prefixes(base, tok)
