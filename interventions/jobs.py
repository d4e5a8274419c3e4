"""Runs experiments end to end: tasks -> CAMA tables -> cells -> results, search, figures.

``run.py`` parses flags into a :class:`JobConfig` and calls :func:`run_job`. Every check that can
fail because of the user's input (model path, layer ranges, templates, empty data sets, CAMA
table mismatch, output path) happens before anything is written to the output directory.

Output directory layout::

    manifest.json            how the results were made (model + hash, versions, git, timings)
    results.jsonl            one line per evaluated cell (experiment, task, plan or layer window)
    af1_search.json          frontier and AF1 configuration per swept task
    probe.json               partial-result probe (three_operand experiment)
    data/<task>-<style>/     the exact data sets (datasets.save_to_disk) with full-model predictions
    figures/                 every figure (PNG, PDF, caption) and tables.md, from the files above

Re-running the same command resumes: finished cells are skipped, a torn last line is dropped.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from .cama import CamaTable, cached_cama_table
from .errors import UserError
from .evaluate import NnsightExecutor, Predictions, score
from .fast import FastExecutor
from .experiments import (NEEDS_CONFIG, PAPER_STYLES, STYLE_TASKS, THREE_OPERAND_TASKS, Cell,
                          af1_search, alternative_cells, config_cells, necessity_cells,
                          parse_experiments, sweep_cells)
from .manifest import base_manifest, now, write_json_atomic
from .models import AF1Model, cache_dir, load_model
from .plan import AF1Plan, as_intervention
from .results import ResultsLog, cell_key

# Local executors: fast (the default; exact to the reference within float rounding) and the
# nnsight reference path, which stays the ground truth in tests.
EXECUTORS = {"fast": FastExecutor, "nnsight": NnsightExecutor}
PROBE_TASK = "A+B-C"


@dataclass
class JobConfig:
    """Everything a job needs; the CLI's flags map one to one onto these fields."""

    model: str = "smollm2"
    experiments: str = "sweep"
    tasks: Sequence[str] = ("A+B",)
    style: str = "calculate"
    template: str | None = None
    l_wait: str | None = None  # None: every layer 0..L-1
    l_transfer: str = "1-4"
    threshold: float = 0.9
    af1_config: str | None = None  # "L_WAIT,L_TRANSFER": skip the search for later experiments
    n_prompts: int | None = 200
    seed: int = 0
    operand_range: tuple[int, int] | None = None
    out: str | None = None
    batch_size: int = 32
    executor: str = "fast"
    device: str = "auto"
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    revision: str | None = None
    cama_table: str | None = None
    cache_dir: str | None = None
    remote: bool = False
    remote_backend: str = "remote"  # "local": the remote path run here (offline test)
    cells_per_request: int = 32
    dry_run: bool = False
    submit: bool = False
    progress: bool = True
    argv: list[str] | None = field(default=None, repr=False)


# -- argument checks -------------------------------------------------------------------------


def parse_layer_values(spec: str, name: str) -> list[int]:
    """``"5"``, ``"0-29"`` (inclusive), ``"1,2,4"`` or mixes like ``"0-3,8"`` -> sorted values."""
    values: set[int] = set()
    for part in str(spec).replace(" ", "").split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            if re.fullmatch(r"-\d+.*", part):
                raise UserError(f"--{name} values must be >= 0, got {spec!r}")
            raise UserError(f"--{name} takes a value, a range a-b or a list a,b,c; got {spec!r}")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        if hi < lo:
            raise UserError(f"--{name} range {part!r} is empty (end before start)")
        values.update(range(lo, hi + 1))
    return sorted(values)


def grid_plans(l_waits: list[int], l_transfers: list[int], n_layers: int) -> list[AF1Plan]:
    """Every fitting (L_wait, L_transfer) pair; a value that fits with none of the others is an
    error (``L_wait + L_transfer > L``)."""
    fits = [(w, t) for w in l_waits for t in l_transfers if w + t <= n_layers and w < n_layers]
    bad_waits = sorted(set(l_waits) - {w for w, _ in fits})
    bad_transfers = sorted(set(l_transfers) - {t for _, t in fits})
    if bad_waits or bad_transfers:
        what = (f"L_wait {bad_waits}" if bad_waits else f"L_transfer {bad_transfers}")
        raise UserError(f"{what} cannot fit: L_wait + L_transfer must be <= the model's "
                        f"{n_layers} layers (L_wait {min(l_waits)}..{max(l_waits)}, "
                        f"L_transfer {min(l_transfers)}..{max(l_transfers)} requested)")
    return [AF1Plan(w, t) for w, t in fits]


