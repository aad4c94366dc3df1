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
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genlab.errors import CheckpointMismatchError, RunFolderError
from genlab.io import atomic_torch_save, atomic_write_json, atomic_write_text, fsync_dir, read_safetensors, \
    read_safetensors_shapes, read_torch, save_safetensors

STEP_DIR = re.compile(r"step_(\d{8})")


def to_safetensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies; tied (shared) tensors are cloned so safetensors accepts them."""
    out, seen = {}, set()
    for k, v in state.items():
        key = (v.data_ptr(), v.shape, v.stride()) if v.numel() else None
        t = v.detach().to("cpu")
        if key in seen:
            t = t.clone()
        seen.add(key)
        out[k] = t.contiguous()
    return out


def state_dict_for_safetensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return to_safetensors(module.state_dict())


def persistent_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The buffers that belong in a state dict (BatchNorm statistics, ...), by name."""
    sd_keys = set(model.state_dict().keys())
    return {n: b for n, b in model.named_buffers() if n in sd_keys}


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint holds of a model: its trainable parameters (one name per tied tensor) and
    its buffers. A frozen base comes from where the recipe built it, not from every checkpoint."""
    sd = model.state_dict()
    keep = {n for n, p in model.named_parameters() if p.requires_grad} | set(persistent_buffers(model))
    return {k: v for k, v in sd.items() if k in keep}


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


def complete_steps(run_dir: str | os.PathLike) -> list[Path]:
    """Every complete step folder of a run, oldest first (``.tmp`` folders are half-written saves)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.fullmatch(p.name) and (p / "state.pt").is_file()]
    return sorted(found, key=lambda p: p.name)


def find_checkpoint(run_dir: str | os.PathLike) -> tuple[Path | None, str]:
    """The newest complete checkpoint of a run and a note: ``latest`` when it names a complete step
    folder, else the newest complete step folder found by scanning (the note says why); (None, reason)
    when there is none."""
    root = Path(run_dir) / "checkpoints"
    marker = root / "latest"
    steps = complete_steps(run_dir)
    if marker.is_file():
        name = marker.read_text().strip()
        if STEP_DIR.fullmatch(name) and (root / name / "state.pt").is_file():
            return root / name, ""
        why = f"{marker} names {name or 'nothing'!r}, which is not a complete checkpoint"
    elif root.is_dir():
        why = f"{marker} is missing"
    else:
        return None, f"{root} does not exist"
    if not steps:
        return None, f"{why}, and {root} holds no complete step folder"
    return steps[-1], f"{why}; using the newest complete step folder {steps[-1].name}"


def latest_checkpoint(run_dir: str | os.PathLike) -> Path:
    """The checkpoint to sample or evaluate a run with; a RunFolderError says why there is none."""
    path, note = find_checkpoint(run_dir)
    if path is None:
        raise RunFolderError(f"{run_dir} has no checkpoint to load ({note})")
    if note:
        print(f"genlab: note: {note}", flush=True)
    return path


def checkpoint_step(path: Path) -> int:
    return int(read_torch(path / "state.pt")["step"])


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model_state: dict[str, torch.Tensor],
    train_state: dict[str, Any],
    rank_state: dict[str, Any],
    ema_state: dict[str, torch.Tensor] | None = None,
    rank: int = 0,
    world_size: int = 1,
    keep: int = 2,
    barrier=lambda: None,
) -> Path:
    """Write a checkpoint atomically. Every rank calls this (each writes its own rank file)."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
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
        save_safetensors(to_safetensors(model_state), tmp / "model.safetensors")
        if ema_state is not None:
            save_safetensors(to_safetensors(ema_state), tmp / "ema.safetensors")
        atomic_torch_save({**train_state, "step": step, "world_size": world_size}, tmp / "state.pt")
    barrier()
    if rank == 0:
        fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(root / "latest", final.name)
        for p in complete_steps(run_dir)[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
        for p in root.glob("step_*.tmp"):  # left by a run killed while saving
            shutil.rmtree(p, ignore_errors=True)
    barrier()
    return final


def save_best(run_dir: str | os.PathLike, step: int, metric: str, value: float,
              model_state: dict[str, torch.Tensor], ema_state: dict[str, torch.Tensor] | None) -> Path:
    """Weights of the best evaluation so far into ``checkpoints/best`` (replaced atomically), with
    ``best.json`` saying which step and metric value they are."""
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / "best", root / "best.tmp"
    root.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_safetensors(to_safetensors(model_state), tmp / "model.safetensors")
    if ema_state is not None:
        save_safetensors(to_safetensors(ema_state), tmp / "ema.safetensors")
    atomic_write_json(tmp / "best.json", {"step": step, "metric": metric, "value": value})
    fsync_dir(tmp)
    old = root / "best.old"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def mismatch(own: dict[str, tuple], found: dict[str, tuple], keys: set[str], path: Path, partial: bool = False) -> None:
    """Raise CheckpointMismatchError naming every key of ``found`` (name -> shape) that does not fit
    the model's ``own`` (name -> shape): unknown, missing from ``keys`` (unless ``partial``), or shaped
    differently."""
    unexpected = sorted(set(found) - set(own))
    missing = [] if partial else sorted(keys - set(found))
    shapes = [f"{k}: file {tuple(found[k])} vs model {tuple(own[k])}"
              for k in sorted(set(found) & set(own)) if tuple(found[k]) != tuple(own[k])]
    if unexpected or missing or shapes:
        parts = [f"{what}: {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}"
                 for what, items in (("keys the model does not have", unexpected), ("missing keys", missing),
                                     ("shape mismatches", shapes)) if items]
        raise CheckpointMismatchError(f"{path} does not match the model built from the run's config ("
                                      + "; ".join(parts) + ")")


def check_resumable(path: Path, model: torch.nn.Module, ema: bool, rank: int = 0) -> None:
    """Everything a resume from ``path`` will read is there, readable and fits ``model`` (checked
    from the safetensors headers, without loading the weights) — before anything is written."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    keys = set(trainable_state(model))
    mismatch(own, read_safetensors_shapes(path / "model.safetensors"), keys, path / "model.safetensors")
    if ema:
        if not (path / "ema.safetensors").is_file():
            raise RunFolderError(f"{path / 'ema.safetensors'} is missing: the run was saved without EMA "
                                 f"(resume it with --train.ema-decay 0)")
        mismatch(own, read_safetensors_shapes(path / "ema.safetensors"), keys, path / "ema.safetensors")
    state = read_torch(path / "state.pt")
    rank_file = path / f"rank_{rank:05d}.pt"
    if not rank_file.is_file():
        raise RunFolderError(f"{rank_file} missing: resume with the same number of processes "
                             f"({state.get('world_size')}) as the interrupted run")
    read_torch(rank_file)


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path,
              keys: set[str] | None = None, partial: bool = False) -> None:
    """Copy ``state`` into ``model``, strictly: every key of ``keys`` (default: the model's whole
    state dict) must be in the file with the model's shape, and the file may hold nothing else.
    ``partial`` (initialising from another run) allows model keys the file lacks."""
    own = model.state_dict()
    keys = set(own) if keys is None else keys
    mismatch({k: tuple(v.shape) for k, v in own.items()}, {k: tuple(v.shape) for k, v in state.items()}, keys,
             path, partial)
    model.load_state_dict(state, strict=False)


