"""Noise schedules shared by the families: a weight alpha(t) of the data and its time derivative.

One protocol serves both continuous flow matching and masked discrete diffusion:

* flow (``genlab.flow.paths``): x_t = alpha(t) x_1 + sigma(t) x_0, with alpha the weight of the
  data x_1; time runs from the source (t = 0, alpha = 0) to the data (t = 1, alpha = 1);
* masked diffusion (MDLM, Sahoo et al. 2024): alpha(t) is the probability that a token is still
  unmasked ("kept") at time t; time runs from the data (t = 0, alpha = 1) to all-masked
  (t = 1, alpha about 0), and the ELBO weight is -alpha'(t) / (1 - alpha(t)).

The two directions are the families' conventions, not the schedule's: ``LinearSchedule`` and
``CosineSchedule`` rise from 0 to 1 (flow); ``LogLinearSchedule`` and ``MaskingCosineSchedule`` fall from 1 to eps (MDLM).
Every method is elementwise: t is a tensor of any shape and the result has its shape.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["Schedule", "LinearSchedule", "CosineSchedule", "LogLinearSchedule", "MaskingCosineSchedule"]


@runtime_checkable
class Schedule(Protocol):
    """alpha(t) and its derivative d alpha / dt, elementwise in t."""

    def alpha(self, t: Tensor) -> Tensor: ...

    def d_alpha(self, t: Tensor) -> Tensor: ...


class LinearSchedule:
    """alpha(t) = t, alpha'(t) = 1 (the conditional-OT / rectified-flow data weight)."""

    def alpha(self, t: Tensor) -> Tensor:
        return t

    def d_alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)


class CosineSchedule:
    """alpha(t) = sin(pi t / 2), alpha'(t) = (pi / 2) cos(pi t / 2).

    This is flow_matching's ``CosineScheduler`` (alpha_t = sin(pi t / 2), sigma_t = cos(pi t / 2)),
    rising from 0 to 1. MDLM's cosine schedule, in MDLM's time (t = 0 is the data), is the same
    curve read backwards with a floor: alpha_MDLM(t) = eps + (1 - eps) cos(pi t / 2), and
    cos(pi t / 2) is this alpha at 1 - t.
    """

    def alpha(self, t: Tensor) -> Tensor:
        return torch.sin(0.5 * math.pi * t)

    def d_alpha(self, t: Tensor) -> Tensor:
        return 0.5 * math.pi * torch.cos(0.5 * math.pi * t)


class LogLinearSchedule:
    """MDLM's log-linear schedule: alpha(t) = 1 - (1 - eps) t, alpha'(t) = -(1 - eps).

    The name comes from the total noise sigma(t) = -log alpha(t) = -log(1 - (1 - eps) t); the keep
    probability falls linearly from 1 at t = 0 to eps at t = 1 (eps > 0 keeps the t = 1 loss
    weight -alpha' / (1 - alpha) finite).
    """

    def __init__(self, eps: float = 1e-3):
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"eps must be in [0, 1), got {eps}")
        self.eps = float(eps)

    def alpha(self, t: Tensor) -> Tensor:
        return 1.0 - (1.0 - self.eps) * t

    def d_alpha(self, t: Tensor) -> Tensor:
        return torch.full_like(t, -(1.0 - self.eps))

    def __repr__(self) -> str:
        return f"LogLinearSchedule(eps={self.eps})"


class MaskingCosineSchedule:
    """MDLM's cosine schedule, falling: alpha(t) = eps + (1 - eps) cos(pi t / 2),
    alpha'(t) = -(1 - eps) (pi / 2) sin(pi t / 2).

    The keep probability is 1 at t = 0 and eps at t = 1; the ELBO weight -alpha' / (1 - alpha)
    behaves like 2 / t near t = 0 (the log-linear schedule's is 1 / t).
    """

    def __init__(self, eps: float = 1e-3):
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"eps must be in [0, 1), got {eps}")
        self.eps = float(eps)

    def alpha(self, t: Tensor) -> Tensor:
        return self.eps + (1.0 - self.eps) * torch.cos(0.5 * math.pi * t)

    def d_alpha(self, t: Tensor) -> Tensor:
        return -(1.0 - self.eps) * 0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    def __repr__(self) -> str:
        return f"MaskingCosineSchedule(eps={self.eps})"
