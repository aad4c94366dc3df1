"""MeanFlow: the identity u = v + (t_end - t) du/dt in genlab's time, its JVP, the loss and the sampler."""

import pytest
import torch

from genlab.flow.meanflow import meanflow_sample
from genlab.flow.models.dit import DiT, DiTConfig
from genlab.flow.objectives import flow_matching_loss, meanflow_loss, meanflow_target, sample_time_pairs
from genlab.flow.paths import CondOTPath

torch.set_num_threads(1)


def _dit(dtype=torch.float32, **kw) -> DiT:
    torch.manual_seed(0)
    cfg = DiTConfig(hidden=32, depth=1, heads=4, patch=2, interval_input=True, **kw)
    model = DiT.from_config(cfg, channels=2, image_size=4, num_classes=3).to(dtype)
    with torch.no_grad():  # away from the zero init, small enough to stay smooth in t
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _data(B=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(B, 2, 4, 4, generator=g, dtype=dtype)
    x1 = torch.randn(B, 2, 4, 4, generator=g, dtype=dtype)
    return x0, x1, torch.rand(B, generator=g, dtype=dtype), torch.tensor([0, 3, 2, 1])[:B]


def test_equals_flow_matching_when_t_end_is_t():
    model = _dit()
    x0, x1, t, y = _data()
    loss, metrics = meanflow_loss(model, x0, x1, t, t.clone(), y=y)
    fm, _ = flow_matching_loss(model, x0, x1, CondOTPath(), t=t, y=y, h=torch.zeros_like(t))
    torch.testing.assert_close(loss, fm, rtol=1e-5, atol=1e-6)
    assert metrics["equal_share"] == 1.0
    weighted, _ = meanflow_loss(model, x0, x1, t, t.clone(), y=y, adaptive_p=1.0)  # the paper's p = 1
    z = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * x1
    err = (model(z, t, y=y, h=torch.zeros(4)) - (x1 - x0)).flatten(1).pow(2).mean(1)
    torch.testing.assert_close(weighted, (err / (err + 1e-3)).mean(), rtol=1e-5, atol=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_jvp_target_matches_a_finite_difference_of_the_total_derivative():
    model = _dit(torch.float64)
    x0, x1, t, y = _data(dtype=torch.float64)
    t = 0.2 + 0.5 * t
    t_end = torch.clamp(t + torch.tensor([0.3, 0.0, 0.1, 0.6], dtype=torch.float64), max=1.0)
    z = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * x1
    v = torch.randn_like(z)  # any flow direction: the identity is about du/dt along dz/dt = v
    u, dudt, target = meanflow_target(model, z, t, t_end, v, y)
    eps = 1e-6  # move along the flow: z + e v, t + e, with t_end fixed (h - e)
    h = t_end - t
    up = model(z + eps * v, t + eps, y=y, h=h - eps)
    down = model(z - eps * v, t - eps, y=y, h=h + eps)
    torch.testing.assert_close(dudt, (up - down) / (2 * eps), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(target, v + h[:, None, None, None] * dudt)
    torch.testing.assert_close(u, model(z, t, y=y, h=h))
    assert u.requires_grad and not target.requires_grad and not dudt.requires_grad


class LinearInTime(torch.nn.Module):
    """u(z, t, h) = a + b (t + h / 2): the exact average of the field v(z, tau) = a + b tau over [t, t + h]."""

    def __init__(self, a, b, h_weight=0.5):
        super().__init__()
        self.a, self.b, self.h_weight = a, b, h_weight
        self.w = torch.nn.Parameter(torch.ones(()))  # something for autograd to hold on to

    def forward(self, z, t, y=None, h=None):
        s = (t + self.h_weight * h)[:, None]
        return self.w * (self.a + self.b * s).expand_as(z)


def test_target_is_exact_on_a_linear_in_time_field():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, generator=g), torch.randn(5, generator=g)
    z = torch.randn(6, 5, generator=g)
    t = torch.rand(6, generator=g) * 0.5
    t_end = t + torch.rand(6, generator=g) * 0.5
    v = a + b * t[:, None]  # the instantaneous velocity at (z, t)
    u, _, target = meanflow_target(LinearInTime(a, b), z, t, t_end, v)
    assert (u - target).pow(2).mean().item() < 1e-12
    _, _, wrong = meanflow_target(LinearInTime(a, b, h_weight=1.0), z, t, t_end, v)  # not the average
    assert (LinearInTime(a, b, 1.0)(z, t, h=t_end - t) - wrong).pow(2).mean().item() > 1e-3


class PointMass(torch.nn.Module):
    """The exact average velocity when the data is one point mu: straight paths, u = (mu - z) / (1 - t)."""

    def __init__(self, mu):
        super().__init__()
        self.mu = mu
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, z, t, y=None, h=None):
        return self.w * (self.mu - z) / (1 - t)[:, None]


def test_loss_is_zero_at_the_exact_average_velocity():
    g = torch.Generator().manual_seed(2)
    mu = torch.randn(3, generator=g, dtype=torch.float64)
    x0 = torch.randn(64, 3, generator=g, dtype=torch.float64)
    x1 = mu.expand(64, 3)
    t, t_end = sample_time_pairs(64, equal_share=0.25, generator=g)
    t, t_end = t.double() * 0.9, t_end.double() * 0.9 + 0.1  # stay away from t = 1
    loss, _ = meanflow_loss(PointMass(mu), x0, x1, t, t_end)
    assert loss.item() < 1e-20
    x_gen = meanflow_sample(PointMass(mu), torch.randn(8, 3, generator=g, dtype=torch.float64), steps=1)
    torch.testing.assert_close(x_gen, mu.expand(8, 3))  # one step lands on the data


def test_training_time_guidance_target():
    model = _dit()
    x0, x1, t, _ = _data()
    y = torch.tensor([0, 3, 2, 3])  # rows 1 and 3 are the null class: their target stays x1 - x0
    loss, _ = meanflow_loss(model, x0, x1, t, t.clone(), y=y, cfg_scale=2.0)
    z = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * x1
    with torch.no_grad():
        u_null = model(z, t, y=torch.full_like(y, 3), h=torch.zeros(4))
        u = model(z, t, y=y, h=torch.zeros(4))
    v = x1 - x0
    target = torch.where((y != 3)[:, None, None, None], 2.0 * v - u_null, v)
    torch.testing.assert_close(loss, (u - target).pow(2).mean(), rtol=1e-5, atol=1e-6)


def test_grad_checkpointing_path_gives_the_same_loss_and_grads():
    x0, x1, t, y = _data()
    t_end = torch.clamp(t + 0.3, max=1.0)

    def run(ckpt):
        model = _dit(grad_checkpointing=ckpt).train()
        loss, _ = meanflow_loss(model, x0, x1, t, t_end, y=y)
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters()]

    (l0, g0), (l1, g1) = run(False), run(True)
    torch.testing.assert_close(l0, l1)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_sample_time_pairs_and_sampler_shapes():
    g = torch.Generator().manual_seed(0)
    t, t_end = sample_time_pairs(20000, equal_share=0.75, generator=g)
    assert t.shape == t_end.shape == (20000,) and bool((t <= t_end).all())
    assert bool(((t >= 0) & (t_end <= 1)).all())
    assert (t == t_end).float().mean().item() == pytest.approx(0.75, abs=0.015)
    tu, tu_end = sample_time_pairs(1000, equal_share=0.0, kind="uniform", generator=g)
    assert bool((tu < tu_end).all())
    model = _dit()
    x0, _, _, y = _data()
    assert meanflow_sample(model, x0, steps=1, y=y).shape == x0.shape
    assert meanflow_sample(model, x0, steps=3).shape == x0.shape
    with pytest.raises(ValueError):
        meanflow_loss(model, x0, x0, torch.full((4,), 0.5), torch.full((4,), 0.4))
