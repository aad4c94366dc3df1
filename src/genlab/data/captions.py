"""Image-caption datasets for the Q-Former: the shapes world, img2dataset webdataset shards, parquet.

Every loader returns a ``CaptionSet``: per image a key and one or more captions, a ``skipped`` count
of what could not be used, and ``image(i)``, which decodes image i on demand (original size, uint8
RGB). ``CaptionPairs`` turns a set into one training example per (image, caption) pair.

    >>> data = load_captions(CaptionDataConfig(), "train", image_size=64)      # the shapes world, offline
    >>> pairs = CaptionPairs(data, image_size=64)
    >>> pairs[0]["pixels"].shape, pairs[0]["caption"]                          # (3, 64, 64), 'a small ...'
    >>> source = MapDataSource(pairs, collate_fn=collate_pairs)                 # genlab.train.data

The sources:

* ``shapes``: ``shapes_train`` / ``shapes_val`` scenes of ``genlab.data.shapes`` drawn from
  ``np.random.default_rng([seed, 0])`` (train) and ``[seed, 1]`` (val), rendered at ``image_size`` and
  kept in memory; captions = ``shapes.captions(scene)`` (2-3 per scene). Same seed, same data.
* ``webdataset``: img2dataset's output, ``path`` = a folder of ``*.tar`` shards (``_stats.json`` and
  ``.parquet`` files beside them are ignored), one ``.tar`` file, or a pattern such as
  ``cc/{00000..00009}.tar`` (braces, then ``*`` / ``?`` globs). A sample is the tar members sharing a
  key (the member's name up to the first dot of its basename; folders inside the tar allowed):
  ``KEY.jpg`` (or jpeg / png / webp) and its caption ``KEY.txt``, else the ``"caption"`` string of
  ``KEY.json``. Loading streams through every shard once with ``tarfile`` and keeps, per image,
  (shard, data offset, size); ``image(i)`` seeks and reads only those bytes.
* ``parquet``: a ``.parquet`` file or a folder of them (sorted, not recursive), read with pyarrow:
  a caption column (a string, or a list of strings = several captions of one image) and an image
  column of bytes, of path strings (relative to the parquet file's folder), or Hugging Face datasets'
  ``{"bytes", "path"}`` struct. Image bytes are held in memory; image files are read on demand.

Bad data is skipped and counted, never printed (the caller logs ``skipped``): ``"corrupt image"``
(PIL's ``verify()`` fails at load, or decoding fails later: ``CaptionPairs`` then serves the next
good pair and counts it), ``"missing caption"`` / ``"missing image"`` (a sample lacks one),
``"missing image file"`` (parquet path), ``"unreadable shard"`` / ``"unreadable file"`` (a truncated
or foreign tar / parquet file: its samples before the damage are kept), ``"missing shard"`` (a name
of a brace pattern that is not there). ``skipped`` counts the whole source read (both splits' loads
report the same numbers). Loading thus reads every image's bytes once (``max_samples`` stops after
the shard / file that reaches it); training decodes only what it draws. A source with no usable sample at all, a pattern matching no
file, or a parquet file without the needed columns is one ``FileFormatError`` naming the path.
For webdataset and parquet the last ``val_fraction`` of the samples (in index order: shards / files
sorted, members in tar order) is the ``val`` split, the rest ``train``. This module knows no model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Literal

import numpy as np
import torch
from PIL import Image

from genlab.config import Check, non_negative, positive, seed_check
from genlab.data.shapes import captions as scene_captions, max_objects_that_fit, render_scene, sample_scene
from genlab.data.caption_formats import (CAPTION_COLUMNS, IMAGE_COLUMNS, IMAGE_EXTENSIONS, Encoded, bump,
                                          index_parquet, index_webdataset, skipped_summary)
from genlab.errors import ConfigError, FileFormatError

__all__ = ["CaptionDataConfig", "CaptionPairs", "CaptionSet", "collate_pairs", "load_captions", "resize_square",
           "CAPTION_COLUMNS", "IMAGE_COLUMNS", "IMAGE_EXTENSIONS"]

FORMATS = ("shapes", "webdataset", "parquet")
CROP_SCALE = (0.85, 1.0)  # augment: the crop's share of the largest centred square's area


@dataclass
class CaptionDataConfig:
    format: Literal["shapes", "webdataset", "parquet"] = "shapes"
    path: str = ""  # webdataset: a folder of .tar shards or a pattern "cc/{00000..00009}.tar"; parquet: file / folder
    caption_column: str = ""  # parquet: "" = the first of caption, text, txt, captions
    image_column: str = ""  # parquet: "" = the first of image, jpg, png, image_path, path, file_name
    shapes_train: int = 3000  # shapes: training scenes (images)
    shapes_val: int = 1000  # shapes: held-out scenes
    min_objects: int = 1  # shapes
    max_objects: int = 2  # shapes
    val_fraction: float = 0.05  # webdataset / parquet: the last fraction of the samples is the val split
    max_samples: int = 0  # at most this many images (real formats: read from the source, then split); 0 = all
    augment: bool = False  # training only: random resized crop (scale 0.85-1, aspect kept), no flips or colour jitter
    seed: int = 0

    def checks(self) -> Iterable[Check]:
        yield "format", self.format in FORMATS, f"choose one of {', '.join(FORMATS)}"
        real = self.format != "shapes"
        yield "path", not real or self.path != "", (
            f"required for format={self.format}: " + ("a folder of img2dataset .tar shards or a pattern such as "
                                                      "cc/{00000..00009}.tar" if self.format == "webdataset"
                                                      else "a .parquet file or a folder of them"))
        if self.format == "parquet" and self.path:
            yield "path", Path(self.path).exists(), "no such file or folder"
        yield "path", real or self.path == "", "applies only to format=webdataset or parquet"
        for name in ("caption_column", "image_column"):
            yield name, self.format == "parquet" or getattr(self, name) == "", "applies only to format=parquet"
        yield from positive("shapes_train", "shapes_val", "min_objects", cfg=self)
        yield "max_objects", self.max_objects >= self.min_objects, "must be >= --data.min-objects"
        if self.format == "shapes":
            fit = max_objects_that_fit()
            yield "max_objects", self.max_objects <= fit, f"at most {fit} objects fit in one scene; use fewer"
        yield "val_fraction", 0.0 <= self.val_fraction < 1.0, "must be in [0, 1)"
        yield from non_negative("max_samples", cfg=self)
        yield seed_check(cfg=self)


# ----------------------------------------------------------------------------- resizing
def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8: the shorter side scaled to ``size`` (bicubic), then
    the centre cropped. An image already ``size`` square comes back unchanged."""
    h, w = img.shape[:2]
    if h == w == size:
        return img
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return _crop_resize(img, top, left, s, size)


