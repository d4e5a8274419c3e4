"""The paper's experiments as lists of cells, and the AF1 search over a sweep's results.

An experiment is a list of :class:`Cell`: what to evaluate (an :class:`AF1Plan` or a general
:class:`Intervention`) plus the fields that identify it in ``results.jsonl``. Executors evaluate
cells; nothing here runs a model.

* ``sweep``        the ``L_wait x L_transfer`` grid of AF1 plans.
* ``necessity``    the full model with the last token's attention to every non-sink token
                   removed in one window of consecutive layers (sizes 1..4), one window at a time.
* ``alternatives`` at the AF1 configuration: the wait stage by CAMA, zero ablation, position-only
                   mean or nothing; the transfer stage by ABP, every token peeking, or no sink.
* ``styles``       the six input styles x {A+B, A-B} at the AF1 configuration.
* ``three_operand`` AF1 on the four three-operand tasks at the AF1 configuration (plus the
                   partial-result probe, see :mod:`interventions.pipeline.probe`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np

from ..errors import UserError
from ..mechanisms.plan import AF1Plan, Intervention
from .scoring import MEASURES

EXPERIMENTS = ("sweep", "necessity", "alternatives", "styles", "three_operand")
# Experiments that need the model's AF1 configuration, found by the sweep.
NEEDS_CONFIG = ("alternatives", "styles", "three_operand")
NECESSITY_WINDOWS = (1, 2, 3, 4)
PAPER_STYLES = ("symbolic", "words", "question", "instruction", "story", "code")
STYLE_TASKS = ("A+B", "A-B")
THREE_OPERAND_TASKS = ("A+B+C", "A+B-C", "A-B+C", "A-B-C")
# The three-operand task whose partial result the probe reads (:mod:`.probe`).
PROBE_TASK = "A+B-C"


@dataclass(frozen=True)
class Cell:
    """One evaluation: ``intervention`` on one data set, and how its row is labelled.

    ``fields`` are the row's identifying fields besides experiment/task/data set (plan fields
    are added from ``intervention`` when it is an :class:`AF1Plan`).
    """

    experiment: str
    intervention: AF1Plan | Intervention
    fields: dict = field(default_factory=dict)

    def row_fields(self) -> dict:
        plan_fields = (self.intervention.to_dict() if isinstance(self.intervention, AF1Plan)
                       else {"l_wait": None, "l_transfer": None, "sink": None,
                             "wait_ablation": None, "transfer_peek": None})
        return {"experiment": self.experiment, **plan_fields, "layer": None, "window": None,
                "variant": None, **self.fields}


def parse_experiments(spec: str) -> list[str]:
    """``"all"`` or a comma list of :data:`EXPERIMENTS`, in canonical order."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if names == ["all"]:
        return list(EXPERIMENTS)
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown or not names:
        raise UserError(f"unknown experiment {', '.join(unknown) or repr(spec)}; choose from "
                        f"{', '.join(EXPERIMENTS)} or all")
    return [n for n in EXPERIMENTS if n in names]


def sweep_cells(plans: list[AF1Plan]) -> list[Cell]:
    return [Cell("sweep", plan) for plan in plans]


def necessity_cells(n_layers: int, windows=NECESSITY_WINDOWS) -> list[Cell]:
    """The full model, except that in layers ``start .. start+window-1`` the last token may
    attend only to the sink and itself (every other query keeps its full causal attention)."""
    cells = []
    for window in windows:
        for start in range(n_layers - window + 1):
            rules = {k: ("sink_self", "all") for k in range(start, start + window)}
            cells.append(Cell("necessity", Intervention(rules),
                              {"layer": start, "window": window}))
    return cells


ALTERNATIVES = {
    # variant: (stage it changes, AF1Plan keyword overrides)
    "AF1 (CAMA + ABP)": ("both", {}),
    "wait: zero ablation": ("wait", {"wait_ablation": "zero"}),
    "wait: position mean": ("wait", {"wait_ablation": "position_mean"}),
    "wait: none": ("wait", {"wait_ablation": "none"}),
    "transfer: all tokens peek": ("transfer", {"transfer_peek": "all"}),
    "transfer: no sink": ("transfer", {"sink": False}),
}


