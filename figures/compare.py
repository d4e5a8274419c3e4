"""Several runs side by side: ``python -m figures compare DIR [DIR ...] --out DIR``.

Reads each run directory's ``manifest.json``, ``results.jsonl``, ``af1_search.json`` and the
manifest's record of its data sets (no model, no torch) and writes to ``--out``:

* ``compare.md``: one row per (model, task, setting) with the model and its revision, layers,
  setting, full accuracy, the AF1 configuration, its relative depth (``L_wait/L`` and
  ``(L_wait+L_transfer)/L``), faithfulness (held out where the run has it, labelled), the
  continuous measures where the rows carry them, and the prompts each number rests on; the
  tasks that only some runs have; what the paper reports. ``compare.json`` holds the same rows.
* ``faithfulness_vs_depth_<task>``: per model, the best cell over ``L_transfer`` at each
  ``L_wait``, against ``L_wait/L``, with 95% Wilson bands.
* ``af1_windows``: each model's AF1 window (wait, transfer, compute) on a common 0-1 depth axis,
  beside its faithfulness with the paper's 85% criterion marked.
* ``necessity_vs_depth_<task>`` where runs have necessity rows: their curves on ``layer/L``.

Layers of models of different depths line up by relative depth: ``L_wait = 12`` of Llama-3-8B's
32 layers is 0.375, as is ``L_wait = 11.25`` of SmolLM2's 30.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from interventions.pipeline.experiments import DEFAULT_THRESHOLD, af1_search
from interventions.pipeline.results import read_results, setting_label, setting_of
from interventions.pipeline.scoring import MEASURES as CONTINUOUS  # each with a ``_ci`` twin

from . import compare_plots
from .render import SWEEP_FILTER, _Context, _datasets, _read_json, _select, _share

# The paper's criterion (AF1 keeps at least 85% of the full model's performance), the search's
# default threshold.
PAPER_CRITERION = DEFAULT_THRESHOLD
MISSING = "—"
PAPER_REPORTS = [
    "| model | L | AF1 configuration | L_wait/L | (L_wait+L_transfer)/L | faithfulness |",
    "|---|---|---|---|---|---|",
    "| Llama-3-8B | 32 | L_wait=12, L_transfer=2 (paper's text) | 0.38 | 0.44 | over 0.95 on "
    "two-operand sums, over 0.90 on three operands |",
    "| Llama-3-8B | 32 | authors' demo code: the residual after block 14 replaced, "
    "L_wait=15, L_transfer=2 here | 0.47 | 0.53 | |",
    "| Llama-3.1-8B | 32 | the same three-stage subgraph | | | |",
    "| Pythia-6.9B (GPT-NeoX) | 32 | similar patterns | | | about 0.70 |",
    "| GPT-J-6B | 28 | similar patterns | | | about 0.60 |",
]


class NotARun(ValueError):
    """A directory given to compare is not a run written by ``run.py``."""


@dataclass
class Run:
    """One run directory: its manifest, its rows and its saved AF1 searches."""

    path: Path
    manifest: dict
    rows: list[dict]
    searches: dict
    name: str = ""  # how tables and legends call it (set by :func:`load_runs`)

    @property
    def model(self) -> dict:
        return self.manifest["model"]

    @property
    def n_layers(self) -> int:
        return int(self.model["n_layers"])

    def settings(self) -> list[dict]:
        """The settings of its rows, in order of appearance."""
        seen: dict[str, dict] = {}
        for row in self.rows:
            seen.setdefault(setting_label(setting_of(row)), setting_of(row))
        return list(seen.values())

    def saved_search(self, fingerprint: str, setting: dict) -> dict:
        """The ``af1_search.json`` entry of a data set in a setting (``{}`` when none)."""
        return next((s for s in self.searches.values()
                     if isinstance(s, dict) and s.get("dataset_fingerprint") == fingerprint
                     and setting_of(s.get("setting", {})) == setting), {})

    def task_record(self, fingerprint: str) -> dict:
        """The manifest's record of a data set (template, operand range, ...)."""
        return next((t for t in self.manifest.get("tasks", {}).values()
                     if t.get("dataset_fingerprint") == fingerprint), {})


