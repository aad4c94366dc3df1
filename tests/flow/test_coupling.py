import warnings

import pytest
import torch
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from genlab.flow.coupling import ot_pairing, pair_batch

torch.set_num_threads(1)


def _batch(n=32, shape=(2, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, *shape, generator=g)
    x1 = torch.randn(n, *shape, generator=g) * 0.5 + 2.0
    return x0, x1


def _cost(x0, x1, perm):
    d = (x0.double() - x1.double()[perm]).flatten(1)
    return d.pow(2).sum(1).sum().item()


def _optimal_cost(x0, x1):
    C = cdist(x0.flatten(1).double().numpy(), x1.flatten(1).double().numpy(), "sqeuclidean")
    r, c = linear_sum_assignment(C)
    return C[r, c].sum()


def _is_permutation(perm, n):
    return perm.dtype == torch.long and perm.shape == (n,) and torch.equal(perm.sort().values, torch.arange(n))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_matches_scipy_assignment(seed):
    x0, x1 = _batch(seed=seed)
    perm = ot_pairing(x0, x1, method="exact")
    assert _is_permutation(perm, 32)
    assert _cost(x0, x1, perm) == pytest.approx(_optimal_cost(x0, x1), rel=1e-9)


def test_exact_with_generator_still_optimal_and_breaks_ties():
    x0, x1 = _batch(seed=3)
    perm = ot_pairing(x0, x1, method="exact", generator=torch.Generator().manual_seed(0))
    assert _is_permutation(perm, 32)
    assert _cost(x0, x1, perm) == pytest.approx(_optimal_cost(x0, x1), rel=1e-9)
    # all data points identical: every permutation is optimal; shuffling picks different ones
    x1_same = torch.zeros(32, 2, 3)
    perms = {tuple(ot_pairing(x0, x1_same, generator=torch.Generator().manual_seed(s)).tolist()) for s in range(4)}
    assert len(perms) > 1


def test_sinkhorn_is_permutation_close_to_optimal():
    x0, x1 = _batch(n=48, seed=4)
    opt = _optimal_cost(x0, x1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sinkhorn must converge, not warn
        perm = ot_pairing(x0, x1, method="sinkhorn", reg=0.005)
    assert _is_permutation(perm, 48)
    assert _cost(x0, x1, perm) <= opt * 1.01
    # a large reg gives a blurrier plan, but the result is still a permutation
    perm_blur = ot_pairing(x0, x1, method="sinkhorn", reg=1.0)
    assert _is_permutation(perm_blur, 48)
    assert _cost(x0, x1, perm_blur) >= _cost(x0, x1, perm) - 1e-9


def test_ot_shortens_pairs_and_none_is_identity():
    g = torch.Generator().manual_seed(5)
    x0, x1 = torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g)  # 2-D: OT pairs are much shorter
    ident = ot_pairing(x0, x1, method="none")
    assert torch.equal(ident, torch.arange(64))
    independent = _cost(x0, x1, ident) / 64
    for method in ("exact", "sinkhorn"):
        a, b = pair_batch(x0, x1, method=method)
        assert a is x0
        paired = (a - b).flatten(1).pow(2).sum(1).mean().item()
        assert paired < 0.5 * independent
        # the pairing only re-orders the data batch
        assert torch.equal(b.flatten().sort().values, x1.flatten().sort().values)


def test_errors():
    x0, x1 = _batch()
    with pytest.raises(ValueError, match="unknown coupling"):
        ot_pairing(x0, x1, method="greedy")
    with pytest.raises(ValueError, match="equal batch sizes"):
        ot_pairing(x0, x1[:5])
