"""The main job: tasks -> CAMA tables -> the L_wait x L_transfer grid -> results and figures.

``run.py`` parses flags into a :class:`JobConfig` and calls :func:`run_job`. Every check that can
fail because of the user's input (model path, layer ranges, templates, empty data sets, CAMA
table mismatch, output path) happens before anything is written to the output directory.

Output directory layout::

    manifest.json            how the results were made (model + hash, versions, git, timings)
    results.jsonl            one line per (task, L_wait, L_transfer) cell
    data/<task>-<style>/     the exact data set (datasets.save_to_disk) with full-model predictions
    heatmap_<task>-<style>.png/.pdf/.caption.txt
"""

from __future__ import annotations

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
from .manifest import base_manifest, now, write_json_atomic
from .models import AF1Model, cache_dir, load_model
from .plan import AF1Plan
from .results import ResultsLog, cell_key

DEFAULT_L_TRANSFER = "1-4"


@dataclass
class JobConfig:
    """Everything a job needs; the CLI's flags map one to one onto these fields."""

    model: str = "smollm2"
    tasks: Sequence[str] = ("A+B",)
    style: str = "calculate"
    template: str | None = None
    l_wait: str | None = None  # None: every layer 0..L-1
    l_transfer: str = DEFAULT_L_TRANSFER
    n_prompts: int | None = 200
    seed: int = 0
    operand_range: tuple[int, int] | None = None
    out: str | None = None
    batch_size: int = 32
    device: str = "auto"
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    revision: str | None = None
    cama_table: str | None = None
    cache_dir: str | None = None
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
    fits = [(w, t) for w in l_waits for t in l_transfers if w + t <= n_layers]
    bad_waits = sorted(set(l_waits) - {w for w, _ in fits})
    bad_transfers = sorted(set(l_transfers) - {t for _, t in fits})
    if bad_waits or bad_transfers:
        what = (f"L_wait {bad_waits}" if bad_waits else f"L_transfer {bad_transfers}")
        raise UserError(f"{what} cannot fit: L_wait + L_transfer must be <= the model's "
                        f"{n_layers} layers (L_wait {min(l_waits)}..{max(l_waits)}, "
                        f"L_transfer {min(l_transfers)}..{max(l_transfers)} requested)")
    return [AF1Plan(w, t) for w, t in fits]


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


def task_label(build) -> str:
    first = build.dataset[0]
    return f"{first['task']}-{first['style']}"


# -- the job ---------------------------------------------------------------------------------


def run_job(cfg: JobConfig) -> Path:
    """Run the default AF1 job described by ``cfg``; returns the output directory."""
    from tasks import build_task, save_task, task_fingerprint

    import datasets
    import transformers

    datasets.disable_progress_bars()  # saving a few hundred rows needs no bar
    if not cfg.progress:
        transformers.utils.logging.disable_progress_bar()
    started = time.time()
    timings: dict[str, float] = {}
    out = Path(cfg.out) if cfg.out else default_out(cfg.model)
    check_out_writable(out)
    l_transfers = parse_layer_values(cfg.l_transfer, "l-transfer")
    l_waits_spec = None if cfg.l_wait is None else parse_layer_values(cfg.l_wait, "l-wait")
    if cfg.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if cfg.n_prompts is not None and cfg.n_prompts < 1:
        raise UserError(f"--n-prompts must be >= 1, got {cfg.n_prompts}")
    root = Path(cfg.cache_dir) if cfg.cache_dir else cache_dir()

    t = time.time()
    model = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device,
                       attn_implementation=cfg.attn_implementation, revision=cfg.revision)
    timings["load_model_s"] = time.time() - t
    n_layers = model.n_layers
    l_waits = list(range(n_layers)) if l_waits_spec is None else l_waits_spec
    plans = grid_plans(l_waits, l_transfers, n_layers)

    builds = []
    for task in cfg.tasks:
        try:
            builds.append(build_task(model.tokenizer, task=task, style=cfg.style,
                                     template=cfg.template, n_prompts=cfg.n_prompts,
                                     seed=cfg.seed, operand_range=cfg.operand_range))
        except ValueError as err:
            raise UserError(str(err)) from None
        print(f"[af1] task {builds[-1].summary()}", flush=True)
    if cfg.cama_table and len(builds) != 1:
        raise UserError("--cama-table applies to a single task; pass one task with --tasks")

    t = time.time()
    tables = []
    for build in builds:
        fingerprint = task_fingerprint(build.dataset)
        if cfg.cama_table:
            table = CamaTable.load(cfg.cama_table).check(
                model.identity.fingerprint, fingerprint, model.identity.dtype,
                layers=sorted({p.l_wait for p in plans if p.l_wait > 0}))
            tables.append((table, Path(cfg.cama_table), True))
        else:
            tables.append(cached_cama_table(model, build.dataset["prompt"], fingerprint, root,
                                            batch_size=cfg.batch_size, progress=cfg.progress))
    timings["cama_s"] = time.time() - t

    # Every user-facing check is done: from here on the output directory is written.
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    manifest = base_manifest(cfg.argv)
    manifest.update({
        "status": "running",
        "config": {k: v for k, v in asdict(cfg).items() if k != "argv"},
        "model": model.identity.to_dict(),
        "executor": NnsightExecutor.name,
        "grid": {"l_wait": l_waits, "l_transfer": l_transfers, "n_cells": len(plans)},
        "tasks": {},
    })
    log = ResultsLog(out / "results.jsonl")
    _refuse_foreign_results(log, model)
    write_json_atomic(manifest_path, manifest)

    t = time.time()
    n_new = 0
    for build, (table, table_path, was_cached) in zip(builds, tables):
        label = task_label(build)
        fingerprint = task_fingerprint(build.dataset)
        dataset = build.dataset
        executor = NnsightExecutor(model, dataset["prompt"], dataset["answer_token_id"],
                                   batch_size=cfg.batch_size)
        full = executor.clean()
        answers = dataset["answer_token_id"]
        saved = dataset.add_column("full_pred_id", full.pred_ids.tolist()).add_column(
            "full_correct", (full.pred_ids == answers).tolist())
        save_task(saved, out / "data" / label)
        manifest["tasks"][label] = {
            "summary": build.summary(), "dataset_fingerprint": fingerprint,
            "n_prompts": len(dataset), "n_candidates": build.n_candidates,
            "n_dropped_not_single_token": build.n_dropped, "n_sampled_out": build.n_sampled_out,
            "operand_range": list(build.operand_range), "template": dataset[0]["template"],
            "data_dir": f"data/{label}", "cama_table": str(table_path),
            "cama_table_was_cached": was_cached, "cama_layers": table.layers,
            "full_accuracy": float((full.pred_ids == answers).mean()),
        }
        write_json_atomic(manifest_path, manifest)
        n_new += _run_grid(log, executor, full, answers, plans, table, build, fingerprint,
                           cfg.progress)
        _draw_heatmap(log, out, build, label, model, fingerprint)
    timings["grid_s"] = time.time() - t
    timings["total_s"] = time.time() - started
    manifest.update({"status": "complete", "finished": now(), "timings": timings,
                     "n_rows": len(log), "n_rows_new": n_new})
    write_json_atomic(manifest_path, manifest)
    return out