def load_run(path: str | Path) -> Run:
    """Read a run directory; :class:`NotARun` (with what is missing) when it is not one."""
    path = Path(path)
    if not path.is_dir():
        raise NotARun(f"{str(path)!r} is not a directory")
    missing = [name for name in ("results.jsonl", "manifest.json")
               if not (path / name).is_file()]
    if missing:
        raise NotARun(f"{str(path)!r} is not a run directory (no {' or '.join(missing)}); "
                      "give directories written by run.py")
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        searches = _read_json(path / "af1_search.json")
    except ValueError as err:
        raise NotARun(f"{str(path)!r}: a JSON file does not parse ({err})") from None
    if not isinstance(manifest.get("model"), dict) or "n_layers" not in manifest["model"]:
        raise NotARun(f"{str(path)!r}: manifest.json records no model and its layers; give "
                      "directories written by run.py")
    return Run(path, manifest, read_results(path / "results.jsonl"), searches)


def load_runs(paths) -> list[Run]:
    """Every run, each named by its model (and its directory where two models share a name);
    the first directory that is not a run raises :class:`NotARun`."""
    runs = [load_run(p) for p in paths]
    if not runs:
        raise NotARun("give at least one run directory")
    for run in runs:
        run.name = _short_model(run.model)
    names = [r.name for r in runs]
    for run in runs:
        if names.count(run.name) > 1:
            run.name = f"{run.name} ({run.path.name})"
    return runs


def _short_model(model: dict) -> str:
    return str(model.get("model_id", "model")).split(" (")[0].split("/")[-1]


@dataclass
class Series:
    """The rows of one run in one setting: a line in the figures (``label``)."""

    run: Run
    setting: dict
    rows: list[dict]
    label: str = ""
    entries: list[dict] = field(default_factory=list)  # its rows of compare.md
    context: _Context | None = None  # names its data sets as the run's own figures do

    def dataset_label(self, task: str, style: str, fingerprint: str) -> str:
        """The data set's name in its run (``A+B-calculate``, ``A+B-calculate~1a2b3c4d``)."""
        return self.context.label(task, style, fingerprint)


def series_of(runs: list[Run]) -> list[Series]:
    """One series per (run, setting); the setting joins the label where a run has several."""
    series = []
    for run in runs:
        settings = run.settings()
        for setting in settings:
            label = run.name + (f" [{setting_label(setting)}]" if len(settings) > 1 else "")
            series.append(Series(run, setting, [r for r in run.rows
                                                if setting_of(r) == setting], label,
                                 context=_Context(run.path, run.rows, run.manifest, setting)))
    return series


