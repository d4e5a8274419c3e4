"""Rebuild every figure and table of a results directory from its files alone (no model).

Reads ``results.jsonl``, ``manifest.json``, ``af1_search.json``, ``probe.json`` and the saved
data sets when present and writes ``figures/`` inside the results directory (or ``out``): one
PNG + PDF + caption per figure, and ``tables.md``. Run it as ``python -m figures RESULTS_DIR``.

A directory can hold rows of several settings (dtype, attention, backend, answer scoring); the
figures and tables show one: the latest run's (``manifest.json``'s ``setting``), or the one asked
for. Every share is shown with its 95% interval; variants run on the same prompts are compared
by the exact McNemar test on the prompts they disagree on, paired prompt by prompt through the
saved data set the rows were measured on (its fingerprint and length are checked: rows of
another data set are never paired, see :class:`~interventions.pipeline.scoring.DataOutcomes`).
A directory can also hold several data sets of one task and style (another ``--seed``, ...):
each has its own name (``A+B-calculate~<fingerprint>``), figures, search and tables.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from interventions.pipeline.experiments import DEFAULT_THRESHOLD, search_task
from interventions.pipeline.manifest import write_json_atomic
from interventions.pipeline.results import (SETTING_DEFAULTS, name_datasets, read_results,
                                            setting_label, setting_name, setting_of)
from interventions.pipeline.scoring import DataOutcomes

from . import plots

SWEEP_FILTER = {"experiment": "sweep", "sink": True, "wait_ablation": "cama",
                "transfer_peek": "last"}
AF1_VARIANT = "AF1 (CAMA + ABP)"


class SettingNotFound(LookupError):
    """The setting asked for has no rows in the directory (the message lists those that do)."""


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _select(rows, **fields):
    return [r for r in rows if all(r.get(k) == v for k, v in fields.items())]


def _datasets(rows, experiment):
    """Distinct (task, style, dataset fingerprint) of an experiment, in order of appearance."""
    seen = {}
    for r in rows:
        if r["experiment"] == experiment:
            seen.setdefault((r["task"], r["style"], r["dataset_fingerprint"]), None)
    return list(seen)


def choose_setting(rows: list[dict], manifest: dict, asked: dict | None = None) -> dict:
    """The setting to draw: the fields in ``asked`` over the latest run's setting (from the
    manifest; the defaults for a directory written before settings were recorded).

    Raises :class:`SettingNotFound` when ``asked`` names an unknown field, or when rows exist
    but none in that setting."""
    asked = asked or {}
    unknown = sorted(set(asked) - set(SETTING_DEFAULTS))
    if unknown:
        raise SettingNotFound(f"unknown setting field {', '.join(unknown)}; choose from "
                              f"{', '.join(SETTING_DEFAULTS)}")
    setting = {**setting_of(manifest.get("setting", {})), **asked}
    on_record = sorted({setting_label(setting_of(r)) for r in rows})
    if rows and setting_label(setting) not in on_record:
        raise SettingNotFound(f"no results in setting {setting_label(setting)}; this directory "
                              f"holds {', '.join(on_record)} (dtype/attn/backend/answer)")
    return setting


class _Context:
    """What every figure of one setting needs: its rows, searches, data sets and labels."""

    def __init__(self, results_dir: Path, rows: list[dict], manifest: dict, setting: dict):
        self.dir = results_dir
        self.setting = setting
        self.rows = [r for r in rows if setting_of(r) == setting]
        self.searches = _read_json(results_dir / "af1_search.json")
        self.config = manifest.get("config", {})
        self.tasks_info = manifest.get("tasks", {})
        # Every data set's name: as the runs named them (the manifest), else in the order the
        # rows first name them (the rule the runs follow).
        registered = {name: entry.get("dataset_fingerprint")
                      for name, entry in self.tasks_info.items()}
        self.names = name_datasets(rows, registered)
        model = manifest.get("model", {})
        self.model_id = model.get("model_id", "model")
        name = self.model_id.split(" (")[0].split("/")[-1]
        self.who = (f"{name}, {model.get('n_layers', '?')} layers, "
                    f"{setting_label(setting)} (dtype/attn/backend/answer)")
        self._data: dict[str, DataOutcomes | None] = {}
        self._searched: dict[tuple[str, str, str], dict] = {}
        self.notes: list[str] = []

    def name(self, task: str, style: str, fingerprint: str) -> str:
        """The data set's name in this setting (``A+B-calculate``, ``A+B-calculate~1a2b3c4d``,
        with ``@<setting>`` outside the default setting)."""
        return self.names.get((task, style, fingerprint, setting_label(self.setting)),
                              setting_name(f"{task}-{style}", self.setting))

    def label(self, task: str, style: str, fingerprint: str) -> str:
        """The data set's name without the setting (figures show one setting): names its
        figures and table sections."""
        name, suffix = self.name(task, style, fingerprint), setting_name("", self.setting)
        return name[:-len(suffix)] if suffix and name.endswith(suffix) else name

    def search(self, task: str, style: str, fingerprint: str) -> dict:
        """The AF1 search of a data set in this setting, from its sweep rows, with the
        threshold, rule and held-out split of the saved search (else the latest run's
        threshold and rule, in-sample); done once per data set."""
        key = (task, style, fingerprint)
        if key not in self._searched:
            self._searched[key] = self._search(task, style, fingerprint)
        return self._searched[key]

    def _search(self, task: str, style: str, fingerprint: str) -> dict:
        sweep = _select(self.rows, dataset_fingerprint=fingerprint, **SWEEP_FILTER)
        if not sweep:
            return {}
        saved = self.searches.get(self.name(task, style, fingerprint), {})
        if saved.get("dataset_fingerprint", fingerprint) != fingerprint:
            saved = {}
        threshold = saved.get("threshold", self.config.get("threshold", DEFAULT_THRESHOLD))
        rule = saved.get("threshold_on", self.config.get("threshold_on", "point"))
        held = saved.get("holdout")
        if not held:
            return search_task(sweep, threshold, rule)
        outcomes = self.outcomes(task, style, fingerprint)
        if outcomes is None:  # the split needs the saved data set; the run's search stands
            return saved
        split = {key: held[key] for key in ("fraction", "seed", "stratified_by",
                                            "select_prompts", "eval_prompts")}
        return search_task(sweep, threshold, rule, outcomes, split, held["seed"])

    def task_entry(self, task: str, style: str, fingerprint: str) -> dict:
        """The manifest's record of a data set in this setting (else of its task and style)."""
        return (self.tasks_info.get(self.name(task, style, fingerprint))
                or self.tasks_info.get(f"{task}-{style}", {}))

    def template(self, task: str, style: str, fingerprint: str) -> str:
        return self.task_entry(task, style, fingerprint).get("template") or style

    def cama_note(self, task: str, style: str, fingerprint: str) -> str:
        """How many prompts the task's CAMA means average over (``""`` if not recorded)."""
        entry = self.task_entry(task, style, fingerprint)
        keys = entry.get("cama_keys")
        if not keys:
            return ""
        by = {"template": "template and token length"}.get(entry.get("cama_groups"),
                                                          "token length")
        return (f"CAMA keys: {keys['n_keys']} (prompts grouped by {by}); prompts per key: "
                f"smallest {keys['prompts_per_key_min']}, median "
                f"{keys['prompts_per_key_median']:g}; "
                f"{keys.get('keys_of_one_prompt_share', 0):.0%} of keys average one prompt.")

    def outcomes(self, task: str, style: str, fingerprint: str) -> DataOutcomes | None:
        """The saved data set of this fingerprint with the full model's outcomes in this
        setting; ``None`` (and a note in the tables) when it was not saved or the directory
        holds another data set under its name (results of an older version that kept one data
        set per task and style)."""
        name = self.name(task, style, fingerprint)
        if name not in self._data:
            self._data[name] = None
            path = self.dir / "data" / name
            if path.is_dir():
                import datasets

                outcomes = DataOutcomes.from_dataset(datasets.load_from_disk(str(path)))
                if outcomes.fingerprint == fingerprint:
                    self._data[name] = outcomes
                else:
                    self.notes.append(
                        f"data/{name} holds data set {outcomes.fingerprint}, not {fingerprint} "
                        f"(the rows' one): no paired test is shown for those rows.")
        return self._data[name]

    def compare(self, first: dict, second: dict, prompts=None) -> dict | None:
        """Paired test of two rows of one data set on the prompts the full model gets right
        (among ``prompts``, default all; where faithfulness is measured), prompt by prompt:
        ``n_only_first``, ``n_only_second``, ``p_value``. ``None`` without the saved data set;
        rows of another data set or length raise
        :class:`~interventions.pipeline.scoring.PairingError`."""
        data = self.outcomes(first["task"], first["style"], first["dataset_fingerprint"])
        return None if data is None else data.pair(first, second, prompts)


