"""Small image datasets written in the real on-disk formats, for tests of the image recipes."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar_py(folder: Path, per_batch: int = 10, seed: int = 0) -> Path:
    """A cifar-10-batches-py folder: 5 train batches, test_batch and batches.meta, each a protocol-2
    pickle of a dict with bytes keys, images as (n, 3072) uint8 rows (R, G, B planes of 32x32)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [int(v) for v in np.arange(per_batch) % 10]  # every class in every batch
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        d = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
             b"filenames": [f"img{j}.png".encode() for j in range(per_batch)]}
        (folder / name).write_bytes(pickle.dumps(d, protocol=2))
    meta = {b"label_names": [n.encode() for n in CIFAR_NAMES], b"num_cases_per_batch": per_batch, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


def write_image_folder(folder: Path, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 10,
                       size: int = 12, seed: int = 0) -> Path:
    """One sub-folder per class of random RGB PNGs."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (folder / c).mkdir(parents=True)
        for j in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / c / f"{j}.png")
    return folder