def table_entry(series: Series, task: str, style: str, fingerprint: str) -> dict:
    """One row of compare.md: the AF1 configuration of a data set in a series and what it rests
    on. The configuration is the run's saved search (with its held-out numbers, where the run
    has them), else the search redone on its sweep rows at the run's threshold; its counts and
    intervals are the chosen cell's own row."""
    run = series.run
    sweep = _select(series.rows, dataset_fingerprint=fingerprint, **SWEEP_FILTER)
    cells = {(r["l_wait"], r["l_transfer"]): r for r in sweep}
    saved = run.saved_search(fingerprint, series.setting)
    search = saved if (saved.get("l_wait"), saved.get("l_transfer")) in cells else af1_search(
        sweep, run.manifest.get("config", {}).get("threshold", DEFAULT_THRESHOLD),
        run.manifest.get("config", {}).get("threshold_on", "point"))
    chosen = cells[(search["l_wait"], search["l_transfer"])]
    holdout = saved.get("holdout") if saved is search else None
    record = run.task_record(fingerprint)
    measures = holdout if holdout and any(f in holdout for f in CONTINUOUS) else chosen
    n_layers = run.n_layers
    return {
        "model": series.label, "model_id": run.model.get("model_id"),
        "revision": run.model.get("revision"), "weights_sha256": run.model.get("weights_sha256"),
        "n_layers": n_layers, "setting": setting_label(series.setting), "run": str(run.path),
        "task": task, "style": style, "label": series.dataset_label(task, style, fingerprint), "dataset_fingerprint":
            fingerprint, "template": record.get("template"),
        "operand_range": record.get("operand_range"),
        "n_prompts": chosen["n_prompts"], "n_full_correct": chosen["n_full_correct"],
        "full_accuracy": chosen["full_accuracy"], "full_accuracy_ci": chosen["full_accuracy_ci"],
        "l_wait": chosen["l_wait"], "l_transfer": chosen["l_transfer"],
        "wait_depth": chosen["l_wait"] / n_layers,
        "transfer_end_depth": (chosen["l_wait"] + chosen["l_transfer"]) / n_layers,
        "threshold": search.get("threshold"), "threshold_on": search.get("threshold_on"),
        "met_threshold": search.get("met_threshold"), "n_cells": len(sweep),
        "in_sample": {k: chosen[k] for k in ("faithfulness", "faithfulness_ci",
                                             "n_af1_correct_of_full", "n_full_correct")},
        "holdout": holdout or None,
        "measures_from": None if not any(f in measures for f in CONTINUOUS) else (
            "held out" if measures is holdout else "in-sample"),
        **{name: measures.get(name) for name in CONTINUOUS},
        **{f"{name}_ci": measures.get(f"{name}_ci") for name in CONTINUOUS},
    }


def graded(entry: dict) -> dict:
    """The faithfulness a comparison reports: held out where the run has it, else in-sample;
    with ``"which"`` saying so."""
    holdout = entry["holdout"]
    if holdout and "n_full_correct" in holdout:
        return {**holdout, "which": "held out"}
    return {**entry["in_sample"], "which": "in-sample"}


def _measure(entry: dict, name: str, digits: int = 3) -> str:
    value, ci = entry.get(name), entry.get(f"{name}_ci")
    if value is None:
        return MISSING
    text = f"{value:.{digits}f}"
    return text + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def _markdown_row(entry: dict) -> str:
    faith = graded(entry)
    cell = f"{_share(faith, 'faithfulness')}, {faith['which']}"
    if faith["which"] == "held out":
        cell += f"; in-sample {_share(entry['in_sample'], 'faithfulness')}"
        hold = entry["holdout"]
        rests = (f"chosen on {hold.get('n_select_prompts', '?')} prompts, graded on "
                 f"{hold.get('n_eval_prompts', '?')} others (fraction "
                 f"{hold.get('fraction', '?')}, seed {hold.get('seed', '?')})")
    else:
        rests = (f"{entry['n_prompts']} prompts, {entry['n_full_correct']} right in full; "
                 f"chosen and graded on the same ({entry['n_cells']} cells)")
    met = faith["faithfulness"] is not None and faith["faithfulness"] >= PAPER_CRITERION
    revision = entry["revision"] or (f"sha256 {entry['weights_sha256'][:12]}"
                                     if entry["weights_sha256"] else MISSING)
    probs = MISSING
    if entry["answer_prob_full"] is not None:
        probs = (f"{_measure(entry, 'answer_prob_full')} → {_measure(entry, 'answer_prob_af1')}"
                 f", ratio {_measure(entry, 'answer_prob_ratio')} ({entry['measures_from']})")
    kl = MISSING if entry["kl_full_to_af1"] is None else (
        f"{_measure(entry, 'kl_full_to_af1')} ({entry['measures_from']})")
    return (f"| {entry['model']} | {revision} | {entry['n_layers']} | {entry['setting']} | "
            f"{entry['label']} | {_share(entry, 'full_accuracy')} | L_wait={entry['l_wait']}, "
            f"L_transfer={entry['l_transfer']} | {entry['wait_depth']:.2f} | "
            f"{entry['transfer_end_depth']:.2f} | {cell} | {'yes' if met else 'no'} | {probs} | "
            f"{kl} | {rests} |")


