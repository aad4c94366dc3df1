"""Distances between two point clouds: exact Wasserstein-2 (POT) and kernel MMD.

Both take (N, D) and (M, D) arrays or tensors (any device) and return a python
float; both compute in float64 on the CPU.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import ot
import torch
from torch import Tensor

__all__ = ["wasserstein2", "mmd"]

ArrayLike = Tensor | np.ndarray


def _as_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected a (N, D) point cloud, got shape {x.shape}")
    return x


def wasserstein2(x: ArrayLike, y: ArrayLike, num_iter_max: int = 1_000_000) -> float:
    """Exact W2 between the empirical measures of ``x`` (N, D) and ``y`` (M, D).

    Both clouds get uniform weights; the optimal transport plan for the
    squared-Euclidean cost is found by POT's network simplex (``ot.emd2``) and
    the result is ``sqrt(min_pi sum_ij pi_ij ||x_i - y_j||^2)``. Cost is about
    O(N^3): fine for a few thousand points, slow beyond.
    """
    xa, ya = _as_numpy(x), _as_numpy(y)
    if xa.shape[1] != ya.shape[1]:
        raise ValueError(f"dimension mismatch: {xa.shape} vs {ya.shape}")
    a = np.full(len(xa), 1.0 / len(xa))
    b = np.full(len(ya), 1.0 / len(ya))
    cost = ot.dist(xa, ya, metric="sqeuclidean")  # (N, M)
    w2_squared = ot.emd2(a, b, cost, numItermax=num_iter_max)
    return float(np.sqrt(max(float(w2_squared), 0.0)))


def mmd(x: ArrayLike, y: ArrayLike, bandwidths: Sequence[float] = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)) -> float:
    """Unbiased estimate of the squared MMD with a sum of RBF kernels.

    Kernel: ``k(a, b) = sum_s exp(-||a - b||^2 / (2 s^2))`` over ``s`` in
    ``bandwidths`` (several scales, so neither fine nor coarse differences are
    missed). Estimator (Gretton et al. 2012, the U-statistic MMD^2_u):

        MMD^2_u = 1/(N(N-1)) sum_{i != i'} k(x_i, x_i')
                + 1/(M(M-1)) sum_{j != j'} k(y_j, y_j')
                - 2/(N M)    sum_{i, j}    k(x_i, y_j)

    It is unbiased, so it can be slightly negative when the two samples come
    from the same distribution. Needs N, M >= 2.
    """
    xa, ya = _as_numpy(x), _as_numpy(y)
    n, m = len(xa), len(ya)
    if n < 2 or m < 2:
        raise ValueError("mmd needs at least 2 points in each sample")
    xt, yt = torch.from_numpy(xa), torch.from_numpy(ya)

    def kernel(a: Tensor, b: Tensor) -> Tensor:
        d2 = torch.cdist(a, b).square()  # (A, B)
        return sum(torch.exp(-d2 / (2.0 * s * s)) for s in bandwidths)

    kxx, kyy, kxy = kernel(xt, xt), kernel(yt, yt), kernel(xt, yt)
    # Drop the diagonal (k(x, x) terms) for the unbiased within-sample means.
    term_xx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    term_yy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(term_xx + term_yy - 2.0 * kxy.mean())
