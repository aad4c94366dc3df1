import math

import pytest
import torch
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from genlab.flow.objectives import flow_matching_loss
from genlab.flow.paths import CondOTPath, CosinePath

torch.set_num_threads(1)


class Linear(torch.nn.Module):
    def __init__(self, d=3):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(d, d, generator=g, dtype=torch.float64))

    def forward(self, x, t, label=None):  # x: (B, d)
        out = x @ self.w + t[:, None]
        return out if label is None else out + label[:, None].to(x.dtype)


def _data(n=16, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64) + 1


def test_loss_is_mse_to_straight_line_velocity():
    model = Linear()
    x0, x1 = _data()
    t = torch.rand(16, dtype=torch.float64)
    loss, metrics = flow_matching_loss(model, x0, x1, CondOTPath(), t=t)
    x_t = t[:, None] * x1 + (1 - t[:, None]) * x0  # written out by hand, not through the path
    ref = ((model(x_t, t) - (x1 - x0)) ** 2).mean()
    torch.testing.assert_close(loss, ref)
    assert loss.ndim == 0 and not metrics["fm_loss"].requires_grad
    loss.backward()
    assert model.w.grad is not None and model.w.grad.abs().sum() > 0


def test_cosine_path_target():
    model = Linear()
    x0, x1 = _data(seed=1)
    t = torch.full((16,), 1 / 3, dtype=torch.float64)
    loss, _ = flow_matching_loss(model, x0, x1, CosinePath(), t=t)
    a, s = math.sin(math.pi / 6), math.cos(math.pi / 6)
    target = 0.5 * math.pi * (s * x1 - a * x0)
    ref = ((model(a * x1 + s * x0, t) - target) ** 2).mean()
    torch.testing.assert_close(loss, ref)


def test_ot_coupling_reorders_data_and_its_labels():
    model = Linear()
    x0, x1 = _data(seed=2)
    labels = torch.arange(16)
    t = torch.rand(16, dtype=torch.float64)
    loss, metrics = flow_matching_loss(model, x0, x1, CondOTPath(), t=t, coupling="exact", label=labels)
    _, perm = linear_sum_assignment(cdist(x0.numpy(), x1.numpy(), "sqeuclidean"))
    x1p, lp = x1[perm], labels[perm]
    x_t = t[:, None] * x1p + (1 - t[:, None]) * x0
    ref = ((model(x_t, t, label=lp) - (x1p - x0)) ** 2).mean()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(metrics["pair_sq_dist"], (x1p - x0).pow(2).sum(1).mean())
    _, m_none = flow_matching_loss(model, x0, x1, CondOTPath(), t=t, label=labels)
    assert metrics["pair_sq_dist"] < m_none["pair_sq_dist"]


def test_sampled_times_follow_generator():
    model = Linear()
    x0, x1 = _data()
    a, _ = flow_matching_loss(model, x0, x1, CondOTPath(), generator=torch.Generator().manual_seed(3))
    b, _ = flow_matching_loss(model, x0, x1, CondOTPath(), generator=torch.Generator().manual_seed(3))
    c, _ = flow_matching_loss(
        model, x0, x1, CondOTPath(), time_sampler="logit_normal", generator=torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    with pytest.raises(ValueError):
        flow_matching_loss(model, x0, x1, CondOTPath(), time_sampler="cubic")
