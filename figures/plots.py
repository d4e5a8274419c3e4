"""One function per figure kind. Each takes results rows (dicts from results.jsonl) and a path,
draws with the shared style, and saves PNG + PDF + caption. Every share is drawn with its 95%
interval (the rows' ``*_ci`` fields): bands on lines, error bars on bars, marks on the heatmap."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from interventions.pipeline.stats import proportion_ci

from .style import (FAITHFULNESS_CMAP, L_TRANSFER_LABEL, L_WAIT_LABEL, RC, plt, save_figure)

TRANSFER_COLORS = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02")


def _faith(row: dict) -> float:
    return np.nan if row["faithfulness"] is None else row["faithfulness"]


def _interval(row: dict, share: str = "faithfulness") -> tuple[float, float]:
    """``(low, high)`` of a share's 95% interval; NaN when the share is undefined."""
    ci = row[f"{share}_ci"]
    return (np.nan, np.nan) if ci is None else (ci[0], ci[1])


def _error_bars(values: Sequence[float | None], intervals: Sequence[list | None]) -> np.ndarray:
    """``(2, N)`` distances from each value down and up to its interval's ends (for matplotlib's
    ``xerr``/``yerr``); 0 where a value is undefined."""
    errors = np.zeros((2, len(values)))
    for i, (value, ci) in enumerate(zip(values, intervals)):
        if value is not None and ci is not None:
            errors[:, i] = (value - ci[0], ci[1] - value)
    return errors


def accuracy_interval(accuracy: float | None, n: int) -> list[float] | None:
    """The 95% interval of an accuracy measured on ``n`` predictions (its count recovered by
    rounding ``accuracy * n``)."""
    return None if accuracy is None else proportion_ci(round(accuracy * n), n)


def faithfulness_grid(rows: Iterable[dict], value=_faith
                      ) -> tuple[list[int], list[int], np.ndarray]:
    """``(l_wait values, l_transfer values, grid[l_transfer, l_wait])`` of ``value(row)``
    (faithfulness by default); NaN where not run."""
    rows = list(rows)
    waits = sorted({r["l_wait"] for r in rows})
    transfers = sorted({r["l_transfer"] for r in rows})
    grid = np.full((len(transfers), len(waits)), np.nan)
    for r in rows:
        grid[transfers.index(r["l_transfer"]), waits.index(r["l_wait"])] = value(r)
    return waits, transfers, grid


def _wrapped(text: str, inches: float, font_size: float) -> str:
    """``text`` broken into lines that fit ``inches`` at ``font_size`` points (an average
    character is about half the font size wide)."""
    return "\n".join(textwrap.wrap(text, max(12, int(inches * 72 / (0.55 * font_size)))))


# What the heatmap can show (``--metric``): the row field, its colour-bar label, and whether
# low values are good (the colour map is then reversed, so good cells look alike in every
# metric).
HEATMAP_METRICS = {"faithfulness": ("faithfulness", "faithfulness", False),
                   "prob_ratio": ("answer_prob_ratio", "answer probability, AF1 / full", False),
                   "kl": ("kl_full_to_af1", "KL(full || AF1), nats", True)}