def _refuse_foreign_results(log: ResultsLog, model: AF1Model) -> None:
    """Resuming into a directory is fine; mixing another model's results into it is not."""
    foreign = {r.get("model_fingerprint") for r in log} - {model.identity.fingerprint}
    if foreign:
        raise UserError(f"{str(log.path)!r} holds results of another model ({foreign.pop()}); "
                        "choose another --out")


def _run_grid(log: ResultsLog, executor: NnsightExecutor, full: Predictions, answers,
              plans: list[AF1Plan], table: CamaTable, build, fingerprint: str,
              progress: bool) -> int:
    first = build.dataset[0]
    base = {"experiment": "sweep", "task": first["task"], "style": first["style"],
            "dataset_fingerprint": fingerprint, "layer": None}
    todo = [p for p in plans if cell_key({**base, **p.to_dict()}) not in log]
    n_layers = executor.model.n_layers
    cells = [(plan, plan, table.for_intervention(plan.intervention(n_layers))) for plan in todo]
    bar = tqdm(total=len(todo), desc=f"AF1 grid {first['task']}", unit="cell",
               disable=not progress)
    started = time.time()
    for plan, preds in executor.run_many(cells):
        row = {**base, **plan.to_dict(), **score(full, preds, answers),
               "executor": executor.name,
               "model_fingerprint": executor.model.identity.fingerprint,
               "seconds": round(time.time() - started, 4),
               "pred_ids": preds.pred_ids.tolist()}
        started = time.time()
        log.append(row)
        bar.update()
        bar.set_postfix(l_wait=plan.l_wait, l_transfer=plan.l_transfer,
                        faith=f"{row['faithfulness'] or 0:.2f}")
    bar.close()
    return len(todo)


def _draw_heatmap(log: ResultsLog, out: Path, build, label: str, model: AF1Model,
                  fingerprint: str) -> None:
    from figures.heatmap import plot_heatmap

    rows = log.select(experiment="sweep", dataset_fingerprint=fingerprint, sink=True,
                      wait_ablation="cama", transfer_peek="last")
    first = build.dataset[0]
    plot_heatmap(rows, out / f"heatmap_{label}.png",
                 title=f"AF1 faithfulness, {first['task']} ({first['style']}), "
                       f"{model.identity.architecture} {model.n_layers}L",
                 caption=(f"Faithfulness of AF1 over L_wait x L_transfer for task {first['task']} "
                          f"(style {first['style']}, template {first['template']!r}), "
                          f"{len(build.dataset)} prompts, full accuracy "
                          f"{rows[0]['full_accuracy']:.3f}; model {model.identity.model_id}. "
                          "h_k enters layer k (0-indexed); blank cells: L_wait + L_transfer > L."
                          if rows else None))