TABLE_HEAD = [
    "| model | revision | L | dtype/attn/backend/answer | task | full accuracy | AF1 "
    "configuration | L_wait/L | (L_wait+L_transfer)/L | faithfulness | ≥ 0.85 | p(answer) full "
    "→ AF1, ratio | KL full→AF1 (nats) | prompts it rests on |",
    "|---" * 14 + "|"]


def compare_runs(paths, out: str | Path) -> list[Path]:
    """Compare the run directories ``paths``; write compare.md, compare.json and the figures
    to ``out``; returns the written paths. Raises :class:`NotARun` before writing anything when
    a directory is not a run."""
    runs = load_runs(paths)
    out = Path(out)
    series = series_of(runs)
    by_task: dict[str, list[tuple[Series, dict]]] = {}
    for s in series:
        for task, style, fp in _datasets(s.rows, "sweep"):
            entry = table_entry(s, task, style, fp)
            s.entries.append(entry)
            by_task.setdefault(entry["label"], []).append((s, entry))
    entries = [e for s in series for e in s.entries]

    written: list[Path] = []
    colors = compare_plots.colors([s.label for s in series])
    for label, members in by_task.items():
        lines = {s.label: _best_over_transfer(s.rows, e["dataset_fingerprint"], e["n_layers"])
                 for s, e in members}
        written += compare_plots.faithfulness_vs_depth(
            lines, colors, out / f"faithfulness_vs_depth_{label}",
            f"Faithfulness vs relative depth: {label}",
            f"For each model, the best cell over L_transfer at each L_wait (faithfulness of AF1 "
            f"on the prompts the full model gets right), against L_wait/L; bands: 95% Wilson "
            f"intervals of that cell. Taking the best cell favours each point a little (it is "
            f"chosen on the same prompts). Dashed: the paper's criterion {PAPER_CRITERION}. "
            f"Task {label}; models: " + "; ".join(
                f"{s.label}, {e['n_layers']} layers, {e['n_prompts']} prompts "
                f"({e['n_full_correct']} right in full), {e['setting']}" for s, e in members)
            + ".", PAPER_CRITERION)
    if entries:
        written += compare_plots.af1_windows(
            [dict(e, graded=graded(e)) for e in entries], colors, out / "af1_windows",
            "AF1 windows on a common depth axis",
            "Left: each model's AF1 configuration per task on relative depth (0 = embeddings, "
            "1 = the last layer's output): wait (h_{L_wait} replaced by CAMA) up to "
            "L_wait/L, transfer (only the last token reads the others) up to "
            "(L_wait+L_transfer)/L, then compute (the last token alone). Right: its "
            "faithfulness with the 95% Wilson interval (held out where the run has it, "
            f"marked 'held out'); dashed: the paper's criterion {PAPER_CRITERION}; filled "
            "marks meet it. Each run's configuration is chosen at its own threshold; *: no "
            "cell reaches it, and the best cell is shown.",
            PAPER_CRITERION)
    necessity_tasks: dict[str, dict[str, list[dict]]] = {}
    for s in series:
        for task, style, fp in _datasets(s.rows, "necessity"):
            rows = [r for r in _select(s.rows, experiment="necessity", dataset_fingerprint=fp)
                    if r["window"] == 1]
            if rows:
                necessity_tasks.setdefault(s.dataset_label(task, style, fp), {})[s.label] = (
                    s.run.n_layers, sorted(rows, key=lambda r: r["layer"]))
    for label, curves in necessity_tasks.items():
        written += compare_plots.necessity_vs_depth(
            curves, colors, out / f"necessity_vs_depth_{label}",
            f"Necessity of last-token reading vs relative depth: {label}",
            "The full model except that at one layer k the last token may attend only to the "
            "sink and itself; faithfulness against k/L (bands: 95% Wilson intervals). Low "
            f"values mark depths where the last token must read the other tokens. Task {label}.")

    out.mkdir(parents=True, exist_ok=True)
    md = _markdown(runs, series, entries, by_task, necessity_tasks, written, out)
    (out / "compare.md").write_text(md)
    (out / "compare.json").write_text(json.dumps({"runs": [str(r.path) for r in runs],
                                                  "rows": entries}, indent=1) + "\n")
    return written + [out / "compare.md", out / "compare.json"]


