"""Heatmaps of accuracy matrices (matplotlib, no display needed)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from cl_plugin._io import atomic_output

__all__ = ["plot_accuracy_matrix"]


def plot_accuracy_matrix(
    matrix: Sequence[Sequence[float]], path: str | os.PathLike, title: str = "", dpi: int = 120
) -> None:
    """Write ``matrix`` (R[i][j]: accuracy on test experience j after training i; (T, U), square or not) as an annotated heatmap PNG.

    NaN cells (not evaluated) are left blank. Uses matplotlib's Agg backend,
    so it works without a display. The image format follows the suffix of
    ``path`` (PNG when it has none). The file is written atomically; an
    existing one is replaced, with a log line (:func:`cl_plugin._io.atomic_output`).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = [[float(v) for v in row] for row in matrix]
    n_rows, n_cols = len(rows), max((len(row) for row in rows), default=0)  # (T, U): may be non-square
    height = max(3.0, 0.7 * n_rows + 1.5)
    width = max(3.0, 0.7 * n_cols + 1.5)
    fig, ax = plt.subplots(figsize=(width + 0.8, height))
    masked = [[v if not math.isnan(v) else float("nan") for v in row] for row in rows]
    image = ax.imshow(masked, vmin=0.0, vmax=1.0, cmap="viridis")
    for i, row in enumerate(rows):
        for j, v in enumerate(row):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black", fontsize=9)
    ax.set_xticks(range(n_cols))
    ax.set_yticks(range(n_rows))
    ax.set_xlabel("test experience j")
    ax.set_ylabel("after training experience i")
    if title:
        ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="accuracy")
    fig.tight_layout()
    target = Path(path)
    try:
        with atomic_output(target) as tmp:  # tmp has no image suffix: name the format
            fig.savefig(os.fspath(tmp), dpi=dpi, format=target.suffix[1:].lower() or "png")
    finally:
        plt.close(fig)
