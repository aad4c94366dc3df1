"""Path energy and straightness against closed forms for straight and curved paths."""

import math

import pytest
import torch

from genlab.eval.trajectories import normalized_path_energy, path_length, straightness

torch.set_num_threads(1)


def line(x0, x1, times, schedule=lambda s: s):
    """(T, B, D) path x0 + schedule(s) (x1 - x0) with s the time rescaled to [0, 1]."""
    s = (times - times[0]) / (times[-1] - times[0])
    return x0[None] + schedule(s)[:, None, None] * (x1 - x0)[None]


def test_straight_constant_speed_path_is_exactly_zero_and_one():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g)
    for times in [torch.linspace(0, 1, 11), torch.linspace(0.5, 2.5, 7), torch.tensor([0.0, 0.1, 0.7, 1.0])]:
        traj = line(x0, x1, times)
        assert normalized_path_energy(traj, times) == pytest.approx(0.0, abs=1e-12)
        assert straightness(traj, times) == pytest.approx(1.0, abs=1e-12)


def test_straight_but_accelerating_path_costs_energy_only():
    # x(t) = x0 + t^2 (x1 - x0): int_0^1 ||2 t d||^2 dt = 4/3 ||d||^2, so E = 1/3.
    x0 = torch.zeros(3, 2, dtype=torch.float64)
    x1 = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    times = torch.linspace(0, 1, 2001, dtype=torch.float64)
    traj = line(x0, x1, times, schedule=lambda s: s**2)
    assert normalized_path_energy(traj, times) == pytest.approx(1 / 3, abs=1e-6)
    assert straightness(traj, times) == pytest.approx(1.0, abs=1e-12)


def test_semicircle_closed_forms():
    # x(t) = (-cos pi t, sin pi t): chord 2, arc pi, speed pi => E = pi^2 / 4 - 1.
    times = torch.linspace(0, 1, 4001, dtype=torch.float64)
    traj = torch.stack([-torch.cos(math.pi * times), torch.sin(math.pi * times)], -1)[:, None]  # (T, 1, 2)
    assert path_length(traj).item() == pytest.approx(math.pi, rel=1e-6)
    assert straightness(traj, times) == pytest.approx(2 / math.pi, rel=1e-6)
    assert normalized_path_energy(traj, times) == pytest.approx(math.pi**2 / 4 - 1, rel=1e-5)


def test_curved_paths_score_worse_than_straight_ones():
    times = torch.linspace(0, 1, 101)
    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(32, 2, generator=g), torch.randn(32, 2, generator=g)
    straight = line(x0, x1, times)
    bump = torch.sin(math.pi * times)[:, None, None] * torch.tensor([0.0, 1.0])  # (T, 1, 2)
    curved = straight + bump
    assert normalized_path_energy(curved, times) > 0.05
    assert straightness(curved, times) < 0.99


def test_reference_cost_and_validation():
    times = torch.linspace(0, 1, 5)
    traj = line(torch.zeros(2, 1), torch.tensor([[1.0], [3.0]]), times)
    # Endpoint cost is mean(1, 9) = 5; pretending the OT cost were 2.5 doubles the energy ratio.
    assert normalized_path_energy(traj, times, reference_cost=5.0) == pytest.approx(0.0, abs=1e-12)
    assert normalized_path_energy(traj, times, reference_cost=2.5) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="increasing"):
        normalized_path_energy(traj, times.flip(0))
    with pytest.raises(ValueError, match="shape"):
        straightness(traj[:, 0], times)
