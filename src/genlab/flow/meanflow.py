"""Sampling a MeanFlow model (Geng et al. 2025); its loss lives in ``objectives.py``.

A MeanFlow model predicts the average velocity u(z, t, h) over [t, t + h], so one step is exact
in principle: z_{t+h} = z_t + h u(z_t, t, h). One step from noise at t = 0 to data at t = 1 is
``steps=1``; more steps walk the uniform grid t_i = i / steps with h = 1 / steps each.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["meanflow_sample"]


@torch.no_grad()
def meanflow_sample(model: Callable[..., Tensor], x0: Tensor, steps: int = 1, y: Tensor | None = None) -> Tensor:
    """x1 ~ data from noise x0 (B, *dims): ``steps`` jumps z += h * model(z, t, y=y, h=h) -> (B, *dims).

    ``steps`` forwards in all (a model trained with MeanFlow's cfg_scale is already guided).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    B = x0.shape[0]
    time_dtype = torch.promote_types(x0.dtype, torch.float32)  # times stay float32 under bf16 states
    grid = torch.linspace(0.0, 1.0, steps + 1, device=x0.device, dtype=time_dtype)
    z = x0
    for i in range(steps):
        t, h = grid[i].expand(B), (grid[i + 1] - grid[i]).expand(B)  # (B,) each
        z = z + (grid[i + 1] - grid[i]).to(z.dtype) * model(z, t, y=y, h=h)
    return z