def load_checkpoint(path: Path, model: torch.nn.Module, keys: set[str], ema=None, rank: int = 0,
                    map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
    """Load a checkpoint's weights into ``model`` (strictly against ``keys``, its trainable state)
    and ``ema``; return (train_state, this rank's state)."""
    load_into(model, read_safetensors(path / "model.safetensors", map_location), path / "model.safetensors", keys)
    if ema is not None:
        ema_file = path / "ema.safetensors"
        if not ema_file.is_file():
            raise RunFolderError(f"{ema_file} is missing: the run was saved without EMA (keep --train.ema-decay 0)")
        state = read_safetensors(ema_file, map_location)
        if set(state) != set(ema.state_dict()):
            raise CheckpointMismatchError(f"{ema_file} does not hold the EMA of this model's trainable weights")
        ema.load_state_dict(state)
    train_state = read_torch(path / "state.pt", map_location)
    rank_file = path / f"rank_{rank:05d}.pt"
    if not rank_file.is_file():
        raise RunFolderError(
            f"{rank_file} missing: resume with the same number of processes "
            f"({train_state.get('world_size')}) as the interrupted run"
        )
    rank_state = read_torch(rank_file)
    return train_state, rank_state


def run_of_checkpoint(path: str | os.PathLike) -> Path:
    """The run folder of ``path``: a run folder itself, or one of its checkpoint folders
    (``<run>/checkpoints/step_N`` or ``<run>/checkpoints/best``)."""
    p = Path(path)
    if not p.exists():
        raise RunFolderError(f"{p} does not exist: give a run folder or one of its checkpoint folders")
    if (p / "config.yaml").is_file():
        return p
    if p.parent.name == "checkpoints" and (p.parent.parent / "config.yaml").is_file():
        return p.parent.parent
    raise RunFolderError(f"{p} is neither a run folder (no config.yaml) nor a checkpoint folder of one")


def load_weights(run_or_folder: str | os.PathLike, model: torch.nn.Module, ema: bool = True,
                 which: str = "latest", partial: bool = False) -> Path:
    """Load a run's weights into ``model``: the EMA weights when the run has them (and ``ema``),
    else the trained ones. ``run_or_folder`` is a run folder (``which`` = latest or best), a
    checkpoint folder, or a folder holding model.safetensors. Returns the file read."""
    src = Path(run_or_folder)
    if not src.exists():
        raise RunFolderError(f"{src} does not exist: give a run folder or a checkpoint folder")
    if (src / "checkpoints").is_dir() or (src / "config.yaml").is_file():
        if which == "best":
            src = src / "checkpoints" / "best"
            if not (src / "model.safetensors").is_file():
                raise RunFolderError(f"{src} has no weights: the run has no best checkpoint yet")
        else:
            src = latest_checkpoint(src)
    if not (src / "model.safetensors").is_file():
        raise RunFolderError(f"{src} holds no model.safetensors: give a run folder or a checkpoint folder")
    f = src / "ema.safetensors" if ema and (src / "ema.safetensors").is_file() else src / "model.safetensors"
    if partial:
        load_into(model, read_safetensors(f), f, partial=True)
    else:
        load_into(model, read_safetensors(f), f, keys=set(trainable_state(model)))
    return f
