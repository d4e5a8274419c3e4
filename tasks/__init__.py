"""Tasks for AF1 as tokenizer-aware prompt data sets with stable fingerprints: mental math
(:mod:`tasks.arithmetic`), the built-in non-arithmetic families (:mod:`tasks.families`) and any
data set of prompts and answers (:mod:`tasks.records`).

Typical use::

    build = build_task(tokenizer, "A+B", style="calculate", n_prompts=200, seed=0)
    print(build.summary())
    # A+B/calculate: 36 prompts, operands 1..9 (81 candidates, 45 dropped: answer not a single token)
    key = task_fingerprint(build.dataset)  # keys CAMA caches
    save_task(build, "out/tasks/a_plus_b"); dataset = load_task("out/tasks/a_plus_b")
    # Two-digit sums on a digit tokenizer: answers of several tokens, scored on the first, or
    # teacher-forced token by token:
    expanded = expand_answer_prefixes(build_task(tokenizer, "A+B", operand_range=(10, 99)).dataset,
                                      tokenizer)
    # Beyond arithmetic: a built-in family, or your own prompts and answers.
    capitals = build_family(tokenizer, "capitals")
    mine = build_dataset_task(tokenizer, "my_task.jsonl")  # columns prompt, answer (, template)
"""

from .answers import expand_answer_prefixes
from .arithmetic import (
    ANSWER_TOKENS,
    DEFAULT_STYLE,
    STYLES,
    TASKS,
    TaskBuild,
    build_task,
    default_operand_range,
    number_mode,
    single_token_numbers,
    template_for,
)
from .families import FAMILIES, build_family
from .records import build_dataset_task, build_from_records, cama_groups, read_dataset
from .store import COLUMNS, load_task, save_task, task_fingerprint, task_metadata, tokenizer_identity

__all__ = [
    "FAMILIES",
    "build_dataset_task",
    "build_family",
    "build_from_records",
    "cama_groups",
    "read_dataset",
    "ANSWER_TOKENS",
    "COLUMNS",
    "DEFAULT_STYLE",
    "STYLES",
    "TASKS",
    "TaskBuild",
    "build_task",
    "default_operand_range",
    "expand_answer_prefixes",
    "load_task",
    "number_mode",
    "save_task",
    "single_token_numbers",
    "task_fingerprint",
    "task_metadata",
    "template_for",
    "tokenizer_identity",
]
