"""Pictures of evaluation results (PNG, Agg canvas, no pyplot), written atomically."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from genlab.io import atomic_write_bytes


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Render ``fig`` to PNG in memory and write it atomically: a killed run never leaves half a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return path


def plot_accuracy_by_scale(results: dict[float, float], per_class: dict[float, list[float]], path: str | Path,
                           classes: list[str] | None = None, title: str = "conditional accuracy") -> Path:
    """Left: the classifier's accuracy on generated samples against the CFG scale. Right: a heat-map
    of the accuracy per (scale, class), each cell labelled with its value."""
    scales = sorted(results)
    acc = [results[s] for s in scales]
    grid = np.array([per_class[s] for s in scales], dtype=np.float64)  # (S, K)
    k = grid.shape[1]
    classes = classes or [str(i) for i in range(k)]

    fig = Figure(figsize=(4.0 + 0.45 * k, 3.6), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax, hm = fig.subplots(1, 2, width_ratios=[3.0, max(2.0, 0.45 * k)])
    ax.plot(scales, acc, marker="o", color="#1f77b4")
    ax.set_xlabel("CFG scale")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0.0, 1.02)
    ax.set_xticks(scales)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)

    im = hm.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    hm.set_xticks(range(k), classes, rotation=45 if max(map(len, classes)) > 2 else 0, fontsize=7)
    hm.set_yticks(range(len(scales)), [f"{s:g}" for s in scales], fontsize=8)
    hm.set_xlabel("class")
    hm.set_ylabel("CFG scale")
    if k <= 20:  # numbers stay legible up to about CIFAR-10's ten classes and then some
        for (i, j), v in np.ndenumerate(grid):
            if not math.isnan(v):
                hm.text(j, i, f"{v:.2f}"[1:] if 0 <= v < 1 else f"{v:.0f}", ha="center", va="center",
                        fontsize=6, color="white" if v < 0.6 else "black")
    fig.colorbar(im, ax=hm, fraction=0.05)
    return save_figure(fig, path)