def parse_af1_config(spec: str | None, n_layers: int) -> AF1Plan | None:
    if spec is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*", spec)
    if not match:
        raise UserError(f"--af1-config takes L_WAIT,L_TRANSFER (e.g. 20,4), got {spec!r}")
    return grid_plans([int(match.group(1))], [int(match.group(2))], n_layers)[0]


def default_out(model_spec: str) -> Path:
    """``runs/<model>``: a local path's folder name, or the Hub id with ``/`` as ``--``."""
    path = Path(model_spec).expanduser()
    name = path.resolve().name if path.exists() else model_spec.replace("/", "--")
    return Path("runs") / (re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model")


def check_out_writable(out: Path) -> None:
    """Fail early, before any work, if ``out`` cannot become a writable directory."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} exists and is not a directory")
    probe_dir = out
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise UserError(f"--out {str(out)!r} is not writable: {str(probe_dir)!r} is a file")
    try:
        fd, name = tempfile.mkstemp(prefix=".af1-probe-", dir=probe_dir)
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        raise UserError(f"--out {str(out)!r} is not writable ({err.strerror})") from None


# -- one task's evaluation state -------------------------------------------------------------


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
                from .remote import RemoteExecutor

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
        """The fields every results row of this task starts with."""
        return {"task": self.task, "style": self.style, "dataset_fingerprint": self.fingerprint}

    def items(self, cells: list[Cell]) -> list[tuple]:
        """``(cell, plan, cama_layer)`` for the cells not yet in the results."""
        todo = [c for c in cells
                if cell_key({**self.row_base, **c.row_fields()}) not in self.job.log]
        n_layers = self.job.model.n_layers
        interventions = [as_intervention(c.intervention, n_layers) for c in todo]
        needed = {i.replace_layer for i in interventions if i.needs_table}
        table = self.table_for(needed) if needed else None
        return [(cell, cell.intervention,
                 table.for_intervention(i) if i.needs_table else None)
                for cell, i in zip(todo, interventions)]

    @property
    def full(self) -> Predictions:
        if self._full is None:
            from tasks import save_task

            self._full = self.executor.clean()
            target = self.job.out / "data" / self.label
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
            "data_dir": f"data/{self.label}",
        }
        if self._full is not None:
            entry["full_accuracy"] = float((self._full.pred_ids == self.answers).mean())
        if self._table is not None:
            table, path, cached = self._table
            entry.update(cama_table=str(path), cama_table_was_cached=cached,
                         cama_layers=table.layers)
        self.job.manifest["tasks"][self.label] = entry
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


# -- the job ---------------------------------------------------------------------------------


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
        self.log: ResultsLog | None = None
        self.searches: dict[str, dict] = {}
        self.client = None  # a RemoteClient for --remote, made once the output directory exists

    def save_manifest(self) -> None:
        write_json_atomic(self.out / "manifest.json", self.manifest)

    def start(self, grid: dict) -> None:
        """Create the output directory, refuse foreign results, write the first manifest."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = ResultsLog(self.out / "results.jsonl")
        foreign = {r.get("model_fingerprint") for r in self.log} - {
            self.model.identity.fingerprint}
        if foreign:
            raise UserError(f"{str(self.log.path)!r} holds results of another model "
                            f"({foreign.pop()}); choose another --out")
        previous = {}
        if (self.out / "manifest.json").is_file():
            try:
                previous = json.loads((self.out / "manifest.json").read_text())
            except ValueError:
                previous = {}
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
            "resumed_rows": len(self.log),
            "dropped_torn_line": self.log.dropped_torn_line,
        })
        self.save_manifest()

    def finish(self, started: float, n_new: int) -> None:
        self.timings["total_s"] = time.time() - started
        if self.client is not None:
            self.manifest["remote"] = self.client.stats.to_dict()
        self.manifest["history"].append({"started": self.manifest["started"], "finished": now(),
                                         "command": self.manifest["command"],
                                         "n_rows_new": n_new})
        self.manifest.update({"status": "complete", "finished": now(), "timings": self.timings,
                              "n_rows": len(self.log), "n_rows_new": n_new})
        self.save_manifest()


