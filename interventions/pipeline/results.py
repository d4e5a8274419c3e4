"""``results.jsonl``: one JSON line per evaluated cell, appended atomically, resumable.

A cell is one (experiment, task, data set, plan) evaluation. Each line is written with a single
``write`` and flushed, so a killed run loses at most the cell in flight; a torn last line (a
kill in the middle of a write) is detected and dropped when the log is reopened.

A row's identity is the cell plus the **setting** it was measured in (:data:`SETTING_DEFAULTS`:
dtype, attention implementation, backend, answer scoring): rows of different settings live side
by side and never stand in for each other. Rows written before settings were recorded lack these
fields; they read as the defaults of that time (float32, sdpa, local, first), which is what
every local CPU run then used. Rows without intervals get them from their counts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

# What a row was measured in, besides model and data set: anything that changes its numbers.
# The values are what rows written before these fields existed were measured in.
SETTING_DEFAULTS = {"dtype": "float32", "attn_implementation": "sdpa", "backend": "local",
                    "answer_scoring": "first"}
SETTING_FIELDS = tuple(SETTING_DEFAULTS)
# Fields that identify a cell; two rows with equal values are the same measurement.
KEY_FIELDS = ("experiment", "task", "style", "dataset_fingerprint", "l_wait", "l_transfer",
              "sink", "wait_ablation", "transfer_peek", "layer", "window", "variant",
              *SETTING_FIELDS)


def setting_of(row: dict) -> dict:
    """The setting a row was measured in (:data:`SETTING_DEFAULTS` for fields it lacks)."""
    return {field: row.get(field, default) for field, default in SETTING_DEFAULTS.items()}


def setting_label(setting: dict) -> str:
    """``float32/sdpa/local/first``: a setting in one short string, fields in a fixed order."""
    return "/".join(str(setting[field]) for field in SETTING_FIELDS)


def setting_name(label: str, setting: dict) -> str:
    """``<task>-<style>`` in the default setting, else with the setting appended
    (``A+B-calculate@bfloat16-sdpa-local-first``): names a task's saved data set (with the
    full model's predictions in that setting), its manifest entry and its AF1 search."""
    if setting_of(setting) == SETTING_DEFAULTS:
        return label
    return f"{label}@{setting_label(setting_of(setting)).replace('/', '-')}"


def dataset_name(label: str, setting: dict, fingerprint: str,
                 registered: dict[str, str | None]) -> str:
    """The name of a data set in a results directory: its saved data set's directory
    (``data/<name>``), its figures, its AF1 search and its manifest entry.

    ``<task>-<style>`` (with the setting appended outside the default one, see
    :func:`setting_name`) for the first data set of that task and style in the directory;
    ``<task>-<style>~<first 8 hex of its fingerprint>`` for any other one (another ``--seed``,
    ``--n-prompts``, ``--operand-range`` or ``--dataset`` file): two data sets never share a
    name, so their results are never paired with each other's prompts.

    ``registered`` maps the names already taken in the directory to their data sets'
    fingerprints; the name chosen is added to it.
    """
    candidates = [setting_name(label, setting),
                  setting_name(f"{label}~{fingerprint[:8]}", setting),
                  setting_name(f"{label}~{fingerprint}", setting)]  # 8 hex digits that collide
    name = next((c for c in candidates if registered.get(c, fingerprint) == fingerprint),
                candidates[-1])
    registered[name] = fingerprint
    return name


def name_datasets(rows: list[dict], registered: dict[str, str | None]) -> dict[tuple, str]:
    """:func:`dataset_name` of every data set of ``rows``, in the order rows first name them:
    ``{(task, style, fingerprint, setting label): name}``. ``registered`` (names on record, e.g.
    the manifest's ``tasks``) is consulted first and extended."""
    names: dict[tuple, str] = {}
    for row in rows:
        setting = setting_of(row)
        key = (row["task"], row["style"], row["dataset_fingerprint"], setting_label(setting))
        if key not in names:
            names[key] = dataset_name(f"{row['task']}-{row['style']}", setting,
                                      row["dataset_fingerprint"], registered)
    return names


def complete_row(row: dict) -> dict:
    """A row as read from disk with every field this version writes: the setting fields of
    rows that predate them, and the intervals of rows that predate those."""
    row = {**setting_of(row), **row}
    if "faithfulness_ci" not in row and "n_full_correct" in row:
        from .stats import row_intervals

        row.update(row_intervals(row))
    return row


def cell_key(row: dict) -> tuple:
    """The identity of a results row: its cell and setting (missing cell fields count as
    ``None``, missing setting fields as their defaults)."""
    row = {**setting_of(row), **row}
    return tuple(row.get(field) for field in KEY_FIELDS)


class ResultsLog:
    """Append-only JSONL results file that knows which cells it already holds."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.rows: list[dict] = []
        self.dropped_torn_line = False
        self.n_legacy_rows = 0  # rows written before settings were recorded
        if self.path.exists():
            self._load()
        self._keys = {cell_key(r) for r in self.rows}

    def _load(self) -> None:
        data = self.path.read_bytes()
        self.rows, good_end, self.n_legacy_rows = _parse(data)
        if good_end != len(data):
            self.dropped_torn_line = True
            with open(self.path, "r+b") as handle:
                handle.truncate(good_end)

    def __contains__(self, key: tuple) -> bool:
        return key in self._keys

    def __iter__(self) -> Iterator[dict]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def append(self, row: dict) -> None:
        """Append one row durably (one write, flush, fsync)."""
        line = (json.dumps(row, separators=(",", ":")) + "\n").encode()
        with open(self.path, "ab") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        self.rows.append(complete_row(row))
        self._keys.add(cell_key(row))

    def select(self, **fields) -> list[dict]:
        """Rows whose fields equal all the given values."""
        return [r for r in self.rows if all(r.get(k) == v for k, v in fields.items())]


def read_results(path: str | os.PathLike) -> list[dict]:
    """All complete rows of a results file (a torn last line is ignored, the file untouched),
    each with every field this version writes (:func:`complete_row`)."""
    return _parse(Path(path).read_bytes())[0]


def _parse(data: bytes) -> tuple[list[dict], int, int]:
    """The complete rows of a results file's bytes (:func:`complete_row`), where the last of
    them ends (a line without its newline, or not JSON, is torn: the writer died in the middle
    of it) and how many rows record no setting."""
    rows, good_end, n_legacy = [], 0, 0
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        n_legacy += not any(field in row for field in SETTING_FIELDS)
        rows.append(complete_row(row))
        good_end += len(line)
    return rows, good_end, n_legacy
