"""Probability paths for flow matching, and samplers for the time t.

Conventions used everywhere in genlab.flow:

* time t lives in [0, 1];
* x_0 comes from the SOURCE distribution (noise, or a 2-D toy source) at t = 0;
* x_1 comes from the TARGET distribution (the data) at t = 1.

Every path here is *affine*: x_t = alpha_t * x_1 + sigma_t * x_0, with alpha_0 = 0,
sigma_0 = 1 (start at the source) and alpha_1 = 1, sigma_1 = 0 (end on the data), up to
the small offsets some schedules keep. The regression target of flow matching is the
time derivative of that sample, dx_t = alpha'_t * x_1 + sigma'_t * x_0, which is what a
velocity model v(x_t, t) learns to predict.

alpha is the data weight of ``genlab.math.schedules`` (every path is a ``Schedule``): the linear
and cosine paths take theirs from ``LinearSchedule`` and ``CosineSchedule``, which masked
diffusion for text shares.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from genlab.math.schedules import CosineSchedule, LinearSchedule, LogLinearSchedule, Schedule


@dataclass
class PathSample:
    """One draw from a path: the point x_t and its velocity dx_t at time t."""

    x_t: Tensor  # (B, *dims)
    dx_t: Tensor  # (B, *dims)  d/dt x_t, the flow-matching target
    t: Tensor  # (B,)
    x_0: Tensor  # (B, *dims)  source sample
    x_1: Tensor  # (B, *dims)  target (data) sample


def _expand_like(t: Tensor, x: Tensor) -> Tensor:
    """Reshape t of shape (B,) to (B, 1, ..., 1) so it broadcasts over x's dims."""
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
    return t.to(dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


class AffinePath:
    """x_t = alpha(t) x_1 + sigma(t) x_0. Subclasses give alpha, sigma and their derivatives.

    The four schedule functions take and return tensors of any shape (elementwise in t). A path
    is a ``genlab.math.schedules.Schedule`` (alpha, d_alpha): by default both come from the class
    attribute ``schedule``; a subclass without one (VPPath) defines them itself.
    """

    schedule: Schedule | None = None  # the data weight alpha(t); a class attribute, not a field

    def alpha(self, t: Tensor) -> Tensor:
        if self.schedule is None:
            raise NotImplementedError
        return self.schedule.alpha(t)

    def sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def d_alpha(self, t: Tensor) -> Tensor:
        if self.schedule is None:
            raise NotImplementedError
        return self.schedule.d_alpha(t)

    def d_sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def sample(self, x0: Tensor, x1: Tensor, t: Tensor) -> PathSample:
        """Point and target velocity on the path between paired x0 and x1 at times t (B,)."""
        if x0.shape != x1.shape:
            raise ValueError(f"x0 and x1 must have the same shape, got {tuple(x0.shape)} and {tuple(x1.shape)}")
        tb = _expand_like(t, x1)  # (B, 1, ..., 1)
        x_t = self.alpha(tb) * x1 + self.sigma(tb) * x0
        dx_t = self.d_alpha(tb) * x1 + self.d_sigma(tb) * x0
        return PathSample(x_t=x_t, dx_t=dx_t, t=t, x_0=x0, x_1=x1)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class CondOTPath(AffinePath):
    """Linear (conditional optimal-transport) path of Lipman et al. 2023.

    x_t = t x_1 + (1 - (1 - sigma_min) t) x_0: a straight line that ends in a Gaussian of
    width sigma_min around x_1 (sigma_min = 0 gives rectified flow / I-CFM). alpha_t = t is
    ``LinearSchedule``.
    """

    schedule = LinearSchedule()

    def __init__(self, sigma_min: float = 0.0):
        if not 0.0 <= sigma_min < 1.0:
            raise ValueError(f"sigma_min must be in [0, 1), got {sigma_min}")
        self.sigma_min = float(sigma_min)
        # sigma(t) = 1 - (1 - sigma_min) t is the falling linear schedule (MDLM's log-linear alpha)
        self._noise = LogLinearSchedule(self.sigma_min)

    def sigma(self, t: Tensor) -> Tensor:
        return self._noise.alpha(t)

    def d_sigma(self, t: Tensor) -> Tensor:
        return self._noise.d_alpha(t)


class CosinePath(AffinePath):
    """Trigonometric path: alpha_t = sin(pi t / 2) (``CosineSchedule``), sigma_t = cos(pi t / 2)
    (alpha^2 + sigma^2 = 1)."""

    schedule = CosineSchedule()

    def sigma(self, t: Tensor) -> Tensor:
        return torch.cos(0.5 * math.pi * t)

    def d_sigma(self, t: Tensor) -> Tensor:
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)


