"""W2 against closed forms and scipy's assignment solver; MMD against a direct loop."""

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from genlab.eval.distances import mmd, wasserstein2

torch.set_num_threads(1)


def test_w2_of_a_translate_is_the_translation_length():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 3, generator=g)
    shift = torch.tensor([1.0, -2.0, 0.5])
    y = (x + shift)[torch.randperm(300, generator=g)]  # shuffled so the pairing must be found
    assert wasserstein2(x, y) == pytest.approx(shift.norm().item(), rel=1e-6)
    assert wasserstein2(x, x) == pytest.approx(0.0, abs=1e-7)


def test_w2_matches_linear_sum_assignment():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(120, 2)), rng.normal(loc=0.7, scale=1.5, size=(120, 2))
    cost = cdist(x, y, "sqeuclidean")
    rows, cols = linear_sum_assignment(cost)
    expected = np.sqrt(cost[rows, cols].mean())  # equal sizes: OT plan is a permutation
    assert wasserstein2(x, y) == pytest.approx(expected, rel=1e-9)
    assert wasserstein2(torch.from_numpy(x).float(), torch.from_numpy(y).float()) == pytest.approx(expected, rel=1e-5)


def test_w2_unequal_sizes_uses_uniform_weights():
    x = torch.tensor([[0.0, 0.0], [4.0, 0.0]])
    y = torch.cat([x, x])  # same empirical measure with 4 atoms
    assert wasserstein2(x, y) == pytest.approx(0.0, abs=1e-9)
    # One atom vs two at distance 1 and 3 on a line: W2^2 = (1 + 9) / 2.
    assert wasserstein2([[0.0]], [[1.0], [-3.0]]) == pytest.approx(np.sqrt(5.0))


def test_w2_gaussians_with_equal_covariance():
    g = torch.Generator().manual_seed(2)
    mu = torch.tensor([3.0, 0.0])
    x, y = torch.randn(800, 2, generator=g), torch.randn(800, 2, generator=g) + mu
    # Closed form ||mu1 - mu2|| = 3; the empirical estimate carries a small positive bias.
    assert 3.0 - 0.05 < wasserstein2(x, y) < 3.0 + 0.3


def mmd_by_loops(x, y, bandwidths):
    def k(a, b):
        return sum(np.exp(-np.sum((a - b) ** 2) / (2 * s * s)) for s in bandwidths)

    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


def test_mmd_matches_the_u_statistic_by_loops():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(7, 2)), rng.normal(loc=0.5, size=(9, 2))
    for bw in [(1.0,), (0.3, 1.0, 4.0)]:
        assert mmd(x, y, bandwidths=bw) == pytest.approx(mmd_by_loops(x, y, bw), rel=1e-10)


def test_mmd_small_for_same_distribution_larger_for_different():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(500, 2, generator=g), torch.randn(500, 2, generator=g)
    c = torch.randn(500, 2, generator=g) * 0.5 + torch.tensor([1.0, 0.0])
    same, diff = mmd(a, b), mmd(a, c)
    assert abs(same) < 0.02
    assert diff > 0.2 and diff > 10 * abs(same)
    with pytest.raises(ValueError):
        mmd(a[:1], b)
