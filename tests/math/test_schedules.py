"""Schedules: d_alpha is the time derivative of alpha; flow's paths are schedules with the same numbers."""

import math

import pytest
import torch

from genlab.flow.paths import CondOTPath, CosinePath, VPPath
from genlab.math.schedules import CosineSchedule, LinearSchedule, LogLinearSchedule, Schedule

SCHEDULES = [LinearSchedule(), CosineSchedule(), LogLinearSchedule(), LogLinearSchedule(eps=0.1),
             CondOTPath(sigma_min=0.1), CosinePath(), VPPath()]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: type(s).__name__)
def test_d_alpha_is_the_autograd_derivative(schedule):
    assert isinstance(schedule, Schedule)
    t = torch.rand(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64).requires_grad_()
    (grad,) = torch.autograd.grad(schedule.alpha(t).sum(), t)
    torch.testing.assert_close(schedule.d_alpha(t.detach()), grad, rtol=1e-12, atol=1e-12)
    assert schedule.d_alpha(t.detach()).shape == t.shape


def test_closed_forms_and_endpoints():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(LinearSchedule().alpha(t), t)
    torch.testing.assert_close(CosineSchedule().alpha(t), torch.sin(math.pi * t / 2))
    ll = LogLinearSchedule(eps=1e-3)
    torch.testing.assert_close(ll.alpha(t), 1 - (1 - 1e-3) * t)
    assert ll.alpha(t)[0].item() == 1.0 and ll.alpha(t)[-1].item() == pytest.approx(1e-3)
    with pytest.raises(ValueError):
        LogLinearSchedule(eps=1.0)


def test_flow_paths_take_alpha_from_the_shared_schedules_bit_for_bit():
    t = torch.rand(5, 3, generator=torch.Generator().manual_seed(1))
    for path, schedule in [(CondOTPath(sigma_min=0.2), LinearSchedule()), (CosinePath(), CosineSchedule())]:
        assert torch.equal(path.alpha(t), schedule.alpha(t))
        assert torch.equal(path.d_alpha(t), schedule.d_alpha(t))
    # the numbers flow matching used before the schedules moved to genlab.math
    assert torch.equal(CondOTPath().alpha(t), t) and torch.equal(CondOTPath().d_alpha(t), torch.ones_like(t))
    assert torch.equal(CosinePath().alpha(t), torch.sin(0.5 * math.pi * t))
    assert torch.equal(CosinePath().d_alpha(t), 0.5 * math.pi * torch.cos(0.5 * math.pi * t))
