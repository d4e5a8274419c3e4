"""One look for every figure: sizes, fonts, colour map, and PNG + PDF output."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are files; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

FAITHFULNESS_CMAP = "viridis"
RC = {
    "figure.dpi": 110,
    "savefig.dpi": 150,
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
}

# The spec's layer convention, said once for every axis label.
L_WAIT_LABEL = "$L_{wait}$ (h$_{L_{wait}}$ replaced by CAMA)"
L_TRANSFER_LABEL = "$L_{transfer}$ (layers the last token reads others)"


def save_figure(fig, path: str | Path, caption: str | None = None) -> list[Path]:
    """Save ``fig`` as ``path`` (PNG) and a PDF beside it, plus a ``.caption.txt`` sidecar."""
    path = Path(path).with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix in (".png", ".pdf"):
        target = path.with_suffix(suffix)
        fig.savefig(target, bbox_inches="tight")
        written.append(target)
    if caption:
        sidecar = path.with_suffix(".caption.txt")
        sidecar.write_text(caption.strip() + "\n")
        written.append(sidecar)
    plt.close(fig)
    return written
