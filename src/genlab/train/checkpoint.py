"""Atomic checkpoints and exact resume.

Layout of a run folder's ``checkpoints/``::

    step_00000500/
        model.safetensors      weights of the trained model (unwrapped from DDP)
        ema.safetensors        EMA weights (when EMA is on)
        state.pt               optimizers, schedulers, step, EMA counter   (rank 0)
        rank_00000.pt          RNG states and data-source state, one per rank
    latest                     text file naming the newest complete step folder

A checkpoint is written into ``step_XXXXXX.tmp`` and renamed into place only when every file is
complete; ``latest`` is replaced atomically after that. A run killed at any moment therefore finds
either the old checkpoint or the new one, never half of one. Tensors are read back with safetensors
or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def _fsync_dir(path: Path) -> None:
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


def atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def state_dict_for_safetensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies; tied (shared) tensors are cloned so safetensors accepts them."""
    out, seen = {}, {}
    for k, v in module.state_dict().items():
        key = (v.data_ptr(), v.shape, v.stride()) if v.numel() else None
        t = v.detach().to("cpu")
        if key in seen:
            t = t.clone()
        seen[key] = k
        out[k] = t.contiguous()
    return out


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    # numpy and python states are tuples of ints; keep them as tensors so weights_only loads them.
    np_state = np.random.get_state()
    state["numpy"] = {
        "keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "pos": int(np_state[2]),
        "has_gauss": int(np_state[3]),
        "cached": float(np_state[4]),
    }
    py = random.getstate()
    state["python"] = {"version": py[0], "state": torch.tensor(py[1], dtype=torch.int64), "gauss": py[2]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_dir(ckpt_root: Path, step: int) -> Path:
    return ckpt_root / f"step_{step:08d}"


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    root = Path(run_dir) / "checkpoints"
    marker = root / "latest"
    if not marker.is_file():
        return None
    path = root / marker.read_text().strip()
    if not (path / "state.pt").is_file():
        raise FileNotFoundError(f"{marker} names {path}, which is missing or incomplete")
    return path


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    train_state: dict[str, Any],
    rank_state: dict[str, Any],
    ema: torch.nn.Module | None = None,
    rank: int = 0,
    world_size: int = 1,
    keep: int = 2,
    barrier=lambda: None,
) -> Path:
    """Write a checkpoint atomically. Every rank calls this (each writes its own rank file)."""
    root = Path(run_dir) / "checkpoints"
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    atomic_torch_save(rank_state, tmp / f"rank_{rank:05d}.pt")
    if rank == 0:
        save_file(state_dict_for_safetensors(model), str(tmp / "model.safetensors"))
        if ema is not None:
            save_file(state_dict_for_safetensors(ema), str(tmp / "ema.safetensors"))
        atomic_torch_save({**train_state, "step": step, "world_size": world_size}, tmp / "state.pt")
    barrier()
    if rank == 0:
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(root / "latest", final.name)
        old = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for p in old[: max(0, len(old) - keep)]:
            shutil.rmtree(p, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    ema: torch.nn.Module | None = None,
    rank: int = 0,
    map_location: str | torch.device = "cpu",
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load weights into ``model`` (and ``ema``); return (train_state, this rank's state)."""
    model.load_state_dict(load_file(str(path / "model.safetensors"), device=str(map_location)))
    if ema is not None:
        ema_file = path / "ema.safetensors"
        if not ema_file.is_file():
            raise FileNotFoundError(f"{ema_file} missing: the run was saved without EMA")
        ema.load_state_dict(load_file(str(ema_file), device=str(map_location)))
    train_state = torch.load(path / "state.pt", map_location=map_location, weights_only=True)
    rank_file = path / f"rank_{rank:05d}.pt"
    if not rank_file.is_file():
        raise FileNotFoundError(
            f"{rank_file} missing: resume with the same number of processes "
            f"({train_state.get('world_size')}) as the interrupted run"
        )
    rank_state = torch.load(rank_file, map_location="cpu", weights_only=True)
    return train_state, rank_state
