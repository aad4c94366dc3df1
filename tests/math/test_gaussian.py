import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from genlab.math.gaussian import (
    diag_gaussian_kl,
    diag_gaussian_log_prob,
    gaussian_kl,
    gaussian_log_prob,
)

torch.set_num_threads(1)


def _spd(k, seed, jitter=0.3):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(k, k, generator=g, dtype=torch.float64)
    return m @ m.T / k + jitter * torch.eye(k, dtype=torch.float64)


def _mu(k, seed):
    return torch.randn(k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_log_prob_matches_scipy():
    mu, cov = _mu(4, 0), _spd(4, 1)
    x = torch.randn(7, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = multivariate_normal(mu.numpy(), cov.numpy()).logpdf(x.numpy())
    np.testing.assert_allclose(gaussian_log_prob(x, mu, cov).numpy(), ref, rtol=1e-12)
    logvar = torch.tensor([0.3, -1.0, 0.0, 2.0], dtype=torch.float64)
    ref_diag = multivariate_normal(mu.numpy(), np.diag(np.exp(logvar.numpy()))).logpdf(x.numpy())
    np.testing.assert_allclose(diag_gaussian_log_prob(x, mu, logvar).numpy(), ref_diag, rtol=1e-12)


def test_kl_matches_monte_carlo():
    k = 3
    mu1, cov1, mu2, cov2 = _mu(k, 3), _spd(k, 4), _mu(k, 5), _spd(k, 6)
    p = multivariate_normal(mu1.numpy(), cov1.numpy())
    q = multivariate_normal(mu2.numpy(), cov2.numpy())
    x = p.rvs(size=200_000, random_state=np.random.default_rng(0))
    log_ratio = p.logpdf(x) - q.logpdf(x)
    mc, se = log_ratio.mean(), log_ratio.std() / math.sqrt(len(x))
    closed = gaussian_kl(mu1, cov1, mu2, cov2).item()
    assert closed > 0.1  # a non-trivial pair
    assert abs(closed - mc) < 4 * se


def test_kl_matches_torch_distributions_batched():
    mu1 = torch.stack([_mu(3, s) for s in range(4)])  # (4, 3)
    cov1 = torch.stack([_spd(3, 10 + s) for s in range(4)])  # (4, 3, 3)
    mu2, cov2 = _mu(3, 20), _spd(3, 21)  # broadcast against the batch
    ref = torch.distributions.kl_divergence(
        torch.distributions.MultivariateNormal(mu1, cov1), torch.distributions.MultivariateNormal(mu2, cov2)
    )
    out = gaussian_kl(mu1, cov1, mu2, cov2)
    assert out.shape == (4,)
    torch.testing.assert_close(out, ref)


def test_kl_of_identical_is_zero_and_asymmetric():
    mu, cov = _mu(5, 0), _spd(5, 1)
    assert gaussian_kl(mu, cov, mu, cov).abs().item() < 1e-12
    mu2, cov2 = _mu(5, 2), _spd(5, 3)
    assert abs(gaussian_kl(mu, cov, mu2, cov2).item() - gaussian_kl(mu2, cov2, mu, cov).item()) > 1e-3


def test_diag_kl_equals_full_kl_and_vae_prior_term():
    g = torch.Generator().manual_seed(7)
    mu1, mu2 = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    lv1, lv2 = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    full = gaussian_kl(mu1, torch.diag_embed(lv1.exp()), mu2, torch.diag_embed(lv2.exp()))
    torch.testing.assert_close(diag_gaussian_kl(mu1, lv1, mu2, lv2), full)
    zeros = torch.zeros_like(mu1)
    # the familiar VAE form: -1/2 sum(1 + logvar - mu^2 - exp(logvar))
    vae = -0.5 * (1 + lv1 - mu1.pow(2) - lv1.exp()).sum(-1)
    torch.testing.assert_close(diag_gaussian_kl(mu1, lv1, zeros, zeros), vae)
    assert diag_gaussian_kl(mu1, lv1, mu1, lv1).abs().max().item() < 1e-12


def test_non_spd_covariance_is_rejected():
    bad = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64)  # eigenvalues 3 and -1
    with pytest.raises(torch.linalg.LinAlgError):
        z = torch.zeros(2, dtype=torch.float64)
        gaussian_kl(z, bad, z, torch.eye(2, dtype=torch.float64))
