"""VelocityMLP and the sinusoidal timestep embedding."""

import math

import pytest
import torch

from genlab.flow.models.mlp import VelocityMLP
from genlab.nn.embeddings import timestep_embedding

torch.set_num_threads(1)


def test_timestep_embedding_matches_the_formula():
    t = torch.tensor([0.0, 0.3, 7.0, 500.0], dtype=torch.float64)
    dim, period = 9, 100.0
    emb = timestep_embedding(t, dim, max_period=period)
    assert emb.shape == (4, 9) and emb.dtype == torch.float64
    half = dim // 2
    for b, tb in enumerate(t.tolist()):
        for k in range(half):
            f = period ** (-k / half)
            assert emb[b, k].item() == pytest.approx(math.cos(tb * f), abs=1e-12)
            assert emb[b, half + k].item() == pytest.approx(math.sin(tb * f), abs=1e-12)
        assert emb[b, -1].item() == 0.0  # odd dim: zero pad
    assert timestep_embedding(t.float(), 8).dtype == torch.float32
    with pytest.raises(ValueError):
        timestep_embedding(t[None], 8)


def test_output_shape_layers_and_gradients():
    model = VelocityMLP(dim=3, hidden=32, depth=3, time_embed_dim=16, activation="gelu")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 4 and linears[0].in_features == 3 + 16 and linears[-1].out_features == 3
    x, t = torch.randn(5, 3), torch.rand(5)
    v = model(x, t)
    assert v.shape == (5, 3)
    v.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_time_matters_and_scalar_time_broadcasts():
    torch.manual_seed(0)
    model = VelocityMLP(hidden=32, depth=2, time_embed_dim=8)
    x = torch.randn(6, 2)
    v_early, v_late = model(x, 0.1), model(x, 0.9)
    assert v_early.shape == (6, 2)
    assert (v_early - v_late).abs().max() > 1e-3
    assert torch.allclose(model(x, torch.tensor(0.1)), v_early)
    assert torch.allclose(model(x, torch.full((6,), 0.1)), v_early)
    # Each row depends only on its own (x, t).
    t = torch.linspace(0, 1, 6)
    rows = torch.cat([model(x[i : i + 1], t[i : i + 1]) for i in range(6)])
    assert torch.allclose(model(x, t), rows, atol=1e-6)


def test_extras_are_ignored_and_bad_activation_rejected():
    model = VelocityMLP(hidden=16, depth=1, time_embed_dim=4)
    x, t = torch.randn(3, 2), torch.rand(3)
    assert torch.equal(model(x, t, y=torch.tensor([1, 2, 3]), guidance=2.0), model(x, t))
    with pytest.raises(ValueError, match="silu"):
        VelocityMLP(activation="swish2")
