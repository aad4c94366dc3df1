import math

import pytest
import torch

from genlab.flow.paths import CondOTPath, CosinePath, VPPath, make_path, sample_time

torch.set_num_threads(1)

PATHS = [CondOTPath(), CondOTPath(sigma_min=0.1), CosinePath(), VPPath(), VPPath(beta_min=0.5, beta_max=5.0)]


def _pair(shape=(5, 3, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("path", PATHS, ids=repr)
def test_velocity_is_finite_difference_of_x_t(path):
    x0, x1 = _pair()
    t = torch.tensor([0.05, 0.2, 0.5, 0.8, 0.95], dtype=torch.float64)
    h = 1e-6
    fd = (path.sample(x0, x1, t + h).x_t - path.sample(x0, x1, t - h).x_t) / (2 * h)
    dx = path.sample(x0, x1, t).dx_t
    assert dx.shape == x0.shape
    torch.testing.assert_close(dx, fd, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", [CondOTPath(), CosinePath()], ids=repr)
def test_boundaries_are_source_and_data(path):
    x0, x1 = _pair()
    n = x0.shape[0]
    torch.testing.assert_close(path.sample(x0, x1, torch.zeros(n, dtype=torch.float64)).x_t, x0)
    torch.testing.assert_close(path.sample(x0, x1, torch.ones(n, dtype=torch.float64)).x_t, x1)


def test_vp_path_ends_on_data_and_nearly_on_noise():
    path = VPPath()
    x0, x1 = _pair()
    n = x0.shape[0]
    torch.testing.assert_close(path.sample(x0, x1, torch.ones(n, dtype=torch.float64)).x_t, x1)
    # alpha_0 = exp(-(beta_min + beta_max) / 4) for the linear beta schedule
    a0 = path.alpha(torch.tensor(0.0, dtype=torch.float64))
    assert a0.item() == pytest.approx(math.exp(-(0.1 + 20.0) / 4), rel=1e-12)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(path.alpha(t) ** 2 + path.sigma(t) ** 2, torch.ones_like(t))
    # the target stays finite at t = 1 exactly (sigma' is singular there)
    assert torch.isfinite(path.sample(x0, x1, torch.ones(n, dtype=torch.float64)).dx_t).all()


def test_sigma_min_leaves_gaussian_of_that_width():
    path = CondOTPath(sigma_min=0.1)
    x0, x1 = _pair()
    n = x0.shape[0]
    s = path.sample(x0, x1, torch.ones(n, dtype=torch.float64))
    torch.testing.assert_close(s.x_t, x1 + 0.1 * x0)
    torch.testing.assert_close(s.dx_t, x1 - 0.9 * x0)
    torch.testing.assert_close(path.sample(x0, x1, torch.zeros(n, dtype=torch.float64)).x_t, x0)


def test_sample_carries_inputs_and_checks_t_shape():
    x0, x1 = _pair()
    t = torch.rand(5, dtype=torch.float64)
    s = CosinePath().sample(x0, x1, t)
    assert s.t is t and s.x_0 is x0 and s.x_1 is x1
    with pytest.raises(ValueError):
        CosinePath().sample(x0, x1, torch.rand(4))


def test_make_path():
    assert isinstance(make_path("cond_ot", sigma_min=0.01), CondOTPath)
    assert make_path("linear").sigma_min == 0.0
    assert isinstance(make_path("Cosine"), CosinePath)
    assert make_path("vp", beta_max=10.0).beta_max == 10.0
    with pytest.raises(ValueError, match="unknown path 'nope'"):
        make_path("nope")


def test_logit_normal_moments():
    g = torch.Generator().manual_seed(0)
    t = sample_time(200_000, "logit_normal", mean=0.5, std=0.7, generator=g)
    assert t.shape == (200_000,) and ((t > 0) & (t < 1)).all()
    logit = torch.log(t.double()) - torch.log1p(-t.double())
    # standard errors: 0.7/sqrt(n) ~ 1.6e-3 for the mean, ~1.1e-3 for the std
    assert logit.mean().item() == pytest.approx(0.5, abs=8e-3)
    assert logit.std().item() == pytest.approx(0.7, abs=6e-3)


def test_uniform_sampler_and_errors():
    g = torch.Generator().manual_seed(1)
    t = sample_time(100_000, generator=g)
    assert 0 <= t.min() and t.max() < 1
    assert t.mean().item() == pytest.approx(0.5, abs=5e-3)
    assert t.var().item() == pytest.approx(1 / 12, abs=2e-3)
    with pytest.raises(ValueError):
        sample_time(3, "beta")
