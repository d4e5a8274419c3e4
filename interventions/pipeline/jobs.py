"""Runs experiments end to end: tasks -> CAMA tables -> cells -> results and the AF1 search.

``run.py`` parses flags into a :class:`~interventions.pipeline.config.JobConfig`, calls
:func:`run_job`, then draws the figures from the saved results (:func:`figures.render.render_run`;
the pipeline never imports ``figures``). Every check that can
fail because of the user's input (model path, layer ranges, templates, empty data sets, CAMA
table mismatch, output path) happens before anything is written to the output directory.

Output directory layout::

    manifest.json            how the results were made (model + hash, versions, git, timings)
    results.jsonl            one line per evaluated cell (experiment, task, plan or layer window)
    af1_search.json          frontier and AF1 configuration per swept task
    probe.json               partial-result probe (three_operand experiment)
    data/<task>-<style>/     the exact data sets (datasets.save_to_disk) with full-model predictions
                             (a second data set of a task and style: <task>-<style>~<fingerprint>)
    figures/                 every figure (PNG, PDF, caption) and tables.md, from the files above
                             (drawn by run.py after the job)

Re-running the same command resumes: finished cells are skipped, a torn last line is dropped.
A cell counts as finished only in the same setting (dtype, attention implementation, backend,
answer scoring): a run in another setting evaluates its cells and keeps its rows apart, and the
search, figures and tables use the current setting's rows.
"""

from __future__ import annotations

import json
from functools import partial
import time
from pathlib import Path

from ..errors import UserError
from ..mechanisms.cama import CamaTable, groups_digest
from ..mechanisms.models import AF1Model, load_model
from ..mechanisms.plan import AF1Plan
from .config import (JobConfig, check_config, check_out_writable, default_out, grid_plans,
                     parse_af1_config, parse_layer_values)
from .experiments import (NEEDS_CONFIG, PAPER_STYLES, PROBE_TASK, STYLE_TASKS,
                          THREE_OPERAND_TASKS, evaluation_plan, holdout_split, parse_experiments,
                          search_task, sweep_cells)
from .manifest import write_json_atomic
from .remote_jobs import dry_run, start_remote, submit
from .results import setting_of
from .state import Job
from .taskrun import TaskRun


def run_job(cfg: JobConfig, report: dict | None = None) -> Path:
    """Run the experiments described by ``cfg``; returns the output directory. With
    ``--dry-run``, ``report`` (when given) receives the plan as ``report["remote_plan"]``."""
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
    check_config(cfg)

    t = time.time()
    model, checked = _load(cfg)
    job = Job(cfg, model, out, experiments)
    job.preflight = checked
    job.timings["load_model_s"] = time.time() - t
    n_layers = model.n_layers
    l_waits = list(range(n_layers)) if l_waits_spec is None else l_waits_spec
    plans = grid_plans(l_waits, l_transfers, n_layers)
    fixed_config = parse_af1_config(cfg.af1_config, n_layers)

    builds = [_build_dataset(cfg, model)] if cfg.dataset else []
    builds += [_build(cfg, model, task, cfg.style, cfg.template) for task in cfg.tasks]
    main_runs = [TaskRun(build, job.context) for build in builds]
    for run in main_runs:
        print(f"[af1] task {run.build.summary()}", flush=True)
    if cfg.cama_table:
        if len(main_runs) != 1:
            raise UserError("--cama-table applies to a single task; pass one task with --tasks")
        table = CamaTable.load(cfg.cama_table).check(
            model.identity.fingerprint, main_runs[0].fingerprint, model.identity.dtype,
            layers=sorted({p.l_wait for p in plans if p.l_wait > 0}),
            attn_implementation=model.identity.attn_implementation,
            groups=groups_digest(main_runs[0].groups))
        main_runs[0].use_table(table, Path(cfg.cama_table))
    extra_runs, skipped = _experiment_tasks(cfg, model, job, experiments)
    if cfg.dry_run:
        print(dry_run(job, main_runs, extra_runs, plans, fixed_config))
        if report is not None:
            report["remote_plan"] = job.remote_plan
        return out

    # Every user-facing check is done: from here on the output directory is written.
    job.start({"l_wait": l_waits, "l_transfer": l_transfers, "n_cells": len(plans)},
              main_runs[0].setting)
    job.manifest["skipped_tasks"] = skipped
    if cfg.remote:
        start_remote(job, main_runs[0])
    if cfg.submit:
        submit(job, main_runs, plans)
        return out
    n_new = 0
    t = time.time()

    def config_for(run: TaskRun | None) -> AF1Plan:
        """The AF1 configuration of ``run`` (``None``: of the first task, for the styles and
        three-operand experiments), searched when first needed."""
        return fixed_config or _model_config(job, run or main_runs[0], plans)

    for experiment, run, cells in evaluation_plan(experiments, main_runs, extra_runs, plans,
                                                  n_layers, config_for):
        n_new += run.evaluate(cells, experiment)
        if experiment == "sweep":
            _search(job, run)
    if any(e in experiments for e in NEEDS_CONFIG):
        config = config_for(None)
        job.manifest["af1_config"] = {"l_wait": config.l_wait, "l_transfer": config.l_transfer,
                                      "source": "--af1-config" if fixed_config else
                                      f"search on {main_runs[0].name}"}
    if "three_operand" in experiments:
        _probe(job, extra_runs["three_operand"])
    job.timings["experiments_s"] = time.time() - t
    job.finish(started, n_new)
    return out