def alternative_cells(config: AF1Plan) -> list[Cell]:
    """AF1 at ``config`` with one stage replaced by each alternative of the paper."""
    return [Cell("alternatives",
                 AF1Plan(config.l_wait, config.l_transfer, **overrides),
                 {"variant": variant, "stage": stage})
            for variant, (stage, overrides) in ALTERNATIVES.items()]


def config_cells(experiment: str, config: AF1Plan) -> list[Cell]:
    """The single AF1 configuration, for the styles and three-operand experiments."""
    return [Cell(experiment, AF1Plan(config.l_wait, config.l_transfer))]


Run = TypeVar("Run")  # a task run (:class:`~.taskrun.TaskRun`); only passed through here


def evaluation_plan(experiments: Sequence[str], main_runs: list[Run],
                    extra_runs: dict[str, list[Run]], plans: list[AF1Plan], n_layers: int,
                    config_for: Callable[[Run | None], AF1Plan] | None
                    ) -> Iterator[tuple[str, Run, list[Cell]]]:
    """``(experiment, task run, cells)`` in the order a job evaluates them; the one place that
    knows the order (runs, dry runs and submissions all follow it).

    ``main_runs``: the tasks of the sweep, necessity and alternatives; ``extra_runs``: those of
    the styles and three-operand experiments, by experiment. ``config_for(run)`` gives a task's
    AF1 configuration (``None``: the job's, for the styles and three-operand experiments). The
    generator calls it only when it gets there, so a sweep yielded earlier can be evaluated (and
    searched) first; it may be ``None`` when no experiment needs a configuration.
    """
    for experiment in experiments:
        if experiment == "sweep":
            for run in main_runs:
                yield experiment, run, sweep_cells(plans)
        elif experiment == "necessity":
            for run in main_runs:
                yield experiment, run, necessity_cells(n_layers)
        elif experiment == "alternatives":
            for run in main_runs:
                yield experiment, run, alternative_cells(config_for(run))
        else:
            for run in extra_runs.get(experiment, []):
                yield experiment, run, config_cells(experiment, config_for(None))


# -- AF1 search ------------------------------------------------------------------------------

# What must reach the threshold (``--threshold-on``): the faithfulness itself, or the lower end
# of its 95% interval (a cell passes only if the data rule out faithfulness below it).
THRESHOLD_RULES = ("point", "lower")
# The paper's criterion: the subgraph keeps at least 85% of the full model's performance.
DEFAULT_THRESHOLD = 0.85
# A second threshold whose configuration every search also reports when it differs (the
# toolkit's earlier default, and a stricter reading of "keeps most of the accuracy").
ALSO_REPORTED_THRESHOLD = 0.9
# The fields of a results row that the search reports for its chosen cell.
CHOSEN_FIELDS = ("faithfulness", "faithfulness_ci", "n_full_correct", "n_af1_correct_of_full",
                 "full_accuracy", "full_accuracy_ci", "n_prompts", "ci_method", "af1_vs_full",
                 *MEASURES, *(f"{m}_ci" for m in MEASURES), "measure_method")
# The fields of a grade on a subset of prompts (held-out, or the prompts that chose).
GRADE_FIELDS = ("n_full_correct", "n_af1_correct_of_full", "faithfulness", "faithfulness_ci",
                "af1_vs_full", *MEASURES, *(f"{m}_ci" for m in MEASURES), "measure_method")


def search_statistic(row: dict, on: str = "point") -> float | None:
    """The number the AF1 search compares with the threshold: the row's faithfulness
    (``on="point"``) or the lower end of its 95% interval (``on="lower"``); ``None`` when the
    full model gets no prompt right."""
    if row["faithfulness"] is None:
        return None
    return row["faithfulness"] if on == "point" else row["faithfulness_ci"][0]


