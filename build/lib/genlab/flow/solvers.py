"""ODE solvers for velocity models: hand-written fixed-grid Runge-Kutta and torchdiffeq's adaptive ones.

A velocity model is any callable `model(x, t, **extras) -> v` with x of shape (B, *dims)
and t of shape (B,). `solve_ode` integrates dx/dt = model(x, t) from t0 to t1 (either
direction: t0 > t1 runs backwards, which the likelihood needs) and counts every model
call (NFE). Extras (class labels, guidance scale, ...) are handed to the model untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torchdiffeq
from torch import Tensor

# f(t, x) -> dx/dt, with t a 0-dim tensor: the form the steppers and torchdiffeq use.
Dynamics = Callable[[Tensor, Tensor], Tensor]


@dataclass
class SolveResult:
    x: Tensor  # (B, *dims) state at the last time
    trajectory: Tensor | None  # (T, B, *dims) states at `times`, if asked for
    times: Tensor  # (T,) times of `trajectory`; without one, the grid (hand-written methods) or its ends
    nfe: int  # number of model calls


class CountingModel:
    """Wraps a velocity model as f(t, x): broadcasts scalar t to (B,), passes extras, counts calls."""

    def __init__(self, model: Callable[..., Tensor], **extras):
        self.model = model
        self.extras = extras
        self.nfe = 0

    def __call__(self, t: Tensor, x: Tensor) -> Tensor:
        self.nfe += 1
        # t keeps at least float32 precision even when the state is half / bfloat16
        t_batch = t.to(device=x.device, dtype=_time_dtype(x)).expand(x.shape[0])  # (B,)
        return self.model(x, t_batch, **self.extras)


# ---- fixed-grid steppers: one step of size dt from (t, x) ------------------------------


def euler_step(f: Dynamics, t: Tensor, dt: Tensor, x: Tensor) -> Tensor:
    return x + dt * f(t, x)


def midpoint_step(f: Dynamics, t: Tensor, dt: Tensor, x: Tensor) -> Tensor:
    x_half = x + 0.5 * dt * f(t, x)
    return x + dt * f(t + 0.5 * dt, x_half)


def heun_step(f: Dynamics, t: Tensor, dt: Tensor, x: Tensor) -> Tensor:
    # Explicit trapezoid: average the slopes at both ends of an Euler predictor.
    k1 = f(t, x)
    k2 = f(t + dt, x + dt * k1)
    return x + 0.5 * dt * (k1 + k2)


def rk4_step(f: Dynamics, t: Tensor, dt: Tensor, x: Tensor) -> Tensor:
    k1 = f(t, x)
    k2 = f(t + 0.5 * dt, x + 0.5 * dt * k1)
    k3 = f(t + 0.5 * dt, x + 0.5 * dt * k2)
    k4 = f(t + dt, x + dt * k3)
    return x + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)


FIXED_STEPPERS = {"euler": euler_step, "midpoint": midpoint_step, "heun": heun_step, "rk4": rk4_step}
STAGES = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}  # model calls per step
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")  # torchdiffeq, atol/rtol


def _time_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _time_grid(t0: float, t1: float, steps: int, time_grid: Tensor | None, x: Tensor) -> Tensor:
    if time_grid is not None:
        grid = torch.as_tensor(time_grid).to(device=x.device, dtype=_time_dtype(x)).flatten()
        if grid.numel() < 2:
            raise ValueError("time_grid needs at least two times")
        d = grid[1:] - grid[:-1]
        if not (bool((d > 0).all()) or bool((d < 0).all())):
            raise ValueError("time_grid must be strictly increasing or strictly decreasing")
        return grid
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if t0 == t1:
        raise ValueError("t0 and t1 must differ")
    return torch.linspace(t0, t1, steps + 1, device=x.device, dtype=_time_dtype(x))


def solve_ode(
    model: Callable[..., Tensor],
    x_init: Tensor,
    method: str = "euler",
    steps: int = 100,
    t0: float = 0.0,
    t1: float = 1.0,
    time_grid: Tensor | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    return_trajectory: bool = False,
    enable_grad: bool = False,
    **extras,
) -> SolveResult:
    """Integrate dx/dt = model(x, t, **extras) from x(t0) = x_init to t1.

    method: "euler", "midpoint", "heun", "rk4" step on the grid linspace(t0, t1, steps + 1)
    (or on `time_grid`, whose first/last entries then replace t0/t1); NFE is steps * stages.
    Any other name ("dopri5", "bosh3", "dopri8", ...) is handed to torchdiffeq.odeint with
    atol/rtol; its trajectory is reported at the same grid, or only at the ends.
    Gradients are off unless enable_grad=True (e.g. to backpropagate through the solve).
    """
    f = CountingModel(model, **extras)
    grid = _time_grid(t0, t1, steps, time_grid, x_init)  # (T,)
    with torch.set_grad_enabled(enable_grad):
        if method in FIXED_STEPPERS:
            step = FIXED_STEPPERS[method]
            x, states = x_init, [x_init]
            for i in range(grid.numel() - 1):
                x = step(f, grid[i], grid[i + 1] - grid[i], x)
                if return_trajectory:
                    states.append(x)
            trajectory = torch.stack(states) if return_trajectory else None
            return SolveResult(x=x, trajectory=trajectory, times=grid, nfe=f.nfe)

        # Adaptive methods choose their own steps, so we only ask for the times we report;
        # torchdiffeq's fixed-grid methods ("heun3", "explicit_adams", ...) step on the
        # times they are given, so those always get the full grid.
        adaptive = method in ADAPTIVE_METHODS
        out_times = grid if (return_trajectory or not adaptive) else grid[[0, -1]]
        try:
            states = torchdiffeq.odeint(f, x_init, out_times, method=method, atol=atol, rtol=rtol)  # (T, B, *dims)
        except ValueError as e:
            if "Invalid method" in str(e):
                raise ValueError(
                    f"unknown ODE method {method!r}; use one of {sorted(FIXED_STEPPERS)} or a torchdiffeq method"
                    f" such as {sorted(ADAPTIVE_METHODS)}"
                ) from e
            raise
        if return_trajectory:
            return SolveResult(x=states[-1], trajectory=states, times=out_times, nfe=f.nfe)
        return SolveResult(x=states[-1], trajectory=None, times=grid[[0, -1]], nfe=f.nfe)


def known_methods() -> list[str]:
    """Every method ``solve_ode`` accepts: genlab's fixed-step solvers and torchdiffeq's."""
    try:
        from torchdiffeq._impl.odeint import SOLVERS  # the table odeint itself checks against
        extra = list(SOLVERS)
    except ImportError:  # a torchdiffeq without that table: the adaptive ones we name
        extra = list(ADAPTIVE_METHODS)
    return sorted(set(FIXED_STEPPERS) | set(extra))
