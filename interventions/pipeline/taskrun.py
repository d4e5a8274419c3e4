"""One task's evaluation state: its data set, CAMA table, executor and the full model's
predictions, each made once, when first needed; and the evaluation of cells into results rows."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from ..executors.base import Predictions
from ..executors.fast import FastExecutor
from ..executors.reference import NnsightExecutor
from ..mechanisms.cama import CamaTable, cached_cama_table
from ..mechanisms.plan import as_intervention, table_layers
from .experiments import Cell
from .results import cell_key, setting_name, setting_of
from .scoring import score
from .stats import proportion_ci

if TYPE_CHECKING:
    from .jobs import Job

EXECUTORS = {"fast": FastExecutor, "nnsight": NnsightExecutor}


class TaskRun:
    """A task data set with what evaluating it needs, each made once, when first needed:
    its CAMA table, its executor and the full model's predictions."""

    def __init__(self, build, job: "Job"):
        from tasks import task_fingerprint

        self.build = build
        self.job = job
        self.dataset = build.dataset
        self.task = build.task
        self.style = build.style
        self.label = f"{build.task}-{build.style}"
        self.fingerprint = task_fingerprint(build.dataset)
        self.answers = build.dataset["answer_token_id"]
        longest = max(job.model.token_lengths(self.dataset["prompt"]), default=0)
        self.sink_outside_window = job.model.sink_outside_window(longest)
        if self.sink_outside_window:
            print(f"[af1] warning: {self.label}: {self.sink_outside_window}", flush=True)
        self._table: tuple[CamaTable, Path, bool] | None = None
        self._executor = None
        self._full: Predictions | None = None

    def use_table(self, table: CamaTable, path: Path) -> None:
        self._table = (table, path, True)

    def table_for(self, layers: set[int]) -> CamaTable:
        """The CAMA table, holding at least ``layers``. Locally the whole table is built once
        and cached; on NDIF only the layers needed (every built layer is downloaded)."""
        if self._table is not None and layers <= set(self._table[0].layers):
            return self._table[0]
        job = self.job
        subset = None
        runner = None
        if job.client is not None:
            have = set(self._table[0].layers) if self._table else set()
            subset = sorted(layers | have)
            runner = self.executor.cama_runner()
        t = time.time()
        self._table = cached_cama_table(job.model, self.dataset["prompt"], self.fingerprint,
                                        job.cache_root, batch_size=job.cfg.batch_size,
                                        progress=job.cfg.progress, runner=runner, layers=subset)
        job.timings["cama_s"] = job.timings.get("cama_s", 0.0) + time.time() - t
        return self._table[0]

    @property
    def executor(self):
        if self._executor is None:
            job = self.job
            if job.client is not None:
                from ..executors.remote.executor import RemoteExecutor

                self._executor = RemoteExecutor(job.model, self.dataset["prompt"], self.answers,
                                                batch_size=job.cfg.batch_size,
                                                cells_per_request=job.cfg.cells_per_request,
                                                client=job.client)
            else:
                self._executor = EXECUTORS[job.cfg.executor](
                    job.model, self.dataset["prompt"], self.answers,
                    batch_size=job.cfg.batch_size)
        return self._executor

    @property
    def row_base(self) -> dict:
        """The fields every results row of this task starts with: the task and the setting it
        is measured in (part of every row's identity, see :mod:`.results`)."""
        return {"task": self.task, "style": self.style, "dataset_fingerprint": self.fingerprint,
                **self.job.setting}

    @property
    def setting(self) -> dict:
        """The setting this task's rows are measured in."""
        return setting_of(self.row_base)

    @property
    def name(self) -> str:
        """This task in this setting (:func:`~.results.setting_name`): names its saved data
        set, manifest entry and AF1 search."""
        return setting_name(self.label, self.setting)

    def items(self, cells: list[Cell]) -> list[tuple]:
        """``(cell, plan, cama_layer)`` for the cells not yet in the results."""
        todo = [c for c in cells
                if cell_key({**self.row_base, **c.row_fields()}) not in self.job.log]
        n_layers = self.job.model.n_layers
        interventions = [as_intervention(c.intervention, n_layers) for c in todo]
        needed = table_layers(interventions)
        table = self.table_for(needed) if needed else None
        return [(cell, cell.intervention,
                 table.for_intervention(i) if i.needs_table else None)
                for cell, i in zip(todo, interventions)]

    @property
    def full(self) -> Predictions:
        if self._full is None:
            from tasks import save_task

            self._full = self.executor.clean()
            target = self.job.out / "data" / self.name
            if not target.exists():
                full_ok = (self._full.pred_ids == self.answers).tolist()
                save_task(self.dataset.add_column("full_pred_id", self._full.pred_ids.tolist())
                          .add_column("full_correct", full_ok), target)
        return self._full

    def record(self) -> None:
        """Describe this task (and its CAMA table, if one was used) in the manifest."""
        build = self.build
        entry = {
            "summary": build.summary(), "dataset_fingerprint": self.fingerprint,
            "n_prompts": len(self.dataset), "n_candidates": build.n_candidates,
            "n_dropped_not_single_token": build.n_dropped, "n_sampled_out": build.n_sampled_out,
            "operand_range": list(build.operand_range), "template": build.template,
            "data_dir": f"data/{self.name}", "setting": self.setting,
        }
        if self.sink_outside_window:
            entry["sink_outside_window"] = self.sink_outside_window
        if self._full is not None:
            n_right = int((self._full.pred_ids == self.answers).sum())
            entry.update(full_accuracy=n_right / len(self.answers), n_full_correct=n_right,
                         full_accuracy_ci=proportion_ci(n_right, len(self.answers)))
        if self._table is not None:
            table, path, cached = self._table
            entry.update(cama_table=str(path), cama_table_was_cached=cached,
                         cama_layers=table.layers)
        self.job.manifest["tasks"][self.name] = entry
        self.job.save_manifest()

    def evaluate(self, cells: list[Cell], desc: str) -> int:
        """Evaluate the cells not yet in the results; append one row per finished cell."""
        log = self.job.log
        items = self.items(cells)
        if not items:
            return 0
        full = self.full
        self.record()
        bar = tqdm(total=len(items), desc=f"{desc} {self.label}", unit="cell",
                   disable=not self.job.cfg.progress)
        started = time.time()
        for cell, preds in self.executor.run_many(items):
            row = {**self.row_base, **cell.row_fields(), **score(full, preds, self.answers),
                   "executor": self.executor.name,
                   "model_fingerprint": self.job.model.identity.fingerprint,
                   "seconds": round(time.time() - started, 4),
                   "pred_ids": preds.pred_ids.tolist()}
            started = time.time()
            log.append(row)
            bar.update()
            bar.set_postfix(faith=f"{row['faithfulness'] or 0:.2f}")
        bar.close()
        if self.job.client is not None:
            self.job.manifest["remote"] = self.job.client.stats.to_dict()
            self.job.save_manifest()
        return len(items)