def frontier(rows: list[dict], threshold: float, on: str = "point") -> dict[int, int | None]:
    """For each ``L_transfer``, the largest ``L_wait`` whose :func:`search_statistic` is
    >= ``threshold``."""
    best: dict[int, int | None] = {}
    for row in rows:
        t = row["l_transfer"]
        best.setdefault(t, None)
        value = search_statistic(row, on)
        if value is not None and value >= threshold:
            if best[t] is None or row["l_wait"] > best[t]:
                best[t] = row["l_wait"]
    return dict(sorted(best.items()))


def af1_search(rows: list[dict], threshold: float, on: str = "point") -> dict:
    """The model's AF1 configuration from sweep rows: among cells whose faithfulness (``on=
    "point"``) or its interval's lower end (``on="lower"``) is at or above ``threshold``, the
    largest ``L_wait``, then the smallest ``L_transfer``.

    When no cell reaches the threshold, the cell with the highest such value is reported instead
    (largest ``L_wait``, then smallest ``L_transfer`` among ties) with ``met_threshold = False``,
    so later experiments still have a configuration to run at; the report says so. The chosen
    cell's counts, 95% interval and continuous measures (:data:`CHOSEN_FIELDS`; ``None`` for
    rows that do not record them) are part of the result. The numbers are those of the rows
    given: graded on the prompts that chose the cell (in-sample); see :func:`search_task`.
    """
    if not rows:
        raise UserError("the AF1 search needs sweep results; run the sweep experiment")
    defined = [r for r in rows if search_statistic(r, on) is not None]
    passing = [r for r in defined if search_statistic(r, on) >= threshold]
    met = bool(passing)
    pool = passing
    if not met:
        pool = defined or rows
        top = max(search_statistic(r, on) or 0.0 for r in pool)
        pool = [r for r in pool if (search_statistic(r, on) or 0.0) == top]
    chosen = max(pool, key=lambda r: (r["l_wait"], -r["l_transfer"]))
    return {
        "threshold": threshold,
        "threshold_on": on,
        "met_threshold": met,
        "l_wait": chosen["l_wait"],
        "l_transfer": chosen["l_transfer"],
        **{name: chosen.get(name) for name in CHOSEN_FIELDS},
        "frontier": {str(t): w for t, w in frontier(rows, threshold, on).items()},
        "n_cells": len(rows),
    }


def holdout_split(full_ok: np.ndarray, strata: np.ndarray, fraction: float, seed: int
                  ) -> dict:
    """Split the prompts the full model gets right into those that choose the AF1
    configuration and those that grade it (``--holdout``).

    ``round(fraction * n)`` of the ``n`` right prompts (at least one, at most ``n - 1``) are
    held out to grade, drawn at random (``numpy.random.default_rng(seed)``) within each stratum
    (``strata``: ``(N,)`` the prompt's CAMA group and token length), each stratum contributing
    in proportion to its size (largest remainders; ties drawn at random), so both parts hold
    every template and length where a stratum has two or more prompts.

    Returns ``{"fraction", "seed", "select_prompts", "eval_prompts"}`` (sorted prompt indices);
    raises :class:`UserError` when fewer than two prompts are right.
    """
    right = np.flatnonzero(full_ok)
    n = len(right)
    if n < 2:
        raise UserError(f"--holdout needs at least 2 prompts the full model gets right to "
                        f"split, got {n}")
    n_eval = min(max(int(np.floor(fraction * n + 0.5)), 1), n - 1)
    rng = np.random.default_rng(seed)
    keys, members = np.unique(strata[right], return_inverse=True)
    sizes = np.bincount(members, minlength=len(keys))
    quota = n_eval * sizes / n
    take = np.floor(quota).astype(int)
    remainder = quota - take + rng.random(len(keys)) * 1e-9  # random among equal remainders
    take[np.argsort(-remainder, kind="stable")[:n_eval - int(take.sum())]] += 1
    held = np.concatenate([rng.permutation(right[members == k])[:take[k]]
                           for k in range(len(keys))])
    held = np.sort(held)
    return {"fraction": fraction, "seed": seed, "stratified_by": "CAMA group and token length",
            "select_prompts": np.setdiff1d(right, held).tolist(), "eval_prompts": held.tolist()}


