"""Caption datasets: the shapes world, img2dataset webdataset shards written here as img2dataset lays
them out, parquet (bytes, relative paths, Hugging Face's struct), pairs, batches and crops."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from genlab.config import validate
from genlab.data.captions import (CaptionDataConfig, CaptionPairs, CaptionSet, collate_pairs, load_captions,
                                  resize_square)
from genlab.data.shapes import captions as scene_captions, render_scene, sample_scene
from genlab.errors import ConfigError, FileFormatError
from genlab.train.data import MapDataSource

torch.set_num_threads(1)


def image_bytes(seed: int, fmt: str = "JPEG", size: tuple[int, int] = (24, 16)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = np.zeros((size[1], size[0], 3), np.uint8) + rng.integers(0, 256, 3, dtype=np.uint8)  # one flat colour
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """One img2dataset shard (KEY.jpg / KEY.txt / KEY.json members) plus its _stats.json and .parquet."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                add(tar, f"{key}.{ext}", data)
    stem = path.with_suffix("")
    (stem.parent / f"{stem.name}_stats.json").write_text(json.dumps({"count": len(samples), "successes": 3}))
    pq.write_table(pa.table({"key": [k for k, _ in samples], "status": ["success"] * len(samples)}),
                   stem.parent / f"{stem.name}.parquet")


def sample(key: str, seed: int, caption: str | None, json_caption: str | None = None, fmt: str = "JPEG") -> tuple:
    ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
    members = {ext: image_bytes(seed, fmt)}
    if caption is not None:
        members["txt"] = caption.encode()
    meta = {"key": key, "status": "success", "width": 24, "height": 16}
    if json_caption is not None:
        meta["caption"] = json_caption
    members["json"] = json.dumps(meta).encode()
    return key, members


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    """00000.tar: 4 good samples, a corrupt jpg, a sample with no .txt (and no json caption), one whose
    caption is only in its .json, a png; 00001.tar: 3 good samples, then cut in the 4th image."""
    root = tmp_path / "cc"
    root.mkdir()
    first = [sample(f"00000{i:04d}", i, f"caption {i}") for i in range(4)]
    first.append(("000000004", {"jpg": b"\xff\xd8\xff\xe0 not really a jpeg", "txt": b"broken", "json": b"{}"}))
    first.append(sample("000000005", 5, None))
    first.append(sample("000000006", 6, None, json_caption="from json"))
    first.append(sample("000000007", 7, "a png", fmt="PNG"))
    write_shard(root / "00000.tar", first)
    second = [sample(f"00001{i:04d}", 10 + i, f"second {i}") for i in range(4)]
    write_shard(root / "00001.tar", second)
    data = (root / "00001.tar").read_bytes()
    with tarfile.open(root / "00001.tar") as tar:
        last_jpg = [m for m in tar.getmembers() if m.name == "000010003.jpg"][0]
    (root / "00001.tar").write_bytes(data[: last_jpg.offset_data + 10])  # cut inside the last image
    return root


def web(path, **kw) -> CaptionDataConfig:
    return CaptionDataConfig(format="webdataset", path=str(path), **kw)


# ----------------------------------------------------------------------------- webdataset

def test_webdataset_folder_keeps_the_good_samples_and_counts_the_rest(shards):
    data = load_captions(web(shards, val_fraction=0.0), "train", 32)
    assert data.keys == [f"00000{i:04d}" for i in (0, 1, 2, 3, 6, 7)] + [f"00001{i:04d}" for i in range(3)]
    assert data.captions[:4] == [[f"caption {i}"] for i in range(4)]
    assert data.captions[4] == ["from json"] and data.captions[5] == ["a png"]
    assert data.skipped == {"corrupt image": 1, "missing caption": 1, "unreadable shard": 1}
    assert data.describe() == (f"webdataset {shards} (train split, 9 of 9 images); "
                               "skipped 1 corrupt image, 1 missing caption, 1 unreadable shard")
    img = data.image(1)
    assert img.dtype == np.uint8 and img.shape == (16, 24, 3)  # original size, (H, W, 3)
    expect = np.asarray(Image.open(io.BytesIO(image_bytes(1))).convert("RGB"))
    np.testing.assert_array_equal(img, expect)
    np.testing.assert_array_equal(data.image(5), np.asarray(Image.open(io.BytesIO(image_bytes(7, "PNG")))))
    assert data.pairs() == [(i, 0) for i in range(9)]


