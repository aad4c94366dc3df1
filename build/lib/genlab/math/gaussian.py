"""Closed forms for Gaussians: log densities and KL divergences (batched over leading dims).

Shapes: mean (..., k), full covariance (..., k, k), diagonal log-variance (..., k).
Results have the leading shape (...). All in nats.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _logdet_from_cholesky(L: Tensor) -> Tensor:
    """log det(L L^T) = 2 sum log diag(L): (..., k, k) -> (...)."""
    return 2.0 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)


def gaussian_log_prob(x: Tensor, mu: Tensor, cov: Tensor) -> Tensor:
    """log N(x; mu, cov) for a full (symmetric positive definite) covariance: (..., k) -> (...)."""
    k = x.shape[-1]
    batch = torch.broadcast_shapes(x.shape[:-1], mu.shape[:-1], cov.shape[:-2])
    L = torch.linalg.cholesky(cov).expand(*batch, k, k)  # (..., k, k)
    diff = (x - mu).expand(*batch, k).unsqueeze(-1)  # (..., k, 1)
    # Mahalanobis term via a triangular solve, never forming cov^{-1}.
    z = torch.linalg.solve_triangular(L, diff, upper=False)  # (..., k, 1)
    maha = z.squeeze(-1).pow(2).sum(-1)
    return -0.5 * (k * math.log(2 * math.pi) + _logdet_from_cholesky(L) + maha)


def diag_gaussian_log_prob(x: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(x; mu, diag(exp(logvar))), summed over the last dim: (..., k) -> (...)."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (x - mu).pow(2) * torch.exp(-logvar)).sum(-1)


def gaussian_kl(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> Tensor:
    """KL(N(mu1, cov1) || N(mu2, cov2)) for full covariances: (..., k), (..., k, k) -> (...).

    KL = 1/2 [ tr(S2^-1 S1) + (mu2 - mu1)^T S2^-1 (mu2 - mu1) - k + log det S2 - log det S1 ].
    """
    k = mu1.shape[-1]
    batch = torch.broadcast_shapes(mu1.shape[:-1], mu2.shape[:-1], cov1.shape[:-2], cov2.shape[:-2])
    L1 = torch.linalg.cholesky(cov1).expand(*batch, k, k)
    L2 = torch.linalg.cholesky(cov2).expand(*batch, k, k)
    # tr(S2^-1 S1) = ||L2^-1 L1||_F^2
    M = torch.linalg.solve_triangular(L2, L1, upper=False)  # (..., k, k)
    trace = M.pow(2).sum((-2, -1))
    diff = (mu2 - mu1).expand(*batch, k).unsqueeze(-1)  # (..., k, 1)
    z = torch.linalg.solve_triangular(L2, diff, upper=False)
    maha = z.squeeze(-1).pow(2).sum(-1)
    return 0.5 * (trace + maha - k + _logdet_from_cholesky(L2) - _logdet_from_cholesky(L1))


def diag_gaussian_kl(mu1: Tensor, logvar1: Tensor, mu2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mu1, diag e^logvar1) || N(mu2, diag e^logvar2)), summed over the last dim: (..., k) -> (...).

    Per dimension: 1/2 [ (var1 + (mu1 - mu2)^2) / var2 - 1 + logvar2 - logvar1 ]. With
    mu2 = 0, logvar2 = 0 this is the VAE prior term. For per-element values, unsqueeze(-1) the inputs.
    """
    per_dim = 0.5 * ((torch.exp(logvar1) + (mu1 - mu2).pow(2)) * torch.exp(-logvar2) - 1.0 + logvar2 - logvar1)
    return per_dim.sum(-1)
