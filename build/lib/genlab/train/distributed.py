"""torchrun / DDP set-up and rank-0 helpers.

Under ``torchrun --nproc-per-node N`` the usual environment variables (RANK, WORLD_SIZE, LOCAL_RANK)
are set; ``init_distributed`` then starts a process group (NCCL on GPUs, gloo on CPU). Without them
everything is a single process and every helper here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def dist_info() -> DistInfo:
    """This process's rank and world size as torchrun describes them (single process otherwise);
    starts nothing. Recipes and the CLI ask here, never ``os.environ`` themselves."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistInfo()
    return DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes (idempotent); single process otherwise."""
    info = dist_info()
    if not info.enabled:
        return info
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
    return info


def device_problem(name: str) -> str | None:
    """Why ``name`` cannot be used as a device here (None when it can): "auto", "cpu", "cuda",
    "cuda:N" and "mps" are understood; CUDA and MPS must be present."""
    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        return "must be auto, cpu, cuda, cuda:N or mps"
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available on this machine (this torch build or driver has none); use cpu or auto"
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"this machine has {torch.cuda.device_count()} CUDA device(s)"
        return None
    if device.type == "mps":
        return None if torch.backends.mps.is_available() else "MPS is not available on this machine"
    return "must be auto, cpu, cuda, cuda:N or mps"


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` = this rank's GPU when CUDA is present, else CPU. A device that cannot be used here
    is a ConfigError (validate first with ``device_problem`` to name the flag)."""
    if name != "auto":
        problem = device_problem(name)
        if problem:
            from genlab.errors import ConfigError

            raise ConfigError(f"device {name!r}: {problem}")
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ranks (``x`` itself when single-process)."""
    if dist.is_available() and dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= dist.get_world_size()
    return x


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
