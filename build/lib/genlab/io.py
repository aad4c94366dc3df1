"""Files written atomically with the user's umask, and readers that name the damaged file.

Every file genlab writes goes through a ``.tmp`` sibling, is flushed to disk and then renamed into
place, so a run killed at any moment leaves the old file or the new one, never half of one. Every
reader turns a truncated, empty or foreign file into a ``FileFormatError`` that names the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from genlab.errors import FileFormatError


def fsync_dir(path: str | os.PathLike) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _finish(tmp: Path, path: Path) -> None:
    """Give ``tmp`` the mode a plain ``open(path, 'w')`` would have, then rename it into place."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    tmp = _tmp(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    _finish(tmp, path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """A report (eval.json, summary.json, ...): indented JSON, written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    path = Path(path)
    tmp = _tmp(path)
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    _finish(tmp, path)


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """safetensors' ``save_file`` into a temporary sibling, then renamed (safetensors itself writes
    the file owner-only; it gets the user's umask here like every other file)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = _tmp(path)
    save_file(tensors, str(tmp), metadata=metadata)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    _finish(tmp, path)


def read_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a damaged or foreign file is a FileFormatError naming it."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # SafetensorError (truncated, empty, not safetensors) has no public type
        raise FileFormatError(f"{path}: not a readable safetensors file ({_first_line(e)}); "
                              f"it may be truncated or damaged") from e


def read_safetensors_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a safetensors file's tensors, from its header alone (safetensors checks the
    header against the file's length, so a truncated file fails here too)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise FileFormatError(f"{path}: not a readable safetensors file ({_first_line(e)}); "
                              f"it may be truncated or damaged") from e


def read_torch(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)``; a damaged file is a FileFormatError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, pickle of a foreign object, empty file ...
        raise FileFormatError(f"{path}: not a readable genlab state file ({_first_line(e)}); "
                              f"it may be truncated or damaged") from e


def read_json(path: str | os.PathLike, expect: type = dict) -> Any:
    """The JSON value in ``path`` (a mapping by default); bad JSON or the wrong top-level type is a
    FileFormatError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FileFormatError(f"{path}: not valid JSON ({e})") from e
    if expect is not None and not isinstance(value, expect):
        raise FileFormatError(f"{path}: expected a JSON {expect.__name__}, got {type(value).__name__}")
    return value


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
