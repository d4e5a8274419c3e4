"""The state of one job (:class:`Job`): its configuration, model, output directory, results
log, manifest and remote client; and the :class:`~.taskrun.TaskContext` its task runs get.

:mod:`.jobs` runs a job with it, :mod:`.remote_jobs` adds what only NDIF needs.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from ..errors import UserError
from ..mechanisms.models import AF1Model, cache_dir
from .config import JobConfig
from .manifest import base_manifest, now, write_json_atomic
from .results import SETTING_DEFAULTS, ResultsLog, setting_label, setting_of
from .stats import CI_LEVEL, CI_METHOD, PAIRED_TEST
from .taskrun import TaskContext


class Job:
    """The state of one ``run.py`` invocation."""

    def __init__(self, cfg: JobConfig, model: AF1Model, out: Path, experiments: list[str]):
        self.cfg = cfg
        self.model = model
        self.out = out
        self.experiments = experiments
        self.cache_root = Path(cfg.cache_dir) if cfg.cache_dir else cache_dir()
        self.timings: dict[str, float] = {}
        self.manifest: dict = {}
        self.searches: dict[str, dict] = {}  # by data-set name
        # The data sets already named in the directory (name: fingerprint), from its manifest:
        # a new data set of the same task and style gets a name of its own (TaskRun.name).
        self.dataset_names: dict[str, str | None] = {
            name: entry.get("dataset_fingerprint")
            for name, entry in _read_manifest(out).get("tasks", {}).items()}
        # The setting every row of this job is measured in (besides the task's answer scoring).
        self.setting = {"dtype": model.identity.dtype,
                        "attn_implementation": model.identity.attn_implementation,
                        "backend": backend_name(cfg)}
        self.preflight = None  # NDIF's preflight result (--remote on NDIF)
        self.remote_plan = None  # what --dry-run would send (a RemotePlan)
        self.context = TaskContext(
            model=model, out=out, cache_root=self.cache_root, setting=self.setting,
            answer_scoring=cfg.answer, executor=cfg.executor, batch_size=cfg.batch_size,
            cells_per_request=cfg.cells_per_request, seed=cfg.seed, progress=cfg.progress,
            record_task=self.record_task, record_remote=self.record_remote,
            dataset_names=self.dataset_names, timings=self.timings)

    # The results log and the remote client are the task runs' too (set once the output
    # directory exists): they live in the context.
    @property
    def log(self) -> ResultsLog | None:
        return self.context.log

    @log.setter
    def log(self, log: ResultsLog) -> None:
        self.context.log = log

    @property
    def client(self):
        """The ``RemoteClient`` of ``--remote`` (``None`` for local runs)."""
        return self.context.client

    @client.setter
    def client(self, client) -> None:
        self.context.client = client

    def record_task(self, name: str, entry: dict) -> None:
        """Describe the data set ``name`` in the manifest (``tasks``) and save it."""
        self.manifest["tasks"][name] = entry
        self.save_manifest()

    def record_remote(self) -> None:
        """Put the remote client's statistics in the manifest (``remote``) and save it."""
        self.manifest["remote"] = self.client.stats.to_dict()
        self.save_manifest()

    def save_manifest(self) -> None:
        write_json_atomic(self.out / "manifest.json", self.manifest)

    def start(self, grid: dict, setting: dict) -> None:
        """Create the output directory, refuse foreign results, write the first manifest
        (``setting``: what this run's rows are measured in)."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = ResultsLog(self.out / "results.jsonl")
        foreign = {r.get("model_fingerprint") for r in self.log} - {
            self.model.identity.fingerprint}
        if foreign:
            raise UserError(f"{str(self.log.path)!r} holds results of another model "
                            f"({foreign.pop()}); choose another --out")
        previous = _read_manifest(self.out)
        self.manifest = base_manifest(self.cfg.argv)
        self.manifest.update({
            "status": "running",
            "experiments": self.experiments,
            "config": {k: v for k, v in asdict(self.cfg).items() if k != "argv"},
            "model": self.model.identity.to_dict(),
            "executor": self.cfg.executor,
            "grid": grid,
            "tasks": previous.get("tasks", {}),
            "history": previous.get("history", []),
            "setting": setting,
            "settings_on_record": _settings_on_record(self.log),
            "intervals": {"method": CI_METHOD, "level": CI_LEVEL, "paired_test": PAIRED_TEST},
            "resumed_rows": len(self.log),
            "rows_without_setting": self.log.n_legacy_rows,
            "dropped_torn_line": self.log.dropped_torn_line,
        })
        if self.log.n_legacy_rows:
            print(f"[af1] {self.log.n_legacy_rows} rows in {self.log.path} record no setting; "
                  f"they are read as {setting_label(SETTING_DEFAULTS)} (what runs used then)",
                  flush=True)
        self.save_manifest()

    def finish(self, started: float, n_new: int) -> None:
        self.timings["total_s"] = time.time() - started
        if self.client is not None:
            self.manifest["remote"] = self.client.stats.to_dict()
            self.client.close()
        self.manifest["history"].append({"started": self.manifest["started"], "finished": now(),
                                         "command": self.manifest["command"],
                                         "setting": self.manifest["setting"],
                                         "n_rows_new": n_new})
        self.manifest["settings_on_record"] = _settings_on_record(self.log)
        self.manifest.update({"status": "complete", "finished": now(), "timings": self.timings,
                              "n_rows": len(self.log), "n_rows_new": n_new})
        self.save_manifest()


def _read_manifest(out: Path) -> dict:
    """The manifest of an earlier run into ``out`` ({} if there is none or it is unreadable)."""
    try:
        return json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}


def backend_name(cfg: JobConfig) -> str:
    """Where cells run: ``local`` (this machine's executors), ``ndif`` (NDIF's servers, which
    run bfloat16), ``ndif-local`` (the NDIF request path run here, ``--remote-backend local``)."""
    if not cfg.remote:
        return "local"
    return "ndif" if cfg.remote_backend == "remote" else "ndif-local"


def _settings_on_record(log: ResultsLog) -> dict[str, int]:
    """How many rows each setting has in ``log`` (``dtype/attn/backend/scoring``: count)."""
    counts: dict[str, int] = {}
    for row in log:
        label = setting_label(setting_of(row))
        counts[label] = counts.get(label, 0) + 1
    return counts
