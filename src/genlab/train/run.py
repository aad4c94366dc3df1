"""Starting a run, once for every recipe: validate first, then touch the run folder.

``start_run(cfg, resume=..., overwrite=...)`` checks the whole resolved config (``config.validate``,
flags named as typed) and the state of the run folder before anything in it is written or deleted:

* a fresh run into a folder that holds a run refuses, naming ``--resume`` and ``--overwrite``;
  ``--overwrite`` clears the old run completely (checkpoints, metrics, pictures, reports);
* ``--resume`` continues from the newest complete checkpoint (``latest``, or the newest complete
  step folder when ``latest`` is gone) or refuses with the reason; a finished run says so and
  does nothing.

Every rank is seeded with ``seed + rank``. Nothing is written yet: the recipe builds its model, and
the engine calls ``Run.commit(model)`` (``Trainer(..., run_dir=run)``), which checks that the checkpoint
to resume is readable and fits the model, and only then (rank 0) clears an ``--overwrite`` folder and
writes ``config.yaml``.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genlab.config import ConfigError, folder_problem, save_yaml, validate
from genlab.errors import RunFolderError
from genlab.io import atomic_write_json
from genlab.train.checkpoint import check_resumable, checkpoint_step, find_checkpoint
from genlab.train.distributed import DistInfo, dist_info

# What marks a folder as a genlab run (any one of them).
RUN_MARKERS = ("config.yaml", "checkpoints", "metrics.jsonl")
RUN_HEADER = "genlab run of the family: "  # first line of config.yaml


def family_of(cfg: Any) -> str:
    """``flow`` for a config defined in ``genlab.flow...``; a config may name its command family with a
    ``FAMILY`` class attribute (the qformer commands' recipes live in ``genlab.vlm``)."""
    if getattr(type(cfg), "FAMILY", None):
        return type(cfg).FAMILY
    parts = type(cfg).__module__.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "genlab" else parts[0]


def read_run_config(run_dir: str | Path, family: str) -> Path:
    """The config.yaml of an existing run of ``family``; a RunFolderError says what the folder is instead."""
    run = Path(run_dir)
    if not run.exists():
        raise RunFolderError(f"{run} does not exist: give the folder of a genlab {family} run")
    if not run.is_dir():
        raise RunFolderError(f"{run} is a file, not a run folder")
    path = run / "config.yaml"
    if not path.is_file():
        raise RunFolderError(f"{run} is not a genlab run folder: it has no config.yaml")
    text = path.read_text(errors="replace")
    if not text.strip():
        raise RunFolderError(f"{path} is empty: this run folder's config was lost or never written")
    first = text.split("\n", 1)[0]
    if first.startswith(f"# {RUN_HEADER}"):
        other = first[len(f"# {RUN_HEADER}"):].strip()
        if other != family:
            raise RunFolderError(f"{run} holds a genlab {other} run, not a {family} run: use `genlab {other} ...`")
    return path


@dataclass
class Run:
    """A started run: its folder, this process's rank, the checkpoint it resumes from, and the config
    that ``commit`` writes."""

    dir: Path
    dist: DistInfo
    cfg: Any = None
    resume_from: Path | None = None
    finished: bool = False  # a resumed run that had already reached its last step: nothing to do
    overwrite: bool = False
    committed: bool = False

    def commit(self, model: torch.nn.Module | None = None, ema: bool = False) -> None:
        """The last checks, then the first writes: a resumed checkpoint must be readable and fit
        ``model`` (its trainable state, ``ema`` included); then rank 0 clears an ``--overwrite`` folder
        and writes config.yaml. Called once, by the engine."""
        if self.committed:
            return
        if self.resume_from is not None and model is not None:
            check_resumable(self.resume_from, model, ema, self.dist.rank)
        if self.dist.is_main:
            if self.overwrite and self.dir.is_dir():
                print(f"genlab: --overwrite: clearing the previous run in {self.dir}", flush=True)
                for p in self.dir.iterdir():
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            self.dir.mkdir(parents=True, exist_ok=True)
            save_yaml(self.cfg, self.dir / "config.yaml", header=f"{RUN_HEADER}{family_of(self.cfg)}")
        self.committed = True


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def holds_run(folder: Path) -> bool:
    return any((folder / m).exists() for m in RUN_MARKERS)


def check_run_dir(run_dir: Path, flag: str = "--run-dir") -> None:
    """A folder that can be made and written: no part of it may be a file (``config.folder_problem``),
    and the deepest part that exists must be writable."""
    problem = folder_problem(run_dir)
    if problem:
        raise ConfigError(f"{flag}={run_dir}: {problem}")
    for p in (run_dir, *run_dir.parents):
        if p.exists():
            if not os.access(p, os.W_OK | os.X_OK):
                raise ConfigError(f"{flag}={run_dir}: {p} is not writable by this user")
            return


def check_batch(train: Any, world_size: int) -> None:
    """Batch sizes that only the world size can rule out (the rest is ``TrainConfig.checks``)."""
    if train.batch_size % world_size:
        raise ConfigError(f"--train.batch-size={train.batch_size}: must be divisible by the {world_size} processes")
    per_rank = train.batch_size // world_size
    if train.micro_batch_size and per_rank % train.micro_batch_size:
        raise ConfigError(f"--train.micro-batch-size={train.micro_batch_size}: must divide the per-process "
                          f"batch {per_rank} (--train.batch-size / processes)")


def start_run(cfg: Any, resume: bool = False, overwrite: bool = False) -> Run:
    """Validate ``cfg`` (a recipe config with ``run_dir`` and ``train``) and the run folder and seed this
    rank; nothing is written or deleted (see ``Run.commit``)."""
    validate(cfg)
    dist = dist_info()
    check_batch(cfg.train, dist.world_size)
    run_dir = Path(cfg.run_dir)
    check_run_dir(run_dir)
    resume_from = None
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: give one")
    if resume:
        resume_from, note = find_checkpoint(run_dir)
        if resume_from is None:
            raise RunFolderError(f"cannot resume {run_dir}: {note}. Nothing was changed; start it over with "
                                 f"--run-dir {run_dir} --overwrite")
        if note and dist.is_main:
            print(f"genlab: note: {note}", flush=True)
        step = checkpoint_step(resume_from)
        if step > cfg.train.steps:
            raise ConfigError(f"--train.steps={cfg.train.steps}: the run is already at step {step}; "
                              f"give at least {step}")
        if step == cfg.train.steps:
            if dist.is_main:
                print(f"genlab: {run_dir} already finished at step {step} (--train.steps {cfg.train.steps}); "
                      f"nothing to do. Train it further with --resume {run_dir} --train.steps N", flush=True)
            return Run(run_dir, dist, cfg, resume_from, finished=True)
    elif dist.is_main and run_dir.is_dir() and any(run_dir.iterdir()):
        # (other ranks skip this: rank 0 may already have written config.yaml for this very run)
        if not holds_run(run_dir):
            raise RunFolderError(f"--run-dir={run_dir} holds files that are not a genlab run; choose a new "
                                 f"or empty folder")
        if not overwrite:
            raise RunFolderError(f"{run_dir} already holds a run: continue it with --resume {run_dir}, or "
                                 f"replace it with --overwrite (which deletes everything in it)")
    seed_everything(cfg.train.seed + dist.rank)
    return Run(run_dir, dist, cfg, resume_from, overwrite=overwrite and not resume)


def write_report(run_dir: str | Path, report: dict, name: str = "eval.json") -> Path:
    """A run's report (eval.json, ...) written atomically; returns its path."""
    path = Path(run_dir) / name
    atomic_write_json(path, report)
    return path
