"""Image datasets for image flow matching: sklearn's 8x8 digits, CIFAR-10 from disk, an image folder.

Every loader returns an ``ImageSet`` of uint8 images (N, C, H, W) in 0..255 and int64 labels; the
model sees them in [-1, 1] through ``to_model_range`` (``ImageDataset`` does it per item), and
samples go back with ``to_uint8``. Horizontal flips are applied per batch by the recipe
(``random_hflip``), so the stored set stays the same on every epoch and machine.

    >>> data = load_images(ImageDataConfig())              # digits, offline
    >>> data.shape, data.num_classes                       # ((1, 8, 8), 10)

The sources:

* ``digits``: ``sklearn.datasets.load_digits`` (1797 images, 8x8, values 0..16, shipped with
  scikit-learn) scaled to 0..255. Train / test is a fixed stratified 80/20 split drawn with
  ``SPLIT_SEED`` (never the run's seed), so the two never overlap and every run sees the same.
* ``cifar10``: the standard download on disk, either ``cifar-10-batches-py`` (pickles, read with
  ``safe_unpickle``: only numpy arrays, lists, dicts and strings are built, never other objects)
  or ``cifar-10-batches-bin`` (records of 1 label byte + 3072 pixel bytes). ``root`` is that folder
  or its parent (the python version is preferred when both are there).
* ``imagefolder``: ``root/<class>/*.png|jpg|jpeg|bmp|gif|webp`` (case-insensitive, sub-folders
  included), classes = sorted folder names. With ``root/train`` (and ``root/test``) the splits are
  those folders; otherwise each class is split 90/10 (train/test) with ``SPLIT_SEED``.

A missing or malformed folder is one ``FileFormatError`` that names the files expected. Nothing is
cached on disk. This module knows no model: it yields tensors.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

import numpy as np
import torch
from torch import Tensor

from genlab.config import Check
from genlab.errors import FileFormatError

__all__ = [
    "ImageDataConfig", "ImageSet", "ImageDataset", "load_images", "to_model_range", "to_uint8",
    "random_hflip", "safe_unpickle", "CIFAR10_CLASSES", "IMAGE_EXTENSIONS", "SPLIT_SEED",
]

SPLIT_SEED = 0  # the fixed seed of every train/test split drawn here, independent of any run seed
DIGITS_TEST_FRACTION = 0.2
FOLDER_TEST_FRACTION = 0.1
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
ROOT_FLAG = "--data.root"  # how recipes expose ``root`` (the config is embedded as ``data:``)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR_PIXELS = 3 * 32 * 32  # one image: the R, G and B planes of 32x32, each row-major
PY_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
BIN_FILES = {s: [f + ".bin" for f in names] for s, names in PY_FILES.items()}
CIFAR_EXPECTED = ("cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta} or "
                  "cifar-10-batches-bin/{data_batch_1..5.bin,test_batch.bin,batches.meta.txt}")


@dataclass
class ImageDataConfig:
    name: Literal["digits", "cifar10", "imagefolder"] = "digits"
    root: str = ""  # cifar10: cifar-10-batches-py or -bin (or their parent); imagefolder: one sub-folder per class
    image_size: int = 0  # imagefolder only: resize (square, bicubic) to this side; 0 = keep (all must agree)
    channels: int = 0  # imagefolder only: 1 (grey) or 3 (RGB); 0 = 3
    hflip: bool = False  # random horizontal flips in training (the recipe applies random_hflip)

    def checks(self) -> Iterable[Check]:
        yield "name", self.name in ("digits", "cifar10", "imagefolder"), "choose one of digits, cifar10, imagefolder"
        needs_root = self.name in ("cifar10", "imagefolder")
        yield "root", not needs_root or self.root != "", f"required for name={self.name}: the folder holding the data"
        yield "root", not (needs_root and self.root) or Path(self.root).is_dir(), "no such folder"
        yield "image_size", self.image_size >= 0, "must be >= 0 (0 = keep the images' own size)"
        yield "image_size", self.image_size == 0 or self.name == "imagefolder", "applies only to name=imagefolder"
        yield "channels", self.channels in (0, 1, 3), "must be 1 (grey), 3 (RGB) or 0 (= 3)"
        yield "channels", self.channels == 0 or self.name == "imagefolder", "applies only to name=imagefolder"


@dataclass
class ImageSet:
    images: Tensor  # (N, C, H, W) uint8 in 0..255
    labels: Tensor  # (N,) int64 in 0..num_classes-1
    classes: list[str]  # class names, index = label
    source: str  # one line for reports

    @property
    def shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return int(self.images.shape[0])


def load_images(cfg: ImageDataConfig, split: Literal["train", "test"] = "train") -> ImageSet:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if cfg.name == "digits":
        return _load_digits(split)
    if cfg.name == "cifar10":
        return _load_cifar10(cfg.root, split)
    if cfg.name == "imagefolder":
        return _load_folder(cfg.root, split, cfg.image_size, cfg.channels or 3)
    raise ValueError(f"unknown image data {cfg.name!r}; choose one of digits, cifar10, imagefolder")


# ----------------------------------------------------------------------------- value ranges

def to_model_range(u8: Tensor) -> Tensor:
    """uint8 0..255 -> float32 in [-1, 1] (0 -> -1, 255 -> 1)."""
    return u8.to(torch.float32) / 127.5 - 1.0


def to_uint8(x: Tensor) -> Tensor:
    """float in [-1, 1] (clamped) -> uint8 0..255, rounded to nearest; inverts ``to_model_range``."""
    return ((x.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)  # float32: bf16 would misround


def random_hflip(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Flip each image of ``x`` (B, C, H, W) left-right with probability 1/2: image i is flipped when
    ``torch.rand(B, generator=generator)[i] < 0.5`` (drawn on the generator's device)."""
    device = generator.device if generator is not None else x.device
    flip = (torch.rand(x.shape[0], generator=generator, device=device) < 0.5).to(x.device)  # (B,)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


