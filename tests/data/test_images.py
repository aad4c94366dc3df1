"""Image datasets: digits split, value ranges, flips, CIFAR-10 readers on tiny real-format folders,
the restricted unpickler, and the image folder."""

import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from genlab.config import validate
from genlab.errors import ConfigError, FileFormatError
from genlab.data.images import (
    _stratified_split,
    ImageDataConfig,
    ImageDataset,
    load_images,
    random_hflip,
    safe_unpickle,
    to_model_range,
    to_uint8,
)

torch.set_num_threads(1)
PER_BATCH = 3  # images per CIFAR batch file in the tiny folders
NAMES = [f"class{i}" for i in range(10)]


# ----------------------------------------------------------------------------- digits, ranges, flips

def test_digits_shapes_range_and_a_disjoint_stratified_split():
    train, test = load_images(ImageDataConfig()), load_images(ImageDataConfig(), "test")
    assert train.shape == test.shape == (1, 8, 8) and train.num_classes == 10
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert len(train) + len(test) == 1797 and abs(len(test) / 1797 - 0.2) < 0.01
    assert train.images.max() == 255 and train.images.min() == 0
    assert "train split" in train.source and str(len(train)) in train.source
    # stratified: every class is ~20% test
    for c in range(10):
        n_tr, n_te = (train.labels == c).sum().item(), (test.labels == c).sum().item()
        assert abs(n_te / (n_tr + n_te) - 0.2) < 0.02
    # disjoint and covering: the two index sets partition the 1797 images, and the split is fixed
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = _stratified_split(d.target, 0.2)
    assert not set(idx["train"]) & set(idx["test"]) and len(idx["train"]) + len(idx["test"]) == 1797
    u8 = torch.from_numpy(np.rint(d.images * 255 / 16).astype(np.uint8))[:, None]
    assert torch.equal(train.images, u8[idx["train"]])
    assert torch.equal(test.labels, torch.from_numpy(d.target[idx["test"]]))
    assert torch.equal(load_images(ImageDataConfig(), "test").images, test.images)


def test_uint8_round_trip_and_range():
    u = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    x = to_model_range(u)
    assert x.dtype == torch.float32 and x.min() == -1 and x.max() == 1
    assert torch.equal(to_uint8(x), u)
    clamped = to_uint8(torch.tensor([-3.0, -1.0, 0.0, 1.0, 7.0]))
    assert torch.equal(clamped, torch.tensor([0, 0, 128, 255, 255], dtype=torch.uint8))


def test_image_dataset_item():
    ds = ImageDataset(load_images(ImageDataConfig(), "test"))
    item = ds[3]
    assert item["x1"].shape == (1, 8, 8) and item["x1"].dtype == torch.float32
    assert -1 <= item["x1"].min() and item["x1"].max() <= 1
    assert item["label"].dtype == torch.int64 and item["label"].dim() == 0
    assert torch.equal(to_uint8(item["x1"]), ds.data.images[3])


def test_random_hflip_flips_exactly_the_drawn_rows():
    x = torch.randn(64, 3, 4, 5, generator=torch.Generator().manual_seed(1))
    y = random_hflip(x, torch.Generator().manual_seed(7))
    flip = torch.rand(64, generator=torch.Generator().manual_seed(7)) < 0.5
    assert 10 < flip.sum() < 54
    assert torch.equal(y[flip], x[flip].flip(-1)) and torch.equal(y[~flip], x[~flip])
    assert random_hflip(x).shape == x.shape


# ----------------------------------------------------------------------------- CIFAR-10, tiny folders