def run_job(cfg: JobConfig) -> Path:
    """Run the experiments described by ``cfg``; returns the output directory."""
    import datasets
    import transformers

    datasets.disable_progress_bars()  # saving a few hundred rows needs no bar
    if not cfg.progress:
        transformers.utils.logging.disable_progress_bar()
    started = time.time()
    experiments = parse_experiments(cfg.experiments)
    out = Path(cfg.out) if cfg.out else default_out(cfg.model)
    check_out_writable(out)
    l_transfers = parse_layer_values(cfg.l_transfer, "l-transfer")
    l_waits_spec = None if cfg.l_wait is None else parse_layer_values(cfg.l_wait, "l-wait")
    if cfg.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if cfg.n_prompts is not None and cfg.n_prompts < 1:
        raise UserError(f"--n-prompts must be >= 1, got {cfg.n_prompts}")
    if not 0.0 < cfg.threshold <= 1.0:
        raise UserError(f"--threshold must lie in (0, 1], got {cfg.threshold}")
    if cfg.executor not in EXECUTORS:
        raise UserError(f"--executor must be one of {', '.join(EXECUTORS)}, got {cfg.executor!r}")
    if (cfg.dry_run or cfg.submit) and not cfg.remote:
        raise UserError("--dry-run and --submit go with --remote")
    if cfg.remote_backend not in ("remote", "local"):
        raise UserError(f"--remote-backend must be remote or local, got {cfg.remote_backend!r}")
    if cfg.cells_per_request < 1:
        raise UserError(f"--cells-per-request must be >= 1, got {cfg.cells_per_request}")

    t = time.time()
    model = _load(cfg)
    job = Job(cfg, model, out, experiments)
    job.timings["load_model_s"] = time.time() - t
    n_layers = model.n_layers
    l_waits = list(range(n_layers)) if l_waits_spec is None else l_waits_spec
    plans = grid_plans(l_waits, l_transfers, n_layers)
    fixed_config = parse_af1_config(cfg.af1_config, n_layers)

    main_runs = [TaskRun(_build(cfg, model, task, cfg.style, cfg.template), job)
                 for task in cfg.tasks]
    for run in main_runs:
        print(f"[af1] task {run.build.summary()}", flush=True)
    if cfg.cama_table:
        if len(main_runs) != 1:
            raise UserError("--cama-table applies to a single task; pass one task with --tasks")
        table = CamaTable.load(cfg.cama_table).check(
            model.identity.fingerprint, main_runs[0].fingerprint, model.identity.dtype,
            layers=sorted({p.l_wait for p in plans if p.l_wait > 0}))
        main_runs[0].use_table(table, Path(cfg.cama_table))
    extra_runs, skipped = _experiment_tasks(cfg, model, job, experiments)
    if cfg.dry_run:
        print(_dry_run(job, main_runs, extra_runs, plans, fixed_config))
        return out

    # Every user-facing check is done: from here on the output directory is written.
    job.start({"l_wait": l_waits, "l_transfer": l_transfers, "n_cells": len(plans)})
    job.manifest["skipped_tasks"] = skipped
    if cfg.remote:
        from .remote import RemoteClient

        job.client = RemoteClient(model, cfg.remote_backend, ledger=out / "remote",
                                  blocking=not cfg.submit)
    if cfg.submit:
        _submit(job, main_runs, plans)
        return out
    n_new = 0
    t = time.time()
    if "sweep" in experiments:
        for run in main_runs:
            n_new += run.evaluate(sweep_cells(plans), "sweep")
            _search(job, run)
    if "necessity" in experiments:
        for run in main_runs:
            n_new += run.evaluate(necessity_cells(n_layers), "necessity")
    config = None
    if any(e in experiments for e in NEEDS_CONFIG):
        config = fixed_config or _model_config(job, main_runs[0], plans)
        job.manifest["af1_config"] = {"l_wait": config.l_wait, "l_transfer": config.l_transfer,
                                      "source": "--af1-config" if fixed_config else
                                      f"search on {main_runs[0].label}"}
    if "alternatives" in experiments:
        for run in main_runs:
            run_config = fixed_config or _model_config(job, run, plans)
            n_new += run.evaluate(alternative_cells(run_config), "alternatives")
    for name in ("styles", "three_operand"):
        if name in experiments:
            for run in extra_runs[name]:
                n_new += run.evaluate(config_cells(name, config), name)
    if "three_operand" in experiments:
        _probe(job, extra_runs["three_operand"])
    job.timings["experiments_s"] = time.time() - t

    from figures.render import render_all

    t = time.time()
    job.manifest["figures"] = [str(p.relative_to(out)) for p in render_all(out)]
    job.timings["figures_s"] = time.time() - t
    job.finish(started, n_new)
    return out


