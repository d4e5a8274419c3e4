"""Several models in one command: ``run.py --model A,B,C [...]``.

The same job runs for each model in turn into ``--out/<model>`` (``runs/<model>`` by default,
each resuming as a single run does), then the comparison of the runs that finished is written
to ``--out/compare/``. Drawing (each run's figures, the comparison) is the caller's, passed in as
functions (``run.py`` passes those of :mod:`figures`): the pipeline does not import ``figures``.
A model that fails (not hosted, refused, out of
memory) is reported in one ``error:`` line and the others go on; the exit status is non-zero
when any failed. With ``--remote --dry-run`` each model's plan is printed, then the total.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable

from ..errors import UserError
from ..mechanisms.plan import PlanError
from .config import JobConfig, check_out_writable, default_out
from .jobs import run_job

COMPARE_DIR = "compare"


def split_models(spec: str) -> list[str]:
    """``"smollm2, ./tiny"`` -> ``["smollm2", "./tiny"]``; refuses empty entries and two
    models that would share an output folder."""
    models = [m.strip() for m in spec.split(",")]
    if any(not m for m in models):
        raise UserError(f"--model takes models separated by commas, got {spec!r}")
    folders = [default_out(m).name for m in models]
    for folder in folders:
        if folders.count(folder) > 1 or folder == COMPARE_DIR:
            same = [m for m, f in zip(models, folders) if f == folder]
            raise UserError(f"models {', '.join(same)} would write to the same folder "
                            f"{folder!r}; give each once (or rename a local directory)")
    return models


def model_outputs(cfg: JobConfig, models: list[str]) -> dict[str, Path]:
    """Each model's output directory: ``--out/<model>`` (``runs/<model>`` without ``--out``)."""
    root = Path(cfg.out) if cfg.out else Path("runs")
    return {m: root / default_out(m).name for m in models}


def run_models(cfg: JobConfig, spec: str, render: Callable[[Path], object] | None = None,
               compare: Callable[[list[Path], Path], object] | None = None) -> int:
    """Run ``cfg`` for each model of the comma list ``spec``; returns the exit status (0: all
    ran; 1: some failed; 2: all failed). Failures are printed as one ``error:`` line each.

    ``render(out)``: draws a run's figures after its job, when the job evaluated
    (:attr:`JobConfig.evaluates`); a failure there is that model's. ``compare(runs, out)``:
    compares the runs that finished, into ``<root>/compare``."""
    models = split_models(spec)
    outputs = model_outputs(cfg, models)
    root = next(iter(outputs.values())).parent
    check_out_writable(root)
    finished: list[Path] = []
    failed: list[str] = []
    plans = []
    for i, (model, out) in enumerate(outputs.items(), 1):
        print(f"[af1] model {i}/{len(models)}: {model} -> {out}", flush=True)
        report: dict = {}
        try:
            run_job(replace(cfg, model=model, out=str(out)), report)
            if render is not None and cfg.evaluates:
                render(out)
        except KeyboardInterrupt:
            raise
        except Exception as err:  # noqa: BLE001 -- one model's failure must not stop the others
            what = "" if isinstance(err, (UserError, PlanError)) else f"{type(err).__name__}: "
            message = (str(err).strip().splitlines() or [""])[0]
            print(f"error: {model}: {what}{message}", file=sys.stderr, flush=True)
            failed.append(model)
            continue
        finished.append(out)
        if report.get("remote_plan") is not None:
            plans.append((model, report["remote_plan"]))
    if cfg.dry_run:
        if plans:
            print(dry_run_total(plans))
    elif finished and compare is not None:
        compare(finished, root / COMPARE_DIR)
        print(f"[af1] comparison of {len(finished)} run{'s' if len(finished) > 1 else ''} in "
              f"{root / COMPARE_DIR}/ (compare.md, compare.json, figures)", flush=True)
    if failed:
        print(f"[af1] {len(failed)} of {len(models)} models failed: {', '.join(failed)}",
              file=sys.stderr, flush=True)
        return 2 if len(failed) == len(models) else 1
    return 0


def dry_run_total(plans) -> str:
    """The dry runs' totals, per model and over all (``plans``: ``(model, RemotePlan)``)."""
    from ..executors.remote.client import format_bytes

    lines = ["NDIF dry run, all models:"]
    totals = {"requests": 0, "configurations": 0, "forward passes": 0, "up": 0, "down": 0}
    for model, plan in plans:
        summary = plan.to_dict()
        counts = {"requests": summary["n_requests"], "configurations": summary["n_cells"],
                  "forward passes": summary["n_traces"], "up": summary["bytes_up"],
                  "down": summary["bytes_down"]}
        for key, value in counts.items():
            totals[key] += value
        lines.append(f"  {model}: " + _counts(counts, format_bytes))
    lines.append("total: " + _counts(totals, format_bytes) + "; nothing was sent")
    return "\n".join(lines)


def _counts(counts: dict, format_bytes) -> str:
    return (f"{counts['requests']} requests, {counts['configurations']} configurations, "
            f"{counts['forward passes']} forward passes, up {format_bytes(counts['up'])}, "
            f"down {format_bytes(counts['down'])}")