def _load(cfg: JobConfig):
    """The model: local weights, or for ``--remote`` the architecture only (after preflight,
    whose result comes second; ``None`` when there is none).

    ``--remote-backend local`` runs the remote path against local weights (the offline test).
    """
    if cfg.remote and cfg.remote_backend == "remote":
        from ..executors.remote.preflight import preflight
        from ..executors.remote.executor import load_remote_model

        if cfg.device != "auto" or cfg.dtype not in ("auto", "bfloat16"):
            print("[af1] note: --device/--dtype do not apply to NDIF (it runs bfloat16 on its "
                  "own GPUs)", flush=True)
        check = preflight(cfg.model, cfg.revision, allow_version_drift=cfg.allow_version_drift,
                          allow_nnsight_mismatch=cfg.allow_nnsight_mismatch,
                          dry_run=cfg.dry_run)
        for warning in check.warnings:
            print(f"[af1] warning: {warning}", flush=True)
        for note in check.notes:
            print(f"[af1] note: {note}", flush=True)
        return load_remote_model(cfg.model, revision=cfg.revision,
                                 attn_implementation=cfg.attn_implementation), check
    if cfg.remote and not cfg.dry_run:  # --remote-backend local: NDIF's code plays the server
        from ..executors.remote.transport import require_ndif

        require_ndif()
    return load_model(cfg.model, dtype=cfg.dtype, device=cfg.device,
                      attn_implementation=cfg.attn_implementation, revision=cfg.revision), None


def _build(cfg: JobConfig, model: AF1Model, task: str, style: str, template: str | None):
    """An arithmetic task (operator form, style or template) or a built-in family."""
    from tasks import FAMILIES, TASKS, build_family, build_task

    try:
        if task in FAMILIES:
            if template is not None:
                raise UserError(f"--template applies to the arithmetic tasks, not to {task}")
            return build_family(model.tokenizer, task, n_prompts=cfg.n_prompts, seed=cfg.seed)
        if task not in TASKS:
            raise UserError(f"unknown task {task!r}; tasks: {', '.join(TASKS + tuple(FAMILIES))}"
                            f" (or your own with --dataset)")
        return build_task(model.tokenizer, task=task, style=style, template=template,
                          n_prompts=cfg.n_prompts, seed=cfg.seed,
                          operand_range=cfg.operand_range)
    except ValueError as err:
        raise UserError(str(err)) from None


def _build_dataset(cfg: JobConfig, model: AF1Model):
    """The task of ``--dataset``."""
    from tasks import build_dataset_task

    try:
        return build_dataset_task(model.tokenizer, cfg.dataset, prompt_column=cfg.prompt_column,
                                  answer_column=cfg.answer_column, split=cfg.split,
                                  n_prompts=cfg.n_prompts, seed=cfg.seed)
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
                runs[name].append(TaskRun(_build(cfg, model, task, style, None),
                                          job.context))
            except UserError as err:
                skipped.append({"experiment": name, "task": task, "style": style,
                                "reason": str(err)})
                print(f"[af1] skipping {name} {task}/{style}: {err}", flush=True)
    return runs, skipped


