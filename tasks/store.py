"""Identity, fingerprints and storage of task data sets.

A task data set carries a JSON record of how it was built in ``dataset.info.description``
(see :func:`task_metadata`). Its fingerprint (:func:`task_fingerprint`) is a content hash of its
rows and of the tokenizer that produced them; it keys CAMA caches downstream, so it must not depend
on anything but content: not on the process, not on where the data set was loaded from, and not on
``datasets``' own ``_fingerprint`` (random for in-memory data sets).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
from datasets.table import InMemoryTable

# The columns of a task data set, in the order the fingerprint hashes them.
# ``answer_token_id`` is the answer's first token (the one scored by default), ``answer_token_ids``
# all of them; ``input_ids`` are the exact token ids the model reads for the prompt (BOS included).
COLUMNS: tuple[str, ...] = (
    "prompt", "answer", "answer_value", "answer_token_id", "answer_token_ids", "A", "B", "C",
    "operators", "expression", "task", "style", "template", "n_tokens", "input_ids",
)
_INT_COLUMNS = frozenset({"answer_value", "answer_token_id", "A", "B", "C", "n_tokens"})
_ID_LIST_COLUMNS = frozenset({"answer_token_ids", "input_ids"})


def _feature(name: str):
    if name in _ID_LIST_COLUMNS:
        return datasets.Sequence(datasets.Value("int64"))  # a List on datasets >= 4
    return datasets.Value("int64" if name in _INT_COLUMNS else "string")


FEATURES = datasets.Features({name: _feature(name) for name in COLUMNS})

# Bump when the meaning of the columns or the hashing scheme changes: old caches then miss.
_FINGERPRINT_VERSION = b"af1-task-fingerprint-v2\0"
METADATA_FORMAT = "af1-task/1"


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """Who tokenized: ``name_or_path``, vocabulary size and a sha256 of the tokenizer's content.

    The hash covers the backend's JSON (``tokenizer.backend_tokenizer.to_str()``) with its
    ``padding`` and ``truncation`` entries removed: transformers switches those on and off on every
    padded call, and they do not change how a prompt tokenizes. Keys are sorted so the hash does
    not depend on serialization order. Tokenizers without a Rust backend are hashed by their
    vocabulary and special tokens instead (``hash_source`` says which).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        content = json.loads(backend.to_str())
        content.pop("padding", None)
        content.pop("truncation", None)
        source = "backend_json"
    else:
        content = {
            "vocab": tokenizer.get_vocab(),
            "special_tokens": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
            "class": type(tokenizer).__name__,
        }
        source = "vocab"
    blob = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return {
        "name_or_path": str(getattr(tokenizer, "name_or_path", "") or ""),
        "vocab_size": len(tokenizer),
        "sha256": hashlib.sha256(blob.encode("utf-8")).hexdigest(),
        "hash_source": source,
    }


def make_dataset(columns: dict[str, Any], record: dict[str, Any]) -> datasets.Dataset:
    """A task data set from its :data:`COLUMNS` (lists or arrays, one entry per row) and its
    build record (stored as JSON in ``info.description``)."""
    info = datasets.DatasetInfo(description=json.dumps(record, sort_keys=True), features=FEATURES)
    # Straight to Arrow: Dataset.from_dict with features encodes row by row in Python (~6 s/M rows).
    table = pa.table({name: columns[name] for name in FEATURES}, schema=FEATURES.arrow_schema)
    return datasets.Dataset(InMemoryTable(table), info=info)


def task_metadata(dataset: datasets.Dataset) -> dict[str, Any]:
    """The build record stored in ``dataset.info.description`` ({} if there is none)."""
    text = dataset.info.description or ""
    try:
        meta = json.loads(text)
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) and meta.get("format") == METADATA_FORMAT else {}


def _check_columns(dataset: datasets.Dataset) -> None:
    missing = [c for c in COLUMNS if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"not a task data set: missing column(s) {', '.join(missing)} "
            f"(expected {', '.join(COLUMNS)}; build one with tasks.build_task)"
        )


def task_fingerprint(dataset: datasets.Dataset) -> str:
    """A 16-hex-character content hash of a task data set.

    sha256 over every column of :data:`COLUMNS` in that order (rows in data set order; integers
    as little-endian int64, id lists as their lengths then their values, strings as a JSON list) plus the tokenizer hash from the build record.
    Identical after :func:`save_task`/:func:`load_task` and across processes; changes when any row
    changes (a prompt, an answer id, a token count, the order of rows) or the tokenizer differs.
    """
    _check_columns(dataset)
    # The arrow view honours an indices mapping left by select/shuffle/filter, unlike .data.
    table = dataset.with_format("arrow")[: len(dataset)] if len(dataset) else None
    h = hashlib.sha256(_FINGERPRINT_VERSION)
    h.update(str(task_metadata(dataset).get("tokenizer", {}).get("sha256", "")).encode())
    h.update(len(dataset).to_bytes(8, "little"))
    for name in COLUMNS:
        h.update(b"\0" + name.encode() + b"\0")
        if table is None:
            continue
        column = table.column(name)
        if name in _INT_COLUMNS:
            h.update(np.asarray(column.to_numpy(), dtype="<i8").tobytes())
        elif name in _ID_LIST_COLUMNS:
            lists = column.combine_chunks()  # value_lengths/flatten honour slicing offsets
            h.update(np.asarray(lists.value_lengths().to_numpy(), dtype="<i8").tobytes())
            h.update(np.asarray(lists.flatten().to_numpy(), dtype="<i8").tobytes())
        else:
            h.update(json.dumps(column.to_pylist(), ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()[:16]


def save_task(build_or_dataset: Any, directory: str | Path) -> Path:
    """Write a task (a :class:`~tasks.TaskBuild` or its data set) with ``Dataset.save_to_disk``.

    The build record travels in the data set's info, so the saved directory says how it was made.
    Returns the directory as a :class:`~pathlib.Path`.
    """
    dataset = getattr(build_or_dataset, "dataset", build_or_dataset)
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"save_task expects a TaskBuild or a datasets.Dataset, got {type(dataset).__name__}")
    _check_columns(dataset)
    directory = Path(directory)
    dataset.save_to_disk(str(directory))
    return directory


def load_task(directory: str | Path) -> datasets.Dataset:
    """Read a task written by :func:`save_task`; its fingerprint equals the saved one's."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no saved task at '{directory}': directory does not exist "
                                f"(write one with tasks.save_task)")
    try:
        dataset = datasets.load_from_disk(str(directory))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"no saved task at '{directory}': not a directory written by "
                                f"tasks.save_task ({err})") from None
    if not isinstance(dataset, datasets.Dataset):
        raise ValueError(f"'{directory}' holds a {type(dataset).__name__}, not a single task data set")
    _check_columns(dataset)
    return dataset
