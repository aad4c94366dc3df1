"""The training-loss picture every recipe writes into its run folder (PNG, Agg canvas, no pyplot)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from genlab.train.logging import read_metrics


def plot_loss_curve(steps, losses, path: str | Path, title: str = "training loss", smooth: int = 50,
                    ylabel: str = "loss", val: tuple | None = None) -> Path:
    """Raw loss (faint) and its running mean over ``smooth`` steps, and the validation loss
    ``val = (steps, losses)`` as points when given; log y-axis when all losses are > 0."""
    to_np = lambda a: a.detach().cpu().float().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, np.float32)  # noqa: E731
    x, y = to_np(steps), to_np(losses)
    fig = Figure(figsize=(6.0, 3.5), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(x, y, color="#1f77b4", alpha=0.25, linewidth=0.8, label="loss")
    if len(y) >= smooth > 1:
        kernel = np.ones(smooth) / smooth
        ax.plot(x[smooth - 1:], np.convolve(y, kernel, mode="valid"), color="#1f77b4", linewidth=1.5,
                label=f"mean of {smooth}")
    if val is not None and len(val[0]):
        vx, vy = to_np(val[0]), to_np(val[1])
        ax.plot(vx, vy, color="#d62728", marker="o", markersize=4, linewidth=1.2, label="validation")
        y = np.concatenate([y, vy])  # the axis range covers both
    if len(y) and float(np.nanmin(y)) > 0:
        ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")  # 2, 3, 4 rather than 2x10^0
        ax.yaxis.set_major_formatter(plain)
        if float(np.nanmax(y)) < 10 * float(np.nanmin(y)):  # under a decade: label minor ticks too
            ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def plot_run_loss(run_dir: str | os.PathLike, path: str | Path, smooth: int = 5, ylabel: str = "loss") -> Path | None:
    """The loss curve of a run, read from its metrics.jsonl (None when nothing was logged yet)."""
    rows = read_metrics(run_dir)
    rec = [r for r in rows if r.get("split") == "train" and "loss" in r]
    if not rec:
        return None
    val = [r for r in rows if r.get("split") == "val" and "loss" in r]
    return plot_loss_curve([r["step"] for r in rec], [r["loss"] for r in rec], path, smooth=smooth, ylabel=ylabel,
                           val=([r["step"] for r in val], [r["loss"] for r in val]) if val else None)