METRICS = ("faithfulness", "prob_ratio", "kl")  # what the heatmap shows (--metric)


def render_run(results_dir: str | Path) -> list[Path]:
    """Draw the figures of a run that has just finished (``run.py`` calls it after the job) in
    the run's setting, and list them in its ``manifest.json`` (``figures``, relative to
    ``results_dir``; the time taken in ``timings.figures_s``). Returns the written paths."""
    results_dir = Path(results_dir)
    started = time.time()
    written = render_all(results_dir)
    manifest = _read_json(results_dir / "manifest.json")
    manifest["figures"] = [str(p.relative_to(results_dir)) for p in written]
    manifest.setdefault("timings", {})["figures_s"] = time.time() - started
    write_json_atomic(results_dir / "manifest.json", manifest)
    return written


def render_all(results_dir: str | Path, out: str | Path | None = None,
               setting: dict | None = None, metric: str = "faithfulness") -> list[Path]:
    """Draw every figure the results of one setting support; returns the written paths.

    ``setting``: fields of the setting to draw (any of dtype, attn_implementation, backend,
    answer_scoring); the rest come from the latest run (:func:`choose_setting`). ``metric``:
    what the heatmap shows (:data:`METRICS`): faithfulness (``heatmap_<name>``), the answer
    probability ratio or the KL divergence from the full model (``heatmap_<metric>_<name>``)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    results_dir = Path(results_dir)
    if not (results_dir / "results.jsonl").is_file():
        raise FileNotFoundError(f"{results_dir} has no results.jsonl")
    out = Path(out) if out else results_dir / "figures"
    all_rows = read_results(results_dir / "results.jsonl")
    manifest = _read_json(results_dir / "manifest.json")
    ctx = _Context(results_dir, all_rows, manifest, choose_setting(all_rows, manifest, setting))
    probe_result = _read_json(results_dir / "probe.json")
    if probe_result and setting_of(probe_result) != ctx.setting:
        probe_result = {}
    rows, who = ctx.rows, ctx.who
    written: list[Path] = []
    others = sorted({setting_label(setting_of(r)) for r in all_rows}
                    - {setting_label(ctx.setting)})
    tables: list[str] = [
        f"# AF1 results: {ctx.model_id}\n",
        f"Setting {setting_label(ctx.setting)} (dtype/attention/backend/answer scoring), "
        f"{len(rows)} rows" + (f"; other settings in this directory: {', '.join(others)}"
                               if others else "") + ". Shares are shown as value [95% Wilson "
        "interval] (right/total); p is the exact McNemar test on the prompts two variants "
        "disagree on. Beside faithfulness: the answer probability ratio (AF1's mean "
        "probability of the answer over the full model's, on the prompts the full model gets "
        "right) and the mean KL(full || AF1) at the last position in nats, each with its 95% "
        "bootstrap interval over prompts.\n"]

    for task, style, fp in _datasets(rows, "sweep"):
        label = ctx.label(task, style, fp)
        sweep = _select(rows, dataset_fingerprint=fp, **SWEEP_FILTER)
        search = ctx.search(task, style, fp)
        config = (search["l_wait"], search["l_transfer"]) if search else None
        common = (f"Task {task}, template {ctx.template(task, style, fp)!r}, data set {fp}, "
                  f"{sweep[0]['n_prompts']} prompts, full accuracy "
                  f"{_share(sweep[0], 'full_accuracy')}; {who}. Faithfulness = share of the "
                  "prompts the full model gets right that AF1 also gets right. h_k enters layer "
                  "k (0-indexed); h_{L_wait} is replaced by CAMA at every non-sink position.")
        boxed = title_note = ""
        if config:
            boxed = (f" Red box: the AF1 configuration (L_wait={config[0]}, "
                     f"L_transfer={config[1]}, faithfulness {_share(search, 'faithfulness')}, "
                     f"threshold {search['threshold']} on the {_rule(search)}"
                     f"{'' if search['met_threshold'] else ', not reached: best cell'}); "
                     f"{_chosen_how(search)}.")
            if metric == "faithfulness":
                boxed += (f" Hollow circle: the cell's 95% interval reaches "
                          f"{search['threshold']}; filled: the whole interval lies at or above "
                          "it.")
            title_note = "\nred box: " + _chosen_how(search, short=True)
        what, prefix = {"faithfulness": ("AF1 faithfulness", "heatmap"),
                        "prob_ratio": ("AF1 answer probability / full model's",
                                       "heatmap_prob_ratio"),
                        "kl": ("KL(full || AF1), nats", "heatmap_kl")}[metric]
        measure_note = {"faithfulness": "",
                        "prob_ratio": " Colour: the mean probability AF1 gives the answer over "
                                      "the full model's, on the prompts the full model gets "
                                      "right (1: as sure as the full model).",
                        "kl": " Colour: the mean KL divergence from the full model's "
                              "last-position distribution to AF1's, in nats, on the prompts "
                              "the full model gets right (0: the same distribution)."}[metric]
        written += plots.heatmap(sweep, out / f"{prefix}_{label}",
                                 f"{what}: {task} ({style}), {who}{title_note}",
                                 common + measure_note + " Blank cells: L_wait + L_transfer > L "
                                 "(or the measure is undefined)." + boxed, config,
                                 search.get("threshold"), metric=metric)
        written += plots.faithfulness_lines(
            sweep, out / f"faithfulness_vs_lwait_{label}", f"Faithfulness vs L_wait: {task}",
            common + " Bands: 95% Wilson intervals.", search.get("threshold"))
        if search:
            tables.append(_search_table(label, fp, search, sweep, ctx))
            note = ctx.cama_note(task, style, fp)
            if note:
                tables.append(note + "\n")

    for task, style, fp in _datasets(rows, "necessity"):
        label = ctx.label(task, style, fp)
        sel = _select(rows, experiment="necessity", dataset_fingerprint=fp)
        written += plots.necessity(
            sel, out / f"necessity_{label}", f"Necessity of last-token reading: {task}",
            f"Full model except that, in a window of consecutive layers starting at the given "
            f"layer, the last token may attend only to the sink and itself; every other token "
            f"keeps full attention. Faithfulness per window (bands: 95% Wilson intervals); "
            f"task {task} ({style}), data set {fp}, {sel[0]['n_prompts']} prompts; {who}. Low "
            "values mark layers where the last token must read the other tokens.")

    for task, style, fp in _datasets(rows, "alternatives"):
        label = ctx.label(task, style, fp)
        sel = _select(rows, experiment="alternatives", dataset_fingerprint=fp)
        cfg = (sel[0]["l_wait"], sel[0]["l_transfer"])
        base = next((r for r in sel if r["variant"] == AF1_VARIANT), None)
        tests = [ctx.compare(base, r) if base and r is not base else None for r in sel]
        notes = [_count(r) + ("" if t is None else f", p={t['p_value']:.2g} vs AF1")
                 for r, t in zip(sel, tests)]
        written += plots.horizontal_bars(
            [r["variant"] for r in sel], [r["faithfulness"] for r in sel],
            [r["faithfulness_ci"] for r in sel], notes,
            out / f"alternatives_{label}", f"Alternatives to CAMA and ABP: {task}",
            f"AF1 at L_wait={cfg[0]}, L_transfer={cfg[1]} with one stage replaced: the wait "
            "stage by zero ablation, a position-only mean, or nothing; the transfer stage by "
            "letting every token peek, or by removing the sink. Error bars: 95% Wilson "
            "intervals; p: exact McNemar test against AF1 on the prompts the full model gets "
            f"right. Task {task} ({style}), data set {fp}, {sel[0]['n_prompts']} prompts; "
            f"{who}.")
        tables.append(_cell_table(f"Alternatives, {label} (L_wait={cfg[0]}, "
                                  f"L_transfer={cfg[1]}; every prompt of data set {fp})", sel,
                                  "variant", paired_with=("AF1", tests)))

    styles = _select(rows, experiment="styles")
    if styles:
        panels = {}
        for op_task in ("A+B", "A-B"):
            sel = [r for r in styles if r["task"] == op_task]
            panels[op_task] = ([r["style"] for r in sel], _series(sel, {
                "full accuracy": "full_accuracy", "AF1 faithfulness": "faithfulness"}))
        cfg = (styles[0]["l_wait"], styles[0]["l_transfer"])
        written += plots.grouped_bars(
            [], {}, out / "styles", f"AF1 across input styles (L_wait={cfg[0]}, "
            f"L_transfer={cfg[1]})",
            f"Full accuracy and AF1 faithfulness for the paper's six input styles, for + and -, "
            f"at the model's AF1 configuration, with 95% Wilson intervals; {who}.",
            panels=panels)
        tables.append(_cell_table("Input styles", styles, "style", with_task=True))

    summary = _select(rows, experiment="three_operand")
    main_at_config = []
    for task, style, fp in _datasets(rows, "sweep"):
        search = ctx.search(task, style, fp)
        if search:
            main_at_config += _select(rows, dataset_fingerprint=fp, l_wait=search["l_wait"],
                                      l_transfer=search["l_transfer"], **SWEEP_FILTER)
    per_task = main_at_config + summary
    if per_task:
        written += plots.grouped_bars(
            [f"{r['task']}\n({r['style']})" for r in per_task],
            _series(per_task, {"full accuracy": "full_accuracy", "AF1 accuracy": "af1_accuracy"}),
            out / "tasks_full_vs_af1", "Full model vs AF1 per task",
            "Share of all prompts answered right by the full model and by AF1 at the model's "
            "AF1 configuration, per task (two-operand tasks from the sweep, three-operand tasks "
            f"from the three_operand experiment), with 95% Wilson intervals; {who}.")
        tables.append(_cell_table("Per task at the AF1 configuration (every prompt: in-sample "
                                  "for the tasks it was chosen on)", per_task, "task",
                                  with_task=False))

    if probe_result:
        written += plots.probe(
            probe_result, out / "probe_partial_result",
            f"Is {probe_result['partial']} held at the token before C? "
            f"({probe_result['task']})",
            f"Linear probes on the clean residual h_k at the last token before C, scored on "
            f"operand pairs never seen in training ({probe_result['n_pairs']} pairs). Parity of "
            f"the partial result cannot be read linearly from a state that only holds A and B "
            "(dashed line: probe on their layer-0 states); above chance it marks a state "
            "organised by the partial result. Decodable is not causal: it does not show the "
            f"model uses it. {who}.")
        tables.append(_probe_table(probe_result))

    tables += [f"Note: {note}\n" for note in dict.fromkeys(ctx.notes)]
    out.mkdir(parents=True, exist_ok=True)
    table_path = out / "tables.md"
    table_path.write_text("\n".join(tables) + "\n")
    written.append(table_path)
    return written


def _series(rows: list[dict], shares: dict[str, str]) -> dict[str, tuple[list, list]]:
    """``{legend label: (values, 95% intervals)}`` of the named shares of ``rows``."""
    return {label: ([r[share] for r in rows], [r[f"{share}_ci"] for r in rows])
            for label, share in shares.items()}


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _count(row: dict) -> str:
    """``24/26``: the faithfulness count of a row."""
    return f"{row['n_af1_correct_of_full']}/{row['n_full_correct']}"


def _share(row: dict, share: str) -> str:
    """``0.923 [0.759, 0.979] (24/26)``: a share with its 95% interval and counts."""
    if row.get(share) is None:
        return "n/a (the full model gets none right)"
    right, total = {"faithfulness": ("n_af1_correct_of_full", "n_full_correct"),
                    "full_accuracy": ("n_full_correct", "n_prompts"),
                    "af1_accuracy": ("n_af1_correct", "n_prompts")}[share]
    low, high = row[f"{share}_ci"]
    return f"{row[share]:.3f} [{low:.3f}, {high:.3f}] ({row[right]}/{row[total]})"


def _measure(row: dict, name: str) -> str:
    """``0.95 [0.90, 0.99]``: a continuous measure with its bootstrap interval; ``n/a`` where
    the row does not have it."""
    value, ci = row.get(name), row.get(f"{name}_ci")
    if value is None:
        return "n/a"
    return f"{value:.3g}" + ("" if ci is None else f" [{ci[0]:.3g}, {ci[1]:.3g}]")


def _rule(search: dict) -> str:
    return ("95% interval's lower end" if search.get("threshold_on") == "lower"
            else "point estimate")


def _chosen_how(search: dict, short: bool = False) -> str:
    """Which prompts chose the AF1 configuration and which grade it."""
    held = search.get("holdout")
    if not held:
        return ("in-sample (selected on these prompts)" if short else
                "chosen and graded on the same prompts: in-sample (selected on these prompts)")
    grade = _share(held, "faithfulness")
    if short:
        faith = "n/a" if held["faithfulness"] is None else f"{held['faithfulness']:.2f}"
        return (f"chosen on {held['n_select_prompts']} prompts, held-out "
                f"{held['n_af1_correct_of_full']}/{held['n_eval_prompts']} = {faith}")
    return (f"chosen on {held['n_select_prompts']} of the prompts the full model gets right, "
            f"graded on the other {held['n_eval_prompts']} (held out, --holdout "
            f"{held['fraction']}, seed {held['seed']}): faithfulness {grade}")


def _search_table(label: str, fingerprint: str, search: dict, sweep: list[dict],
                  ctx: _Context) -> str:
    chosen = (search["l_wait"], search["l_transfer"])
    held = search.get("holdout")
    lines = [f"## AF1 search, {label}", "",
             f"Data set {fingerprint}, {sweep[0]['n_prompts']} prompts, "
             f"{sweep[0]['n_full_correct']} of them right for the full model.", "",
             f"Threshold {search['threshold']} on the {_rule(search)}: AF1 configuration "
             f"L_wait={chosen[0]}, L_transfer={chosen[1]}"
             f"{'' if search['met_threshold'] else ' (threshold not reached: best cell)'}."]
    if held:
        lines += ["", f"Chosen on {held['n_select_prompts']} prompts (faithfulness there "
                  f"{_share(held['selection'], 'faithfulness')}), graded on the other "
                  f"{held['n_eval_prompts']} prompts the full model gets right, held out "
                  f"(--holdout {held['fraction']}, seed {held['seed']}, stratified by "
                  f"{held.get('stratified_by') or 'nothing'}): **held-out faithfulness "
                  f"{_share(held, 'faithfulness')}**, answer probability ratio "
                  f"{_measure(held, 'answer_prob_ratio')}, KL(full || AF1) "
                  f"{_measure(held, 'kl_full_to_af1')} nats. On every prompt (in-sample for "
                  f"the {held['n_select_prompts']} that chose it): faithfulness "
                  f"{_share(search, 'faithfulness')}."]
    else:
        lines += ["", f"Faithfulness {_share(search, 'faithfulness')}, in-sample (selected on "
                  "these prompts: the best of many cells on the same prompts, so optimistic; "
                  "--holdout grades it on prompts that did not choose it); answer probability "
                  f"ratio {_measure(search, 'answer_prob_ratio')}, KL(full || AF1) "
                  f"{_measure(search, 'kl_full_to_af1')} nats."]
    also = search.get("threshold_0.9")
    if also and not also["differs"]:
        lines += ["", "At threshold 0.9 the configuration is the same."]
    if also and also["differs"]:
        grade = (_share(also["holdout"], "faithfulness") + " held out" if also.get("holdout")
                 else _share(also, "faithfulness") + " in-sample")
        lines += ["", f"At threshold 0.9 the configuration would be L_wait={also['l_wait']}, "
                  f"L_transfer={also['l_transfer']}"
                  f"{'' if also['met_threshold'] else ' (not reached: best cell)'}: "
                  f"faithfulness {grade}."]
    lines += ["", "| L_transfer | largest L_wait at threshold |", "|---|---|"]
    lines += [f"| {t} | {w if w is not None else '-'} |" for t, w in search["frontier"].items()]
    # The cells next to the chosen one, compared with it on the same prompts (the held-out
    # ones with --holdout): how firmly the prompts single it out.
    cells = {(r["l_wait"], r["l_transfer"]): r for r in sweep}
    base = cells.get(chosen)
    near = [cells[(chosen[0] + dw, chosen[1] + dt)] for dw, dt in
            ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)) if (chosen[0] + dw, chosen[1] + dt) in cells]
    if base is not None and len(near) > 1:
        prompts = held["eval_prompts"] if held else None
        where = (f"on the {held['n_eval_prompts']} held-out prompts" if held else
                 "on the same prompts, those the full model gets right")
        lines += ["", f"Cells next to it, {where} (McNemar: prompts only the AF1 configuration "
                  "/ only the neighbour gets right; faithfulness and measures on every prompt):",
                  "", "| L_wait | L_transfer | faithfulness | answer prob. ratio | KL (nats) | "
                  "vs AF1 configuration |", "|---|---|---|---|---|---|"]
        for r in near:
            test = None if r is base else ctx.compare(base, r, prompts)
            versus = ("-" if test is None else f"{test['n_only_first']} / "
                      f"{test['n_only_second']}, p={test['p_value']:.2g}")
            lines.append(f"| {r['l_wait']} | {r['l_transfer']} | {_share(r, 'faithfulness')} "
                         f"| {_measure(r, 'answer_prob_ratio')} | "
                         f"{_measure(r, 'kl_full_to_af1')} | {versus} |")
    return "\n".join(lines) + "\n"


def _cell_table(title: str, rows: list[dict], key: str, with_task: bool = False,
                paired_with: tuple[str, list[dict | None]] | None = None) -> str:
    """One row per results row: its shares with intervals, the continuous measures, AF1 against
    the full model on the same prompts, and (``paired_with``: a name and one test per row)
    against another variant."""
    head = "| task | " if with_task else "| "
    extra = "" if paired_with is None else f" {paired_with[0]}-only / this-only, p |"
    lines = [f"## {title}", "",
             head + f"{key} | full accuracy | AF1 accuracy | faithfulness | answer prob. ratio "
             "| KL (nats) | AF1 vs full: full-only / AF1-only, p |" + extra,
             "|---" * (7 + with_task + (paired_with is not None)) + "|"]
    tests = paired_with[1] if paired_with else [None] * len(rows)
    for r, test in zip(rows, tests):
        prefix = f"| {r['task']} | " if with_task else "| "
        vs_full = r["af1_vs_full"]
        line = (prefix + f"{r[key]} | {_share(r, 'full_accuracy')} | "
                f"{_share(r, 'af1_accuracy')} | {_share(r, 'faithfulness')} | "
                f"{_measure(r, 'answer_prob_ratio')} | {_measure(r, 'kl_full_to_af1')} | "
                f"{vs_full['n_full_only']} / {vs_full['n_af1_only']}, "
                f"p={vs_full['p_value']:.2g} |")
        if paired_with is not None:
            line += (" - |" if test is None else f" {test['n_only_first']} / "
                     f"{test['n_only_second']}, p={test['p_value']:.2g} |")
        lines.append(line)
    return "\n".join(lines) + "\n"


def _probe_table(result: dict) -> str:
    n = result["n_pairs"]

    def acc(value) -> str:
        ci = plots.accuracy_interval(value, n)
        return _fmt(value) if ci is None else f"{value:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]"

    c = result["control_operands_h0"]
    lines = [f"## Partial-result probe, {result['task']} ({result['partial']} at the token "
             f"before C, {n} operand pairs; accuracies out of fold, with 95% Wilson "
             "intervals)", "",
             "| layer | parity acc. | parity, shuffled | value exact | value R^2 |",
             "|---|---|---|---|---|"]
    for s in result["scores"] + [{**c, "layer": "control [h_0(A); h_0(B)]"}]:
        lines.append(f"| {s['layer']} | {acc(s['parity_accuracy'])} | "
                     f"{acc(s['parity_shuffled_accuracy'])} | {acc(s['value_exact'])} | "
                     f"{_fmt(s['value_r2'])} |")
    return "\n".join(lines) + "\n"