def test_webdataset_split_is_the_last_fraction_and_max_samples_caps(shards):
    train = load_captions(web(shards, val_fraction=0.25), "train", 32)
    val = load_captions(web(shards, val_fraction=0.25), "val", 32)
    assert len(train) == 7 and len(val) == 2 and val.keys == ["000010001", "000010002"]
    assert train.keys + val.keys == load_captions(web(shards, val_fraction=0.0), "train", 32).keys
    capped = load_captions(web(shards, val_fraction=0.0, max_samples=3), "train", 32)
    assert capped.keys == ["000000000", "000000001", "000000002"]
    assert capped.skipped["unreadable shard"] == 0  # the second shard was never opened


def test_brace_patterns_and_missing_shards(shards):
    one = load_captions(web(f"{shards}/{{00000..00000}}.tar", val_fraction=0.0), "train", 32)
    assert len(one) == 6 and one.skipped["unreadable shard"] == 0
    both = load_captions(web(f"{shards}/{{00000..00002}}.tar", val_fraction=0.0), "train", 32)
    assert len(both) == 9 and both.skipped["missing shard"] == 1
    assert len(load_captions(web(f"{shards}/0000*.tar", val_fraction=0.0), "train", 32)) == 9
    with pytest.raises(FileFormatError, match=r"cc/\{00005..00009\}.tar: the pattern matches no file"):
        load_captions(web(f"{shards}/{{00005..00009}}.tar"), "train", 32)


def test_folders_with_nothing_readable_name_the_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "00000_stats.json").write_text("{}")
    with pytest.raises(FileFormatError, match=f"{empty}: no .tar shards"):
        load_captions(web(empty), "train", 32)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "00000.tar").write_bytes(b"this is not a tar file at all" * 40)
    write_shard(junk / "00001.tar", [sample("000010000", 0, None)])  # an image without any caption
    with pytest.raises(FileFormatError, match=f"{junk}: no readable image-caption sample in 2 shard.*"
                                              f"1 missing caption, 1 unreadable shard"):
        load_captions(web(junk), "train", 32)
    with pytest.raises(FileFormatError, match="nowhere: no such file or folder"):
        load_captions(web(tmp_path / "nowhere"), "train", 32)


def test_members_in_folders_inside_the_tar(tmp_path):
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        info = tarfile.TarInfo("part")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        add(tar, "part/000.jpg", image_bytes(3))
        add(tar, "part/000.txt", b"  inside a folder \n")
    data = load_captions(web(tmp_path / "s.tar", val_fraction=0.0), "train", 32)
    assert data.keys == ["part/000"] and data.captions == [["inside a folder"]]


def test_a_shard_cut_at_a_member_boundary_counts_as_unreadable(tmp_path):
    write_shard(tmp_path / "00000.tar", [sample(f"00000{i:04d}", i, f"c {i}") for i in range(3)])
    with tarfile.open(tmp_path / "00000.tar") as tar:
        third = [m for m in tar.getmembers() if m.name == "000000002.jpg"][0]
    (tmp_path / "00000.tar").write_bytes((tmp_path / "00000.tar").read_bytes()[: third.offset])  # no header, no end
    data = load_captions(web(tmp_path, val_fraction=0.0), "train", 32)
    assert data.keys == ["000000000", "000000001"] and data.skipped["unreadable shard"] == 1


# ----------------------------------------------------------------------------- parquet

