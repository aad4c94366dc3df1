"""Image-text retrieval: Recall@K both ways, and a picture of a similarity matrix.

Recall@K is the retrieval metric of CLIP, ALIGN and BLIP-2 (COCO / Flickr30k 5k / 1k test sets):
rank every caption for each image (image->text, "i2t") and every image for each caption
(text->image, "t2i") by similarity, and count the queries with a correct item among the first K.

One choice differs from the COCO protocol, on purpose: a caption counts as correct for an image
when it belongs to that image *or its text equals one of that image's captions*. In the
procedural shapes world two scenes often get the very same sentence ("a red cube left of a blue
ball"); ranking the other scene's copy first is not a retrieval error, and counting it as one
would cap Recall@1 below 1 for a perfect model. On data without repeated captions this is the
usual definition.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from genlab.eval.plots import save_figure


def _as_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.is_floating_point() else x).numpy()
    return np.asarray(x)


def correct_pairs(text_image: np.ndarray, texts: Sequence[str], n_images: int,
                  image_texts: Sequence[Sequence[str]] | None = None) -> np.ndarray:
    """The (N_img, N_txt) bool matrix ``correct[i, j]``: caption j matches image i, i.e. image i owns
    caption j or owns a caption with exactly caption j's text (extra captions of ``image_texts``
    included). The same matrix answers both directions."""
    ids: dict[str, int] = {}
    tid = np.array([ids.setdefault(t, len(ids)) for t in texts], dtype=np.int64)  # (N_txt,) text ids
    extra = [[ids[t] for t in caps if t in ids] for caps in image_texts] if image_texts is not None else None
    has_text = np.zeros((n_images, len(ids)), dtype=bool)  # (N_img, U): image i owns text u
    has_text[text_image, tid] = True
    if extra is not None:
        for i, us in enumerate(extra):
            has_text[i, us] = True
    return has_text[:, tid]  # (N_img, N_txt); owner pairs are included since has_text[owner[j], tid[j]]


def _recall(sim: np.ndarray, correct: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """Row-wise recall: the fraction of rows whose first correct column ranks below k, ranking the
    columns by descending ``sim`` with ties in index order (a stable sort).

    No sort is needed: the first correct column in that order is the correct column of highest
    score (the lowest index among equals: ``argmax`` returns the first maximum), and its rank is the
    number of columns that a stable sort puts before it: higher score, or equal score and lower
    index. Every row must have a correct column."""
    rows = np.arange(sim.shape[0])
    best_j = np.where(correct, sim, -np.inf).argmax(1)  # (R,) the first correct column in ranked order
    lost = ~correct[rows, best_j]  # rows whose correct scores are all -inf: argmax found a wrong -inf
    best_j[lost] = correct[lost].argmax(1)  # then the first correct index is the first in ranked order
    best = sim[rows, best_j][:, None]  # (R, 1) its score
    before = (sim > best) | ((sim == best) & (np.arange(sim.shape[1])[None, :] < best_j[:, None]))  # (R, C)
    rank = before.sum(1)  # (R,) 0 = retrieved first
    return {k: float((rank < k).mean()) for k in ks}


def recall_at_k(sim: torch.Tensor | np.ndarray, text_image: torch.Tensor | np.ndarray, texts: Sequence[str],
                image_texts: Sequence[Sequence[str]] | None = None,
                ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K for image->text and text->image retrieval.

    sim (N_img, N_txt), torch or numpy, higher = more similar (cosines, logits). text_image (N_txt,)
    int: the image each caption belongs to. texts: the N_txt caption strings. image_texts (optional):
    for each image, more captions of it that are not among ``texts`` (say the 4 captions left out
    when only one per image is embedded); a caption in ``texts`` equal to one of them also counts
    as correct for that image.

    Image->text: image i is a hit at K when one of its K most similar captions belongs to i or has
    exactly the text of one of i's captions. Text->image: caption j is a hit at K when one of its K
    most similar images is j's image or owns a caption with exactly j's text. Ties are broken by
    index order (a stable sort: among equal similarities the lower index ranks first), so a
    constant ``sim`` scores as if every query returned items 0, 1, 2, ...

    Returns ``{"i2t_r1": .., "i2t_r5": .., "i2t_r10": .., "t2i_r1": .., ..., "n_images", "n_texts"}``
    with recalls as fractions in [0, 1] (keys follow ``ks``). Memory and time are O(N_img x N_txt),
    no sort: 1000 images x 3000 captions take about 0.1 s on one core. ``ValueError`` on mismatched
    shapes, a caption owned by an image outside ``sim``, an image with no correct caption, or a NaN.
    """
    s = _as_numpy(sim).astype(np.float64, copy=False)
    owner = _as_numpy(text_image).astype(np.int64).reshape(-1)
    if s.ndim != 2:
        raise ValueError(f"recall_at_k: sim must be (N_img, N_txt), got shape {s.shape}")
    n_img, n_txt = s.shape
    if owner.shape[0] != n_txt or len(texts) != n_txt:
        raise ValueError(f"recall_at_k: sim has {n_txt} captions but text_image has {owner.shape[0]} "
                         f"and texts {len(texts)}")
    if n_txt and (owner.min() < 0 or owner.max() >= n_img):
        raise ValueError(f"recall_at_k: text_image must lie in [0, {n_img}), got [{owner.min()}, {owner.max()}]")
    if image_texts is not None and len(image_texts) != n_img:
        raise ValueError(f"recall_at_k: image_texts has {len(image_texts)} entries for {n_img} images")
    if np.isnan(s).any():
        raise ValueError("recall_at_k: sim contains NaN")
    correct = correct_pairs(owner, texts, n_img, image_texts)  # (N_img, N_txt)
    if not correct.any(1).all():
        raise ValueError(f"recall_at_k: {int((~correct.any(1)).sum())} images have no caption among texts")

    out: dict[str, float] = {}
    for name, r in (("i2t", _recall(s, correct, ks)), ("t2i", _recall(s.T, correct.T, ks))):
        out.update({f"{name}_r{k}": v for k, v in r.items()})
    out["n_images"], out["n_texts"] = n_img, n_txt
    return out


