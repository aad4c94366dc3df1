"""Activation table, MLP, modulate and the adaLN-Zero blocks against hand-written formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from genlab.nn.attention import RotaryEmbedding
from genlab.nn.blocks import ACTIVATIONS, MLP, Activation, AdaLNZeroBlock, FinalAdaLNLayer, activation, modulate

torch.set_num_threads(1)
SELU_SCALE, SELU_ALPHA = 1.0507009873554804934193349852946, 1.6732632423543772848170429916717  # Klambauer et al.


def test_activation_table_matches_torch():
    x = torch.linspace(-4, 4, 101, dtype=torch.float64)
    want = {
        "gelu": torch.nn.GELU()(x),
        "gelu_pytorch_tanh": torch.nn.GELU(approximate="tanh")(x),
        "silu": x * torch.sigmoid(x),
        "relu": x.clamp_min(0),
        "elu": torch.where(x > 0, x, torch.expm1(x)),
        "selu": SELU_SCALE * torch.where(x > 0, x, SELU_ALPHA * torch.expm1(x)),
        "tanh": torch.tanh(x),
    }
    for name, value in want.items():
        torch.testing.assert_close(activation(name)(x), value, rtol=1e-12, atol=1e-12, msg=name)
        torch.testing.assert_close(Activation(name)(x), value, rtol=1e-12, atol=1e-12, msg=name)
    # HF's NewGELU ("gelu_new") writes the tanh formula out
    new_gelu = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    torch.testing.assert_close(activation("gelu_new")(x), new_gelu, rtol=1e-12, atol=1e-12)
    assert set(want) < set(ACTIVATIONS)


def test_unknown_activation_lists_the_known_ones():
    with pytest.raises(ValueError, match="gelu_pytorch_tanh.*silu"):
        activation("swish2")
    with pytest.raises(ValueError, match="swish2"):
        Activation("swish2")


def test_activation_module_has_no_state():
    seq = torch.nn.Sequential(torch.nn.Linear(3, 4), Activation("silu"), torch.nn.Linear(4, 2))
    assert list(seq.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_mlp_is_fc2_act_fc1():
    torch.manual_seed(0)
    mlp = MLP(6, 10, "gelu", out_dim=3)
    x = torch.randn(2, 5, 6)
    want = F.linear(F.gelu(F.linear(x, mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight, mlp.fc2.bias)
    torch.testing.assert_close(mlp(x), want)
    assert mlp(x).shape == (2, 5, 3)


def test_modulate_formula():
    x, shift, scale = torch.randn(3, 4, 5), torch.randn(3, 5), torch.randn(3, 5)
    want = torch.stack([x[b] * (1 + scale[b]) + shift[b] for b in range(3)])
    torch.testing.assert_close(modulate(x, shift, scale), want)


def test_fresh_blocks_are_identity_and_zero():
    torch.manual_seed(1)
    block = AdaLNZeroBlock(16, 4, cond_dim=8)
    x, c = torch.randn(2, 7, 16), torch.randn(2, 8)
    assert torch.equal(block(x, c), x)
    final = FinalAdaLNLayer(16, 5, cond_dim=8)
    assert torch.equal(final(x, c), torch.zeros(2, 7, 5))


def _randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def _rotate(x, cos, sin):  # x (B, H, L, D); cos/sin (B, L, D): rotate-half RoPE written out
    half = x.shape[-1] // 2
    return x * cos[:, None] + torch.cat([-x[..., half:], x[..., :half]], -1) * sin[:, None]


def dit_block_reference(block, x, c, heads, mask=None, rope=None):
    """The DiT block (Peebles & Xie 2023, Fig. 3) from the block's raw weights, with plain torch ops."""
    B, L, D = x.shape
    lin = block.adaLN_modulation[1]
    mod = F.linear(F.silu(c), lin.weight, lin.bias)  # (B, 6D)
    sh1, sc1, g1, sh2, sc2, g2 = (mod[:, i * D:(i + 1) * D] for i in range(6))
    h = F.layer_norm(x, (D,), eps=1e-6) * (1 + sc1[:, None]) + sh1[:, None]
    a = block.attn

    def proj(layer, t):  # (B, L, D) -> (B, heads, L, D / heads)
        return F.linear(t, layer.weight, layer.bias).view(B, L, heads, D // heads).transpose(1, 2)

    q, k, v = proj(a.q_proj, h), proj(a.k_proj, h), proj(a.v_proj, h)
    if rope is not None:
        q, k = _rotate(q, *rope), _rotate(k, *rope)
    att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, L, D)
    x = x + g1[:, None] * F.linear(att, a.o_proj.weight, a.o_proj.bias)
    h = F.layer_norm(x, (D,), eps=1e-6) * (1 + sc2[:, None]) + sh2[:, None]
    m = block.mlp
    h = F.linear(F.gelu(F.linear(h, m.fc1.weight, m.fc1.bias), approximate="tanh"), m.fc2.weight, m.fc2.bias)
    return x + g2[:, None] * h


@pytest.mark.parametrize("with_mask_and_rope", [False, True], ids=["plain", "mask-rope"])
def test_block_equals_the_dit_formula(with_mask_and_rope):
    torch.manual_seed(2)
    D, H, L = 24, 3, 6
    block = AdaLNZeroBlock(D, H, mlp_ratio=2.0, cond_dim=10)
    _randomize(block, 3)
    x, c = torch.randn(2, L, D), torch.randn(2, 10)
    mask = rope = None
    if with_mask_and_rope:
        keys = torch.rand(2, L) > 0.3
        keys[:, 0] = True
        mask = keys[:, None, None, :]  # (B, 1, 1, L): padding keys hidden
        rope = RotaryEmbedding(D // H)(torch.arange(L)[None].expand(2, -1))
    with torch.no_grad():
        got = block(x, c, mask=mask, rope=rope)
        want = dit_block_reference(block, x, c, H, mask, rope)
    assert got.shape == (2, L, D)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - x).abs().max() > 0.1  # the modulation really does something


def test_final_layer_formula():
    torch.manual_seed(4)
    final = FinalAdaLNLayer(12, 5, cond_dim=7)
    _randomize(final, 5)
    x, c = torch.randn(3, 4, 12), torch.randn(3, 7)
    lin = final.adaLN_modulation[1]
    shift, scale = F.linear(F.silu(c), lin.weight, lin.bias).chunk(2, dim=-1)
    h = F.layer_norm(x, (12,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    with torch.no_grad():
        torch.testing.assert_close(final(x, c), F.linear(h, final.linear.weight, final.linear.bias))
