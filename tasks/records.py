"""Tasks given as (prompt, answer) records: any data set (``--dataset``) and the built-in
non-arithmetic families (:mod:`tasks.families`).

:func:`read_dataset` loads a data set from a directory written by ``datasets.save_to_disk``, a
local parquet, CSV or JSON-lines file, or a Hub id (and a local directory of data files, through
the same ``datasets.load_dataset`` call). :func:`build_from_records` turns prompts and answers
into a task data set with the columns of :data:`tasks.store.COLUMNS`, under the same rules as
the arithmetic tasks: the answer-token rule of :mod:`tasks.tokens` (answers of any number of
tokens; those that do not tokenize apart from their prompt are dropped and counted), the sink
rule (BOS put first where position 0 varies, else refused), an optional seeded sample, and the
exact ``input_ids`` of every prompt.

**CAMA groups.** A CAMA mean is taken over prompts whose positions line up. A data set with a
``template`` column is grouped by it (and by token length within a template); one without is
grouped by token length only. :func:`cama_groups` gives each row's group.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import datasets
import numpy as np

from .arithmetic import TaskBuild, sample_rows
from .store import METADATA_FORMAT, make_dataset, task_metadata, tokenizer_identity
from .tokens import (bos_prefix, check_answers, check_bos_first, encoder, move_whitespace,
                     sink_tokens)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DATA_FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}
TEMPLATE_COLUMN = "template"  # groups CAMA when present (see module docstring)


def read_dataset(source: str, split: str = "train") -> datasets.Dataset:
    """One split of a data set, from wherever ``source`` points.

    Args:
        source: a directory written by ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict`` of
            which ``split`` is taken); a ``.parquet``, ``.csv``, ``.json`` or ``.jsonl`` file;
            otherwise a Hub id or a directory of data files, read by
            ``datasets.load_dataset(source, split=split)``.
        split: the split to use where the source has several.

    Raises:
        ValueError: the source cannot be read, or has no such split (the message says why).
    """
    path = Path(source).expanduser()
    try:
        if path.is_dir() and ((path / "dataset_info.json").is_file()
                              or (path / "dataset_dict.json").is_file()):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise ValueError(f"data set {source!r} has no split {split!r}; its splits: "
                                     f"{', '.join(loaded)} (--split)")
                loaded = loaded[split]
            return loaded
        if path.is_file() and path.stat().st_size == 0:
            raise ValueError(f"data set {source!r} is empty: the file has no bytes")
        if path.is_file():
            builder = DATA_FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise ValueError(f"cannot read {source!r}: a data file must end in "
                                 f"{', '.join(DATA_FILE_BUILDERS)}")
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        return datasets.load_dataset(source, split=split)
    except ValueError as err:
        if str(err).startswith(("data set ", "cannot read ")):
            raise
        if "corresponds to no data" in str(err):  # datasets' words for a file without rows
            raise ValueError(f"data set {source!r} is empty: no rows in split {split!r}") from None
        raise ValueError(f"cannot read data set {source!r}: {_first_line(err)}") from None
    except Exception as err:  # network, missing repo, malformed file: all one line for the user
        raise ValueError(f"cannot read data set {source!r} (split {split!r}): "
                         f"{type(err).__name__}: {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def records_of(dataset: datasets.Dataset, source: str, prompt_column: str = "prompt",
               answer_column: str = "answer") -> tuple[list[str], list[str], list[str] | None]:
    """``(prompts, answers, templates or None)`` of a data set, checked: the columns exist, the
    set is not empty, prompts and answers are strings (prompts and templates, where a
    ``template`` column exists, non-empty ones)."""
    columns = dataset.column_names
    for flag, column in (("--prompt-column", prompt_column), ("--answer-column", answer_column)):
        if column not in columns:
            raise ValueError(f"data set {source!r} has no column {column!r} ({flag}); its "
                             f"columns: {', '.join(columns) or 'none'}")
    if len(dataset) == 0:
        raise ValueError(f"data set {source!r} is empty: no rows to build prompts from")
    templates = None
    checked = [(prompt_column, "prompts"), (answer_column, "answers")]
    if TEMPLATE_COLUMN in columns and TEMPLATE_COLUMN not in (prompt_column, answer_column):
        checked.append((TEMPLATE_COLUMN, "templates"))
    values = []
    for column, what in checked:
        cells = dataset[column]
        for i, cell in enumerate(cells):
            if not isinstance(cell, str):
                raise ValueError(f"data set {source!r}: {what} must be strings, but row {i} of "
                                 f"column {column!r} holds {type(cell).__name__} {cell!r}")
            if what != "answers" and not cell.strip():  # answers: see build_from_records
                raise ValueError(f"data set {source!r}: row {i} of column {column!r} is empty")
        values.append(list(cells))
    if len(values) == 3:
        templates = values[2]
    return values[0], values[1], templates


def build_from_records(tokenizer: "PreTrainedTokenizerBase", prompts: Sequence[str],
                       answers: Sequence[str], *, task: str, style: str,
                       templates: Sequence[str] | None = None, n_prompts: int | None = None,
                       seed: int = 0, source: dict[str, Any] | None = None) -> TaskBuild:
    """A task data set from prompts and their answers (see the module docstring).

    Args:
        tokenizer: the model's tokenizer.
        prompts, answers: ``N`` non-empty strings each; the answer is what follows the prompt.
        task, style: names the rows and results carry (e.g. ``"capitals"``, ``"recall"``).
        templates: the template each prompt was made from (groups CAMA), or ``None``.
        n_prompts: keep at most this many prompts (a seeded sample, in data set order).
        seed: seed of that sample.
        source: what the records came from, stored in the build record.

    Raises:
        ValueError: an answer that tokenizes to nothing, no prompt obeying the answer-token rule,
        or a sink that cannot be made constant.
    """
    n_candidates = len(prompts)
    plain = tokenizer(list(answers), add_special_tokens=False)["input_ids"] if answers else []
    empty = [i for i, ids in enumerate(plain) if not ids]  # one batched call, not one per row
    if empty:
        raise ValueError(f"{task}: the answer of row {empty[0]} ({answers[empty[0]]!r}) tokenizes "
                         f"to nothing ({len(empty)} such rows); every answer needs a token to "
                         f"score")
    encode = encoder(tokenizer)
    check = check_answers(encode, prompts, answers)
    prefix = ""
    if len(sink_tokens([ids for ids, ok in zip(check.prompt_ids, check.ok) if ok])) > 1:
        try:
            prefix = bos_prefix(tokenizer, "{prompt}")
        except ValueError:
            raise ValueError(
                f"{task}: position 0 (the sink, which every query may read) is not the same "
                f"token in every prompt, and the tokenizer has no BOS token to put first; "
                f"start every prompt with the same word") from None
        check = check_answers(encode, [prefix + p for p in prompts], answers)
        check_bos_first([ids for ids, ok in zip(check.prompt_ids, check.ok) if ok], tokenizer)
    kept = np.flatnonzero(check.ok)
    if len(kept) == 0:
        raise ValueError(f"{task}: no prompt's answer tokenizes apart from its prompt for this "
                         f"tokenizer ({n_candidates} rows, all dropped)")
    chosen = kept[sample_rows(len(kept), n_prompts, seed)]
    final = [move_whitespace(prefix + prompts[i], answers[i], bool(check.moved[i]))
             for i in chosen]
    answer_ids = [check.answer_ids[i] for i in chosen]
    input_ids = [check.prompt_ids[i] for i in chosen]
    n = len(chosen)
    row_templates = ([templates[i] for i in chosen] if templates is not None else [""] * n)
    distinct = sorted(set(row_templates))
    sink_id = input_ids[0][0]
    sizes = [len(ids) for ids in answer_ids]
    record = {
        "format": METADATA_FORMAT, "task": task, "style": style,
        "template": distinct[0] if len(distinct) == 1 and distinct[0] else None,
        "templates": distinct if templates is not None else None,
        "cama_groups": TEMPLATE_COLUMN if templates is not None else "length",
        "source": source or {}, "operand_range": None,
        "n_prompts": None if n_prompts is None else int(n_prompts), "seed": int(seed),
        "n_candidates": int(n_candidates), "n_dropped": int(n_candidates - len(kept)),
        "n_sampled_out": int(len(kept) - n), "n_rows": int(n),
        "n_whitespace_moved": int(check.moved[chosen].sum()), "answer_tokens": "any",
        "n_answer_tokens": {str(k): sizes.count(k) for k in sorted(set(sizes))},
        "answer_rule": "tokenize(prompt+answer) == tokenize(prompt)+answer_token_ids, "
                       "add_special_tokens=True, one or more answer tokens; trailing prompt "
                       "whitespace moved into the answer when only that makes the rule hold",
        "sink": {"token_id": int(sink_id), "token": tokenizer.convert_ids_to_tokens(int(sink_id)),
                 "bos_prepended": bool(prefix), "prefix": prefix},
        "tokenizer": tokenizer_identity(tokenizer),
    }
    none = np.full(n, -1, dtype=np.int64)  # the arithmetic columns (operands, value) do not apply
    columns = {
        "prompt": [p for p, _ in final], "answer": [a for _, a in final], "answer_value": none,
        "answer_token_id": np.array([ids[0] for ids in answer_ids], dtype=np.int64),
        "answer_token_ids": [list(ids) for ids in answer_ids], "A": none, "B": none, "C": none,
        "operators": [""] * n, "expression": [""] * n, "task": [task] * n, "style": [style] * n,
        "template": row_templates,
        "n_tokens": np.array([len(ids) for ids in input_ids], dtype=np.int64),
        "input_ids": input_ids,
    }
    return TaskBuild(dataset=make_dataset(columns, record), n_candidates=int(n_candidates),
                     n_dropped=record["n_dropped"], n_sampled_out=record["n_sampled_out"],
                     operand_range=None, task=task, style=style, template=record["template"],
                     answer_tokens="any", bos_prepended=bool(prefix))


def build_dataset_task(tokenizer: "PreTrainedTokenizerBase", source: str, *,
                       prompt_column: str = "prompt", answer_column: str = "answer",
                       split: str = "train", n_prompts: int | None = None,
                       seed: int = 0) -> TaskBuild:
    """The task of a user's data set (``--dataset``): :func:`read_dataset`, then
    :func:`records_of` and :func:`build_from_records`. Its task name is the source's file or
    directory name (``data`` for ``data.parquet``), its style ``dataset``."""
    dataset = read_dataset(source, split)
    prompts, answers, templates = records_of(dataset, source, prompt_column, answer_column)
    name = Path(str(source).rstrip("/")).stem or "dataset"
    return build_from_records(tokenizer, prompts, answers, task=name, style="dataset",
                              templates=templates, n_prompts=n_prompts, seed=seed,
                              source={"dataset": str(source), "split": split,
                                      "prompt_column": prompt_column,
                                      "answer_column": answer_column})


def cama_groups(dataset: datasets.Dataset) -> np.ndarray | None:
    """``(N,)`` int64 CAMA group of each row: the index of its ``template`` among the data set's
    sorted distinct templates, for a data set built with templates of more than one kind
    (:func:`build_from_records`); ``None`` where every prompt is in one group (token length
    then separates prompts by itself)."""
    if task_metadata(dataset).get("cama_groups") != TEMPLATE_COLUMN:
        return None
    templates = dataset[TEMPLATE_COLUMN]
    distinct = sorted(set(templates))
    if len(distinct) < 2:
        return None
    index = {t: i for i, t in enumerate(distinct)}
    return np.array([index[t] for t in templates], dtype=np.int64)
