"""Exact log-likelihood of a flow-matching model seen as a continuous normalising flow.

Instantaneous change of variables (Chen et al. 2018): along dx/dt = v(x, t),
    d/dt log p_t(x_t) = -div v(x_t, t).
Integrating from the data (t = 1) back to the source (t = 0):
    log p_1(x_1) = log p_0(x_0) - int_0^1 div v(x_t, t) dt.
We solve the augmented ODE for z = [x, l] with dl/dt = div v and l(1) = 0, backwards from
t = 1 to t = 0; then l(0) = -int_0^1 div v dt and log p_1(x_1) = log p_0(x_0) + l(0).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from genlab.flow.solvers import solve_ode


def standard_normal_log_prob(x: Tensor) -> Tensor:
    """log N(x; 0, I) summed over all but the batch dim: (B, *dims) -> (B,)."""
    return -0.5 * (x.pow(2) + math.log(2 * math.pi)).flatten(1).sum(dim=1)


def bits_per_dim(log_prob: Tensor, dim: int) -> Tensor:
    """Negative log-likelihood in bits per dimension: -log p / (dim * ln 2).

    `log_prob` must be the density of the data *as the model sees it*; for images scaled
    from {0..255} to [-1, 1], add dim * log(127.5) to log_prob first (change of units),
    and dequantise the pixels, to get numbers comparable with the literature.
    """
    return -log_prob / (dim * math.log(2.0))


def _exact_divergence(v: Tensor, x: Tensor) -> Tensor:
    """Trace of dv/dx by one backward pass per dimension: (B, D), (B, D) -> (B,). Low D only."""
    div = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
    for i in range(x.shape[1]):
        (grad_i,) = torch.autograd.grad(v[:, i].sum(), x, retain_graph=True, allow_unused=True)  # (B, D)
        if grad_i is not None:  # None: v does not depend on x at all
            div = div + grad_i[:, i]
    return div


def _hutchinson_divergence(v: Tensor, x: Tensor, eps: Tensor) -> Tensor:
    """Unbiased estimate eps^T (dv/dx) eps with one vector-Jacobian product: (B, D) -> (B,)."""
    (vjp,) = torch.autograd.grad((v * eps).sum(), x, allow_unused=True)  # (B, D) = eps^T J per sample
    if vjp is None:
        return torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
    return (vjp * eps).sum(dim=1)


class _AugmentedDynamics:
    """Velocity of the augmented state z = [x (flattened), l]: returns [v, div v], (B, D + 1)."""

    def __init__(self, model: Callable[..., Tensor], shape: tuple[int, ...], eps: Tensor | None, extras: dict):
        self.model, self.shape, self.eps, self.extras = model, shape, eps, extras

    def __call__(self, z: Tensor, t: Tensor) -> Tensor:
        with torch.enable_grad():  # the divergence needs autograd even inside no_grad solves
            x = z[:, :-1].detach().requires_grad_(True)  # (B, D)
            v = self.model(x.reshape(-1, *self.shape), t, **self.extras).reshape(x.shape)  # (B, D)
            if not v.requires_grad:  # velocity that ignores x: zero divergence
                div = torch.zeros_like(v[:, 0])
            elif self.eps is None:
                div = _exact_divergence(v, x)
            else:
                div = _hutchinson_divergence(v, x, self.eps)
        return torch.cat([v.detach(), div.detach()[:, None]], dim=1)


def log_likelihood(
    model: Callable[..., Tensor],
    x1: Tensor,
    source_log_prob: Callable[[Tensor], Tensor] = standard_normal_log_prob,
    method: str = "dopri5",
    steps: int = 100,
    divergence: str = "exact",
    noise: str = "rademacher",
    atol: float = 1e-5,
    rtol: float = 1e-5,
    generator: torch.Generator | None = None,
    **extras,
) -> Tensor:
    """Natural-log density log p_1(x1) of the flow defined by `model`, shape (B,).

    x1: data batch (B, *dims). source_log_prob: log p_0 of the source, (B, *dims) -> (B,).
    method/steps/atol/rtol: as in `solve_ode` (the solve runs from t = 1 to t = 0).
    divergence: "exact" (D backward passes per model call: fine for low-dimensional data)
    or "hutchinson" (one pass; an unbiased estimate using one noise vector per sample,
    Rademacher or Gaussian per `noise`, held fixed over the whole solve as FFJORD does).
    Extras go to the model untouched. No gradient flows back to the model's parameters.
    """
    shape = tuple(x1.shape[1:])
    x_flat = x1.reshape(x1.shape[0], -1)  # (B, D)
    if divergence == "exact":
        eps = None
    elif divergence == "hutchinson":
        gen_device = generator.device if generator is not None else x1.device
        if noise == "rademacher":
            eps = torch.randint(0, 2, x_flat.shape, generator=generator, device=gen_device) * 2 - 1
        elif noise == "gaussian":
            eps = torch.randn(x_flat.shape, generator=generator, device=gen_device)
        else:
            raise ValueError(f"unknown Hutchinson noise {noise!r}; choose 'rademacher' or 'gaussian'")
        eps = eps.to(device=x1.device, dtype=x1.dtype)  # (B, D), fixed for the whole solve
    else:
        raise ValueError(f"unknown divergence {divergence!r}; choose 'exact' or 'hutchinson'")

    z1 = torch.cat([x_flat, torch.zeros_like(x_flat[:, :1])], dim=1)  # (B, D + 1), l(1) = 0
    dynamics = _AugmentedDynamics(model, shape, eps, extras)
    z0 = solve_ode(dynamics, z1, method=method, steps=steps, t0=1.0, t1=0.0, atol=atol, rtol=rtol).x
    x0 = z0[:, :-1].reshape(x1.shape)
    return source_log_prob(x0) + z0[:, -1]
