"""Readers of the real caption formats behind ``genlab.data.captions``: img2dataset webdataset shards
and parquet files (the layouts, skip rules and errors are described in that module's docstring).

Each ``index_*`` reads a source once and returns ``(keys, captions, entries, skipped)``: per image its
key, its captions and where its encoded bytes are (``Encoded`` decodes image i from that on demand).
"""

from __future__ import annotations

import glob
import io
import json
import tarfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps

from genlab.errors import FileFormatError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # a webdataset sample's image member
CAPTION_COLUMNS = ("caption", "text", "txt", "captions")
IMAGE_COLUMNS = ("image", "jpg", "png", "image_path", "path", "file_name")
SHARD_LAYOUT = "*.tar shards holding KEY.jpg|png|webp with KEY.txt (or a \"caption\" in KEY.json)"


# ----------------------------------------------------------------------------- decoding

def decode_image(data: bytes, where: str) -> np.ndarray:
    """Image bytes as uint8 (H, W, 3) RGB: EXIF rotation applied (left / right must stay right),
    transparency composited over white, grey / palette / CMYK converted. Undecodable bytes are one
    FileFormatError naming ``where``."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                white = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(white, im)
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise FileFormatError(f"{where}: cannot decode it as an image ({e})") from e


def _verifies(data: bytes) -> bool:
    """PIL's cheap check (headers, PNG checksums) without decoding the pixels."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        return True
    except Exception:  # PIL raises many kinds (OSError, SyntaxError, struct.error, ...) for broken files
        return False



# ----------------------------------------------------------------------------- encoded images

class Encoded:
    """Encoded images: per image ("tar", shard, offset, size), ("bytes", where, data) or ("file", path)."""

    def __init__(self, entries: list[tuple]):
        self.entries = entries

    def __call__(self, i: int) -> np.ndarray:
        e = self.entries[i]
        if e[0] == "tar":
            _, shard, offset, size, name = e
            where = f"{shard}: member {name}"
            try:
                with open(shard, "rb") as f:
                    f.seek(offset)
                    data = f.read(size)
            except OSError as err:
                raise FileFormatError(f"{where}: cannot read it ({err})") from err
        elif e[0] == "bytes":
            where, data = e[1], e[2]
        else:
            where = str(e[1])
            try:
                data = Path(e[1]).read_bytes()
            except OSError as err:
                raise FileFormatError(f"{where}: cannot read it ({err})") from err
        return decode_image(data, where)

    def subset(self, idx: Sequence[int]) -> "Encoded":
        return Encoded([self.entries[i] for i in idx])


def bump(skipped: dict[str, int], reason: str, k: int = 1) -> None:
    skipped[reason] = skipped.get(reason, 0) + k


# ----------------------------------------------------------------------------- webdataset shards

def _files_in(folder: Path, suffix: str, noun: str, expected: str) -> list[Path]:
    """The ``*suffix`` files of ``folder`` (sorted, not recursive); none is one error saying what was expected."""
    files = sorted(q for q in folder.glob(f"*{suffix}") if q.is_file())
    if not files:
        raise FileFormatError(f"{folder}: no {suffix} {noun} in this folder; expected {expected}")
    return files


def _shard_paths(path: str, skipped: dict[str, int]) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        return _files_in(p, ".tar", "shards", f"img2dataset's webdataset output ({SHARD_LAYOUT})")
    if p.is_file():
        return [p]
    from braceexpand import braceexpand

    names = list(braceexpand(path))
    if names == [path] and not glob.has_magic(path):
        raise FileFormatError(f"{path}: no such file or folder; give a folder of {SHARD_LAYOUT}, or a pattern "
                              f"such as cc/{{00000..00009}}.tar")
    shards = []
    for name in names:
        if glob.has_magic(name):
            shards += sorted(Path(q) for q in glob.glob(name) if Path(q).is_file())
        elif Path(name).is_file():
            shards.append(Path(name))
        else:
            bump(skipped, "missing shard")
    if not shards:
        raise FileFormatError(f"{path}: the pattern matches no file (it names {len(names)} paths, e.g. {names[0]})")
    return shards


