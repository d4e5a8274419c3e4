"""The comparison's figures: models of different depths on one relative-depth axis (0 = the
embeddings, 1 = the last layer's output). Each model keeps one colour in every figure."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .plots import TRANSFER_COLORS, _faith, _interval
from .style import RC, plt, save_figure

DEPTH_LABEL = "relative depth (layer / L)"
STAGE_COLORS = {"wait": "#d9d9d9", "transfer": "#525252", "compute": "#9ecae1"}  # not model colours


def colors(labels: Sequence[str]) -> dict[str, str]:
    """One colour per series label, in order."""
    return {label: TRANSFER_COLORS[i % len(TRANSFER_COLORS)] for i, label in enumerate(labels)}


def _depth_lines(ax, curves: dict[str, tuple[list[float], list[dict]]], palette: dict[str, str]):
    """Each curve's faithfulness over depth with its 95% interval as a band (drawn under the
    lines, light, so that overlapping bands stay readable)."""
    for label, (depths, rows) in curves.items():
        color = palette[label]
        if all(r["faithfulness"] is None for r in rows):
            label += " (n/a: no prompt right in full)"
        low, high = zip(*[_interval(r) for r in rows]) if rows else ((), ())
        ax.fill_between(depths, low, high, color=color, alpha=0.12, lw=0, step=None)
        ax.plot(depths, [_faith(r) for r in rows], marker="o", ms=2.5, lw=1.3, color=color,
                label=label)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel(DEPTH_LABEL)
    ax.set_ylabel("faithfulness")


def faithfulness_vs_depth(lines: dict[str, list[dict]], palette: dict[str, str], path: Path,
                          title: str, caption: str, criterion: float) -> list[Path]:
    """``lines``: per series label, sweep rows (one per L_wait, each with ``depth``)."""
    with plt.rc_context(RC):
        fig, ax = plt.subplots(figsize=(6.4, 3.2))
        _depth_lines(ax, {label: ([r["depth"] for r in rows], rows)
                          for label, rows in lines.items()}, palette)
        ax.axhline(criterion, color="grey", ls="--", lw=0.8, label=f"criterion {criterion}")
        ax.set_xlabel("$L_{wait}$ / L (relative depth where waiting ends)")
        ax.set_ylabel("faithfulness (best $L_{transfer}$)")
        ax.set_title(title)
        ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        return save_figure(fig, path, caption)


def necessity_vs_depth(curves: dict[str, tuple[int, list[dict]]], palette: dict[str, str],
                       path: Path, title: str, caption: str) -> list[Path]:
    """``curves``: per series label, ``(L, necessity rows of window 1 sorted by layer)``."""
    with plt.rc_context(RC):
        fig, ax = plt.subplots(figsize=(6.4, 3.2))
        _depth_lines(ax, {label: ([r["layer"] / n for r in rows], rows)
                          for label, (n, rows) in curves.items()}, palette)
        ax.set_title(title)
        ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        return save_figure(fig, path, caption)


def af1_windows(entries: list[dict], palette: dict[str, str], path: Path, title: str,
                caption: str, criterion: float) -> list[Path]:
    """One bar per comparison row (``entries``: compare.json rows with ``graded``, the
    faithfulness reported): wait, transfer and compute on relative depth; beside it that
    faithfulness with its interval, the criterion dashed, a filled mark where it is met."""
    n = len(entries)
    with plt.rc_context(RC):
        fig, (left, right) = plt.subplots(
            1, 2, figsize=(8.0, 0.42 * n + 1.5), sharey=True,
            gridspec_kw={"width_ratios": [2.2, 1.0], "wspace": 0.12})
        y = np.arange(n)[::-1]
        for yi, e in zip(y, entries):
            wait, end = e["wait_depth"], e["transfer_end_depth"]
            for stage, (start, stop) in {"wait": (0.0, wait), "transfer": (wait, end),
                                         "compute": (end, 1.0)}.items():
                left.barh(yi, stop - start, left=start, height=0.6,
                          color=STAGE_COLORS[stage], edgecolor="white", lw=0.5,
                          label=stage if yi == y[0] else None)
            graded = e["graded"]
            color = palette[e["model"]]
            value = graded["faithfulness"]
            if value is None:
                right.text(0.02, yi, "n/a: the full model\ngets no prompt right", va="center",
                           fontsize=7, color=color)
            else:
                ci = graded.get("faithfulness_ci") or [value, value]
                met = value >= criterion
                right.errorbar(value, yi, xerr=[[value - ci[0]], [ci[1] - value]], fmt="o",
                               ms=5, color=color, mfc=color if met else "white", capsize=2,
                               lw=1)
                right.text(1.04, yi, f"{graded['n_af1_correct_of_full']}/"
                           f"{graded['n_full_correct']}"
                           + (" held out" if graded["which"] == "held out" else ""),
                           va="center", fontsize=7, transform=right.get_yaxis_transform())
        left.set_yticks(y, [f"{e['model']}\n{e['label']}: {e['l_wait']} + {e['l_transfer']} of "
                            f"{e['n_layers']} layers{'' if e['met_threshold'] else ' *'}"
                            for e in entries], fontsize=7)
        for tick, e in zip(left.get_yticklabels(), entries):
            tick.set_color(palette[e["model"]])
        left.set_xlim(0, 1)
        left.set_xlabel(DEPTH_LABEL)
        left.legend(frameon=False, ncol=3, loc="lower left", bbox_to_anchor=(0, 1.0),
                    fontsize=7)
        right.axvline(criterion, color="grey", ls="--", lw=0.8)
        right.set_xlim(0, 1.02)
        right.set_xticks([0.25, 0.5, 0.75, 1.0])
        right.set_xlabel("faithfulness")
        right.text(criterion, 1.0, f" {criterion}", color="grey", fontsize=7, va="bottom",
                   transform=right.get_xaxis_transform())
        right.set_ylim(-0.6, n - 0.4)
        fig.suptitle(title, y=1.0 + 0.25 / (0.42 * n + 1.5))
        return save_figure(fig, path, caption)