def test_parquet_bytes_column_with_auto_names(tmp_path):
    images = [image_bytes(i) for i in range(3)] + [b"garbage", None]
    pq.write_table(pa.table({"text": ["one", "two", None, "four", "five"], "jpg": images}), tmp_path / "a.parquet")
    data = load_captions(CaptionDataConfig(format="parquet", path=str(tmp_path / "a.parquet"), val_fraction=0.0),
                         "train", 32)
    assert data.captions == [["one"], ["two"]] and data.keys == ["a/0", "a/1"]
    assert data.skipped == {"corrupt image": 1, "missing caption": 1, "missing image file": 0, "missing image": 1}
    np.testing.assert_array_equal(data.image(1), np.asarray(Image.open(io.BytesIO(image_bytes(1)))))


def test_parquet_relative_paths_and_a_folder_of_files(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(3):
        (tmp_path / "img" / f"{i}.png").write_bytes(image_bytes(i, "PNG"))
    pq.write_table(pa.table({"caption": ["a", "b"], "file_name": ["img/0.png", "img/9.png"]}), tmp_path / "0.parquet")
    pq.write_table(pa.table({"caption": [["c", "c again"], ["d"]], "file_name": ["img/1.png", "img/2.png"]}),
                   tmp_path / "1.parquet")
    cfg = CaptionDataConfig(format="parquet", path=str(tmp_path), val_fraction=0.34)
    train, val = load_captions(cfg, "train", 32), load_captions(cfg, "val", 32)
    assert train.captions == [["a"], ["c", "c again"]] and val.captions == [["d"]]
    assert train.skipped["missing image file"] == 1
    assert train.pairs() == [(0, 0), (1, 0), (1, 1)]
    np.testing.assert_array_equal(val.image(0), np.asarray(Image.open(tmp_path / "img" / "2.png")))


def test_parquet_hugging_face_image_struct_and_column_errors(tmp_path):
    (tmp_path / "x.png").write_bytes(image_bytes(5, "PNG"))
    struct = [{"bytes": image_bytes(4), "path": "ignored.jpg"}, {"bytes": None, "path": "x.png"}]
    pq.write_table(pa.table({"image": struct, "caption": ["from bytes", "from path"]}), tmp_path / "hf.parquet")
    data = load_captions(CaptionDataConfig(format="parquet", path=str(tmp_path / "hf.parquet"), val_fraction=0.0),
                         "train", 32)
    assert data.captions == [["from bytes"], ["from path"]]
    assert data.image(1).shape == (16, 24, 3)
    with pytest.raises(FileFormatError, match=r"hf.parquet: no column 'alt' \(caption\); its columns are"):
        load_captions(CaptionDataConfig(format="parquet", path=str(tmp_path / "hf.parquet"), caption_column="alt"),
                      "train", 32)
    pq.write_table(pa.table({"caption": ["a"], "url": ["http://x"]}), tmp_path / "urls.parquet")
    with pytest.raises(FileFormatError, match="urls.parquet: no image column .looked for image, jpg"):
        load_captions(CaptionDataConfig(format="parquet", path=str(tmp_path / "urls.parquet")), "train", 32)
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 nope")
    with pytest.raises(FileFormatError, match="bad.parquet: cannot read it as parquet"):
        load_captions(CaptionDataConfig(format="parquet", path=str(tmp_path / "bad.parquet")), "train", 32)


# ----------------------------------------------------------------------------- shapes

def test_shapes_world_is_deterministic_and_train_differs_from_val():
    cfg = CaptionDataConfig(shapes_train=5, shapes_val=3, seed=7)
    a, b = load_captions(cfg, "train", 32), load_captions(cfg, "train", 32)
    val = load_captions(cfg, "val", 32)
    assert len(a) == 5 and len(val) == 3 and a.captions == b.captions
    for i in range(5):
        np.testing.assert_array_equal(a.image(i), b.image(i))
    assert a.image(0).shape == (32, 32, 3) and a.image(0).dtype == np.uint8
    assert a.captions[:3] != val.captions
    # the reference: the first training scene is the first scene drawn from rng([seed, 0])
    scene = sample_scene(np.random.default_rng([7, 0]), min_objects=1, max_objects=2)
    np.testing.assert_array_equal(a.image(0), render_scene(scene, 32))
    assert a.captions[0] == scene_captions(scene) and 2 <= len(a.captions[0]) <= 3
    other = load_captions(CaptionDataConfig(shapes_train=5, seed=8), "train", 32)
    assert other.captions != a.captions
    assert len(load_captions(CaptionDataConfig(shapes_train=5, max_samples=2), "train", 32)) == 2


def test_config_checks():
    validate(CaptionDataConfig())
    with pytest.raises(ConfigError, match="--path=: required for format=webdataset"):
        validate(CaptionDataConfig(format="webdataset"))
    with pytest.raises(ConfigError, match="--val-fraction=1.0: must be in"):
        validate(CaptionDataConfig(val_fraction=1.0))
    with pytest.raises(ConfigError, match="--caption-column=c: applies only to format=parquet"):
        validate(CaptionDataConfig(caption_column="c"))
    with pytest.raises(ConfigError, match="--max-objects=1: must be >= --data.min-objects"):
        validate(CaptionDataConfig(min_objects=2, max_objects=1))


# ----------------------------------------------------------------------------- pairs, batches, crops

def test_pairs_items_and_a_batch_through_map_data_source():
    data = load_captions(CaptionDataConfig(shapes_train=4), "train", 32)
    pairs = CaptionPairs(data, image_size=32)
    assert len(pairs) == sum(len(c) for c in data.captions) == len(data.pairs())
    item = pairs[len(data.captions[0])]  # the first caption of the second image
    assert item["pixels"].dtype == torch.uint8 and item["pixels"].shape == (3, 32, 32)
    assert item["caption"] == data.captions[1][0] and int(item["image_index"]) == 1
    torch.testing.assert_close(item["pixels"], torch.from_numpy(data.image(1)).permute(2, 0, 1))
    source = MapDataSource(pairs, seed=0, shuffle=True, collate_fn=collate_pairs, pin_memory=False)
    batch = source.next_batch(5)
    assert batch["pixels"].shape == (5, 3, 32, 32) and batch["image_index"].shape == (5,)
    assert isinstance(batch["caption"], list) and all(isinstance(c, str) for c in batch["caption"])
    for c, i in zip(batch["caption"], batch["image_index"].tolist()):
        assert c in data.captions[i]


def test_a_corrupt_image_met_in_training_is_skipped_and_counted(shards):
    data = load_captions(web(shards, val_fraction=0.0), "train", 32)
    shard, offset, size, name = data.reader.entries[0][1:]
    Path(shard).write_bytes(Path(shard).read_bytes()[:offset] + b"\0" * size + Path(shard).read_bytes()[offset + size:])
    pairs = CaptionPairs(data, image_size=8)
    item = pairs[0]  # image 0 no longer decodes: the next pair is served
    assert item["caption"] == "caption 1" and item["pixels"].shape == (3, 8, 8)
    assert data.skipped["corrupt image"] == 2  # one at load, one met here
    with pytest.raises(FileFormatError, match="00000.tar: member 000000000.jpg: cannot decode"):
        data.image(0)


def test_resize_square_and_augmented_crops():
    img = np.arange(40 * 60 * 3, dtype=np.int64).reshape(40, 60, 3).astype(np.uint8)  # (H, W, 3)
    out = resize_square(img, 20)
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(resize_square(img[:, 10:50], 40), img[:, 10:50])  # square of the right size
    np.testing.assert_array_equal(out, np.asarray(Image.fromarray(img[:, 10:50]).resize((20, 20), Image.BICUBIC)))
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    data = CaptionSet(["k"], [["c"]], {}, "one photo", lambda i: photo)
    plain = CaptionPairs(data, 16)[0]["pixels"]
    aug = CaptionPairs(data, 16, augment=True, seed=0)
    first, second = aug[0]["pixels"], aug[0]["pixels"]
    assert first.shape == plain.shape == (3, 16, 16)
    assert not torch.equal(first, plain) and not torch.equal(first, second)
    torch.testing.assert_close(CaptionPairs(data, 16, augment=True, seed=0)[0]["pixels"], first)  # seeded