def plot_similarity_grid(sim: torch.Tensor | np.ndarray, captions: Sequence[str], images: np.ndarray,
                         path: str | Path, max_rows: int = 8, max_cols: int = 8) -> Path:
    """Write a PNG of a caption x image similarity matrix and return its path.

    sim (R, C): row r is ``captions[r]``, column c is ``images[c]`` (uint8 (C, H, W, 3)). Each cell
    is coloured by its value and labelled with it (two decimals); the thumbnails sit above their
    columns and the wrapped captions to the left of their rows. Only the first ``max_rows``
    captions and ``max_cols`` images are drawn. Rendered on the Agg canvas and written atomically
    with ``genlab.eval.plots.save_figure``.
    """
    grid = _as_numpy(sim).astype(np.float64)[:max_rows, :max_cols]  # (R, C)
    imgs = np.asarray(images)[:max_cols]  # (C, H, W, 3)
    if grid.ndim != 2:
        raise ValueError(f"plot_similarity_grid: sim must be (rows, cols), got shape {grid.shape}")
    r, c = grid.shape
    if len(captions) < r or imgs.shape[0] < c or imgs.ndim != 4 or imgs.shape[-1] != 3:
        raise ValueError(f"plot_similarity_grid: need {r} captions and (>= {c}, H, W, 3) images, got "
                         f"{len(captions)} captions and images of shape {imgs.shape}")

    fig = Figure(figsize=(3.0 + 0.9 * c, 1.4 + 0.75 * r), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    lo, hi = float(grid.min()), float(grid.max())
    hi = hi if hi > lo else lo + 1e-6
    im = ax.imshow(grid, cmap="viridis", vmin=lo, vmax=hi, aspect="equal")
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                color="white" if (v - lo) / (hi - lo) < 0.6 else "black")
    # Thumbnails one cell high above the grid, in the same data coordinates as the cells; with
    # origin "upper" the extent's last value is the top (the y axis points down).
    for j in range(c):
        ax.imshow(imgs[j], extent=(j - 0.45, j + 0.45, -0.6, -1.5), interpolation="nearest")
    ax.set_xlim(-0.5, c - 0.5)
    ax.set_ylim(r - 0.5, -1.55)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks(range(r), [textwrap.fill(t, 28) for t in captions[:r]], fontsize=7)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    fig.colorbar(im, ax=ax, fraction=0.04, label="similarity")
    return save_figure(fig, path)