def _load(cfg: JobConfig) -> AF1Model:
    """The model: local weights, or for ``--remote`` the architecture only (after preflight).

    ``--remote-backend local`` runs the remote path against local weights (the offline test).
    """
    if cfg.remote and cfg.remote_backend == "remote":
        from .preflight import preflight
        from .remote import load_remote_model

        if cfg.device != "auto" or cfg.dtype not in ("auto", "bfloat16"):
            print("[af1] note: --device/--dtype do not apply to NDIF (it runs bfloat16 on its "
                  "own GPUs)", flush=True)
        check = preflight(cfg.model, cfg.revision)
        for warning in check.warnings:
            print(f"[af1] warning: {warning}", flush=True)
        return load_remote_model(cfg.model, revision=cfg.revision,
                                 attn_implementation=cfg.attn_implementation)
    return load_model(cfg.model, dtype=cfg.dtype, device=cfg.device,
                      attn_implementation=cfg.attn_implementation, revision=cfg.revision)


def _planned_cells(main: list[TaskRun], extra: dict[str, list[TaskRun]], plans,
                   fixed_config, experiments, n_layers) -> list[tuple[TaskRun, list[Cell]]]:
    """Every (task, cells) evaluation the experiments would run, in order (one entry per
    experiment and task, as :func:`run_job` evaluates them); configuration-dependent cells use
    ``--af1-config`` or, before any search, the middle of the model (an estimate)."""
    config = fixed_config or AF1Plan(n_layers // 2, min(2, n_layers - n_layers // 2))
    planned = []
    if "sweep" in experiments:
        planned += [(run, sweep_cells(plans)) for run in main]
    if "necessity" in experiments:
        planned += [(run, necessity_cells(n_layers)) for run in main]
    if "alternatives" in experiments:
        planned += [(run, alternative_cells(config)) for run in main]
    for name in ("styles", "three_operand"):
        if name in experiments:
            planned += [(run, config_cells(name, config)) for run in extra[name]]
    return planned


def _dry_run(job: Job, main_runs, extra_runs, plans, fixed_config) -> str:
    """The remote requests the job would send, with their sizes; writes and sends nothing."""
    from .cama import cama_cache_path
    from .preflight import PlannedTask, plan_remote_job
    from .results import read_results

    done = set()
    if (job.out / "results.jsonl").is_file():
        done = {cell_key(r) for r in read_results(job.out / "results.jsonl")}
    n_layers = job.model.n_layers
    tasks = []
    built: dict[str, set] = {}  # layers each task's table will hold by then
    for run, cells in _planned_cells(main_runs, extra_runs, plans, fixed_config,
                                     job.experiments, n_layers):
        todo = [c for c in cells if cell_key({**run.row_base, **c.row_fields()}) not in done]
        if not todo:
            continue
        interventions = [as_intervention(c.intervention, n_layers) for c in todo]
        needed = {i.replace_layer for i in interventions if i.needs_table}
        first = run.label not in built
        have = built.setdefault(run.label, set())
        if first and cama_cache_path(job.model, run.fingerprint, job.cache_root).is_file():
            have.update(range(n_layers + 1))
        build = sorted(needed | have) if not needed <= have else []
        have.update(build)
        tasks.append(PlannedTask(run.label, run.dataset["prompt"], [c.intervention for c in todo],
                                 build, clean=first))
    plan = plan_remote_job(job.model, tasks, batch_size=job.cfg.batch_size,
                           cells_per_request=job.cfg.cells_per_request)
    note = "" if fixed_config or not any(
        e in job.experiments for e in NEEDS_CONFIG) else (
        "\nnote: alternatives/styles/three_operand are planned at an assumed AF1 configuration "
        "(the sweep decides the real one; the request count does not depend on it)")
    probe = next((r for r in extra_runs.get("three_operand", []) if r.task == PROBE_TASK), None)
    if probe is not None and not (job.out / "probe.json").is_file():
        pairs = len(set(zip(probe.dataset["A"], probe.dataset["B"])))
        batches = -(-pairs // job.cfg.batch_size)
        note += (f"\nplus the partial-result probe: {3 * batches} small requests (3 reads x "
                 f"{batches} batches of its {pairs} operand pairs)")
    return str(plan) + note


def _submit(job: Job, main_runs: list[TaskRun], plans: list[AF1Plan]) -> None:
    """Build the CAMA tables (waiting), then submit every sweep/necessity request without
    waiting; the job ids stay in ``<out>/remote``. Rerunning without ``--submit`` collects."""
    n_layers = job.model.n_layers
    jobs = []
    for run, cells in _planned_cells(main_runs, {}, plans, None,
                                     [e for e in job.experiments
                                      if e in ("sweep", "necessity")], n_layers):
        items = run.items(cells)
        if items:
            jobs += run.executor.submit(items)
    job.manifest.update(status="submitted", submitted_jobs=jobs,
                        remote=job.client.stats.to_dict())
    job.save_manifest()
    print(f"[af1] submitted {len(jobs)} requests; rerun the same command without --submit to "
          f"collect them (job ids in {job.out / 'remote'})", flush=True)


def _build(cfg: JobConfig, model: AF1Model, task: str, style: str, template: str | None):
    from tasks import build_task

    try:
        return build_task(model.tokenizer, task=task, style=style, template=template,
                          n_prompts=cfg.n_prompts, seed=cfg.seed,
                          operand_range=cfg.operand_range)
    except ValueError as err:
        raise UserError(str(err)) from None


def _experiment_tasks(cfg, model, job, experiments) -> tuple[dict[str, list[TaskRun]], list]:
    """Data sets of the styles and three-operand experiments. A style the tokenizer cannot
    serve (filtering empties it) is skipped and reported, not fatal."""
    wanted: dict[str, list[tuple[str, str]]] = {"styles": [], "three_operand": []}
    if "styles" in experiments:
        wanted["styles"] = [(task, style) for task in STYLE_TASKS for style in PAPER_STYLES]
    if "three_operand" in experiments:
        style = cfg.style if cfg.template is None and cfg.style in (
            "calculate", "symbolic", "code") else "calculate"
        wanted["three_operand"] = [(task, style) for task in THREE_OPERAND_TASKS]
    runs: dict[str, list[TaskRun]] = {name: [] for name in wanted}
    skipped = []
    for name, pairs in wanted.items():
        for task, style in pairs:
            try:
                runs[name].append(TaskRun(_build(cfg, model, task, style, None), job))
            except UserError as err:
                skipped.append({"experiment": name, "task": task, "style": style,
                                "reason": str(err)})
                print(f"[af1] skipping {name} {task}/{style}: {err}", flush=True)
    return runs, skipped


def _search(job: Job, run: TaskRun) -> dict:
    """Frontier and AF1 configuration of one task from its sweep rows (all on record)."""
    rows = job.log.select(experiment="sweep", dataset_fingerprint=run.fingerprint, sink=True,
                          wait_ablation="cama", transfer_peek="last")
    result = {"task": run.task, "style": run.style, "dataset_fingerprint": run.fingerprint,
              **af1_search(rows, job.cfg.threshold)}
    job.searches[run.label] = result
    searches = {}
    path = job.out / "af1_search.json"
    if path.is_file():
        searches = json.loads(path.read_text())
    searches[run.label] = result
    write_json_atomic(path, searches)
    job.manifest["af1_search"] = searches
    job.save_manifest()
    met = "" if result["met_threshold"] else f" (no cell reaches {job.cfg.threshold}: best cell)"
    print(f"[af1] {run.label}: AF1 configuration L_wait={result['l_wait']}, "
          f"L_transfer={result['l_transfer']}, faithfulness {result['faithfulness']}{met}",
          flush=True)
    return result


def _model_config(job: Job, run: TaskRun, plans: list[AF1Plan]) -> AF1Plan:
    """The AF1 configuration of a task: from this run's search, else from sweep rows already
    in the output directory, else by running the sweep now."""
    if run.label not in job.searches:
        if not job.log.select(experiment="sweep", dataset_fingerprint=run.fingerprint):
            print(f"[af1] {run.label}: running the sweep first to find the AF1 configuration",
                  flush=True)
            run.evaluate(sweep_cells(plans), "sweep")
        _search(job, run)
    found = job.searches[run.label]
    return AF1Plan(found["l_wait"], found["l_transfer"])


def _probe(job: Job, runs: list[TaskRun]) -> None:
    from .probe import partial_result_probe

    run = next((r for r in runs if r.task == PROBE_TASK), None)
    if run is None:
        return
    path = job.out / "probe.json"
    if path.is_file():
        existing = json.loads(path.read_text())
        if existing.get("dataset_fingerprint") == run.fingerprint:
            return
    t = time.time()
    backend_for = None
    if job.client is not None:
        def backend_for(label):
            return job.client.backend("probe", label)
    result = partial_result_probe(job.model, run.dataset, batch_size=job.cfg.batch_size,
                                  seed=job.cfg.seed, backend_for=backend_for)
    result.update(task=run.task, style=run.style, dataset_fingerprint=run.fingerprint)
    write_json_atomic(path, result)
    job.timings["probe_s"] = time.time() - t
