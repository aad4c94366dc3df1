import math

import numpy as np
import pytest
import torch

from genlab.flow.solvers import STAGES, solve_ode

torch.set_num_threads(1)


def cos_field(x, t):
    """y' = cos(t) y, so y(t) = y(t0) exp(sin t - sin t0)."""
    return torch.cos(t)[:, None, None] * x


def _y0():
    return torch.tensor([[[1.0, -2.0]], [[0.5, 3.0]]], dtype=torch.float64)  # (B=2, 1, 2)


def _exact(y0, t0, t1):
    return y0 * math.exp(math.sin(t1) - math.sin(t0))


@pytest.mark.parametrize("method,order", [("euler", 1), ("midpoint", 2), ("heun", 2), ("rk4", 4)])
def test_observed_order_of_accuracy(method, order):
    y0 = _y0()
    steps = np.array([16, 32, 64, 128])
    errors = []
    for n in steps:
        res = solve_ode(cos_field, y0, method=method, steps=int(n), t0=0.0, t1=1.0)
        errors.append((res.x - _exact(y0, 0.0, 1.0)).abs().max().item())
        assert res.nfe == n * STAGES[method]
    slope = np.polyfit(np.log(1.0 / steps), np.log(errors), 1)[0]
    assert slope == pytest.approx(order, abs=0.15)


def test_dopri5_meets_tolerance_both_ways():
    y0 = _y0()
    fwd = solve_ode(cos_field, y0, method="dopri5", t0=0.0, t1=2.0, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(fwd.x, _exact(y0, 0.0, 2.0), rtol=1e-7, atol=1e-7)
    assert fwd.nfe > 6 and fwd.trajectory is None
    assert fwd.times.tolist() == [0.0, 2.0]
    loose = solve_ode(cos_field, y0, method="dopri5", t0=0.0, t1=2.0, atol=1e-3, rtol=1e-3)
    assert loose.nfe < fwd.nfe  # tighter tolerance costs more calls
    back = solve_ode(cos_field, fwd.x, method="dopri5", t0=2.0, t1=0.0, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(back.x, y0, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("method", ["euler", "rk4", "dopri5"])
def test_backward_inverts_forward(method):
    y0 = _y0()
    kw = dict(steps=200, atol=1e-10, rtol=1e-10)
    x1 = solve_ode(cos_field, y0, method=method, t0=0.0, t1=1.0, **kw).x
    back = solve_ode(cos_field, x1, method=method, t0=1.0, t1=0.0, **kw)
    tol = 1e-2 if method == "euler" else 1e-8
    torch.testing.assert_close(back.x, y0, rtol=tol, atol=tol)
    # backwards from the exact end point recovers the start (not just an inverse of our own error)
    back_exact = solve_ode(cos_field, _exact(y0, 0.0, 1.0), method=method, t0=1.0, t1=0.0, **kw)
    torch.testing.assert_close(back_exact.x, y0, rtol=tol, atol=tol)


def test_extras_reach_model_and_t_is_batched():
    seen = []

    def model(x, t, scale, label=None):
        assert t.shape == (x.shape[0],) and t.dtype == x.dtype
        seen.append((scale, label))
        return scale * torch.ones_like(x)

    x = torch.zeros(3, 4)
    res = solve_ode(model, x, method="heun", steps=5, scale=2.0, label="cat")
    torch.testing.assert_close(res.x, torch.full((3, 4), 2.0))  # dx/dt = 2 over [0, 1]
    assert res.nfe == 10 and set(seen) == {(2.0, "cat")}
    res = solve_ode(model, x, method="dopri5", scale=-1.0)
    torch.testing.assert_close(res.x, torch.full((3, 4), -1.0))
    assert res.nfe == len(seen) - 10 and seen[-1] == (-1.0, None)


def test_low_precision_state_keeps_float32_time():
    times = []

    def model(x, t):
        times.append(t)
        return -x

    for method in ("rk4", "dopri5"):
        res = solve_ode(model, torch.ones(2, 3, dtype=torch.bfloat16), method=method, steps=20)
        assert res.x.dtype == torch.bfloat16 and times[-1].dtype == torch.float32
        assert res.x.float().mean().item() == pytest.approx(math.exp(-1), abs=1e-2)
    # 0.05-spaced times survive exactly enough in float32 (bfloat16 would round 0.95 to 0.9492)
    assert any(abs(t[0].item() - 0.95) < 1e-6 for t in times)


def test_trajectory_and_time_grid():
    y0 = _y0()
    res = solve_ode(cos_field, y0, method="rk4", steps=10, return_trajectory=True)
    assert res.trajectory.shape == (11, *y0.shape) and res.times.shape == (11,)
    for i in (0, 5, 10):
        torch.testing.assert_close(res.trajectory[i], _exact(y0, 0.0, res.times[i].item()), rtol=1e-6, atol=1e-6)
    # non-uniform grid: finer near the end; the grid's ends replace t0/t1
    grid = torch.tensor([0.0, 0.5, 0.8, 0.9, 1.0], dtype=torch.float64)
    res = solve_ode(cos_field, y0, method="midpoint", time_grid=grid, t0=99.0, return_trajectory=True)
    assert res.nfe == 8 and torch.equal(res.times, grid)
    torch.testing.assert_close(res.x, _exact(y0, 0.0, 1.0), rtol=2e-2, atol=2e-2)
    # adaptive solver reports its trajectory on the same grid
    res = solve_ode(cos_field, y0, method="dopri5", steps=4, return_trajectory=True, atol=1e-9, rtol=1e-9)
    assert res.trajectory.shape == (5, *y0.shape)
    torch.testing.assert_close(res.trajectory[2], _exact(y0, 0.0, 0.5), rtol=1e-7, atol=1e-7)


def test_torchdiffeq_fixed_grid_method_uses_the_grid():
    y0 = _y0()
    res = solve_ode(cos_field, y0, method="heun3", steps=50)
    assert res.nfe >= 3 * 50  # it took all 50 steps, not one step from t0 to t1
    torch.testing.assert_close(res.x, _exact(y0, 0.0, 1.0), rtol=1e-5, atol=1e-5)


def test_grad_off_by_default_on_when_asked():
    w = torch.tensor(0.7, requires_grad=True)

    def model(x, t):
        return w * x

    x = torch.ones(2, 3)
    assert not solve_ode(model, x, method="euler", steps=4).x.requires_grad
    out = solve_ode(model, x, method="rk4", steps=20, enable_grad=True).x
    out.sum().backward()  # d/dw sum(exp(w) x) = 6 exp(w)
    assert w.grad.item() == pytest.approx(6 * math.exp(0.7), rel=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown ODE method"):
        solve_ode(cos_field, _y0(), method="leapfrog")
    with pytest.raises(ValueError, match="strictly"):
        solve_ode(cos_field, _y0(), time_grid=torch.tensor([0.0, 0.5, 0.5, 1.0]))