def _py2_pickle(obj) -> bytes:
    """A pickle as Python 2 wrote CIFAR-10: protocol 2, str (here bytes) as BINSTRING, numpy arrays
    through numpy.core.multiarray._reconstruct with their raw bytes as a string."""
    def s(b: bytes) -> bytes:
        return (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<i", len(b))) + b
    def i(n: int) -> bytes:
        return b"K" + bytes([n]) if 0 <= n < 256 else b"J" + struct.pack("<i", n)
    def enc(o) -> bytes:
        if isinstance(o, bytes):
            return s(o)
        if isinstance(o, int):
            return i(o)
        if isinstance(o, list):
            return b"](" + b"".join(enc(v) for v in o) + b"e"
        if isinstance(o, dict):
            return b"}(" + b"".join(enc(k) + enc(v) for k, v in o.items()) + b"u"
        if isinstance(o, np.ndarray):
            assert o.dtype == np.uint8
            dtype = (b"cnumpy\ndtype\n" + s(b"u1") + i(0) + i(1) + b"\x87R"  # dtype("u1", 0, 1), then its state
                     + b"(" + i(3) + s(b"|") + b"NNN" + i(-1) + i(-1) + i(0) + b"tb")
            shape = b"(" + b"".join(i(n) if n < 256 else b"J" + struct.pack("<i", n) for n in o.shape) + b"t"
            return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + i(0) + b"\x85" + s(b"b") + b"\x87R"
                    + b"(" + i(1) + shape + dtype + b"\x89" + s(o.tobytes()) + b"tb")
        raise TypeError(type(o))
    return b"\x80\x02" + enc(obj) + b"."


