"""Mental-math tasks: operator forms, input styles, and tokenizer-aware data set construction.

A task is an operator form (``"A+B"``, ``"A-B-C"``, ...) written out in an input style (a template
with ``{A}``, ``{B}`` and, for three operands, ``{C}`` slots). :func:`build_task` enumerates every
operand tuple in a range, keeps those with a non-negative result whose answer is a single token
for the given tokenizer (the spec's scoring needs one answer token), optionally samples a seeded
subset, and returns a :class:`datasets.Dataset` with a build record (see :mod:`tasks.store`).
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import datasets
import numpy as np
import pyarrow as pa
from datasets.table import InMemoryTable

from .store import FEATURES, METADATA_FORMAT, task_fingerprint, tokenizer_identity

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
# Tokenization and the answer-token rule
# --------------------------------------------------------------------------------------------

Encoder = Callable[[Sequence[str]], list[list[int]]]


def _encoder(tokenizer: "PreTrainedTokenizerBase") -> Encoder:
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
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
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
class _AnswerCheck:
    ok: np.ndarray  # bool: the answer is one token after the (possibly stripped) prompt
    moved: np.ndarray  # bool: trailing whitespace moved from the prompt into the answer
    token_id: np.ndarray  # int64, -1 where not ok
    n_tokens: np.ndarray  # int64: token length of the final prompt, -1 where not ok


def _check_answers(encode: Encoder, prompts: Sequence[str], answers: Sequence[str]) -> _AnswerCheck:
    """Apply the answer-token rule (see :func:`build_task`) to each (prompt, answer) pair."""
    n = len(prompts)
    ok = np.zeros(n, dtype=bool)
    moved = np.zeros(n, dtype=bool)
    token_id = np.full(n, -1, dtype=np.int64)
    n_tokens = np.full(n, -1, dtype=np.int64)
    full = encode([p + a for p, a in zip(prompts, answers)])
    plain = encode(prompts)
    retry: list[int] = []
    for i, (f, p) in enumerate(zip(full, plain)):
        if len(f) == len(p) + 1 and f[:-1] == p:
            ok[i], token_id[i], n_tokens[i] = True, f[-1], len(p)
        elif prompts[i] != prompts[i].rstrip():
            retry.append(i)
    if retry:
        # BPE tokenizers like GPT-2's merge the space into the number ("is 7" -> "is", " 7"): the
        # text the model sees is the same; only where the prompt ends changes.
        stripped = encode([prompts[i].rstrip() for i in retry])
        for i, p in zip(retry, stripped):
            f = full[i]
            if len(f) == len(p) + 1 and f[:-1] == p:
                ok[i], moved[i], token_id[i], n_tokens[i] = True, True, f[-1], len(p)
    return _AnswerCheck(ok, moved, token_id, n_tokens)


def _move_whitespace(prompt: str, answer: str, moved: bool) -> tuple[str, str]:
    if not moved:
        return prompt, answer
    body = prompt.rstrip()
    return body, prompt[len(body):] + answer


def number_mode(tokenizer: "PreTrainedTokenizerBase") -> str:
    """``"multi"`` if every integer 0..999 is a single answer token for ``tokenizer``, else ``"digits"``.

    Checked with the answer-token rule of :func:`build_task` in two answer contexts: after
    ``"Calculate: 1+1="`` and after ``"The sum of 1 and 1 is "``; both must hold for every number.
    """
    encode = _encoder(tokenizer)
    contexts = ("Calculate: 1+1=", "The sum of 1 and 1 is ")
    prompts = [c for c in contexts for _ in range(1000)]
    answers = [str(n) for _ in contexts for n in range(1000)]
    return "multi" if _check_answers(encode, prompts, answers).ok.all() else "digits"


def default_operand_range(tokenizer: "PreTrainedTokenizerBase") -> tuple[int, int]:
    """The spec's operand range for a tokenizer: (1, 99) in ``"multi"`` mode, (1, 9) in ``"digits"``.

    The result side of the rule (single-token results) is enforced by :func:`build_task`'s filter.
    """
    return (1, 99) if number_mode(tokenizer) == "multi" else (1, 9)


# --------------------------------------------------------------------------------------------
# Building a task
# --------------------------------------------------------------------------------------------

_MAX_CANDIDATES = 50_000_000  # ~1.2 GB of int64 operands: beyond that a range is a mistake


@dataclass(frozen=True, eq=False)
class TaskBuild:
    """The result of :func:`build_task`: the data set and what filtering did to the candidates.

    Attributes:
        dataset: the prompts (columns in :data:`tasks.store.COLUMNS`).
        n_candidates: operand tuples in range with a non-negative result.
        n_dropped: candidates whose answer is not a single token for the tokenizer.
        n_sampled_out: kept prompts left out by ``n_prompts`` sampling.
        operand_range: inclusive (lo, hi) the operands were drawn from.
        task, style, template: what was built (``style`` is ``"custom"`` for a user template).
    """

    dataset: datasets.Dataset
    n_candidates: int
    n_dropped: int
    n_sampled_out: int
    operand_range: tuple[int, int]
    task: str
    style: str
    template: str

    @property
    def n_prompts(self) -> int:
        return len(self.dataset)

    @property
    def fingerprint(self) -> str:
        return task_fingerprint(self.dataset)

    def summary(self) -> str:
        """One line, e.g. ``A+B/calculate: 36 prompts (81 candidates, 45 dropped: ...)``."""
        lo, hi = self.operand_range
        text = (f"{self.task}/{self.style}: {self.n_prompts} prompts, operands {lo}..{hi} "
                f"({self.n_candidates} candidates, {self.n_dropped} dropped: answer not a single token")
        if self.n_sampled_out:
            text += f", {self.n_sampled_out} sampled out by n_prompts"
        return text + ")"


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


def _sample(n_kept: int, n_prompts: int | None, seed: int) -> np.ndarray:
    """Indices of the kept rows to use: all, or a seeded sample kept in enumeration order."""
    if n_prompts is None or n_prompts >= n_kept:
        return np.arange(n_kept)
    chosen = np.random.default_rng(seed).choice(n_kept, size=n_prompts, replace=False)
    return np.sort(chosen)  # enumeration order is lexicographic in the operands



_Selection = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _select_exact(encode: Encoder, template: str, operands: np.ndarray, results: np.ndarray,
                  n_prompts: int | None, seed: int) -> _Selection:
    """Apply the answer rule to every candidate; then sample.

    Returns per-candidate ``ok``, ``moved``, ``token_id``, the chosen candidate indices, and the
    token lengths of the chosen (final) prompts.
    """
    check = _check_answers(encode, _format_prompts(template, operands),
                           [str(r) for r in results.tolist()])
    kept = np.flatnonzero(check.ok)
    chosen = kept[_sample(len(kept), n_prompts, seed)]
    return check.ok, check.moved, check.token_id, chosen, check.n_tokens[chosen]


def _select_sampled(encode: Encoder, template: str, slot_order: Sequence[str], operands: np.ndarray,
                    results: np.ndarray, n_prompts: int, seed: int) -> _Selection:
    """Like :func:`_select_exact`, without tokenizing every candidate when only a sample is wanted.

    The rule is applied to one representative per (value of the template's last slot, result):
    the text right before the answer, the only text the answer's tokenization can touch for a
    tokenizer that pre-splits text. The sampled prompts are then checked exactly; if any disagrees
    with its representative, everything is redone by :func:`_select_exact`.
    """
    last = "ABC".index(slot_order[-1])
    key = operands[:, last] * (int(results.max()) + 1) + results
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    reps = _check_answers(encode, _format_prompts(template, operands[first]),
                          [str(r) for r in results[first].tolist()])
    ok, moved, token_id = reps.ok[inverse], reps.moved[inverse], reps.token_id[inverse]
    kept = np.flatnonzero(ok)
    chosen = kept[_sample(len(kept), n_prompts, seed)]
    final = [_move_whitespace(p, str(r), m) for p, r, m in
             zip(_format_prompts(template, operands[chosen]), results[chosen].tolist(),
                 moved[chosen].tolist())]
    check = _check_answers(encode, [p for p, _ in final], [a for _, a in final])
    if check.ok.all() and not check.moved.any() and np.array_equal(check.token_id, token_id[chosen]):
        return ok, moved, token_id, chosen, check.n_tokens
    return _select_exact(encode, template, operands, results, n_prompts, seed)


def build_task(
    tokenizer: "PreTrainedTokenizerBase",
    task: str = "A+B",
    style: str = DEFAULT_STYLE,
    template: str | None = None,
    n_prompts: int | None = None,
    seed: int = 0,
    operand_range: tuple[int, int] | None = None,
) -> TaskBuild:
    """Build the prompts of ``task`` for ``tokenizer``, keeping only single-token answers.

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

    Candidates are all operand tuples in range whose result is non-negative.

    **Answer-token rule.** The answer token is what the tokenizer produces for the answer when it
    follows the prompt: with ``add_special_tokens=True`` throughout (a BOS is part of both),
    ``tokenize(prompt + answer)`` must equal ``tokenize(prompt) + [one token]``. If that fails and
    the prompt ends with whitespace, the whitespace is moved into the answer (``prompt.rstrip()``,
    answer ``" 7"``) and the test is repeated: BPE tokenizers like GPT-2's and Pythia's write
    ``"is 7"`` as ``["is", " 7"]``; the model sees the same text, only the prompt's end moves.
    Otherwise the candidate is dropped (its answer is not a single token), and counted.

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
        (parameters, counts, tokenizer identity); see :func:`tasks.store.task_metadata`.

    Raises:
        ValueError: unknown task or style, a bad template or range, or no prompt left.
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
    lo, hi = _check_range(operand_range if range_given else default_operand_range(tokenizer))

    operands, results = _enumerate(ops, lo, hi)
    n_candidates = len(results)
    if n_candidates == 0:
        raise ValueError(f"task {task} has no operands in {lo}..{hi} with a non-negative result")
    encode = _encoder(tokenizer)

    if n_prompts is None:
        ok, moved, token_id, chosen, n_tokens = _select_exact(encode, template, operands, results,
                                                              n_prompts, seed)
    else:
        ok, moved, token_id, chosen, n_tokens = _select_sampled(encode, template, slot_order,
                                                                operands, results, n_prompts, seed)
    kept = np.flatnonzero(ok)
    final = [_move_whitespace(p, str(r), m) for p, r, m in
             zip(_format_prompts(template, operands[chosen]), results[chosen].tolist(),
                 moved[chosen].tolist())]

    if len(kept) == 0:
        raise ValueError(f"task {task} with template {template!r} has no prompt whose answer is a "
                         f"single token for this tokenizer ({n_candidates} candidates with operands "
                         f"in {lo}..{hi}, all dropped)")

    rows = operands[chosen]
    n = len(chosen)
    c_column = rows[:, 2] if rows.shape[1] == 3 else np.full(n, -1, dtype=np.int64)
    expression_format = "".join("{" + ch + "}" if ch in "ABC" else ch for ch in task)
    n_dropped = n_candidates - len(kept)
    n_sampled_out = len(kept) - n
    record = {
        "format": METADATA_FORMAT,
        "task": task,
        "style": style_name,
        "template": template,
        "operators": ops,
        "operand_range": [lo, hi],
        "operand_range_source": "given" if range_given else "default_operand_range",
        "n_prompts": None if n_prompts is None else int(n_prompts),
        "seed": int(seed),
        "n_candidates": int(n_candidates),
        "n_dropped": int(n_dropped),
        "n_sampled_out": int(n_sampled_out),
        "n_rows": int(n),
        "n_whitespace_moved": int(moved[chosen].sum()),
        "answer_rule": "tokenize(prompt+answer) == tokenize(prompt)+[answer_token_id], "
                       "add_special_tokens=True; trailing prompt whitespace moved into the answer "
                       "when only that makes the answer one token",
        "tokenizer": tokenizer_identity(tokenizer),
    }
    columns = {
        "prompt": [p for p, _ in final],
        "answer": [a for _, a in final],
        "answer_value": results[chosen],
        "answer_token_id": token_id[chosen],
        "A": rows[:, 0],
        "B": rows[:, 1],
        "C": c_column,
        "operators": [ops] * n,
        "expression": [expression_format.format(A=a, B=b, C=c)
                       for a, b, c in zip(rows[:, 0].tolist(), rows[:, 1].tolist(), c_column.tolist())],
        "task": [task] * n,
        "style": [style_name] * n,
        "template": [template] * n,
        "n_tokens": np.asarray(n_tokens, dtype=np.int64),
    }
    info = datasets.DatasetInfo(description=json.dumps(record, sort_keys=True), features=FEATURES)
    # Straight to Arrow: Dataset.from_dict with features encodes row by row in Python (~6 s/M rows).
    table = pa.table({name: columns[name] for name in FEATURES}, schema=FEATURES.arrow_schema)
    dataset = datasets.Dataset(InMemoryTable(table), info=info)
    return TaskBuild(dataset=dataset, n_candidates=int(n_candidates), n_dropped=int(n_dropped),
                     n_sampled_out=int(n_sampled_out), operand_range=(lo, hi), task=task,
                     style=style_name, template=template)