def _search(job: Job, run: TaskRun) -> dict:
    """Frontier and AF1 configuration of one data set from its sweep rows (all on record),
    chosen on every prompt or, with ``--holdout``, on one part of them and graded on the
    other (:func:`~.experiments.search_task`)."""
    cfg = job.cfg
    rows = job.log.select(experiment="sweep", dataset_fingerprint=run.fingerprint, sink=True,
                          wait_ablation="cama", transfer_peek="last", **run.setting)
    outcomes = run.outcomes
    split = skipped = None
    if cfg.holdout is not None:
        try:
            split = holdout_split(outcomes.full.ok, run.prompt_strata(), cfg.holdout, cfg.seed)
        except UserError as err:  # too few right prompts in this task: say so, go on
            skipped = f"{err}; chosen and graded in-sample"
            print(f"[af1] warning: {run.name}: {skipped}", flush=True)
    result = {"task": run.task, "style": run.style, "dataset_fingerprint": run.fingerprint,
              "setting": run.setting,
              **search_task(rows, cfg.threshold, cfg.threshold_on, outcomes, split, cfg.seed)}
    if skipped:
        result["holdout_skipped"] = skipped
    job.searches[run.name] = result
    searches = {}
    path = job.out / "af1_search.json"
    if path.is_file():
        searches = json.loads(path.read_text())
    searches[run.name] = result
    write_json_atomic(path, searches)
    job.manifest["af1_search"] = searches
    job.save_manifest()
    rule = "faithfulness" if result["threshold_on"] == "point" else "its 95% lower bound"
    met = "" if result["met_threshold"] else ", reached by no cell: best cell"
    held = result["holdout"]
    grade = (f"in-sample (selected on these prompts) {_faithfulness_text(result)}"
             if held is None else
             f"chosen on {held['n_select_prompts']} prompts, held-out "
             f"{_faithfulness_text(held)} on the other {held['n_eval_prompts']}")
    also = result.get("threshold_0.9")
    note = ("" if not also or not also["differs"] else
            f"; at threshold 0.9: L_wait={also['l_wait']}, L_transfer={also['l_transfer']}")
    print(f"[af1] {run.name}: AF1 configuration L_wait={result['l_wait']}, "
          f"L_transfer={result['l_transfer']}, faithfulness {grade} (threshold "
          f"{cfg.threshold} on {rule}{met}){note}", flush=True)
    return result


def _faithfulness_text(grade: dict) -> str:
    """``24/26 = 0.923, 95% interval 0.759-0.979, answer probability ratio 0.95`` (or
    ``undefined``)."""
    if grade["faithfulness"] is None:
        return "undefined"
    low, high = grade["faithfulness_ci"]
    ratio = grade.get("answer_prob_ratio")
    return (f"{grade['n_af1_correct_of_full']}/{grade['n_full_correct']} = "
            f"{grade['faithfulness']:.3f}, 95% interval {low:.3f}-{high:.3f}"
            + ("" if ratio is None else f", answer probability ratio {ratio:.3f}"))


def _model_config(job: Job, run: TaskRun, plans: list[AF1Plan]) -> AF1Plan:
    """The AF1 configuration of a task: from this run's search, else from sweep rows already
    in the output directory, else by running the sweep now."""
    if run.name not in job.searches:
        if not job.log.select(experiment="sweep", dataset_fingerprint=run.fingerprint,
                              **run.setting):
            print(f"[af1] {run.label}: running the sweep first to find the AF1 configuration",
                  flush=True)
            run.evaluate(sweep_cells(plans), "sweep")
        _search(job, run)
    found = job.searches[run.name]
    return AF1Plan(found["l_wait"], found["l_transfer"])


def _probe(job: Job, runs: list[TaskRun]) -> None:
    from .probe import partial_result_probe

    run = next((r for r in runs if r.task == PROBE_TASK), None)
    if run is None:
        return
    path = job.out / "probe.json"
    if path.is_file():
        existing = json.loads(path.read_text())
        if (existing.get("dataset_fingerprint") == run.fingerprint
                and setting_of(existing) == run.setting):
            return
    t = time.time()
    backend_for = None if job.client is None else partial(job.client.backend, "probe")
    result = partial_result_probe(job.model, run.dataset, batch_size=job.cfg.batch_size,
                                  seed=job.cfg.seed, backend_for=backend_for)
    result.update(task=run.task, style=run.style, dataset_fingerprint=run.fingerprint,
                  **run.setting)
    write_json_atomic(path, result)
    job.timings["probe_s"] = time.time() - t