def _grade(outcomes, row: dict, prompts, seed: int) -> dict:
    """A row's :data:`GRADE_FIELDS` on ``prompts`` only."""
    numbers = outcomes.measure(row, seed, np.asarray(prompts, dtype=np.int64))
    return {name: numbers[name] for name in GRADE_FIELDS}


def search_task(rows: list[dict], threshold: float, on: str = "point", outcomes=None,
                split: dict | None = None, seed: int = 0) -> dict:
    """The AF1 search of one data set's sweep rows, with its grade.

    Without ``split`` the configuration is chosen and graded on the same prompts:
    ``in_sample`` is true and ``holdout`` ``None`` (the grade is optimistic: it is the best of
    many cells on these prompts). With ``split`` (:func:`holdout_split`; needs ``outcomes``, a
    :class:`~.scoring.DataOutcomes` of the data set) the configuration is chosen on
    ``select_prompts`` only and graded on ``eval_prompts``: ``in_sample`` is false, and
    ``holdout`` holds the split (prompt indices and the saved data set's ``select_rows`` /
    ``eval_rows``), the chosen cell's grade on the prompts that chose it (``selection``) and its
    held-out grade (:data:`GRADE_FIELDS`). Either way the top-level numbers are the chosen
    cell's on every prompt (as its results row has them).

    When ``threshold`` is not :data:`ALSO_REPORTED_THRESHOLD` the result also holds
    ``threshold_0.9``: the configuration that threshold gives (chosen the same way, with its
    numbers and held-out grade) and whether it ``differs``; ``None`` otherwise.
    """
    # Every cell graded on the prompts that choose, once for both thresholds.
    graded = None if split is None else [
        {**row, **outcomes.measure(row, seed, np.asarray(split["select_prompts"]))}
        for row in rows]
    result = _search_graded(rows, graded, threshold, on, outcomes, split, seed)
    key = f"threshold_{ALSO_REPORTED_THRESHOLD:g}"
    result[key] = None
    if threshold != ALSO_REPORTED_THRESHOLD:
        other = _search_graded(rows, graded, ALSO_REPORTED_THRESHOLD, on, outcomes, split, seed)
        if other["holdout"] is not None:  # the same split: its lists are said once
            other["holdout"] = {k: v for k, v in other["holdout"].items()
                                if k not in ("select_prompts", "eval_prompts",
                                             "select_rows", "eval_rows")}
        result[key] = {"differs": (other["l_wait"], other["l_transfer"]) !=
                       (result["l_wait"], result["l_transfer"]), **other}
    return result


def _search_graded(rows: list[dict], graded: list[dict] | None, threshold: float, on: str,
                   outcomes, split: dict | None, seed: int) -> dict:
    """:func:`search_task` at one threshold; ``graded``: the rows graded on the prompts that
    choose (``None`` without ``split``)."""
    if split is None:
        result = {**af1_search(rows, threshold, on), "in_sample": True, "holdout": None}
    else:
        choice = af1_search(graded, threshold, on)
        chosen = next(r for r in rows if (r["l_wait"], r["l_transfer"]) ==
                      (choice["l_wait"], choice["l_transfer"]))
        result = {**choice, **{name: chosen.get(name) for name in CHOSEN_FIELDS},
                  "in_sample": False}
        result["holdout"] = {
            "fraction": split["fraction"], "seed": split["seed"],
            "stratified_by": split.get("stratified_by"),
            "n_select_prompts": len(split["select_prompts"]),
            "n_eval_prompts": len(split["eval_prompts"]),
            "select_prompts": split["select_prompts"], "eval_prompts": split["eval_prompts"],
            "select_rows": outcomes.rows_of(split["select_prompts"]),
            "eval_rows": outcomes.rows_of(split["eval_prompts"]),
            "selection": _grade(outcomes, chosen, split["select_prompts"], seed),
            **_grade(outcomes, chosen, split["eval_prompts"], seed)}
    return result