class ImageDataset(torch.utils.data.Dataset):
    """Map-style view of an ``ImageSet``: item i = {"x1": float32 (C, H, W) in [-1, 1], "label": int64 ()}.
    The images stay uint8 in memory (4x smaller) and are converted per item."""

    def __init__(self, images: ImageSet):
        self.data = images

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i) -> dict:
        return {"x1": to_model_range(self.data.images[i]), "label": self.data.labels[i]}


# ----------------------------------------------------------------------------- splits

def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int = SPLIT_SEED) -> dict[str, np.ndarray]:
    """Per class, a seeded permutation puts round(fraction * n) images (at least 1 when n >= 2, never
    all) in test and the rest in train. Indices come back sorted, so both splits keep the file order."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n = len(idx)
        k = min(max(int(round(test_fraction * n)), 1 if n >= 2 else 0), n - 1)
        test.append(idx[:k])
        train.append(idx[k:])
    return {"train": np.sort(np.concatenate(train)), "test": np.sort(np.concatenate(test))}


def _image_set(images: np.ndarray, labels: np.ndarray, classes: list[str], what: str, split: str) -> ImageSet:
    c, h, w = images.shape[1:]
    source = f"{what} ({split} split, {len(images)} images {c}x{h}x{w})"
    return ImageSet(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64)),
                    list(classes), source)


# ----------------------------------------------------------------------------- digits

def _load_digits(split: str) -> ImageSet:
    from sklearn.datasets import load_digits

    d = load_digits()  # images (1797, 8, 8) float in 0..16, target (1797,)
    u8 = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (N, 1, 8, 8)
    idx = _stratified_split(d.target, DIGITS_TEST_FRACTION)[split]
    return _image_set(u8[idx], d.target[idx], [str(i) for i in range(10)], "sklearn digits", split)


# ----------------------------------------------------------------------------- the restricted unpickler

class _Refused(Exception):
    """What a pickle asked for that is not built here (a global, a codec, an object array)."""

    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


def _codecs_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # Python 3 writes bytes into protocol-2 pickles as _codecs.encode(str, "latin1"); any other codec
    # (zlib, rot13, ...) is not needed for data and is refused.
    if encoding.replace("-", "").replace("_", "").lower() not in ("latin1", "iso88591") or not isinstance(text, str):
        raise _Refused(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1", errors)


def _empty_bytes(*args: Any) -> bytes:
    if args:  # bytes(n) would allocate n bytes on the pickle's say-so
        raise _Refused("builtins.bytes with arguments")
    return b""


def _numeric_dtype(*args: Any) -> np.dtype:
    dt = np.dtype(*args)
    if dt.hasobject:  # object arrays hold arbitrary Python objects, not numbers
        raise _Refused(f"a numpy array of dtype {dt}")
    return dt


def _frombuffer(buf: Any, dtype: np.dtype, shape: tuple, order: str) -> np.ndarray:
    # numpy 2's protocol-5 path: numpy._core.numeric._frombuffer(buffer, dtype, shape, order)
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise _Refused("a numpy object array")
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order)


_RECONSTRUCT = np.zeros(0).__reduce__()[0]  # numpy's own _reconstruct, wherever this numpy keeps it
_SCALAR = np.float32(0).__reduce__()[0]  # numpy's scalar(dtype, bytes), for pickled numpy numbers
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _numeric_dtype,
    ("_codecs", "encode"): _codecs_encode,
    ("builtins", "bytes"): _empty_bytes,
    ("__builtin__", "bytes"): _empty_bytes,
}
for _mod in ("numpy.core", "numpy._core"):  # numpy 1 (and Python 2 era files) write numpy.core, numpy 2 numpy._core
    _ALLOWED[(f"{_mod}.multiarray", "_reconstruct")] = _RECONSTRUCT
    _ALLOWED[(f"{_mod}.multiarray", "scalar")] = _SCALAR
    _ALLOWED[(f"{_mod}.numeric", "_frombuffer")] = _frombuffer


class _DataUnpickler(pickle.Unpickler):
    """Builds numpy arrays, lists, dicts, strings, bytes and numbers; every other global is refused
    before it is imported, so a pickle cannot run code (``os.system``, ``eval``, a class's
    ``__reduce__``) through us."""

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name))
        if found is None:
            raise _Refused(f"{module}.{name}")
        return found


def safe_unpickle(data: bytes, name: str) -> Any:
    """Unpickle ``data`` (Python 2 strings become bytes) allowing only numpy arrays, lists, dicts and
    strings; anything else, or a broken pickle, is a FileFormatError that names ``name``."""
    try:
        return _DataUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _Refused as e:
        raise FileFormatError(f"{name}: refusing to unpickle {e.what} "
                              "(only numpy arrays, lists, dicts and strings are read)") from None
    except Exception as e:  # truncated, foreign or hostile bytes: all one kind of error for the user
        raise FileFormatError(f"{name}: not a readable pickle of arrays ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------- CIFAR-10

def _cifar_folder(root: str) -> tuple[Path, str]:
    """The batches folder under ``root`` and its kind ("py" or "bin")."""
    base = Path(root)
    for sub, kind in (("cifar-10-batches-py", "py"), ("cifar-10-batches-bin", "bin")):
        if (base / sub).is_dir():
            return base / sub, kind
    if base.is_dir():
        if any((base / f).is_file() for f in PY_FILES["train"] + PY_FILES["test"]):
            return base, "py"
        if any((base / f).is_file() for f in BIN_FILES["train"] + BIN_FILES["test"]):
            return base, "bin"
    raise FileFormatError(f"{ROOT_FLAG} {root}: no CIFAR-10 here; expected {CIFAR_EXPECTED}")


def _load_cifar10(root: str, split: str) -> ImageSet:
    folder, kind = _cifar_folder(root)
    meta = "batches.meta" if kind == "py" else "batches.meta.txt"
    names = (PY_FILES if kind == "py" else BIN_FILES)[split]
    missing = [f for f in [*names, meta] if not (folder / f).is_file()]
    if missing:
        expected = ("data_batch_1..5, test_batch, batches.meta" if kind == "py"
                    else "data_batch_1..5.bin, test_batch.bin, batches.meta.txt")
        raise FileFormatError(f"{folder}: missing {', '.join(missing)}; a CIFAR-10 folder holds {expected}")
    read = _read_py_batch if kind == "py" else _read_bin_batch
    parts = [read(folder / f) for f in names]
    images = np.concatenate([p[0] for p in parts])  # (N, 3072) uint8, a fresh writable copy
    labels = np.concatenate([p[1] for p in parts])  # (N,) int64
    classes = _read_py_meta(folder / meta) if kind == "py" else _read_bin_meta(folder / meta)
    what = f"CIFAR-10 {'python' if kind == 'py' else 'binary'} version, {folder}"
    # Each row is the R plane, then G, then B, each 32 rows of 32: exactly (3, 32, 32) row-major.
    return _image_set(images.reshape(-1, 3, 32, 32), labels, classes, what, split)


def _check_labels(labels: np.ndarray, n: int, path: Path) -> np.ndarray:
    if labels.shape != (n,):
        raise FileFormatError(f"{path}: {labels.shape[0] if labels.ndim else 0} labels for {n} images")
    if n and (labels.min() < 0 or labels.max() > 9):
        raise FileFormatError(f"{path}: labels must be in 0..9, found {labels.min()}..{labels.max()}")
    return labels.astype(np.int64)


def _field(d: dict, key: str, path: Path) -> Any:
    for k in (key.encode(), key):  # Python 2 pickles have bytes keys, Python 3 ones str keys
        if k in d:
            return d[k]
    raise FileFormatError(f"{path}: no '{key}' entry (found {', '.join(map(repr, d))})")


def _read_py_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    d = safe_unpickle(path.read_bytes(), str(path))
    if not isinstance(d, dict):
        raise FileFormatError(f"{path}: expected a dict with 'data' and 'labels', got {type(d).__name__}")
    data, labels = _field(d, "data", path), _field(d, "labels", path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != CIFAR_PIXELS:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise FileFormatError(f"{path}: 'data' must be a uint8 array (N, {CIFAR_PIXELS}), got {got}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise FileFormatError(f"{path}: 'labels' must be a list of integers") from None
    return data, _check_labels(labels, data.shape[0], path)


def _read_bin_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = path.read_bytes()
    record = 1 + CIFAR_PIXELS
    if len(raw) == 0 or len(raw) % record:
        raise FileFormatError(f"{path}: {len(raw)} bytes is not a whole number of {record}-byte records "
                              "(1 label byte + 3072 pixel bytes); truncated or not CIFAR-10")
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(-1, record)  # (N, 3073), a read-only view
    return rows[:, 1:], _check_labels(rows[:, 0].astype(np.int64), rows.shape[0], path)


def _names(names: list[str], path: Path) -> list[str]:
    if len(names) != 10:
        raise FileFormatError(f"{path}: expected the 10 CIFAR-10 class names, found {len(names)}")
    return names


def _read_py_meta(path: Path) -> list[str]:
    d = safe_unpickle(path.read_bytes(), str(path))
    names = _field(d, "label_names", path) if isinstance(d, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, (bytes, str)) for n in names):
        raise FileFormatError(f"{path}: expected a dict whose 'label_names' is a list of strings")
    return _names([n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names], path)


def _read_bin_meta(path: Path) -> list[str]:
    text = path.read_bytes().decode("utf-8", "replace")
    return _names([line.strip() for line in text.splitlines() if line.strip()], path)


# ----------------------------------------------------------------------------- image folder

def _class_files(folder: Path) -> tuple[list[str], list[list[Path]]]:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    def is_image(p: Path) -> bool:  # hidden files (macOS "._x.png" and the like) are not images
        return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")

    files = [sorted(p for p in (folder / c).rglob("*") if is_image(p)) for c in classes]
    return classes, files


def _load_folder(root: str, split: str, size: int, channels: int) -> ImageSet:
    base = Path(root)
    want = f"one sub-folder per class holding {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} images"
    if not base.is_dir():
        raise FileFormatError(f"{ROOT_FLAG} {root}: no such folder; expected {want}")
    if (base / "train").is_dir():  # explicit splits: classes (and so labels) always come from train/
        classes, files = _class_files(base / "train")
        if split == "test":
            if not (base / "test").is_dir():
                raise FileFormatError(f"{base}: has train/ but no test/; expected test/<class>/ beside it")
            test_classes, test_files = _class_files(base / "test")
            unknown = sorted(set(test_classes) - set(classes))
            if unknown:
                raise FileFormatError(f"{base / 'test'}: classes {', '.join(unknown)} are not in {base / 'train'}")
            files = [test_files[test_classes.index(c)] if c in test_classes else [] for c in classes]
        folder = base / split
    else:
        classes, files = _class_files(base)
        folder = base
    if not classes or not any(files):
        raise FileFormatError(f"{folder}: no images; expected {want}")
    paths = [p for fs in files for p in fs]
    labels = np.concatenate([np.full(len(fs), i, dtype=np.int64) for i, fs in enumerate(files)])
    if folder is base:  # one pool: a fixed 90/10 split per class
        idx = _stratified_split(labels, FOLDER_TEST_FRACTION)[split]
        if len(idx) == 0:
            raise FileFormatError(f"{folder}: too few images for a test split (a class needs at least 2)")
        paths, labels = [paths[i] for i in idx], labels[idx]
    images = _read_images(paths, size, "L" if channels == 1 else "RGB")
    what = f"image folder {folder}" + (f", resized to {size}x{size}" if size else "")
    return _image_set(images, labels, classes, what, split)


def _read_images(paths: list[Path], size: int, mode: str) -> np.ndarray:
    from PIL import Image

    out: np.ndarray | None = None
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                im = im.convert(mode)  # also decodes; GIFs give their first frame
                if size:
                    im = im.resize((size, size), Image.Resampling.BICUBIC)
        except Exception as e:  # PIL raises OSError, ValueError, DecompressionBombError, SyntaxError ...
            raise FileFormatError(f"{p}: not a readable image ({type(e).__name__}: {e})") from None
        a = np.asarray(im, dtype=np.uint8).reshape(im.height, im.width, -1)  # (H, W, C)
        if out is None:
            out, first = np.empty((len(paths), a.shape[2], a.shape[0], a.shape[1]), np.uint8), p
        elif a.shape[:2] != out.shape[2:]:
            raise FileFormatError(
                f"images differ in size: {first} is {out.shape[3]}x{out.shape[2]}, {p} is {a.shape[1]}x{a.shape[0]}; "
                "set --data.image-size to resize them all")
        out[i] = a.transpose(2, 0, 1)
    assert out is not None
    return out