def _batches(seed=0):
    """{file name: (images (n, 3, 32, 32) uint8, labels (n,))} for the 6 batch files."""
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    return {n: (rng.integers(0, 256, (PER_BATCH, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, PER_BATCH))
            for n in names}


def _write_py(folder, batches):
    folder.mkdir(parents=True)
    for k, (name, (x, y)) in enumerate(batches.items()):
        d = {b"batch_label": name.encode(), b"labels": [int(v) for v in y], b"data": x.reshape(len(x), -1),
             b"filenames": [f"img{j}.png".encode() for j in range(len(x))]}
        # half the files as Python 2 wrote them, half as Python 3 writes protocol 2 (bytes via _codecs)
        (folder / name).write_bytes(_py2_pickle(d) if k % 2 == 0 else pickle.dumps(d, protocol=2))
    meta = {b"label_names": [n.encode() for n in NAMES], b"num_cases_per_batch": PER_BATCH, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(_py2_pickle(meta))


def _write_bin(folder, batches):
    folder.mkdir(parents=True)
    for name, (x, y) in batches.items():
        rows = np.concatenate([y.astype(np.uint8)[:, None], x.reshape(len(x), -1)], axis=1)  # (n, 3073)
        (folder / f"{name}.bin").write_bytes(rows.tobytes())
    (folder / "batches.meta.txt").write_text("\n".join(NAMES) + "\n\n")


def _expected(batches, split):
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    return np.concatenate([batches[n][0] for n in names]), np.concatenate([batches[n][1] for n in names])


@pytest.mark.parametrize("kind", ["py", "bin"])
def test_cifar_readers_give_the_images_written(tmp_path, kind):
    batches = _batches()
    folder = tmp_path / f"cifar-10-batches-{kind}"
    (_write_py if kind == "py" else _write_bin)(folder, batches)
    for root in (folder, tmp_path):  # the batches folder itself, or its parent
        for split in ("train", "test"):
            data = load_images(ImageDataConfig(name="cifar10", root=str(root)), split)
            x, y = _expected(batches, split)
            assert data.shape == (3, 32, 32) and data.classes == NAMES
            assert data.images.dtype == torch.uint8 and torch.equal(data.images, torch.from_numpy(x))
            assert torch.equal(data.labels, torch.from_numpy(y).long())
            assert f"{split} split, {len(x)} images 3x32x32" in data.source
    # plane order: the first 1024 bytes of a row are R, so channel 0 of the image
    x, _ = batches["test_batch"]
    flat = x.reshape(len(x), -1)
    assert np.array_equal(flat[0, :1024].reshape(32, 32), x[0, 0])
    assert np.array_equal(flat[0, 2048:].reshape(32, 32), x[0, 2])


def test_cifar_prefers_python_version_when_both_are_there(tmp_path):
    py, binary = _batches(0), _batches(1)
    _write_py(tmp_path / "cifar-10-batches-py", py)
    _write_bin(tmp_path / "cifar-10-batches-bin", binary)
    data = load_images(ImageDataConfig(name="cifar10", root=str(tmp_path)), "test")
    assert torch.equal(data.images, torch.from_numpy(py["test_batch"][0])) and "python" in data.source


def test_cifar_missing_folder_and_files_name_what_is_expected(tmp_path):
    with pytest.raises(FileFormatError, match=r"no CIFAR-10 here; expected cifar-10-batches-py/\{data_batch_1\.\.5,"
                                              r"test_batch,batches\.meta\} or cifar-10-batches-bin/"):
        load_images(ImageDataConfig(name="cifar10", root=str(tmp_path)))
    batches = _batches()
    _write_bin(tmp_path / "cifar-10-batches-bin", batches)
    os.remove(tmp_path / "cifar-10-batches-bin" / "data_batch_3.bin")
    with pytest.raises(FileFormatError, match=r"missing data_batch_3\.bin; a CIFAR-10 folder holds data_batch_1\.\.5"):
        load_images(ImageDataConfig(name="cifar10", root=str(tmp_path)))
    assert len(load_images(ImageDataConfig(name="cifar10", root=str(tmp_path)), "test")) == PER_BATCH


def test_cifar_malformed_files(tmp_path):
    batches = _batches()
    folder = tmp_path / "cifar-10-batches-bin"
    _write_bin(folder, batches)
    f = folder / "test_batch.bin"
    f.write_bytes(f.read_bytes()[:-10])  # truncated
    with pytest.raises(FileFormatError, match=r"test_batch\.bin: 9209 bytes is not a whole number of 3073-byte"):
        load_images(ImageDataConfig(name="cifar10", root=str(folder)), "test")
    rows = np.zeros((2, 3073), np.uint8)
    rows[1, 0] = 10  # label out of range
    f.write_bytes(rows.tobytes())
    with pytest.raises(FileFormatError, match=r"test_batch\.bin: labels must be in 0\.\.9"):
        load_images(ImageDataConfig(name="cifar10", root=str(folder)), "test")

    folder = tmp_path / "cifar-10-batches-py"
    _write_py(folder, batches)
    bad = {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}
    (folder / "test_batch").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(FileFormatError, match=r"test_batch: 'data' must be a uint8 array \(N, 3072\)"):
        load_images(ImageDataConfig(name="cifar10", root=str(folder)), "test")
    short = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}
    (folder / "test_batch").write_bytes(pickle.dumps(short, protocol=2))
    with pytest.raises(FileFormatError, match=r"test_batch: 1 labels for 2 images"):
        load_images(ImageDataConfig(name="cifar10", root=str(folder)), "test")
    (folder / "test_batch").write_bytes(b"\x80\x02}(U\x04data")  # truncated pickle
    with pytest.raises(FileFormatError, match=r"test_batch: not a readable pickle"):
        load_images(ImageDataConfig(name="cifar10", root=str(folder)), "test")


CALLS: list = []


def _record(*args):
    CALLS.append(args)


class _Evil:
    def __reduce__(self):
        return os.system, ("echo owned",)


class _Recorded:  # a pickle that calls a function of ours, to see whether it ran
    def __reduce__(self):
        return _record, ("ran",)


class _Custom:
    def __init__(self):
        self.x = 1


def test_safe_unpickle_refuses_other_objects_without_calling_them():
    with pytest.raises(FileFormatError, match=r"^batch\.pkl: refusing to unpickle (posix|nt|os)\.system "
                                              r"\(only numpy arrays, lists, dicts and strings are read\)$"):
        safe_unpickle(pickle.dumps({b"data": _Evil()}, protocol=2), "batch.pkl")
    recorded = pickle.dumps({b"data": _Recorded()}, protocol=2)
    CALLS.clear()
    with pytest.raises(FileFormatError, match=r"refusing to unpickle tests\.data\.test_images\._record"):
        safe_unpickle(recorded, "x")
    assert CALLS == []  # refused before it was even looked up
    pickle.loads(recorded)
    assert CALLS == [("ran",)]  # while the plain unpickler runs it
    for obj in (_Custom(), np.array([1, "a"], dtype=object), eval):
        for protocol in (2, 5):
            with pytest.raises(FileFormatError, match=r"^x: refusing to unpickle"):
                safe_unpickle(pickle.dumps(obj, protocol=protocol), "x")
    with pytest.raises(FileFormatError, match="zlib"):  # a codec other than latin1
        safe_unpickle(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x04\x00\x00\x00zlib\x86R.", "x")


def test_safe_unpickle_reads_arrays_lists_dicts_strings():
    obj = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), b"b": [1, 2.5, "s", b"bytes", None, True], "c": (1, 2)}
    for protocol in (0, 2, 4, 5):
        got = safe_unpickle(pickle.dumps(obj, protocol=protocol), "x")
        assert np.array_equal(got["a"], obj["a"]) and got[b"b"] == obj[b"b"] and got["c"] == (1, 2)