def _read_shard(shard: Path, skipped: dict[str, int]) -> list[tuple[str, dict[str, Any]]]:
    """The samples of one shard in tar order: (key, {extension: bytes of text members, or
    (offset, size, name) of image members, whose bytes are verified here}). A shard that breaks off
    keeps the members read before the damage and counts one "unreadable shard"."""
    groups: dict[str, dict[str, Any]] = {}
    size = shard.stat().st_size
    try:
        with open(shard, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for m in tar:  # raises ReadError where the archive breaks off
                base = m.name.rsplit("/", 1)[-1]
                if not m.isfile() or base.startswith(".") or "." not in base:
                    continue
                stem, ext = base.split(".", 1)
                key, ext = m.name[: len(m.name) - len(base)] + stem, ext.lower()
                if m.offset_data + m.size > size:
                    raise tarfile.ReadError("unexpected end of data")
                data = tar.extractfile(m).read()  # type: ignore[union-attr]
                g = groups.setdefault(key, {})
                if ext in IMAGE_EXTENSIONS:
                    g["image"] = (m.offset_data, m.size, m.name) if _verifies(data) else "corrupt"
                elif ext in ("txt", "json"):
                    g[ext] = data
            f.seek(tar.offset)  # a complete archive ends with zero blocks; no end marker = cut at a boundary
            end = f.read(512)
            if len(end) < 512 or end.count(0) != 512:
                raise tarfile.ReadError("no end-of-archive marker")
    except (tarfile.TarError, OSError, EOFError):
        bump(skipped, "unreadable shard")
    return list(groups.items())


def _caption(g: dict[str, Any]) -> str:
    text = g.get("txt", b"").decode("utf-8", errors="replace").strip()
    if not text and "json" in g:
        try:
            meta = json.loads(g["json"])
        except (ValueError, UnicodeDecodeError):
            meta = None
        if isinstance(meta, dict) and isinstance(meta.get("caption"), str):
            text = meta["caption"].strip()
    return text


def index_webdataset(path: str, max_samples: int):
    skipped: dict[str, int] = {"corrupt image": 0, "missing caption": 0, "unreadable shard": 0}
    shards = _shard_paths(path, skipped)
    keys, caps, entries = [], [], []
    for shard in shards:
        for key, g in _read_shard(shard, skipped):
            image, caption = g.get("image"), _caption(g)
            if image is None:
                if caption or "txt" in g or "json" in g:
                    bump(skipped, "missing image")
            elif image == "corrupt":
                bump(skipped, "corrupt image")
            elif not caption:
                bump(skipped, "missing caption")
            else:
                keys.append(key), caps.append([caption]), entries.append(("tar", str(shard), *image))
        if max_samples and len(keys) >= max_samples:
            break
    return _first(keys, caps, entries, skipped, max_samples,
                  f"{path}: no readable image-caption sample in {len(shards)} shard(s); expected {SHARD_LAYOUT}")


def skipped_summary(skipped: dict[str, int]) -> str:
    """"3 corrupt image, 1 missing caption" (the non-zero counts), or "nothing"."""
    return ", ".join(f"{v} {k}" for k, v in skipped.items() if v) or "nothing"


# ----------------------------------------------------------------------------- parquet

def _parquet_files(path: str) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        return _files_in(p, ".parquet", "files", "files with a caption column and an image column of bytes or paths")
    if not p.is_file():
        raise FileFormatError(f"{p}: no such file or folder; give a .parquet file or a folder of them")
    return [p]


def _column(file: Path, names: list[str], asked: str, auto: tuple[str, ...], what: str) -> str:
    if asked:
        if asked not in names:
            raise FileFormatError(f"{file}: no column {asked!r} ({what}); its columns are {names}")
        return asked
    for name in auto:
        if name in names:
            return name
    raise FileFormatError(f"{file}: no {what} column (looked for {', '.join(auto)}); its columns are {names}; "
                          f"name one with --data.{'caption' if 'caption' in what else 'image'}-column")


def _row_captions(value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        return []
    return [c.strip() for c in value if isinstance(c, str) and c.strip()]


def index_parquet(cfg: Any, max_samples: int):
    import pyarrow as pa
    import pyarrow.parquet as pq

    skipped: dict[str, int] = {"corrupt image": 0, "missing caption": 0, "missing image file": 0}
    files = _parquet_files(cfg.path)
    keys, caps, entries = [], [], []
    for file in files:
        try:
            pf = pq.ParquetFile(file)
        except (pa.ArrowException, OSError) as e:
            if len(files) == 1:
                raise FileFormatError(f"{file}: cannot read it as parquet ({e})") from e
            bump(skipped, "unreadable file")
            continue
        names = pf.schema_arrow.names
        cap_col = _column(file, names, cfg.caption_column, CAPTION_COLUMNS, "caption")
        img_col = _column(file, names, cfg.image_column, IMAGE_COLUMNS, "image")
        kind = pf.schema_arrow.field(img_col).type
        if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_string(kind)
                or pa.types.is_large_string(kind) or (pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0)):
            raise FileFormatError(f"{file}: column {img_col!r} holds {kind}; expected image bytes, path strings or a "
                                  f"{{bytes, path}} struct")
        row = 0
        try:
            for batch in pf.iter_batches(columns=[cap_col, img_col], batch_size=256):
                for caption, image in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                    where, row = f"{file}: row {row}", row + 1
                    entry = _parquet_image(image, file, where, skipped)
                    texts = _row_captions(caption)
                    if entry is not None and not texts:
                        bump(skipped, "missing caption")
                    elif entry is not None:
                        keys.append(f"{file.stem}/{row - 1}"), caps.append(texts), entries.append(entry)
        except (pa.ArrowException, OSError):  # a damaged row group: keep the rows read before it
            bump(skipped, "unreadable file")
        if max_samples and len(keys) >= max_samples:
            break
    return _first(keys, caps, entries, skipped, max_samples,
                  f"{cfg.path}: no readable image-caption row in {len(files)} parquet file(s)")


def _first(keys: list, caps: list, entries: list, skipped: dict, max_samples: int, empty: str):
    """The first ``max_samples`` (0 = all) samples read; a FileFormatError ``empty`` when there is none."""
    if not keys:
        raise FileFormatError(f"{empty}; skipped: {skipped_summary(skipped)}")
    n = max_samples or len(keys)
    return keys[:n], caps[:n], entries[:n], skipped


def _parquet_image(value: Any, file: Path, where: str, skipped: dict[str, int]) -> tuple | None:
    """The row's image as an ``_Encoded`` entry, verified; None (counted) when it is missing or broken."""
    if isinstance(value, dict):  # Hugging Face datasets' Image feature: bytes, else a path
        value = value.get("bytes") or value.get("path")
    if value is None or value == b"" or value == "":
        bump(skipped, "missing image")
        return None
    if isinstance(value, str):
        path = Path(value) if Path(value).is_absolute() else file.parent / value
        if not path.is_file():
            bump(skipped, "missing image file")
            return None
        entry, data = ("file", str(path)), path.read_bytes()
    else:
        data = bytes(value)
        entry = ("bytes", where, data)
    if not _verifies(data):
        bump(skipped, "corrupt image")
        return None
    return entry