def _crop_resize(img: np.ndarray, top: int, left: int, side: int, size: int) -> np.ndarray:
    crop = img[top:top + side, left:left + side]  # (side, side, 3)
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.BICUBIC))


# ----------------------------------------------------------------------------- the set

class _Memory:
    """Images already decoded: (N, S, S, 3) uint8."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __call__(self, i: int) -> np.ndarray:
        return self.images[i]


@dataclass
class CaptionSet:
    """Images with their captions. ``image(i)`` is uint8 (H, W, 3) RGB at the image's own size,
    decoded on demand (a FileFormatError naming the shard / file when it cannot be decoded)."""

    keys: list[str]
    captions: list[list[str]]  # per image, at least one non-empty caption
    skipped: dict[str, int]  # what could not be used, by reason
    source: str = ""  # one line for reports
    reader: Callable[[int], np.ndarray] = field(default_factory=lambda: _Memory(np.zeros((0, 1, 1, 3), np.uint8)),
                                                 repr=False)  # image i, decoded

    def __len__(self) -> int:
        return len(self.keys)

    def image(self, i: int) -> np.ndarray:
        return self.reader(i)

    def describe(self) -> str:
        """``source`` plus what was skipped, for the log: "webdataset cc/... (...); skipped 3 corrupt image"."""
        bad = skipped_summary(self.skipped)
        return self.source + (f"; skipped {bad}" if bad != "nothing" else "")

    def pairs(self) -> list[tuple[int, int]]:
        """(image index, caption index) for every caption, image by image."""
        return [(i, j) for i, caps in enumerate(self.captions) for j in range(len(caps))]


def load_captions(cfg: CaptionDataConfig, split: Literal["train", "val"], image_size: int) -> CaptionSet:
    """The ``split`` of the source ``cfg`` describes (see the module docstring). ``image_size`` is the
    side the shapes world is drawn at; real images keep their own size (``CaptionPairs`` resizes)."""
    if split not in ("train", "val"):
        raise ConfigError(f"split must be 'train' or 'val', got {split!r}")
    if cfg.format == "shapes":
        return _load_shapes(cfg, split, image_size)
    if cfg.format not in FORMATS:
        raise ConfigError(f"unknown caption data format {cfg.format!r}; choose one of {', '.join(FORMATS)}")
    if not cfg.path:
        raise ConfigError(f"format={cfg.format} needs a path (--data.path)")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ConfigError(f"val_fraction={cfg.val_fraction}: must be in [0, 1)")
    if cfg.format == "webdataset":
        keys, caps, entries, skipped = index_webdataset(cfg.path, cfg.max_samples)
    else:
        keys, caps, entries, skipped = index_parquet(cfg, cfg.max_samples)
    n = len(keys)
    n_val = 0 if cfg.val_fraction == 0 else min(max(int(round(cfg.val_fraction * n)), 1 if n >= 2 else 0), n - 1)
    idx = range(n - n_val, n) if split == "val" else range(n - n_val)
    source = f"{cfg.format} {cfg.path} ({split} split, {len(idx)} of {n} images)"
    return CaptionSet([keys[i] for i in idx], [caps[i] for i in idx], skipped, source, Encoded(entries).subset(idx))


def _load_shapes(cfg: CaptionDataConfig, split: str, image_size: int) -> CaptionSet:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ConfigError(f"image_size must be an integer >= 8 for the shapes world, got {image_size!r}")
    n = cfg.shapes_train if split == "train" else cfg.shapes_val
    n = min(n, cfg.max_samples) if cfg.max_samples else n
    rng = np.random.default_rng([cfg.seed, 0 if split == "train" else 1])  # train and val never share a stream
    images, caps = np.zeros((n, image_size, image_size, 3), np.uint8), []  # (N, S, S, 3)
    for i in range(n):
        scene = sample_scene(rng, min_objects=cfg.min_objects, max_objects=cfg.max_objects)
        images[i] = render_scene(scene, image_size)
        caps.append(scene_captions(scene))
    keys = [f"shapes_{split}_{i:06d}" for i in range(n)]
    return CaptionSet(keys, caps, {}, f"shapes world ({split} split, {n} scenes, seed {cfg.seed})", _Memory(images))


# ----------------------------------------------------------------------------- pairs for training

class CaptionPairs(torch.utils.data.Dataset):
    """One item per (image, caption) pair of ``data``: {"pixels": uint8 (3, S, S), "caption": str,
    "image_index": int64 ()}, the image through ``resize_square`` (or, with ``augment``, a random
    square crop of 85-100% of the largest centred square's area, anywhere in the image, resized to S;
    never flipped or recoloured, since captions name sides and colours). The n-th fetch of pair k in
    a process crops with ``np.random.default_rng([seed, k, n])``. An image that fails to decode is
    counted in ``data.skipped["corrupt image"]`` (in the process that met it) and the next good pair
    is served instead; if no image decodes, the error is raised."""

    def __init__(self, data: CaptionSet, image_size: int, augment: bool = False, seed: int = 0):
        if len(data) == 0:
            raise ConfigError(f"{data.source or 'the caption set'}: no images to make pairs of")
        self.data, self.size, self.augment, self.seed = data, image_size, augment, seed
        self.index = data.pairs()
        self.bad: set[int] = set()  # images that failed to decode here
        self.fetches: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k) -> dict:
        k = int(k)
        for step in range(len(self.index)):
            i, j = self.index[(k + step) % len(self.index)]
            if i in self.bad:
                continue
            try:
                img = self.data.image(i)  # (H, W, 3)
            except FileFormatError:
                if len(self.bad) + 1 == len(self.data):
                    raise
                self.bad.add(i)
                bump(self.data.skipped, "corrupt image")
                continue
            pixels = self._crop(img, k) if self.augment else resize_square(img, self.size)  # (S, S, 3)
            return {"pixels": torch.from_numpy(np.array(pixels.transpose(2, 0, 1), order="C")),  # (3, S, S), a copy
                    "caption": self.data.captions[i][j], "image_index": torch.tensor(i, dtype=torch.int64)}
        raise FileFormatError(f"{self.data.source}: no image could be decoded")

    def _crop(self, img: np.ndarray, k: int) -> np.ndarray:
        n = self.fetches.get(k, 0)
        self.fetches[k] = n + 1
        rng = np.random.default_rng([self.seed, k, n])
        h, w = img.shape[:2]
        side = max(1, int(round(min(h, w) * math.sqrt(rng.uniform(*CROP_SCALE)))))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        return _crop_resize(img, top, left, side, self.size)


def collate_pairs(items: list[dict]) -> dict:
    """A batch of ``CaptionPairs`` items: {"pixels": uint8 (B, 3, S, S), "caption": list of B str,
    "image_index": int64 (B,)}."""
    return {"pixels": torch.stack([it["pixels"] for it in items]),
            "caption": [it["caption"] for it in items],
            "image_index": torch.stack([torch.as_tensor(it["image_index"], dtype=torch.int64) for it in items])}