def _best_over_transfer(rows: list[dict], fingerprint: str, n_layers: int) -> list[dict]:
    """Per L_wait, the sweep cell with the highest faithfulness over L_transfer (the smallest
    L_transfer among ties; undefined faithfulness ranks last), with ``depth = L_wait / L``."""
    by_wait: dict[int, list[dict]] = {}
    for r in _select(rows, dataset_fingerprint=fingerprint, **SWEEP_FILTER):
        by_wait.setdefault(r["l_wait"], []).append(r)
    best = {w: max(cells, key=lambda r: (-1.0 if r["faithfulness"] is None
                                         else r["faithfulness"], -r["l_transfer"]))
            for w, cells in by_wait.items()}
    return [dict(best[w], depth=w / n_layers) for w in sorted(best)]


def _markdown(runs, series, entries, by_task, necessity_tasks, written, out: Path) -> str:
    lines = ["# AF1 across models", "",
             "Runs: " + "; ".join(f"{r.name} ({r.path}, {r.n_layers} layers)" for r in runs)
             + ".", "",
             "One row per model, task and setting. Shares are value [95% Wilson interval] "
             "(right/total). Faithfulness is the share of the prompts the full model gets right "
             "that AF1 also gets right, at the AF1 configuration the run chose (at its own "
             "threshold); it is graded on held-out prompts where the run has them, else on "
             "the prompts that chose it (in-sample, optimistic). Relative depth: L_wait/L "
             "(where waiting ends) and (L_wait+L_transfer)/L (where transfer ends). "
             f"≥ 0.85: the paper's criterion, on the faithfulness shown. {MISSING}: not in "
             "the run's rows.", ""]
    lines += TABLE_HEAD + [_markdown_row(e) for e in entries]
    if not entries:
        lines.append("| " + " | ".join([MISSING] * 14) + " |")
        lines += ["", "No run has sweep results in its rows."]
    everyone = {s.label for s in series}
    partial = {label: sorted({s.label for s, _ in members})
               for label, members in by_task.items()
               if {s.label for s, _ in members} != everyone}
    if partial:
        lines += ["", "## Tasks in only some runs", ""]
        lines += [f"- {label}: in {', '.join(have)}; not in "
                  f"{', '.join(sorted(everyone - set(have)))}" for label, have in partial.items()]
    info = [e for e in entries if e["template"] or e["operand_range"]]
    if info:
        lines += ["", "## What the tasks are on each tokenizer", "",
                  "| model | task | template | operands | prompts |", "|---|---|---|---|---|"]
        lines += [f"| {e['model']} | {e['label']} | `{e['template'] or MISSING}` | "
                  f"{'{}..{}'.format(*e['operand_range']) if e['operand_range'] else MISSING} | "
                  f"{e['n_prompts']} |" for e in info]
    lines += ["", "## What the paper reports", "",
              "Mamidanna et al., All for One (EMNLP 2025): the AF1 configuration is the largest "
              "L_wait (then the smallest L_transfer) whose faithfulness is at least 0.85.", ""]
    lines += PAPER_REPORTS
    pngs = [p for p in written if p.suffix == ".png"]
    if pngs:
        lines += ["", "## Figures", ""]
        lines += [f"![{p.stem}]({p.relative_to(out)})" for p in pngs]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    """``python -m figures compare DIR [DIR ...] --out DIR``."""
    parser = argparse.ArgumentParser(
        prog="python -m figures compare",
        description="Compare run directories written by run.py (other models, or other "
                    "settings of one): compare.md, compare.json and figures on relative depth. "
                    "Loads no model.")
    parser.add_argument("runs", nargs="+", metavar="DIR", help="run directories")
    parser.add_argument("--out", required=True, help="where to write")
    args = parser.parse_args(argv)
    try:
        written = compare_runs(args.runs, args.out)
    except NotARun as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0
