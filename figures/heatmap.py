"""Faithfulness over the L_wait x L_transfer grid for one task."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from .style import FAITHFULNESS_CMAP, L_TRANSFER_LABEL, L_WAIT_LABEL, RC, plt, save_figure


def faithfulness_grid(rows: Iterable[dict]) -> tuple[list[int], list[int], np.ndarray]:
    """``(l_wait values, l_transfer values, grid[l_transfer, l_wait])``; NaN where not run."""
    rows = list(rows)
    waits = sorted({r["l_wait"] for r in rows})
    transfers = sorted({r["l_transfer"] for r in rows})
    grid = np.full((len(transfers), len(waits)), np.nan)
    for r in rows:
        value = r["faithfulness"]
        grid[transfers.index(r["l_transfer"]), waits.index(r["l_wait"])] = (
            np.nan if value is None else value)
    return waits, transfers, grid


def plot_heatmap(rows: Iterable[dict], path: str | Path, title: str,
                 caption: str | None = None) -> list[Path]:
    """Draw faithfulness as a heatmap (x: L_wait, y: L_transfer) and save PNG + PDF."""
    waits, transfers, grid = faithfulness_grid(rows)
    with plt.rc_context(RC):
        fig, ax = plt.subplots(figsize=(max(4.0, 0.22 * len(waits) + 1.8), 0.45 * len(transfers) + 1.4))
        image = ax.imshow(np.ma.masked_invalid(grid), origin="lower", aspect="auto",
                          cmap=FAITHFULNESS_CMAP, vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_xticks(range(len(waits)), [str(w) for w in waits], fontsize=7)
        ax.set_yticks(range(len(transfers)), [str(t) for t in transfers])
        ax.set_xlabel(L_WAIT_LABEL)
        ax.set_ylabel(L_TRANSFER_LABEL)
        ax.set_title(title)
        fig.colorbar(image, ax=ax, label="faithfulness", fraction=0.04, pad=0.02)
        return save_figure(fig, path, caption)
