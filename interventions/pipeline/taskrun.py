"""One task's evaluation state: its data set, CAMA table, executor and the full model's
predictions, each made once, when first needed; and the evaluation of cells into results rows.

Answer scoring (``--answer``): ``first`` scores each prompt's first answer token at its last
position; ``full`` teacher-forces every answer token (:func:`tasks.expand_answer_prefixes`): the
expanded prompts are what the executors run and what the CAMA table is built from, and a prompt
counts as right only when all of its rows are right.

A data set's name in the output directory (:func:`~.results.dataset_name`) is unique per data
set: a second data set of the same task and style (another ``--seed``, ``--n-prompts``, ...)
gets ``<task>-<style>~<fingerprint>``, its own saved data set, search and figures.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
from tqdm.auto import tqdm

from ..errors import UserError
from ..executors.base import Predictions
from ..executors.fast import FastExecutor
from ..executors.reference import NnsightExecutor
from ..mechanisms.cama import CamaTable, cached_cama_table, sparse_keys_warning
from ..mechanisms.plan import as_intervention, table_layers
from .experiments import Cell
from .results import ResultsLog, cell_key, dataset_name, setting_name, setting_of
from .scoring import DataOutcomes, stored
from .stats import proportion_ci

if TYPE_CHECKING:
    from ..executors.remote.client import RemoteClient
    from ..mechanisms.models import AF1Model

EXECUTORS = {"fast": FastExecutor, "nnsight": NnsightExecutor}


@dataclass
class TaskContext:
    """What a :class:`TaskRun` reads from its job, and where it writes.

    Reads: the model, the job's flags that shape an evaluation, the output and cache
    directories, the setting every row is measured in, the results on record (``log``) and the
    remote client (``None``: the local executors). Writes: results rows (``log``), saved data sets
    under ``out/data``, the names of data sets it registers (``dataset_names``), its time
    building CAMA tables (``timings["cama_s"]``), and the manifest through ``record_task`` (a
    task's manifest entry, by name) and ``record_remote`` (the remote client's statistics).
    ``log`` and ``client`` are set by the job once its output directory exists.
    """

    model: "AF1Model"
    out: Path
    cache_root: Path
    setting: dict  # dtype, attention implementation and backend of every row
    answer_scoring: str  # --answer
    executor: str  # --executor
    batch_size: int
    cells_per_request: int
    seed: int
    progress: bool
    record_task: Callable[[str, dict], None]
    record_remote: Callable[[], None]
    dataset_names: dict[str, str | None] = field(default_factory=dict)  # name: fingerprint
    timings: dict[str, float] = field(default_factory=dict)
    log: ResultsLog | None = None
    client: "RemoteClient | None" = None


def check_input_ids(tokenizer, prompts, input_ids) -> None:
    """Refuse a data set whose ``input_ids`` are not what the model's tokenizer (through which
    every executor encodes) makes of its prompts."""
    fed = tokenizer(list(prompts))["input_ids"]
    bad = [i for i, (a, b) in enumerate(zip(fed, input_ids)) if list(a) != list(b)]
    if bad or len(fed) != len(input_ids):
        i = bad[0] if bad else min(len(fed), len(input_ids))
        raise UserError(f"the model's tokenizer does not read the data set's prompts as its "
                        f"input_ids ({len(bad)} prompts differ, first row {i}); rebuild the data "
                        f"set with this model's tokenizer")


def check_context(model, label: str, input_ids, source_row=None) -> None:
    """Refuse a data set with a prompt longer than the model's context
    (``max_position_embeddings``): positions beyond it have no trained embedding, and the
    results would mean nothing. ``source_row``: the data-set row of each evaluated row (under
    ``--answer full``), so the message names the user's row."""
    limit = getattr(model.hf.config.get_text_config(), "max_position_embeddings", None)
    if not limit:
        return
    lengths = np.fromiter(map(len, input_ids), dtype=np.int64, count=len(input_ids))
    if len(lengths) and lengths.max() > limit:
        i = int(lengths.argmax())
        row = i if source_row is None else int(source_row[i])
        extra = "" if source_row is None else " (with its answer's first tokens, --answer full)"
        raise UserError(f"{label}: data-set row {row} has {int(lengths[i])} tokens{extra}, more "
                        f"than the model's context of {limit} positions "
                        f"(max_position_embeddings); shorten or drop that prompt")


