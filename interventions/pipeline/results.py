"""``results.jsonl``: one JSON line per evaluated cell, appended atomically, resumable.

A cell is one (experiment, task, data set, plan) evaluation. Each line is written with a single
``write`` and flushed, so a killed run loses at most the cell in flight; a torn last line (a
kill in the middle of a write) is detected and dropped when the log is reopened.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

# Fields that identify a cell; two rows with equal values are the same measurement.
KEY_FIELDS = ("experiment", "task", "style", "dataset_fingerprint", "l_wait", "l_transfer",
              "sink", "wait_ablation", "transfer_peek", "layer", "window", "variant")


def cell_key(row: dict) -> tuple:
    """The identity of a results row (missing fields count as ``None``)."""
    return tuple(row.get(field) for field in KEY_FIELDS)


class ResultsLog:
    """Append-only JSONL results file that knows which cells it already holds."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.rows: list[dict] = []
        self.dropped_torn_line = False
        if self.path.exists():
            self._load()
        self._keys = {cell_key(r) for r in self.rows}

    def _load(self) -> None:
        data = self.path.read_bytes()
        good_end = 0
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break  # torn: the writer died before the newline
            try:
                self.rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
            good_end += len(line)
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
        self.rows.append(row)
        self._keys.add(cell_key(row))

    def select(self, **fields) -> list[dict]:
        """Rows whose fields equal all the given values."""
        return [r for r in self.rows if all(r.get(k) == v for k, v in fields.items())]


def read_results(path: str | os.PathLike) -> list[dict]:
    """All complete rows of a results file (a torn last line is ignored, the file untouched)."""
    rows = []
    with open(path, "rb") as handle:
        for line in handle:
            if not line.endswith(b"\n"):
                break
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows
