"""Built-in 2-D distributions for flow-matching experiments.

Every sampler draws with torch's RNG only (an explicit ``torch.Generator`` when
given), so a fixed generator state gives the same points on every machine.
All distributions are scaled to live roughly in the box [-4.5, 4.5]^2, so a
model trained on one can be pointed at another without re-tuning.

    >>> g = torch.Generator().manual_seed(0)
    >>> sample_toy2d("moons", 512, generator=g).shape
    torch.Size([512, 2])
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

__all__ = ["TOY2D_NAMES", "sample_toy2d", "has_log_prob", "toy2d_log_prob", "Toy2DSource"]

# Geometry of each distribution, exposed so tests and docs can refer to it.
EIGHT_GAUSSIANS_RADIUS = 3.5
EIGHT_GAUSSIANS_STD = 0.35
CIRCLE_RADII = (3.5, 1.75)
CHECKER_CELL = 2.0  # 4 x 4 board of 2 x 2 cells covering [-4, 4]^2, 8 of them filled


def _randn(n: int, d: int, g: torch.Generator | None) -> Tensor:
    device = g.device if g is not None else None
    return torch.randn(n, d, generator=g, device=device)


def _rand(n: int, g: torch.Generator | None) -> Tensor:
    device = g.device if g is not None else None
    return torch.rand(n, generator=g, device=device)


def _randint(high: int, n: int, g: torch.Generator | None) -> Tensor:
    device = g.device if g is not None else None
    return torch.randint(0, high, (n,), generator=g, device=device)


def _eight_gaussians(n: int, g: torch.Generator | None) -> Tensor:
    """Equal mixture of 8 isotropic Gaussians centred on a circle."""
    k = _randint(8, n, g)
    angle = k.float() * (2 * math.pi / 8)
    centers = EIGHT_GAUSSIANS_RADIUS * torch.stack([angle.cos(), angle.sin()], dim=1)  # (n, 2)
    return centers + EIGHT_GAUSSIANS_STD * _randn(n, 2, g)


def _moons(n: int, g: torch.Generator | None) -> Tensor:
    """Two interleaved half circles (sklearn's make_moons), centred and scaled by 2.5."""
    upper = _randint(2, n, g).bool()
    theta = math.pi * _rand(n, g)
    outer = torch.stack([theta.cos(), theta.sin()], dim=1)  # upper moon
    inner = torch.stack([1 - theta.cos(), 0.5 - theta.sin()], dim=1)  # lower moon, shifted
    x = torch.where(upper[:, None], outer, inner)
    x = x + 0.1 * _randn(n, 2, g)
    # The pair spans x in [-1, 2], y in [-0.5, 1]; move its centre to the origin.
    return 2.5 * (x - torch.tensor([0.5, 0.25], device=x.device))


def _checkerboard(n: int, g: torch.Generator | None) -> Tensor:
    """Uniform on the 8 'black' cells of a 4 x 4 board over [-4, 4]^2.

    Cell (i, j) (column i, row j, both in 0..3) is filled when i + j is even.
    """
    i = _randint(4, n, g)
    j = 2 * _randint(2, n, g) + i % 2  # same parity as i, so i + j is even
    cell = torch.stack([i, j], dim=1).float()  # (n, 2)
    within = torch.stack([_rand(n, g), _rand(n, g)], dim=1)  # (n, 2) uniform in the cell
    return -4.0 + CHECKER_CELL * (cell + within)


def _spirals(n: int, g: torch.Generator | None) -> Tensor:
    """Two interleaved Archimedean spiral arms (r = theta), 1.5 turns each."""
    theta = _rand(n, g).sqrt() * 3 * math.pi  # sqrt: uniform density along the arm
    arm = torch.stack([-theta.cos() * theta, theta.sin() * theta], dim=1)  # (n, 2)
    sign = 2 * _randint(2, n, g).float() - 1  # second arm is the first rotated by pi
    x = sign[:, None] * arm + 0.3 * _randn(n, 2, g)
    return x / 3.0


def _circles(n: int, g: torch.Generator | None) -> Tensor:
    """Two concentric rings (radii 3.5 and 1.75), half the points on each."""
    outer = _randint(2, n, g).bool()
    radius = torch.where(outer, CIRCLE_RADII[0], CIRCLE_RADII[1])
    phi = 2 * math.pi * _rand(n, g)
    x = radius[:, None] * torch.stack([phi.cos(), phi.sin()], dim=1)
    return x + 0.1 * _randn(n, 2, g)


def _normal(n: int, g: torch.Generator | None) -> Tensor:
    """Standard normal N(0, I_2)."""
    return _randn(n, 2, g)


_SAMPLERS: dict[str, Callable[[int, torch.Generator | None], Tensor]] = {
    "8gaussians": _eight_gaussians,
    "moons": _moons,
    "checkerboard": _checkerboard,
    "spirals": _spirals,
    "circles": _circles,
    "normal": _normal,
}
TOY2D_NAMES: tuple[str, ...] = tuple(_SAMPLERS)


def _check_name(name: str) -> None:
    if name not in _SAMPLERS:
        raise ValueError(f"unknown 2-D distribution {name!r}; choose one of {', '.join(TOY2D_NAMES)}")


def sample_toy2d(
    name: str,
    n: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw ``n`` points from the 2-D distribution ``name``; returns (n, 2) float32.

    The draw happens on the generator's device (CPU when no generator is given,
    using torch's global RNG) and the result is then moved to ``device``. The
    same generator state always gives the same points.
    """
    _check_name(name)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    x = _SAMPLERS[name](n, generator)
    return x.to(device=device, dtype=torch.float32)


def _normal_log_prob(x: Tensor) -> Tensor:
    return -0.5 * x.square().sum(-1) - math.log(2 * math.pi)


def _eight_gaussians_log_prob(x: Tensor) -> Tensor:
    angle = torch.arange(8, device=x.device, dtype=x.dtype) * (2 * math.pi / 8)
    centers = EIGHT_GAUSSIANS_RADIUS * torch.stack([angle.cos(), angle.sin()], dim=1)  # (8, 2)
    var = EIGHT_GAUSSIANS_STD**2
    sq = (x[:, None, :] - centers[None]).square().sum(-1)  # (N, 8)
    return torch.logsumexp(-sq / (2 * var), dim=1) - math.log(8 * 2 * math.pi * var)


def _checkerboard_log_prob(x: Tensor) -> Tensor:
    cell = torch.floor((x + 4.0) / CHECKER_CELL)  # (N, 2) column, row
    inside = ((x >= -4.0) & (x <= 4.0)).all(-1) & ((cell.sum(-1) % 2) == 0)
    log_area = math.log(8 * CHECKER_CELL**2)  # uniform over 8 cells of area 4
    return torch.where(inside, torch.full_like(x[:, 0], -log_area), torch.full_like(x[:, 0], -math.inf))


# Distributions whose density has a closed form (the others are noisy curves).
_LOG_PROBS: dict[str, Callable[[Tensor], Tensor]] = {
    "normal": _normal_log_prob,
    "8gaussians": _eight_gaussians_log_prob,
    "checkerboard": _checkerboard_log_prob,
}


def has_log_prob(name: str) -> bool:
    """Whether ``toy2d_log_prob`` knows the exact density of ``name``."""
    _check_name(name)
    return name in _LOG_PROBS


def toy2d_log_prob(name: str, x: Tensor) -> Tensor:
    """Exact log density (natural log) of ``name`` at points x (N, 2) -> (N,).

    Available for "normal", "8gaussians" and "checkerboard" (-inf off the
    board's filled cells); other names raise ValueError.
    """
    if not has_log_prob(name):
        raise ValueError(f"no closed-form density for {name!r}; available: {', '.join(_LOG_PROBS)}")
    if x.dim() != 2 or x.shape[1] != 2:
        raise ValueError(f"x must have shape (N, 2), got {tuple(x.shape)}")
    return _LOG_PROBS[name](x)


class Toy2DSource:
    """Endless batches of (x0 ~ source, x1 ~ target) pairs for the training engine.

    Pairs are independent draws; a coupling (e.g. minibatch OT) is applied later
    by the objective. The source owns one CPU ``torch.Generator`` seeded with
    ``seed + 1000 * rank``, so each data-parallel rank sees different data, and
    ``state_dict`` / ``load_state_dict`` save and restore that generator so a
    resumed run draws exactly the batches it would have drawn.
    """

    def __init__(self, source: str, target: str, seed: int, rank: int = 0) -> None:
        _check_name(source)
        _check_name(target)
        self.source, self.target = source, target
        self.generator = torch.Generator().manual_seed(seed + 1000 * rank)

    def next_batch(self, n: int) -> dict[str, Tensor]:
        """Return ``{"x0": (n, 2), "x1": (n, 2)}`` float32 CPU tensors."""
        x0 = sample_toy2d(self.source, n, generator=self.generator)
        x1 = sample_toy2d(self.target, n, generator=self.generator)
        return {"x0": x0, "x1": x1}

    def state_dict(self) -> dict[str, Tensor]:
        """The generator state as a uint8 tensor (safe to store with safetensors)."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state["generator"].to(device="cpu", dtype=torch.uint8))

    def __repr__(self) -> str:
        return f"Toy2DSource(source={self.source!r}, target={self.target!r})"
