"""The request ledger: finished results and job ids of remote requests, on disk, so a rerun
resumes instead of sending the same work again.

Every write is atomic (a temporary file renamed into place, removed if the write is
interrupted), and a result is on disk before the index says so: a Ctrl-C at any point leaves a
ledger whose entries are all usable, and at worst one request is sent again.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ...errors import UserError


class RequestLedger:
    """Results and job ids of remote requests, kept on disk so that a rerun resumes.

    ``<directory>/requests.json`` maps a request key to its job id, state (``submitted``,
    ``done``, ``expired``: its result could no longer be downloaded, or ``lost``: NDIF no
    longer knew the job, or its websocket went silent and NDIF did not know it; either way the
    request is submitted again), encoding, ``expired_jobs`` and ``lost_jobs`` (earlier job ids of
    the same request); ``<directory>/<key>.result`` holds a finished result blob as received.
    Keys describe the request's content (model, inputs, configurations, tables), so the same work
    maps to the same key in a new process.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.index_path = self.directory / "requests.json"
        try:
            self.index: dict = json.loads(self.index_path.read_text())
        except FileNotFoundError:
            self.index = {}
        except ValueError:
            raise UserError(f"{str(self.index_path)!r} is not a request ledger; remove it or "
                            "choose another ledger directory") from None

    def _write(self, path: Path, data: bytes) -> None:
        """Replace ``path`` with ``data`` atomically; an interrupted write leaves no trace."""
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_bytes(data)
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _save(self) -> None:
        self._write(self.index_path, json.dumps(self.index, indent=1, sort_keys=True).encode())

    def _history(self, key: str) -> dict:
        """What an entry keeps across states: the jobs whose results expired or that were
        given up."""
        entry = self.index.get(key, {})
        return {name: entry[name] for name in ("expired_jobs", "lost_jobs") if entry.get(name)}

    def result(self, key: str) -> tuple[bytes, bool] | None:
        """``(content, compress)`` of a finished request, or ``None``."""
        entry = self.index.get(key)
        path = self.directory / f"{key}.result"
        if entry is None or entry.get("state") != "done" or not path.is_file():
            return None
        return path.read_bytes(), bool(entry["compress"])

    def job(self, key: str) -> str | None:
        entry = self.index.get(key)
        return entry.get("job_id") if entry and entry.get("state") == "submitted" else None

    def submitted(self, key: str, job_id: str, label: str) -> None:
        self.index[key] = {"state": "submitted", "job_id": job_id, "label": label,
                           "submitted": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           **self._history(key)}
        self._save()

    def expired(self, key: str) -> None:
        """The submitted job's result can no longer be downloaded: keep its id in the entry's
        ``expired_jobs`` and let the request be submitted again."""
        self._retire(key, "expired")

    def lost(self, key: str) -> None:
        """NDIF no longer knows the submitted job: keep its id in the entry's ``lost_jobs``
        and let the request be submitted again."""
        self._retire(key, "lost")

    def _retire(self, key: str, state: str) -> None:
        entry = self.index.get(key)
        if entry is None:
            return
        entry[f"{state}_jobs"] = entry.get(f"{state}_jobs", []) + [entry.get("job_id")]
        entry["state"] = state
        self._save()

    def forget(self, key: str) -> None:
        """Drop a job that failed on the server, so the request is sent again."""
        if self.index.pop(key, None) is not None:
            self._save()

    def done(self, key: str, content: bytes, compress: bool, label: str,
             job_id: str | None) -> None:
        self._write(self.directory / f"{key}.result", content)
        self.index[key] = {"state": "done", "job_id": job_id, "label": label,
                           "compress": compress, "bytes": len(content), **self._history(key)}
        self._save()

