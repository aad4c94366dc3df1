"""A tiny deterministic regression task for engine tests (also run under torchrun by test_ddp)."""

from __future__ import annotations

import torch
from torch import nn


class ShardedRegression:
    """A fixed dataset; each step draws a GLOBAL batch of indices with a shared generator and this rank
    takes its contiguous shard, so N ranks together see exactly what one process sees."""

    def __init__(self, n: int = 512, dim: int = 4, seed: int = 0, rank: int = 0, world: int = 1):
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, dim, generator=g)
        self.y = torch.sin(self.x @ torch.randn(dim, 1, generator=g))
        self.gen = torch.Generator().manual_seed(seed)
        self.rank, self.world = rank, world

    def next_batch(self, n: int) -> dict[str, torch.Tensor]:
        idx = torch.randint(0, len(self.x), (n * self.world,), generator=self.gen)
        idx = idx[self.rank * n:(self.rank + 1) * n]
        return {"x": self.x[idx], "y": self.y[idx]}

    def state_dict(self):
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state):
        self.gen.set_state(state["gen"])


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))


def mse_loss(model, batch):
    pred = model(batch["x"])
    return ((pred - batch["y"]) ** 2).mean(), {}


def noisy_mse_loss(model, batch):
    """Uses the global torch RNG, so exact resume must restore RNG state too."""
    noise = 0.01 * torch.randn_like(batch["x"])
    pred = model(batch["x"] + noise)
    return ((pred - batch["y"]) ** 2).mean(), {"noise_mean": noise.mean()}