class TaskRun:
    """A task data set with what evaluating it needs, each made once, when first needed:
    its CAMA table, its executor and the full model's predictions.

    Attributes:
        dataset: the task's prompts (one row per prompt).
        evaluated: what the executors run: ``dataset`` itself, or with ``--answer full`` one row
            per answer token (``source_row`` says whose); ``prompts``/``answers`` are its
            ``prompt`` and ``answer_token_id`` columns and ``fingerprint`` its fingerprint.
        prompt_of: ``(rows,)`` source prompt of each evaluated row under full scoring, else None.
    """

    def __init__(self, build, context: TaskContext):
        from tasks import cama_groups, expand_answer_prefixes, task_fingerprint

        self.build = build
        self.context = context
        model = context.model
        self.dataset = build.dataset
        self.task = build.task
        self.style = build.style
        self.label = f"{build.task}-{build.style}"
        self.answer_scoring = context.answer_scoring
        self.evaluated = self.dataset
        self.prompt_of = None
        if self.answer_scoring == "full":
            try:
                self.evaluated = expand_answer_prefixes(self.dataset, model.tokenizer)
            except ValueError as err:
                raise UserError(str(err)) from None
            self.prompt_of = np.asarray(self.evaluated["source_row"])
        self.prompts = self.evaluated["prompt"]
        self.answers = self.evaluated["answer_token_id"]
        check_input_ids(model.tokenizer, self.prompts, self.evaluated["input_ids"])
        check_context(model, self.label, self.evaluated["input_ids"], self.prompt_of)
        self.fingerprint = task_fingerprint(self.evaluated)
        # CAMA groups: by template where the data set has several (tasks.cama_groups), else
        # one group (token length, part of every key, separates the rest).
        self.groups = cama_groups(self.evaluated)
        longest = max(map(len, self.evaluated["input_ids"]), default=0)  # checked just above
        self.sink_outside_window = model.sink_outside_window(longest)
        if self.sink_outside_window:
            print(f"[af1] warning: {self.label}: {self.sink_outside_window}", flush=True)
        self._table: tuple[CamaTable, Path, bool] | None = None
        self._warned_sparse = False
        self._executor = None
        self._full: Predictions | None = None
        self._name: str | None = None

    def use_table(self, table: CamaTable, path: Path) -> None:
        self._table = (table, path, True)

    def table_for(self, layers: set[int]) -> CamaTable:
        """The CAMA table, holding at least ``layers``. Locally the whole table is built once
        and cached; on NDIF only the layers needed (every built layer is downloaded)."""
        if self._table is not None and layers <= set(self._table[0].layers):
            return self._table[0]
        context = self.context
        subset = None
        runner = None
        if context.client is not None:
            have = set(self._table[0].layers) if self._table else set()
            subset = sorted(layers | have)
            runner = self.executor.cama_runner()
        t = time.time()
        self._table = cached_cama_table(context.model, self.prompts, self.fingerprint,
                                        context.cache_root, batch_size=context.batch_size,
                                        progress=context.progress, runner=runner, layers=subset,
                                        groups=self.groups)
        context.timings["cama_s"] = context.timings.get("cama_s", 0.0) + time.time() - t
        warning = sparse_keys_warning(self._table[0])
        if warning and not self._warned_sparse:  # once, though NDIF may build layers in turns
            self._warned_sparse = True
            print(f"[af1] warning: {self.label}: {warning}", flush=True)
        return self._table[0]

    @property
    def executor(self):
        if self._executor is None:
            context = self.context
            if context.client is not None:
                from ..executors.remote.executor import RemoteExecutor

                self._executor = RemoteExecutor(context.model, self.prompts, self.answers,
                                                batch_size=context.batch_size,
                                                cells_per_request=context.cells_per_request,
                                                client=context.client, groups=self.groups)
            else:
                self._executor = EXECUTORS[context.executor](
                    context.model, self.prompts, self.answers,
                    batch_size=context.batch_size, groups=self.groups)
        return self._executor

    @property
    def row_base(self) -> dict:
        """The fields every results row of this task starts with: the task and the setting it
        is measured in (part of every row's identity, see :mod:`.results`)."""
        return {"task": self.task, "style": self.style, "dataset_fingerprint": self.fingerprint,
                **self.context.setting, "answer_scoring": self.answer_scoring}

    @property
    def setting(self) -> dict:
        """The setting this task's rows are measured in."""
        return setting_of(self.row_base)

    @property
    def name(self) -> str:
        """This data set in this setting (:func:`~.results.dataset_name`): names its saved data
        set, manifest entry, AF1 search and figures; unique per data set in the directory."""
        if self._name is None:
            registered = self.context.dataset_names
            plain = setting_name(self.label, self.setting)
            saved = self.context.out / "data" / plain
            if plain not in registered and saved.is_dir():  # saved, yet not in the manifest
                from tasks import load_task, task_fingerprint

                registered[plain] = task_fingerprint(load_task(saved))
            self._name = dataset_name(self.label, self.setting, self.fingerprint, registered)
        return self._name

    def items(self, cells: list[Cell]) -> list[tuple]:
        """``(cell, plan, cama_layer)`` for the cells not yet in the results."""
        todo = [c for c in cells
                if cell_key({**self.row_base, **c.row_fields()}) not in self.context.log]
        n_layers = self.context.model.n_layers
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
            target = self.context.out / self.data_dir
            if not target.exists():  # else it holds this data set (its name says so)
                full_ok = (self._full.pred_ids == self.answers).tolist()
                saved = (self.evaluated.add_column("full_pred_id", self._full.pred_ids.tolist())
                         .add_column("full_correct", full_ok))
                if self._full.answer_logprobs is not None:
                    saved = saved.add_column("full_answer_logprob",
                                             stored(self._full.answer_logprobs))
                save_task(saved, target)
        return self._full

    @cached_property
    def outcomes(self) -> DataOutcomes:
        """The full model on this data set, to grade results rows with (as the saved data
        set would give them); built once, from the full model's predictions."""
        return DataOutcomes(self.fingerprint, self.answers, self.full.pred_ids,
                            stored(self.full.answer_logprobs), self.prompt_of)

    def prompt_strata(self) -> np.ndarray:
        """``(N,)`` each prompt's stratum for a held-out split: its CAMA group (template) and
        token length, as one integer."""
        first = (np.arange(len(self.evaluated)) if self.prompt_of is None
                 else np.unique(self.prompt_of, return_index=True)[1])
        groups = np.zeros(len(first), np.int64) if self.groups is None else \
            np.asarray(self.groups)[first]
        lengths = np.asarray(self.dataset["n_tokens"], dtype=np.int64)
        return groups * (int(lengths.max()) + 1) + lengths

    @property
    def data_dir(self) -> str:
        """Where the evaluated data set is saved, relative to the output directory."""
        return f"data/{self.name}"

    def record(self) -> None:
        """Describe this task (and its CAMA table, if one was used) in the manifest."""
        from tasks import task_metadata

        build = self.build
        record = task_metadata(self.dataset)
        entry = {
            "summary": build.summary(), "dataset_fingerprint": self.fingerprint,
            "n_prompts": len(self.dataset), "n_candidates": build.n_candidates,
            "n_dropped": build.n_dropped, "answer_tokens": build.answer_tokens,
            "n_answer_tokens": record.get("n_answer_tokens"),
            "answer_scoring": self.answer_scoring, "n_evaluated_rows": len(self.evaluated),
            "n_sampled_out": build.n_sampled_out,
            "operand_range": list(build.operand_range) if build.operand_range else None,
            "template": build.template, "sink": record.get("sink"), "data_dir": self.data_dir,
            "cama_groups": record.get("cama_groups", "length"),
            "setting": self.setting,
            **({"source": record["source"]} if record.get("source") else {}),
        }
        if self.sink_outside_window:
            entry["sink_outside_window"] = self.sink_outside_window
        if self._full is not None:
            full_ok = self.outcomes.full.ok
            n_right = int(full_ok.sum())
            entry.update(full_accuracy=n_right / len(full_ok), n_full_correct=n_right,
                         full_accuracy_ci=proportion_ci(n_right, len(full_ok)))
        if self._table is not None:
            table, path, cached = self._table
            entry.update(cama_table=str(path), cama_table_was_cached=cached,
                         cama_layers=table.layers, cama_keys=table.statistics)
        self.context.record_task(self.name, entry)

    def evaluate(self, cells: list[Cell], desc: str) -> int:
        """Evaluate the cells not yet in the results; append one row per finished cell."""
        context = self.context
        log = context.log
        items = self.items(cells)
        if not items:
            return 0
        outcomes = self.outcomes
        self.record()
        bar = tqdm(total=len(items), desc=f"{desc} {self.label}", unit="cell",
                   disable=not context.progress)
        started = time.time()
        for cell, preds in self.executor.run_many(items):
            # Per evaluated row, as the numbers are recomputed from the file (scoring.py).
            per_row = {"pred_ids": preds.pred_ids.tolist(),
                       "answer_logprobs": stored(preds.answer_logprobs),
                       "kl_rows": stored(preds.kl_from_clean)}
            row = {**self.row_base, **cell.row_fields(),
                   **outcomes.measure({**self.row_base, **per_row}, context.seed),
                   "executor": self.executor.name,
                   "model_fingerprint": context.model.identity.fingerprint,
                   "seconds": round(time.time() - started, 4), **per_row}
            started = time.time()
            log.append(row)
            bar.update()
            bar.set_postfix(faith=f"{row['faithfulness'] or 0:.2f}")
        bar.close()
        if context.client is not None:
            context.record_remote()
        return len(items)