# ----------------------------------------------------------------------------- image folder

def _png(path, size, colour, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)


def test_image_folder_classes_resize_and_split(tmp_path):
    for j in range(10):
        _png(tmp_path / "cat" / f"{j}.png", (6, 4), (255, 0, 0))
        _png(tmp_path / "dog" / f"{j}.PNG", (6, 4), (0, 0, 255))
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    cfg = ImageDataConfig(name="imagefolder", root=str(tmp_path))
    train, test = load_images(cfg), load_images(cfg, "test")
    assert train.classes == ["cat", "dog"] and train.shape == (3, 4, 6)
    assert len(train) == 18 and len(test) == 2 and sorted(test.labels.tolist()) == [0, 1]  # 90/10 per class
    red = train.images[train.labels == 0]
    assert (red[:, 0] == 255).all() and (red[:, 2] == 0).all()
    grey = load_images(ImageDataConfig(name="imagefolder", root=str(tmp_path), image_size=5, channels=1))
    assert grey.shape == (1, 5, 5) and "resized to 5x5" in grey.source
    # explicit train/ and test/ folders: labels follow train/'s classes
    split = tmp_path / "split"
    _png(split / "train" / "a" / "0.png", (3, 3), (1, 2, 3))
    _png(split / "train" / "b" / "0.jpg", (3, 3), (4, 5, 6))
    _png(split / "test" / "b" / "0.bmp", (3, 3), (4, 5, 6))
    test = load_images(ImageDataConfig(name="imagefolder", root=str(split)), "test")
    assert test.classes == ["a", "b"] and test.labels.tolist() == [1]
    assert len(load_images(ImageDataConfig(name="imagefolder", root=str(split)))) == 2


def test_image_folder_errors(tmp_path):
    _png(tmp_path / "train" / "a" / "0.png", (4, 4), (0, 0, 0))
    _png(tmp_path / "train" / "a" / "1.png", (5, 4), (0, 0, 0))
    cfg = ImageDataConfig(name="imagefolder", root=str(tmp_path))
    with pytest.raises(FileFormatError, match=r"images differ in size: .*0\.png is 4x4, .*1\.png is 5x4; set --data"):
        load_images(cfg)
    assert load_images(ImageDataConfig(name="imagefolder", root=str(tmp_path), image_size=4)).shape == (3, 4, 4)
    (tmp_path / "train" / "a" / "2.png").write_bytes(b"not a png")
    with pytest.raises(FileFormatError, match=r"2\.png: not a readable image"):
        load_images(ImageDataConfig(name="imagefolder", root=str(tmp_path), image_size=4))
    (tmp_path / "empty" / "x").mkdir(parents=True)
    with pytest.raises(FileFormatError, match=r"empty: no images; expected one sub-folder per class"):
        load_images(ImageDataConfig(name="imagefolder", root=str(tmp_path / "empty")))
    with pytest.raises(FileFormatError, match=r"--data.root .*nope: no such folder"):
        load_images(ImageDataConfig(name="imagefolder", root=str(tmp_path / "nope")))


def test_config_checks(tmp_path):
    validate(ImageDataConfig())
    validate(ImageDataConfig(name="cifar10", root=str(tmp_path)))
    for cfg, msg in [(ImageDataConfig(name="cifar10"), "--root=: required for name=cifar10"),
                     (ImageDataConfig(name="imagefolder", root=str(tmp_path / "no")), "no such folder"),
                     (ImageDataConfig(name="imagefolder", root=str(tmp_path), image_size=-1), "--image-size=-1: must be >= 0"),
                     (ImageDataConfig(name="imagefolder", root=str(tmp_path), channels=2), "--channels=2: must be 1"),
                     (ImageDataConfig(image_size=16), "applies only to name=imagefolder")]:
        with pytest.raises(ConfigError, match=msg):
            validate(cfg)
