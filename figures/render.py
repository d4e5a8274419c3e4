"""Rebuild every figure and table of a results directory from its files alone (no model).

Reads ``results.jsonl``, ``manifest.json``, ``af1_search.json`` and ``probe.json`` when present
and writes ``figures/`` inside the results directory (or ``out``): one PNG + PDF + caption per
figure, and ``tables.md``. Run it as ``python -m figures RESULTS_DIR``.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import plots

SWEEP_FILTER = {"experiment": "sweep", "sink": True, "wait_ablation": "cama",
                "transfer_peek": "last"}


def _read_rows(path: Path) -> list[dict]:
    from interventions.pipeline.results import read_results

    return read_results(path) if path.is_file() else []


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


def render_all(results_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """Draw every figure the results support; returns the written paths."""
    results_dir = Path(results_dir)
    if not (results_dir / "results.jsonl").is_file():
        raise FileNotFoundError(f"{results_dir} has no results.jsonl")
    out = Path(out) if out else results_dir / "figures"
    rows = _read_rows(results_dir / "results.jsonl")
    manifest = _read_json(results_dir / "manifest.json")
    searches = _read_json(results_dir / "af1_search.json")
    probe_result = _read_json(results_dir / "probe.json")
    model = manifest.get("model", {})
    model_name = model.get("model_id", "model").split(" (")[0].split("/")[-1]
    n_layers = model.get("n_layers", "?")
    who = f"{model_name}, {n_layers} layers"
    tasks_info = manifest.get("tasks", {})
    written: list[Path] = []
    tables: list[str] = [f"# AF1 results: {model.get('model_id', 'model')}\n"]

    for task, style, fp in _datasets(rows, "sweep"):
        label = f"{task}-{style}"
        sweep = _select(rows, dataset_fingerprint=fp, **SWEEP_FILTER)
        search = searches.get(label, {})
        config = (search["l_wait"], search["l_transfer"]) if search else None
        n = sweep[0]["n_prompts"]
        acc = sweep[0]["full_accuracy"]
        template = tasks_info.get(label, {}).get("template", style)
        common = (f"Task {task}, template {template!r}, {n} prompts, full accuracy {acc:.3f}; "
                  f"{who}. Faithfulness = share of the prompts the full model gets right that "
                  "AF1 also gets right. h_k enters layer k (0-indexed); h_{L_wait} is replaced "
                  "by CAMA at every non-sink position.")
        boxed = (f" Red box: the AF1 configuration (L_wait={config[0]}, "
                 f"L_transfer={config[1]}, threshold {search['threshold']}"
                 f"{'' if search['met_threshold'] else ', not reached: best cell'}).") \
            if config else ""
        written += plots.heatmap(sweep, out / f"heatmap_{label}", f"AF1 faithfulness: {task} "
                                 f"({style}), {who}", common + " Blank cells: L_wait + "
                                 "L_transfer > L." + boxed, config)
        written += plots.faithfulness_lines(
            sweep, out / f"faithfulness_vs_lwait_{label}", f"Faithfulness vs L_wait: {task}",
            common, search.get("threshold"))
        if search:
            tables.append(_search_table(label, search))

    for task, style, fp in _datasets(rows, "necessity"):
        label = f"{task}-{style}"
        sel = _select(rows, experiment="necessity", dataset_fingerprint=fp)
        written += plots.necessity(
            sel, out / f"necessity_{label}", f"Necessity of last-token reading: {task}",
            f"Full model except that, in a window of consecutive layers starting at the given "
            f"layer, the last token may attend only to the sink and itself; every other token "
            f"keeps full attention. Faithfulness per window; task {task} ({style}), "
            f"{sel[0]['n_prompts']} prompts; {who}. Low values mark layers where the last token "
            "must read the other tokens.")

    for task, style, fp in _datasets(rows, "alternatives"):
        label = f"{task}-{style}"
        sel = _select(rows, experiment="alternatives", dataset_fingerprint=fp)
        cfg = (sel[0]["l_wait"], sel[0]["l_transfer"])
        written += plots.horizontal_bars(
            [r["variant"] for r in sel], [r["faithfulness"] for r in sel],
            out / f"alternatives_{label}", f"Alternatives to CAMA and ABP: {task}",
            f"AF1 at L_wait={cfg[0]}, L_transfer={cfg[1]} with one stage replaced: the wait "
            "stage by zero ablation, a position-only mean, or nothing; the transfer stage by "
            "letting every token peek, or by removing the sink. Task "
            f"{task} ({style}), {sel[0]['n_prompts']} prompts; {who}.")
        tables.append(_cell_table(f"Alternatives, {label} (L_wait={cfg[0]}, "
                                  f"L_transfer={cfg[1]})", sel, "variant"))

    styles = _select(rows, experiment="styles")
    if styles:
        panels = {}
        for op_task in ("A+B", "A-B"):
            sel = [r for r in styles if r["task"] == op_task]
            panels[op_task] = ([r["style"] for r in sel], {
                "full accuracy": [r["full_accuracy"] for r in sel],
                "AF1 faithfulness": [r["faithfulness"] for r in sel]})
        cfg = (styles[0]["l_wait"], styles[0]["l_transfer"])
        written += plots.grouped_bars(
            [], {}, out / "styles", f"AF1 across input styles (L_wait={cfg[0]}, "
            f"L_transfer={cfg[1]})",
            f"Full accuracy and AF1 faithfulness for the paper's six input styles, for + and -, "
            f"at the model's AF1 configuration; {who}.", panels=panels)
        tables.append(_cell_table("Input styles", styles, "style", with_task=True))

    summary = _select(rows, experiment="three_operand")
    main_at_config = []
    for task, style, fp in _datasets(rows, "sweep"):
        search = searches.get(f"{task}-{style}")
        if search:
            main_at_config += _select(rows, dataset_fingerprint=fp, l_wait=search["l_wait"],
                                      l_transfer=search["l_transfer"], **SWEEP_FILTER)
    per_task = main_at_config + summary
    if per_task:
        written += plots.grouped_bars(
            [f"{r['task']}\n({r['style']})" for r in per_task],
            {"full accuracy": [r["full_accuracy"] for r in per_task],
             "AF1 accuracy": [r["af1_accuracy"] for r in per_task]},
            out / "tasks_full_vs_af1", "Full model vs AF1 per task",
            "Share of all prompts answered right by the full model and by AF1 at the model's "
            "AF1 configuration, per task (two-operand tasks from the sweep, three-operand tasks "
            f"from the three_operand experiment); {who}.")
        tables.append(_cell_table("Per task at the AF1 configuration", per_task, "task",
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

    out.mkdir(parents=True, exist_ok=True)
    table_path = out / "tables.md"
    table_path.write_text("\n".join(tables) + "\n")
    written.append(table_path)
    return written


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _search_table(label: str, search: dict) -> str:
    lines = [f"## AF1 search, {label}", "",
             f"Threshold {search['threshold']}: AF1 configuration L_wait={search['l_wait']}, "
             f"L_transfer={search['l_transfer']} (faithfulness {_fmt(search['faithfulness'])}"
             f"{'' if search['met_threshold'] else ', threshold not reached: best cell'}).", "",
             "| L_transfer | largest L_wait at threshold |", "|---|---|"]
    lines += [f"| {t} | {w if w is not None else '-'} |" for t, w in search["frontier"].items()]
    return "\n".join(lines) + "\n"


def _cell_table(title: str, rows: list[dict], key: str, with_task: bool = False) -> str:
    head = "| task | " if with_task else "| "
    lines = [f"## {title}", "", head + f"{key} | full accuracy | AF1 accuracy | faithfulness | "
             "n prompts |", "|---" * (5 + with_task) + "|"]
    for r in rows:
        faith = _fmt(r["faithfulness"])
        prefix = f"| {r['task']} | " if with_task else "| "
        lines.append(prefix + f"{r[key]} | {r['full_accuracy']:.3f} | {r['af1_accuracy']:.3f} "
                     f"| {faith} | {r['n_prompts']} |")
    return "\n".join(lines) + "\n"


def _probe_table(result: dict) -> str:
    c = result["control_operands_h0"]
    lines = [f"## Partial-result probe, {result['task']} ({result['partial']} at the token "
             f"before C, {result['n_pairs']} operand pairs)", "",
             "| layer | parity acc. | parity, shuffled | value exact | value R^2 |",
             "|---|---|---|---|---|"]
    for s in result["scores"]:
        lines.append(f"| {s['layer']} | {_fmt(s['parity_accuracy'])} | "
                     f"{_fmt(s['parity_shuffled_accuracy'])} | {_fmt(s['value_exact'])} | "
                     f"{_fmt(s['value_r2'])} |")
    lines.append(f"| control [h_0(A); h_0(B)] | {_fmt(c['parity_accuracy'])} | "
                 f"{_fmt(c['parity_shuffled_accuracy'])} | {_fmt(c['value_exact'])} | "
                 f"{_fmt(c['value_r2'])} |")
    return "\n".join(lines) + "\n"
