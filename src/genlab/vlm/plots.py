"""Pictures of a VLM run: answered examples (PNG, Agg, no pyplot); the engine draws loss.png."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from genlab.eval.plots import save_figure


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)  # raster backend, no pyplot: nothing opens a window
    return fig


def plot_examples(images: list[np.ndarray], prompts: list[str], answers: list[str], truths: list[str],
                  path: Path, cols: int = 4) -> Path:
    """A grid of images, each with its prompt, the model's answer (green when it equals the truth,
    red otherwise) and the truth."""
    import textwrap

    rows = -(-len(images) // cols)
    fig = _figure(2.4 * cols, 2.9 * rows)
    for i, (image, prompt, ans, truth) in enumerate(zip(images, prompts, answers, truths)):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(image, interpolation="nearest")
        ax.set_axis_off()
        wrap = lambda s: "\n".join(textwrap.wrap(s, 32)) or "''"  # noqa: E731
        ax.set_title(wrap(prompt), fontsize=7)
        ax.text(0.5, -0.03, wrap(ans), transform=ax.transAxes, ha="center", va="top", fontsize=7,
                color="green" if ans == truth else "red")
        ax.text(0.5, -0.25, wrap(f"truth: {truth}"), transform=ax.transAxes, ha="center", va="top",
                fontsize=6, color="black")
    fig.subplots_adjust(left=0.02, right=0.98, hspace=0.9, wspace=0.1, top=0.95, bottom=0.08)
    return save_figure(fig, path)  # atomic: a killed run never leaves half a PNG
