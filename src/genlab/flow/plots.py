"""Pictures of 2-D flows, written straight to PNG files.

Figures are built with ``matplotlib.figure.Figure`` and the Agg canvas, never
through pyplot: nothing opens a window, no global figure list grows during a
long run, and the figure is freed as soon as the function returns. Inputs may
be numpy arrays, torch tensors (any device) or plain lists. Every function
creates the parent folder, writes ``path`` and returns it as a ``Path``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullLocator

from genlab.train.plots import plot_loss_curve  # the shared loss picture, re-exported here

__all__ = ["plot_samples", "plot_trajectories", "plot_density", "plot_loss_curve", "plot_nfe_curve"]

_DPI = 120
_TARGET_COLOR = "#9e9e9e"
_SAMPLE_COLOR = "#1f77b4"
_SOURCE_COLOR = "black"
_PATH_COLOR = "olive"


def _np(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().to("cpu", torch.float32).numpy()
    return np.asarray(a, dtype=np.float32)


def _new_figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)  # attach the raster backend explicitly
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    fig.clear()  # drop artists now rather than waiting for the garbage collector
    return path


def _limits(*clouds: np.ndarray, margin: float = 0.05) -> tuple[float, float, float, float]:
    pts = np.concatenate([c.reshape(-1, 2) for c in clouds], axis=0)
    lo, hi = np.nanmin(pts, axis=0), np.nanmax(pts, axis=0)
    pad = margin * float((hi - lo).max() + 1e-6)
    return lo[0] - pad, hi[0] + pad, lo[1] - pad, hi[1] + pad


def _square(ax: Axes, lim: tuple[float, float, float, float]) -> None:
    ax.set_xlim(lim[0], lim[1])
    ax.set_ylim(lim[2], lim[3])
    ax.set_aspect("equal")
    ax.tick_params(labelsize=7)


def plot_samples(samples, target, path: str | Path, title: str = "samples") -> Path:
    """Scatter of model samples (N, 2), beside the target samples (M, 2) unless ``target`` is None.

    The two panels share the same square limits so shapes can be compared by eye.
    """
    s = _np(samples)
    clouds = [s] if target is None else [_np(target), s]
    fig, axes = _new_figure(4.0 * len(clouds), 4.3, ncols=len(clouds))
    lim = _limits(*clouds)
    names = ["samples"] if target is None else ["target", "samples"]
    colors = [_SAMPLE_COLOR] if target is None else [_TARGET_COLOR, _SAMPLE_COLOR]
    for ax, cloud, name, color in zip(axes, clouds, names, colors):
        ax.scatter(cloud[:, 0], cloud[:, 1], s=1.5, alpha=0.6, color=color, linewidths=0)
        ax.set_title(f"{name} (n={len(cloud)})", fontsize=9)
        _square(ax, lim)
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def plot_trajectories(traj, path: str | Path, n: int = 2000, title: str = "flow") -> Path:
    """Paths of the first ``n`` samples of ``traj`` (T, B, 2): start points (black),
    faint path lines (olive) and end points (blue)."""
    tr = _np(traj)
    if tr.ndim != 3 or tr.shape[-1] != 2:
        raise ValueError(f"traj must have shape (T, B, 2), got {tr.shape}")
    tr = tr[:, :n]  # (T, n, 2)
    fig, (ax,) = _new_figure(5.0, 5.0)
    ax.plot(tr[:, :, 0], tr[:, :, 1], color=_PATH_COLOR, alpha=0.08, linewidth=0.5)
    ax.scatter(tr[0, :, 0], tr[0, :, 1], s=2, alpha=0.8, color=_SOURCE_COLOR, linewidths=0, label="x(0)")
    ax.scatter(tr[-1, :, 0], tr[-1, :, 1], s=2, alpha=1.0, color=_SAMPLE_COLOR, linewidths=0, label="x(1)")
    ax.plot([], [], color=_PATH_COLOR, label="path")  # legend entry for the faint lines
    ax.legend(loc="upper right", fontsize=7, markerscale=3, framealpha=0.8)
    ax.set_title(f"{title} ({tr.shape[1]} paths, {tr.shape[0]} steps)", fontsize=10)
    _square(ax, _limits(tr))
    return _save(fig, path)


def plot_density(
    log_prob,
    extent: Sequence[float],
    path: str | Path,
    resolution: int = 200,
    title: str = "model density",
) -> Path:
    """Heat map of exp(log p) over the box ``extent = (xmin, xmax, ymin, ymax)``.

    ``log_prob`` is either a function mapping a (G*G, 2) float32 tensor of grid
    points to their (G*G,) log densities (called once; its output is detached), or a
    (G, G) array of log densities already on the grid, with row i at the i-th
    y value and column j at the j-th x value (``resolution`` is then ignored).
    """
    xmin, xmax, ymin, ymax = (float(v) for v in extent)
    if callable(log_prob):
        fn: Callable = log_prob
        xs = torch.linspace(xmin, xmax, resolution)
        ys = torch.linspace(ymin, ymax, resolution)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")  # (G, G): rows follow y
        grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)  # (G*G, 2)
        values = _np(fn(grid)).reshape(resolution, resolution)  # fn may need autograd (divergences)
    else:
        values = _np(log_prob)
        if values.ndim != 2:
            raise ValueError(f"grid values must be (G, G), got {values.shape}")
    density = np.exp(values)  # (G, G)
    fig, (ax,) = _new_figure(5.0, 4.3)
    im = ax.imshow(density, origin="lower", extent=(xmin, xmax, ymin, ymax), cmap="magma", interpolation="bilinear")
    fig.colorbar(im, ax=ax, shrink=0.8).ax.tick_params(labelsize=7)
    ax.set_title(title, fontsize=10)
    _square(ax, (xmin, xmax, ymin, ymax))
    return _save(fig, path)


def plot_nfe_curve(nfes, w2s, path: str | Path, title: str = "sample quality vs NFE",
                   reference: float | None = None) -> Path:
    """W2 to the target against the number of function evaluations, log-scaled NFE axis.

    ``w2s`` may be one sequence (one curve) or a mapping ``label -> sequence`` to
    compare methods (e.g. I-CFM vs OT-CFM); ``nfes`` is then either one shared
    sequence or a mapping with the same labels. ``reference`` (e.g. W2 of the source itself to the
    target) is drawn as a dashed line, and the y axis starts at 0 so that noise does not look like
    a trend.
    """
    curves = w2s if isinstance(w2s, Mapping) else {"": w2s}
    fig, (ax,) = _new_figure(5.5, 3.8)
    ticks: set[float] = set()
    for label, ys in curves.items():
        xs = _np(nfes[label] if isinstance(nfes, Mapping) else nfes)
        ax.plot(xs, _np(ys), marker="o", markersize=4, linewidth=1.5, label=label or None)
        ticks.update(float(v) for v in xs)
    ax.set_xscale("log")
    if len(ticks) <= 12:  # label the NFEs actually measured instead of powers of ten
        ax.set_xticks(sorted(ticks))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_locator(NullLocator())
    if reference is not None:
        ax.axhline(reference, color="gray", linestyle="--", linewidth=1, label="source vs target")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("NFE (function evaluations)")
    ax.set_ylabel("W2 to target")
    ax.grid(alpha=0.3, which="both")
    if any(curves) or reference is not None:
        ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def save_image_grid(images, path: str | Path, nrow: int, row_labels: Sequence[str] | None = None,
                    min_side: int = 32, pad: int = 2) -> Path:
    """A PNG grid of uint8 images (N, C, H, W), ``nrow`` images per row, written atomically.

    Small images (sklearn's 8x8 digits) are enlarged with nearest-neighbour pixels to at least
    ``min_side``; ``row_labels`` (one per row, e.g. class names) are written at the left.
    """
    from io import BytesIO

    from PIL import Image, ImageDraw

    from genlab.io import atomic_write_bytes

    imgs = torch.as_tensor(images).detach().to("cpu", torch.uint8)  # (N, C, H, W)
    n, c, h, w = imgs.shape
    zoom = max(1, -(-min_side // max(h, w)))  # ceil division
    rows = -(-n // nrow)
    label_w = 0 if not row_labels else 8 + 7 * max(len(str(s)) for s in row_labels)
    cell_h, cell_w = h * zoom + pad, w * zoom + pad
    canvas = Image.new("RGB", (label_w + nrow * cell_w + pad, rows * cell_h + pad), "white")
    arr = imgs.permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
    for i in range(n):
        tile = Image.fromarray(arr[i, :, :, 0] if c == 1 else arr[i]).convert("RGB")
        tile = tile.resize((w * zoom, h * zoom), Image.NEAREST)
        r, col = divmod(i, nrow)
        canvas.paste(tile, (label_w + pad + col * cell_w, pad + r * cell_h))
    if row_labels:
        draw = ImageDraw.Draw(canvas)
        for r, label in enumerate(row_labels[:rows]):
            draw.text((4, pad + r * cell_h + cell_h // 2 - 6), str(label), fill="black")
    buf = BytesIO()
    canvas.save(buf, format="PNG")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return path