def heatmap(rows: Sequence[dict], path: Path, title: str, caption: str,
            config: tuple[int, int] | None = None, threshold: float | None = None,
            metric: str = "faithfulness") -> list[Path]:
    """A measure over the grid (x: L_wait, y: L_transfer); the AF1 configuration boxed.

    ``metric`` (:data:`HEATMAP_METRICS`): faithfulness (0 to 1), the answer probability ratio
    (0 to the larger of 1 and its largest value) or the KL divergence from the full model (0 to
    its largest value, reversed colours); undefined cells are blank. With ``threshold``
    (faithfulness only): a hollow circle on cells whose 95% interval reaches it (upper end >=
    threshold), a filled one where the whole interval lies at or above it (lower end >=)."""
    field, label, low_is_good = HEATMAP_METRICS[metric]
    waits, transfers, grid = faithfulness_grid(
        rows, lambda r: np.nan if r.get(field) is None else r[field])
    top = float(np.nanmax(grid)) if np.isfinite(grid).any() else 1.0
    vmax = 1.0 if metric == "faithfulness" else max(top, 1.0 if metric == "prob_ratio" else 1e-6)
    cmap = FAITHFULNESS_CMAP + ("_r" if low_is_good else "")
    width, height = max(4.0, 0.22 * len(waits) + 1.8), max(2.6, 0.45 * len(transfers) + 1.4)
    with plt.rc_context(RC):
        fig, ax = plt.subplots(figsize=(width, height))
        image = ax.imshow(np.ma.masked_invalid(grid), origin="lower", aspect="auto",
                          cmap=cmap, vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_xticks(range(len(waits)), [str(w) for w in waits], fontsize=7)
        ax.set_yticks(range(len(transfers)), [str(t) for t in transfers])
        if config and config[0] in waits and config[1] in transfers:
            x, y = waits.index(config[0]), transfers.index(config[1])
            ax.add_patch(plt.Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, lw=1.8,
                                       edgecolor="red"))
        if threshold is not None and metric == "faithfulness":
            _, _, low = faithfulness_grid(rows, lambda r: _interval(r)[0])
            _, _, high = faithfulness_grid(rows, lambda r: _interval(r)[1])
            ys, xs = np.nonzero(high >= threshold)
            filled = low[ys, xs] >= threshold
            ax.scatter(xs, ys, s=14, facecolors=np.where(filled, "black", "none"),
                       edgecolors="black", linewidths=0.8)
        ax.set_xlabel(L_WAIT_LABEL)
        # The axis label and title wrap to the axes, so neither runs past the figure's edge.
        ax.set_ylabel(L_TRANSFER_LABEL.replace(" (", "\n("), fontsize=8)
        ax.set_title(_wrapped(title, width - 0.8, RC["axes.titlesize"]), loc="left")
        fig.colorbar(image, ax=ax, label=label, fraction=0.04, pad=0.02)
        return save_figure(fig, path, caption)


def faithfulness_lines(rows: Sequence[dict], path: Path, title: str, caption: str,
                       threshold: float | None = None) -> list[Path]:
    """Faithfulness against L_wait, one line per L_transfer, each point with its 95% interval
    as an error bar. The bars of the lines sit side by side around each L_wait (bands of several
    lines would merge where they overlap), and the legend stands beside the axes."""
    waits, transfers, grid = faithfulness_grid(rows)
    _, _, low = faithfulness_grid(rows, lambda r: _interval(r)[0])
    _, _, high = faithfulness_grid(rows, lambda r: _interval(r)[1])
    step = 0.5 / max(1, len(transfers))  # the bars of one L_wait spread over half a layer
    with plt.rc_context(RC):
        fig, ax = plt.subplots(figsize=(max(6.0, 0.2 * len(waits) + 1.5), 3.0))
        for i, t in enumerate(transfers):
            color = TRANSFER_COLORS[i % len(TRANSFER_COLORS)]
            x = np.asarray(waits) + (i - (len(transfers) - 1) / 2) * step
            ax.plot(x, grid[i], marker="o", ms=3, lw=1.2, color=color,
                    label=f"$L_{{transfer}}$={t}")
            ax.vlines(x, low[i], high[i], color=color, lw=0.9, alpha=0.55)
        if threshold is not None:
            ax.axhline(threshold, color="grey", ls="--", lw=0.8, label=f"threshold {threshold}")
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel(L_WAIT_LABEL)
        ax.set_ylabel("faithfulness")
        ax.set_title(title)
        ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  title="95% intervals:\nvertical bars", title_fontsize=7)
        return save_figure(fig, path, caption)


def necessity(rows: Sequence[dict], path: Path, title: str, caption: str) -> list[Path]:
    """Faithfulness when the last token cannot read non-sink tokens in one window of layers."""
    windows = sorted({r["window"] for r in rows})
    with plt.rc_context(RC):
        fig, ax = plt.subplots(figsize=(6.0, 3.0))
        for i, w in enumerate(windows):
            sel = sorted((r for r in rows if r["window"] == w), key=lambda r: r["layer"])
            layers = [r["layer"] for r in sel]
            color = TRANSFER_COLORS[i % len(TRANSFER_COLORS)]
            ax.plot(layers, [_faith(r) for r in sel], marker="o", ms=3, lw=1.2, color=color,
                    label=f"window of {w} layer{'s' if w > 1 else ''}")
            ax.fill_between(layers, [_interval(r)[0] for r in sel],
                            [_interval(r)[1] for r in sel], color=color, alpha=0.12, lw=0)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("first layer of the window (0-indexed)")
        ax.set_ylabel("faithfulness")
        ax.set_title(title)
        ax.legend(frameon=False)
        return save_figure(fig, path, caption)


