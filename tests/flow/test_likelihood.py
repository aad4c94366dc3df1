import math

import numpy as np
import pytest
import torch
from scipy.linalg import expm
from scipy.stats import multivariate_normal

from genlab.flow.likelihood import bits_per_dim, log_likelihood, standard_normal_log_prob

torch.set_num_threads(1)

A = np.array([[-0.3, 0.8], [-0.5, 0.2]])
B = np.array([0.5, -1.0])


def affine_model(x, t, scale=1.0):
    """Time-constant linear velocity v(x) = scale (A x + b) on x of shape (N, 1, 2)."""
    a = torch.as_tensor(A, dtype=x.dtype)
    b = torch.as_tensor(B, dtype=x.dtype)
    return scale * (x @ a.T + b)


def affine_flow_law(scale=1.0, mu0=np.zeros(2), cov0=np.eye(2)):
    """Law of x_1 when x_0 ~ N(mu0, cov0) flows along v for unit time: N(E mu0 + m, E cov0 E^T).

    expm of the augmented matrix [[A, b], [0, 0]] is [[E, m], [0, 1]] with E = expm(A) and
    m = int_0^1 expm(A s) ds b, the affine part of the flow map.
    """
    aug = np.zeros((3, 3))
    aug[:2, :2], aug[:2, 2] = scale * A, scale * B
    M = expm(aug)
    E, m = M[:2, :2], M[:2, 2]
    return multivariate_normal(mean=E @ mu0 + m, cov=E @ cov0 @ E.T)


def _points(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 1, 2, generator=g, dtype=torch.float64) * 1.5).add(torch.tensor([0.3, -0.8]))


@pytest.mark.parametrize("method,steps", [("dopri5", None), ("rk4", 40)])
def test_affine_flow_matches_closed_form(method, steps):
    x1 = _points()
    ref = affine_flow_law().logpdf(x1.reshape(-1, 2).numpy())
    kw = dict(atol=1e-9, rtol=1e-9) if method == "dopri5" else dict(steps=steps)
    logp = log_likelihood(affine_model, x1, standard_normal_log_prob, method=method, **kw)
    assert logp.shape == (6,)
    np.testing.assert_allclose(logp.numpy(), ref, atol=1e-4, rtol=0)


def test_extras_and_non_standard_source():
    mu0, cov0 = np.array([1.0, -0.5]), np.array([[0.5, 0.2], [0.2, 0.8]])
    source = torch.distributions.MultivariateNormal(torch.tensor(mu0), torch.tensor(cov0))
    x1 = _points(seed=1)
    ref = affine_flow_law(scale=0.6, mu0=mu0, cov0=cov0).logpdf(x1.reshape(-1, 2).numpy())
    logp = log_likelihood(
        affine_model, x1, lambda x: source.log_prob(x.reshape(-1, 2)), atol=1e-9, rtol=1e-9, scale=0.6
    )
    np.testing.assert_allclose(logp.numpy(), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_on_affine_flow(noise):
    n_rep = 4000
    x1 = _points(n=2, seed=2).repeat_interleave(n_rep, dim=0)  # each point with many noise draws
    ref = affine_flow_law().logpdf(x1[[0, n_rep]].reshape(-1, 2).numpy())
    g = torch.Generator().manual_seed(0)
    est = log_likelihood(affine_model, x1, method="rk4", steps=10, divergence="hutchinson", noise=noise, generator=g)
    est = est.reshape(2, n_rep)
    se = est.std(dim=1) / math.sqrt(n_rep)
    assert (se > 0).all()  # the estimate really is noisy, so this test can see a bias
    assert ((est.mean(dim=1).numpy() - ref).__abs__() < 4 * se.numpy()).all()


class TinyField(torch.nn.Module):
    """A fixed nonlinear, time-dependent velocity field on R^2."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = torch.nn.Parameter(torch.randn(3, 32, generator=g, dtype=torch.float64))
        self.w2 = torch.nn.Parameter(torch.randn(32, 2, generator=g, dtype=torch.float64) * 0.3)

    def forward(self, x, t):
        h = torch.tanh(torch.cat([x, t[:, None]], dim=1) @ self.w1)
        return h @ self.w2


def test_nonlinear_flow_density_integrates_to_one_and_hutchinson_agrees():
    model = TinyField()
    # Riemann sum of p_1 on a grid wide enough to hold all the mass
    ticks = torch.linspace(-7.0, 7.0, 57, dtype=torch.float64)
    grid = torch.cartesian_prod(ticks, ticks)  # (3249, 2)
    logp = log_likelihood(model, grid, method="rk4", steps=16)
    cell = (ticks[1] - ticks[0]).item() ** 2
    assert logp.exp().sum().item() * cell == pytest.approx(1.0, abs=1e-3)
    # and the flow is not the identity: p_1 differs from the source density
    assert (logp - standard_normal_log_prob(grid)).abs().max() > 0.1

    x1 = torch.tensor([[0.4, -0.2]], dtype=torch.float64).repeat(3000, 1)
    exact = log_likelihood(model, x1[:1], method="rk4", steps=16)
    g = torch.Generator().manual_seed(1)
    est = log_likelihood(model, x1, method="rk4", steps=16, divergence="hutchinson", generator=g)
    se = est.std() / math.sqrt(est.numel())
    assert abs(est.mean() - exact[0]).item() < 4 * se.item()


def test_no_grad_leaks_and_bad_arguments():
    model = TinyField()
    logp = log_likelihood(model, torch.zeros(4, 2, dtype=torch.float64), method="euler", steps=4)
    assert not logp.requires_grad and model.w1.grad is None
    with pytest.raises(ValueError, match="unknown divergence"):
        log_likelihood(model, torch.zeros(4, 2), divergence="skilling")
    with pytest.raises(ValueError, match="unknown Hutchinson noise"):
        log_likelihood(model, torch.zeros(4, 2), divergence="hutchinson", noise="uniform")


def test_standard_normal_and_bits_per_dim():
    x = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(0))
    ref = torch.distributions.Normal(0.0, 1.0).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(standard_normal_log_prob(x), ref)
    # a density of 2^-dim per unit volume is one bit per dimension
    torch.testing.assert_close(bits_per_dim(torch.tensor([-12 * math.log(2.0)]), 12), torch.tensor([1.0]))