class VPPath(AffinePath):
    """Variance-preserving diffusion path written in flow-matching time (Lipman et al. 2023, eq. 19).

    With s = 1 - t (diffusion time, s = 0 is data) and T(s) = int_0^s beta(r) dr for the
    linear schedule beta(r) = beta_min + r (beta_max - beta_min):
        alpha_t = exp(-T(1 - t) / 2),   sigma_t = sqrt(1 - alpha_t^2).
    At t = 1 this is exactly the data; at t = 0 it is only *nearly* the source
    (alpha_0 = exp(-(beta_min + beta_max) / 4), about 6.6e-3 for the defaults).
    sigma'_t blows up like 1 / sqrt(1 - t) as t -> 1 (a property of the VP path, not of this
    code); we clamp sigma_t from below by `eps` in that one division so that t = 1 exactly
    gives a finite, if huge, target instead of inf/nan.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, eps: float = 1e-12):
        if not 0.0 <= beta_min <= beta_max:
            raise ValueError(f"need 0 <= beta_min <= beta_max, got {beta_min}, {beta_max}")
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)
        self.eps = float(eps)

    def _T(self, s: Tensor) -> Tensor:  # integral of beta from 0 to s
        return self.beta_min * s + 0.5 * (self.beta_max - self.beta_min) * s**2

    def _beta(self, s: Tensor) -> Tensor:
        return self.beta_min + (self.beta_max - self.beta_min) * s

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(-0.5 * self._T(1.0 - t))

    def sigma(self, t: Tensor) -> Tensor:
        # 1 - exp(-T) via expm1 keeps precision near t = 1, where T is tiny.
        return torch.sqrt(-torch.expm1(-self._T(1.0 - t)))

    def d_alpha(self, t: Tensor) -> Tensor:
        # d/dt T(1 - t) = -beta(1 - t)
        return 0.5 * self._beta(1.0 - t) * self.alpha(t)

    def d_sigma(self, t: Tensor) -> Tensor:
        # sigma^2 = 1 - alpha^2  =>  sigma' = -alpha alpha' / sigma
        return -self.alpha(t) * self.d_alpha(t) / self.sigma(t).clamp_min(self.eps)


_PATHS: dict[str, type[AffinePath]] = {
    "cond_ot": CondOTPath,
    "linear": CondOTPath,  # common alias
    "cosine": CosinePath,
    "vp": VPPath,
}


def make_path(name: str, **kw) -> AffinePath:
    """Build a path by name ("cond_ot" / "linear", "cosine", "vp"); kw go to its constructor."""
    key = name.lower().replace("-", "_")
    if key not in _PATHS:
        raise ValueError(f"unknown path {name!r}; choose one of {sorted(_PATHS)}")
    return _PATHS[key](**kw)


def sample_time(
    n: int,
    kind: str = "uniform",
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw n training times in (0, 1), shape (n,).

    "uniform": U[0, 1). "logit_normal": sigmoid(N(mean, std^2)), which puts more weight on
    the middle of the path (Esser et al. 2024, SD3); `mean`/`std` are those of logit(t).
    """
    # Draw on the generator's own device (a CPU generator cannot fill a CUDA tensor), then move.
    gen_device = generator.device if generator is not None else device
    if kind == "uniform":
        t = torch.rand(n, generator=generator, device=gen_device)
    elif kind == "logit_normal":
        t = torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=gen_device))
    else:
        raise ValueError(f"unknown time sampler {kind!r}; choose 'uniform' or 'logit_normal'")
    return t.to(device) if device is not None else t
