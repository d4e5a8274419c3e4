"""Mental-math tasks: operator forms, input styles, and tokenizer-aware data set construction.

A task is an operator form (``"A+B"``, ``"A-B-C"``, ...) written out in an input style (a template
with ``{A}``, ``{B}`` and, for three operands, ``{C}`` slots). :func:`build_task` enumerates every
operand tuple in a range, keeps those with a non-negative result whose answer obeys the
answer-token rule of :mod:`tasks.tokens` (by default: is a single token), makes the sink one
token in every prompt (prepending BOS where needed), optionally samples a seeded subset, and
returns a :class:`datasets.Dataset` with a build record (see :mod:`tasks.store`).
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import datasets
import numpy as np

from .store import METADATA_FORMAT, make_dataset, task_fingerprint, tokenizer_identity
from .tokens import (Encoder, bos_prefix, check_answers, check_bos_first, encoder,
                     move_whitespace, sink_tokens)

if TYPE_CHECKING:  # transformers is only needed by callers; keep the import light
    from transformers import PreTrainedTokenizerBase

# --------------------------------------------------------------------------------------------
# Operator forms and input styles
# --------------------------------------------------------------------------------------------

# Task name -> its operators, in order. Results must be non-negative.
_OPERATORS: Mapping[str, str] = {
    "A+B": "+", "A-B": "-",
    "A+B+C": "++", "A+B-C": "+-", "A-B+C": "-+", "A-B-C": "--",
}
TASKS: tuple[str, ...] = tuple(_OPERATORS)

DEFAULT_STYLE = "calculate"

# Two-operand styles per operator. The first six are the paper's input-style table (``-`` written
# analogously); ``calculate`` is the toolkit's default: it starts with a fixed word, so on a
# tokenizer without BOS the sink (position 0) is a constant token rather than operand A.
_TWO_OPERAND_STYLES: dict[str, dict[str, str]] = {
    "symbolic": {"+": "{A}+{B}=", "-": "{A}-{B}="},
    "words": {"+": "The sum of {A} and {B} is ", "-": "The difference of {A} and {B} is "},
    "question": {"+": "What is the sum of {A} and {B}? Answer: ",
                 "-": "What is the difference of {A} and {B}? Answer: "},
    "instruction": {"+": "If you add {A} to {B}, you will get ",
                    "-": "If you subtract {B} from {A}, you will get "},
    "story": {"+": "John has {A} cookies. Jane has {B} cookies. Together they have ",
              "-": "John has {A} cookies. He gives {B} cookies to Jane. Now John has "},
    "code": {"+": "a = {A}; b = {B}; print(a + b) # should print ",
             "-": "a = {A}; b = {B}; print(a - b) # should print "},
    "calculate": {"+": "Calculate: {A}+{B}=", "-": "Calculate: {A}-{B}="},
}


def _three_operand_templates(ops: str) -> dict[str, str]:
    o1, o2 = ops
    return {
        "symbolic": f"{{A}}{o1}{{B}}{o2}{{C}}=",
        "calculate": f"Calculate: {{A}}{o1}{{B}}{o2}{{C}}=",
        "code": f"a = {{A}}; b = {{B}}; c = {{C}}; print(a {o1} b {o2} c) # should print ",
    }


def _style_table() -> Mapping[str, Mapping[str, str]]:
    table: dict[str, dict[str, str]] = {name: {} for name in _TWO_OPERAND_STYLES}
    for task, ops in _OPERATORS.items():
        if len(ops) == 1:
            for name, by_op in _TWO_OPERAND_STYLES.items():
                table[name][task] = by_op[ops]
        else:
            for name, template in _three_operand_templates(ops).items():
                table[name][task] = template
    return MappingProxyType({name: MappingProxyType(t) for name, t in table.items()})


#: Style name -> {task name -> template}. Every style covers ``A+B`` and ``A-B``; three-operand
#: tasks exist in ``symbolic``, ``calculate`` and ``code`` only.
STYLES: Mapping[str, Mapping[str, str]] = _style_table()


def _check_task(task: str) -> str:
    if task not in _OPERATORS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    return task


def template_for(task: str, style: str) -> str:
    """The built-in template of ``task`` in ``style`` (e.g. ``"Calculate: {A}+{B}="``)."""
    _check_task(task)
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; valid styles: {', '.join(STYLES)}")
    if task not in STYLES[style]:
        available = [name for name, table in STYLES.items() if task in table]
        raise ValueError(f"style {style!r} does not exist for the three-operand task {task!r}; "
                         f"styles for it: {', '.join(available)}")
    return STYLES[style][task]


def _slots_of(task: str) -> tuple[str, ...]:
    return ("A", "B", "C")[: len(_OPERATORS[task]) + 1]


def _validate_template(template: Any, task: str) -> list[str]:
    """Check that ``template`` has exactly the slots ``task`` needs, each once.

    Returns the slot names in the order they appear in the text.
    """
    slots = _slots_of(task)
    expected = f"task {task} expects " + ", ".join("{" + s + "}" for s in slots) + " each exactly once"
    if not isinstance(template, str) or not template:
        raise ValueError(f"template must be a non-empty string; {expected}")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:  # unbalanced braces; literal braces are written {{ and }}
        raise ValueError(f"template {template!r} is malformed ({err}); {expected}, "
                         f"literal braces as {{{{ and }}}}") from None
    found: list[str] = []
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if field == "" or field.isdigit():
            raise ValueError(f"template {template!r} has a positional slot {{{field}}}; {expected}")
        if spec or conversion:
            raise ValueError(f"template {template!r} has a formatted slot {{{field}...}}; "
                             f"write plain {{{field}}}; {expected}")
        if field not in slots:
            if field == "C":
                raise ValueError(f"template {template!r} has slot {{C}} but task {task} has two "
                                 f"operands; {expected}")
            raise ValueError(f"template {template!r} has unknown slot {{{field}}}; {expected}")
        found.append(field)
    if not found:
        raise ValueError(f"template {template!r} has no slots; {expected}")
    for slot in slots:
        count = found.count(slot)
        if count == 0:
            raise ValueError(f"template {template!r} lacks slot {{{slot}}}; {expected}")
        if count > 1:
            raise ValueError(f"template {template!r} has slot {{{slot}}} {count} times; {expected}")
    return found


# --------------------------------------------------------------------------------------------
# Operand ranges by tokenizer
# --------------------------------------------------------------------------------------------


# The answer contexts in which a number must be one token to count as a single-token number.
_NUMBER_CONTEXTS = ("Calculate: 1+1=", "The sum of 1 and 1 is ")


def single_token_numbers(tokenizer: "PreTrainedTokenizerBase") -> int:
    """The largest ``n`` (at most 999) such that every integer ``0..n`` is a single answer token
    for ``tokenizer``; ``-1`` when ``0`` is not.

    Checked with the answer-token rule (:mod:`tasks.tokens`) in two answer contexts: after
    ``"Calculate: 1+1="`` and after ``"The sum of 1 and 1 is "`` (where a BPE tokenizer like
    GPT-2's reads the space and the number as one token); a number counts only when both hold.
    """
    prompts = [c for c in _NUMBER_CONTEXTS for _ in range(1000)]
    answers = [str(n) for _ in _NUMBER_CONTEXTS for n in range(1000)]
    check = check_answers(encoder(tokenizer), prompts, answers, max_answer_tokens=1)
    single = check.ok.reshape(len(_NUMBER_CONTEXTS), 1000).all(axis=0)
    return 999 if single.all() else int(np.argmin(single)) - 1


def number_mode(tokenizer: "PreTrainedTokenizerBase") -> str:
    """How ``tokenizer`` writes numbers, from :func:`single_token_numbers`:

    * ``"multi"``: every integer 0..999 is one token (Llama-3's tokenizer splits digit runs into
      chunks of up to three, each in its vocabulary);
    * ``"partial"``: every integer 0..99 is one token, but not every one up to 999 (BPE
      vocabularies learnt on text, such as GPT-2's, which GPT-J uses, and GPT-NeoX's, which
      Pythia uses: frequent numbers merge, others split irregularly);
    * ``"digits"``: anything less (SmolLM2, Qwen2, Gemma and Mistral split numbers into digits).
    """
    limit = single_token_numbers(tokenizer)
    return "multi" if limit >= 999 else "partial" if limit >= 99 else "digits"


def default_operand_range(tokenizer: "PreTrainedTokenizerBase") -> tuple[int, int]:
    """The spec's operand range for a tokenizer: (1, 99) where every number up to 99 is one token
    (``"multi"`` and ``"partial"`` modes of :func:`number_mode`), else (1, 9).

    The result side of the rule (single-token results) is enforced by :func:`build_task`'s filter:
    in ``"partial"`` mode it drops the sums whose result splits, and the build says how many.
    """
    return _mode_range(number_mode(tokenizer))


def _mode_range(mode: str) -> tuple[int, int]:
    return (1, 9) if mode == "digits" else (1, 99)


# --------------------------------------------------------------------------------------------
# Building a task
# --------------------------------------------------------------------------------------------

_MAX_CANDIDATES = 50_000_000  # ~1.2 GB of int64 operands: beyond that a range is a mistake
ANSWER_TOKENS = ("single", "any")


@dataclass(frozen=True, eq=False)
class TaskBuild:
    """The result of :func:`build_task`: the data set and what filtering did to the candidates.

    Attributes:
        dataset: the prompts (columns in :data:`tasks.store.COLUMNS`).
        n_candidates: operand tuples in range with a non-negative result.
        n_dropped: candidates whose answer breaks the answer-token rule (with
            ``answer_tokens="single"``: whose answer is not a single token).
        n_sampled_out: kept prompts left out by ``n_prompts`` sampling.
        operand_range: inclusive (lo, hi) the operands were drawn from (``None`` for tasks
            that have none: :mod:`tasks.records`).
        task, style, template: what was built (``style`` is ``"custom"`` for a user template;
            ``template`` is ``None`` for a data set of several templates or none).
        answer_tokens: ``"single"`` (only single-token answers kept) or ``"any"``.
        bos_prepended: the tokenizer's BOS text was put before every prompt so that the sink is
            one token (see :func:`tasks.tokens.bos_prefix`).
    """

    dataset: datasets.Dataset
    n_candidates: int
    n_dropped: int
    n_sampled_out: int
    operand_range: tuple[int, int] | None
    task: str
    style: str
    template: str | None
    answer_tokens: str = "single"
    bos_prepended: bool = False

    @property
    def n_prompts(self) -> int:
        return len(self.dataset)

    @property
    def fingerprint(self) -> str:
        return task_fingerprint(self.dataset)

    def summary(self) -> str:
        """One line, e.g. ``A+B/calculate: 36 prompts (81 candidates, 45 dropped: ...)``."""
        why = ("answer not a single token" if self.answer_tokens == "single"
               else "answer does not tokenize apart from the prompt")
        text = f"{self.task}/{self.style}: {self.n_prompts} prompts"
        if self.operand_range is not None:
            text += ", operands {}..{}".format(*self.operand_range)
        text += f" ({self.n_candidates} candidates, {self.n_dropped} dropped: {why}"
        if self.n_sampled_out:
            text += f", {self.n_sampled_out} sampled out by n_prompts"
        text += ")"
        if self.answer_tokens == "any":
            sizes = sorted({len(ids) for ids in self.dataset["answer_token_ids"]})
            text += (f"; answers of {sizes[0]} token" + ("s" if sizes[-1] > 1 else "")
                     if len(sizes) == 1 else f"; answers of {sizes[0]}-{sizes[-1]} tokens")
        if self.bos_prepended:
            text += "; BOS prepended as the sink"
        return text


def _check_range(operand_range: Any) -> tuple[int, int]:
    try:
        lo, hi = operand_range
    except (TypeError, ValueError):
        raise ValueError(f"operand_range must be a pair (lo, hi), got {operand_range!r}") from None
    for v in (lo, hi):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"operand_range must hold integers, got {operand_range!r}")
    lo, hi = int(lo), int(hi)
    if not 0 <= lo <= hi:
        raise ValueError(f"operand_range must satisfy 0 <= lo <= hi, got ({lo}, {hi})")
    return lo, hi


def _enumerate(ops: str, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """All operand tuples in [lo, hi]^k (lexicographic) with a non-negative result, and results."""
    k = len(ops) + 1
    if (hi - lo + 1) ** k > _MAX_CANDIDATES:
        raise ValueError(f"operand_range ({lo}, {hi}) gives {(hi - lo + 1) ** k} tuples for a "
                         f"{k}-operand task; at most {_MAX_CANDIDATES} are supported")
    values = np.arange(lo, hi + 1, dtype=np.int64)
    grid = np.stack(np.meshgrid(*([values] * k), indexing="ij"), axis=-1).reshape(-1, k)
    result = grid[:, 0].copy()
    for j, op in enumerate(ops, start=1):
        result += grid[:, j] if op == "+" else -grid[:, j]
    keep = result >= 0
    return grid[keep], result[keep]


def _format_prompts(template: str, operands: np.ndarray) -> list[str]:
    names = ("A", "B", "C")[: operands.shape[1]]
    return [template.format(**dict(zip(names, row))) for row in operands.tolist()]


def _final_texts(template: str, operands: np.ndarray, results: np.ndarray,
                 moved: np.ndarray) -> list[tuple[str, str]]:
    """``(prompt, answer)`` of each row as the model reads it (whitespace moved where needed)."""
    return [move_whitespace(p, str(r), m) for p, r, m in
            zip(_format_prompts(template, operands), results.tolist(), moved.tolist())]


def sample_rows(n_kept: int, n_prompts: int | None, seed: int) -> np.ndarray:
    """Indices of the kept rows to use: all, or a seeded sample (``numpy`` ``default_rng(seed)``)
    kept in their original order."""
    if n_prompts is None or n_prompts >= n_kept:
        return np.arange(n_kept)
    chosen = np.random.default_rng(seed).choice(n_kept, size=n_prompts, replace=False)
    return np.sort(chosen)  # for arithmetic, enumeration order is lexicographic in the operands


@dataclass(frozen=True)
class _Selection:
    """The rows chosen from the candidates.

    ``n_ok`` candidates obey the answer-token rule; ``chosen`` are the rows' candidate indices
    (operand order); ``moved``, ``prompt_ids`` and ``answer_ids`` are per row.
    """

    n_ok: int
    chosen: np.ndarray
    moved: np.ndarray
    prompt_ids: list[list[int]]
    answer_ids: list[tuple[int, ...]]


def _select_exact(encode: Encoder, template: str, operands: np.ndarray, results: np.ndarray,
                  n_prompts: int | None, seed: int, max_answer_tokens: int | None) -> _Selection:
    """Apply the answer rule to every candidate; then sample."""
    check = check_answers(encode, _format_prompts(template, operands),
                          [str(r) for r in results.tolist()], max_answer_tokens)
    kept = np.flatnonzero(check.ok)
    chosen = kept[sample_rows(len(kept), n_prompts, seed)]
    return _Selection(len(kept), chosen, check.moved[chosen],
                      [check.prompt_ids[i] for i in chosen], [check.answer_ids[i] for i in chosen])


def _select_sampled(encode: Encoder, template: str, slot_order: Sequence[str], operands: np.ndarray,
                    results: np.ndarray, n_prompts: int, seed: int,
                    max_answer_tokens: int | None) -> _Selection:
    """Like :func:`_select_exact`, without tokenizing every candidate when only a sample is wanted.

    The rule is applied to one representative per (value of the template's last slot, result):
    the text right before the answer, the only text the answer's tokenization can touch for a
    tokenizer that pre-splits text. The sampled prompts are then checked exactly; if any disagrees
    with its representative, everything is redone by :func:`_select_exact`.
    """
    last = "ABC".index(slot_order[-1])
    key = operands[:, last] * (int(results.max()) + 1) + results
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    reps = check_answers(encode, _format_prompts(template, operands[first]),
                         [str(r) for r in results[first].tolist()], max_answer_tokens)
    kept = np.flatnonzero(reps.ok[inverse])
    chosen = kept[sample_rows(len(kept), n_prompts, seed)]
    moved = reps.moved[inverse[chosen]]
    expected = [reps.answer_ids[j] for j in inverse[chosen]]
    final = _final_texts(template, operands[chosen], results[chosen], moved)
    check = check_answers(encode, [p for p, _ in final], [a for _, a in final], max_answer_tokens)
    if check.ok.all() and not check.moved.any() and check.answer_ids == expected:
        return _Selection(len(kept), chosen, moved, check.prompt_ids, check.answer_ids)
    return _select_exact(encode, template, operands, results, n_prompts, seed, max_answer_tokens)


def _how_it_splits(tokenizer: "PreTrainedTokenizerBase", template: str, operands: np.ndarray,
                   result: int) -> str:
    """Why a candidate fails the answer-token rule, for an error message: the tokens of its
    prompt's end and of the prompt with its answer."""
    (prompt,) = _format_prompts(template, operands[None, :])
    tokens = [tokenizer.convert_ids_to_tokens(ids)[-4:] for ids in
              tokenizer([prompt, prompt + str(result)], add_special_tokens=True)["input_ids"]]
    return (f"e.g. the prompt {prompt!r} ends in the tokens {tokens[0]}, and with its answer "
            f"{str(result)!r} in {tokens[1]}")


def _refuse_unknown_answers(tokenizer: "PreTrainedTokenizerBase", template: str,
                            operands: np.ndarray, results: np.ndarray,
                            selection: _Selection) -> None:
    """Refuse a data set in which an answer reads as the tokenizer's unknown token: it obeys
    the answer-token rule, but every such answer is the same token, and scoring means nothing."""
    unk = getattr(tokenizer, "unk_token_id", None)
    bad = [i for i, ids in enumerate(selection.answer_ids) if unk is not None and unk in ids]
    if bad:
        row = selection.chosen[bad[0]]
        (prompt,) = _format_prompts(template, operands[row][None, :])
        raise ValueError(f"the tokenizer reads the answer {str(results[row])!r} of {prompt!r} as "
                         f"its unknown token {tokenizer.unk_token!r} ({len(bad)} of "
                         f"{len(selection.chosen)} prompts): its vocabulary cannot write this "
                         f"task's numbers")


def build_task(
    tokenizer: "PreTrainedTokenizerBase",
    task: str = "A+B",
    style: str = DEFAULT_STYLE,
    template: str | None = None,
    n_prompts: int | None = None,
    seed: int = 0,
    operand_range: tuple[int, int] | None = None,
    answer_tokens: str | None = None,
) -> TaskBuild:
    """Build the prompts of ``task`` for ``tokenizer``.

    Args:
        tokenizer: a Hugging Face tokenizer (fast tokenizers are much quicker).
        task: the operator form, one of :data:`TASKS`.
        style: a name in :data:`STYLES` (ignored when ``template`` is given).
        template: a custom template with ``{A}``, ``{B}`` (and ``{C}`` for three-operand tasks)
            slots, each exactly once; the arithmetic still comes from ``task``. Style ``"custom"``.
        n_prompts: keep at most this many prompts, a seeded random sample (``numpy``
            ``default_rng(seed)``) kept in operand order; ``None`` keeps all.
        seed: seed of that sample.
        operand_range: inclusive ``(lo, hi)`` for every operand; default
            :func:`default_operand_range` of the tokenizer.
        answer_tokens: ``"single"`` keeps only answers of one token; ``"any"`` keeps answers of
            several tokens too (scored on their first token, or every token by
            :func:`tasks.answers.expand_answer_prefixes`). Default: ``"any"`` when
            ``operand_range`` is given and the tokenizer splits numbers into digits, else
            ``"single"`` (the spec's single-digit default; where numbers are single tokens
            nothing changes).

    Candidates are all operand tuples in range whose result is non-negative. Each is kept when
    its answer obeys the answer-token rule of :mod:`tasks.tokens` (with ``"single"``: when its
    answer is one token); the others are dropped and counted.

    **Sink.** If position 0 is not the same token in every kept prompt (``{A}+{B}=`` on a
    tokenizer that adds no BOS), the tokenizer's BOS text is put before every prompt (the
    ``prompt`` and ``input_ids`` columns include it; the build record says so); a tokenizer
    without BOS makes this a :class:`ValueError` naming the fix.

    Without ``n_prompts`` every candidate is tokenized and checked (about 20k prompts/s on two
    CPU cores: a full three-operand build over 1..99, ~970k prompts, takes under a minute). With
    ``n_prompts`` the rule is first applied once per (value of the template's last slot, result),
    the text that touches the answer, and only the sampled prompts are then checked in full; should
    one disagree with its representative, every candidate is checked instead. Either way each row
    of the data set obeys the rule exactly. (Only a tokenizer whose split at the answer depends on
    text before the last operand could make the sampled path drop a candidate that the exact path
    keeps; no pre-splitting tokenizer does.)

    Returns:
        A :class:`TaskBuild`. The data set's ``info.description`` holds a JSON build record
        (parameters, counts, sink, tokenizer identity); see :func:`tasks.store.task_metadata`.

    Raises:
        ValueError: unknown task or style, a bad template or range, no prompt left, or a sink
        that cannot be made constant.
    """
    _check_task(task)
    ops = _OPERATORS[task]
    if template is None:
        style_name, template = style, template_for(task, style)
    else:
        style_name = "custom"
    slot_order = _validate_template(template, task)
    if n_prompts is not None and (isinstance(n_prompts, bool) or not isinstance(n_prompts, (int, np.integer))
                                  or n_prompts < 1):
        raise ValueError(f"n_prompts must be a positive integer or None, got {n_prompts!r}")
    range_given = operand_range is not None
    mode = number_mode(tokenizer)
    lo, hi = _check_range(operand_range if range_given else _mode_range(mode))
    if answer_tokens is None:
        answer_tokens = "any" if range_given and mode == "digits" else "single"
    elif answer_tokens not in ANSWER_TOKENS:
        raise ValueError(f"answer_tokens must be one of {', '.join(ANSWER_TOKENS)}, got "
                         f"{answer_tokens!r}")
    max_answer_tokens = 1 if answer_tokens == "single" else None

    operands, results = _enumerate(ops, lo, hi)
    n_candidates = len(results)
    if n_candidates == 0:
        raise ValueError(f"task {task} has no operands in {lo}..{hi} with a non-negative result")
    encode = encoder(tokenizer)

    def select(text: str) -> _Selection:
        if n_prompts is None:
            return _select_exact(encode, text, operands, results, None, seed, max_answer_tokens)
        return _select_sampled(encode, text, slot_order, operands, results, n_prompts, seed,
                               max_answer_tokens)

    selection = select(template)
    prefix = ""  # text before the template in every prompt: the BOS where the sink needs it
    if len(sink_tokens(selection.prompt_ids)) > 1:
        prefix = bos_prefix(tokenizer, template)
    run_template = prefix.replace("{", "{{").replace("}", "}}") + template
    if prefix:
        selection = select(run_template)
    if selection.n_ok == 0:
        what = "is a single token" if answer_tokens == "single" else "tokenizes apart from it"
        example = _how_it_splits(tokenizer, run_template, operands[0], results[0])
        raise ValueError(f"task {task} with template {template!r} has no prompt whose answer "
                         f"{what} for this tokenizer ({n_candidates} candidates with operands "
                         f"in {lo}..{hi}, all dropped; {example})")
    if prefix:
        check_bos_first(selection.prompt_ids, tokenizer)
    _refuse_unknown_answers(tokenizer, run_template, operands, results, selection)
    bos_prepended = bool(prefix)
    chosen = selection.chosen
    final = _final_texts(run_template, operands[chosen], results[chosen], selection.moved)

    rows = operands[chosen]
    n = len(chosen)
    c_column = rows[:, 2] if rows.shape[1] == 3 else np.full(n, -1, dtype=np.int64)
    expression_format = "".join("{" + ch + "}" if ch in "ABC" else ch for ch in task)
    n_dropped = n_candidates - selection.n_ok
    n_sampled_out = selection.n_ok - n
    sink_id = selection.prompt_ids[0][0]
    answer_sizes = [len(ids) for ids in selection.answer_ids]
    record = {
        "format": METADATA_FORMAT,
        "task": task,
        "style": style_name,
        "template": template,
        "operators": ops,
        "operand_range": [lo, hi],
        "operand_range_source": "given" if range_given else "default_operand_range",
        "number_mode": mode,
        "n_prompts": None if n_prompts is None else int(n_prompts),
        "seed": int(seed),
        "n_candidates": int(n_candidates),
        "n_dropped": int(n_dropped),
        "n_sampled_out": int(n_sampled_out),
        "n_rows": int(n),
        "n_whitespace_moved": int(selection.moved.sum()),
        "answer_tokens": answer_tokens,
        "n_answer_tokens": {str(k): answer_sizes.count(k) for k in sorted(set(answer_sizes))},
        "answer_rule": "tokenize(prompt+answer) == tokenize(prompt)+answer_token_ids, "
                       "add_special_tokens=True, " + ("one answer token; " if max_answer_tokens
                                                      else "one or more answer tokens; ")
                       + "trailing prompt whitespace moved into the answer when only that makes "
                         "the rule hold",
        "sink": {"token_id": int(sink_id), "token": tokenizer.convert_ids_to_tokens(int(sink_id)),
                 "bos_prepended": bos_prepended, "prefix": prefix},
        "tokenizer": tokenizer_identity(tokenizer),
    }
    columns = {
        "prompt": [p for p, _ in final],
        "answer": [a for _, a in final],
        "answer_value": results[chosen],
        "answer_token_id": np.array([ids[0] for ids in selection.answer_ids], dtype=np.int64),
        "answer_token_ids": [list(ids) for ids in selection.answer_ids],
        "A": rows[:, 0],
        "B": rows[:, 1],
        "C": c_column,
        "operators": [ops] * n,
        "expression": [expression_format.format(A=a, B=b, C=c)
                       for a, b, c in zip(rows[:, 0].tolist(), rows[:, 1].tolist(), c_column.tolist())],
        "task": [task] * n,
        "style": [style_name] * n,
        "template": [template] * n,
        "n_tokens": np.array([len(ids) for ids in selection.prompt_ids], dtype=np.int64),
        "input_ids": selection.prompt_ids,
    }
    dataset = make_dataset(columns, record)
    return TaskBuild(dataset=dataset, n_candidates=int(n_candidates), n_dropped=int(n_dropped),
                     n_sampled_out=int(n_sampled_out), operand_range=(lo, hi), task=task,
                     style=style_name, template=template, answer_tokens=answer_tokens,
                     bos_prepended=bos_prepended)