def horizontal_bars(labels: Sequence[str], values: Sequence[float | None],
                    intervals: Sequence[list | None], notes: Sequence[str], path: Path,
                    title: str, caption: str, xlabel: str = "faithfulness") -> list[Path]:
    """One bar per label with its 95% interval (used for the alternatives); ``notes`` are
    printed beside the bars (counts, paired tests)."""
    with plt.rc_context(RC):
        fig, ax = plt.subplots(figsize=(6.5, 0.38 * len(labels) + 1.0))
        y = np.arange(len(labels))[::-1]
        errors = _error_bars(values, intervals)
        heights = [np.nan if v is None else v for v in values]
        ax.barh(y, heights, color="#4c72b0", xerr=errors, ecolor="black",
                error_kw={"lw": 0.8, "capsize": 2})
        for yi, ci, note in zip(y, intervals, notes):
            ax.text((0 if ci is None else ci[1]) + 0.02, yi, note, va="center", fontsize=7)
        ax.set_yticks(y, labels)
        ax.set_xlim(0, 1.6)
        ax.set_xticks(np.linspace(0, 1, 6))
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        return save_figure(fig, path, caption)


def grouped_bars(groups: Sequence[str], series: dict[str, tuple[Sequence, Sequence]], path: Path,
                 title: str, caption: str, ylabel: str = "share of prompts",
                 panels: dict[str, tuple[Sequence[str], dict[str, tuple[Sequence, Sequence]]]]
                 | None = None) -> list[Path]:
    """Bars per group, one colour per series, each with its 95% interval as an error bar
    (``series``: ``{label: (values, intervals)}``); ``panels`` draws several such charts side
    by side (``{panel title: (groups, series)}``), otherwise one chart of ``groups``/``series``."""
    panels = panels or {title: (groups, series)}
    with plt.rc_context(RC):
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False,
                                 sharey=True)
        for ax, (panel_title, (names, data)) in zip(axes[0], panels.items()):
            x = np.arange(len(names))
            width = 0.8 / max(1, len(data))
            for i, (label, (values, intervals)) in enumerate(data.items()):
                vals = [np.nan if v is None else v for v in values]
                ax.bar(x + (i - (len(data) - 1) / 2) * width, vals, width, label=label,
                       color=TRANSFER_COLORS[i % len(TRANSFER_COLORS)],
                       yerr=_error_bars(values, intervals), ecolor="black",
                       error_kw={"lw": 0.7, "capsize": 1.5})
            ax.set_xticks(x, names, rotation=30, ha="right")
            ax.set_ylim(0, 1.05)
            ax.set_title(panel_title if len(panels) > 1 else title)
        axes[0][0].set_ylabel(ylabel)
        axes[0][0].legend(frameon=False, fontsize=7)
        if len(panels) > 1:
            fig.suptitle(title, y=1.03)
        return save_figure(fig, path, caption)


def probe(result: dict, path: Path, title: str, caption: str) -> list[Path]:
    """Partial-result probe accuracy per layer, with its controls; the parity accuracy with its
    95% interval over the ``n_pairs`` held-out predictions as a band."""
    scores = result["scores"]
    layers = [s["layer"] for s in scores]
    control = result["control_operands_h0"]
    bands = [accuracy_interval(s["parity_accuracy"], result["n_pairs"]) for s in scores]
    with plt.rc_context(RC):
        fig, ax = plt.subplots(figsize=(6.0, 3.0))
        ax.plot(layers, [s["parity_accuracy"] for s in scores], marker="o", ms=3,
                color="#d95f02", label=f"parity of {result['partial']} (held-out pairs)")
        ax.fill_between(layers, [b[0] for b in bands], [b[1] for b in bands], color="#d95f02",
                        alpha=0.15, lw=0)
        ax.plot(layers, [s["parity_shuffled_accuracy"] for s in scores], ls=":",
                color="#999999", label="parity, shuffled labels")
        ax.plot(layers, [s["value_exact"] for s in scores], marker="s", ms=2.5,
                color="#1b9e77", label=f"value of {result['partial']}, exact")
        ax.axhline(control["parity_accuracy"], color="#7570b3", ls="--", lw=0.9,
                   label="parity from [h$_0$(A); h$_0$(B)] (no interaction)")
        ax.axhline(0.5, color="black", lw=0.5)
        ax.set_ylim(0, 1.03)
        ax.set_xlabel("layer k of the residual h$_k$ (0 = embeddings)")
        ax.set_ylabel("probe accuracy")
        ax.set_title(title)
        ax.legend(frameon=False, fontsize=7)
        return save_figure(fig, path, caption)
