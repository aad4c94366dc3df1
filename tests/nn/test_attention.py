"""Properties of the shared attention layer, RoPE and KV cache, against hand-written references."""

import math

import pytest
import torch

from genlab.nn.attention import Attention, KVCache, RotaryEmbedding, apply_rotary, attend, causal_mask

torch.set_num_threads(1)


def per_head_reference(attn: Attention, x, mask=None):
    """Each head separately: softmax(q_h k_g^T * scale, capped, masked) v_g with g = h // (H/G);
    heads concatenated and projected. Plain loops and explicit softmax, no SDPA."""
    B, L, _ = x.shape
    H, G, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = attn.q_proj(x).view(B, L, H, D)
    k = attn.k_proj(x).view(B, L, G, D)
    v = attn.v_proj(x).view(B, L, G, D)
    heads = []
    for h in range(H):
        g = h // (H // G)
        s = torch.einsum("bid,bjd->bij", q[:, :, h], k[:, :, g]) * attn.scale
        if attn.softcap is not None:
            s = attn.softcap * torch.tanh(s / attn.softcap)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        heads.append(torch.einsum("bij,bjd->bid", s.softmax(-1), v[:, :, g]))
    return getattr(attn, attn.out_name)(torch.cat(heads, dim=-1))


@pytest.mark.parametrize("kv_heads,softcap", [(4, None), (2, None), (1, None), (2, 3.0), (1, 3.0)],
                         ids=["mha", "gqa", "mqa", "gqa-softcap", "mqa-softcap"])
def test_multi_head_equals_concatenated_heads(kv_heads, softcap):
    torch.manual_seed(0)
    attn = Attention(32, 4, kv_heads, head_dim=8, bias=True, softcap=softcap)
    x = torch.randn(2, 7, 32)
    mask = torch.rand(2, 7, 7) > 0.3
    mask |= torch.eye(7, dtype=torch.bool)
    with torch.no_grad():
        assert torch.allclose(attn(x), per_head_reference(attn, x), atol=1e-5)
        assert torch.allclose(attn(x, mask[:, None]), per_head_reference(attn, x, mask), atol=1e-5)
        causal = causal_mask(7, 7)
        assert torch.allclose(attn(x, is_causal=True), per_head_reference(attn, x, causal[None]), atol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_compiled_single_query_path_equals_reference(kv_heads):
    """Under torch.compile on CPU one query per row takes the explicit path (not SDPA); it must
    give what the per-head reference gives, with a padding mask over the keys."""
    torch.manual_seed(0)
    scale = 8 ** -0.5
    q, k, v = torch.randn(3, 4, 1, 8), torch.randn(3, kv_heads, 6, 8), torch.randn(3, kv_heads, 6, 8)
    keys = torch.rand(3, 6) > 0.3
    keys[:, -1] = True
    mask = keys[:, None, None, :]  # (B, 1, 1, S)

    def per_head(q, k, v):
        rep = 4 // kv_heads
        s = torch.einsum("bhd,bhsd->bhs", q[:, :, 0], k.repeat_interleave(rep, 1)) * scale
        s = s.masked_fill(~keys[:, None], float("-inf"))
        return torch.einsum("bhs,bhsd->bhd", s.softmax(-1), v.repeat_interleave(rep, 1))[:, :, None]

    seen = []

    def traced(q, k, v):
        seen.append(torch.compiler.is_compiling())
        return attend(q, k, v, mask, scale)

    compiled = torch.compile(traced, backend="aot_eager", dynamic=False, fullgraph=True)
    assert torch.allclose(compiled(q, k, v), per_head(q, k, v), atol=1e-5)
    assert seen == [True]  # the traced call took the compiled branch
    assert torch.allclose(attend(q, k, v, mask, scale), per_head(q, k, v), atol=1e-5)  # eager: SDPA


def test_permutation_equivariant_without_positions():
    torch.manual_seed(1)
    attn = Attention(24, 3, 1)
    x = torch.randn(2, 9, 24)
    perm = torch.randperm(9)
    with torch.no_grad():
        assert torch.allclose(attn(x)[:, perm], attn(x[:, perm]), atol=1e-5)
        # with rotary positions attached to the tokens the property goes away, as it should
        cos, sin = RotaryEmbedding(8)(torch.arange(9)[None].expand(2, -1))
        assert not torch.allclose(attn(x, rope=(cos, sin))[:, perm], attn(x[:, perm], rope=(cos, sin)), atol=1e-3)


def test_single_head_can_copy_one_position():
    """Weights built by hand: every query attends to the token carrying a marker feature and
    copies that token's content through identity value/output maps."""
    dim, target = 8, 5
    attn = Attention(dim, 1, bias=True)
    with torch.no_grad():
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
            lin.weight.zero_()
            lin.bias.zero_()
        attn.q_proj.bias[-1] = 100.0  # constant query along the marker direction
        attn.k_proj.weight[-1, -1] = 1.0  # key = marker feature
        attn.v_proj.weight.copy_(torch.eye(dim))
        attn.o_proj.weight.copy_(torch.eye(dim))
        x = torch.randn(3, 10, dim)
        x[..., -1] = 0.0
        x[:, target, -1] = 1.0
        out = attn(x)
    assert torch.allclose(out, x[:, target:target + 1].expand_as(out), atol=1e-4)


def test_rotary_matches_complex_rotation():
    """RoPE (rotate-half layout) rotates the pair (x_i, x_{i+D/2}) by angle pos * theta^(-2i/D)."""
    D, theta = 8, 100.0
    pos = torch.tensor([[0, 3, 11]])
    x = torch.randn(1, 2, 3, D)
    cos, sin = RotaryEmbedding(D, theta)(pos)
    got = apply_rotary(x, cos, sin)
    freqs = torch.tensor([theta ** (-2 * i / D) for i in range(D // 2)], dtype=torch.float64)
    z = torch.complex(x[..., : D // 2].double(), x[..., D // 2:].double())
    z = z * torch.exp(1j * pos[0, :, None].double() * freqs)
    want = torch.cat([z.real, z.imag], dim=-1).float()
    assert torch.allclose(got, want, atol=1e-5)


def test_rotary_scores_depend_on_relative_position_only():
    rope = RotaryEmbedding(16)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(i, j):
        qi = apply_rotary(q, *rope(torch.tensor([[i]])))
        kj = apply_rotary(k, *rope(torch.tensor([[j]])))
        return (qi * kj).sum()

    assert math.isclose(score(3, 1), score(12, 10), rel_tol=1e-4)
    assert not math.isclose(score(3, 1), score(3, 2), rel_tol=1e-3)


@pytest.mark.parametrize("kv_heads,softcap", [(1, None), (2, 4.0)])
def test_kv_cache_decoding_equals_full_causal_pass(kv_heads, softcap):
    torch.manual_seed(2)
    attn = Attention(32, 4, kv_heads, head_dim=8, softcap=softcap)
    rope = RotaryEmbedding(8)
    x = torch.randn(2, 9, 32)
    cs = rope(torch.arange(9)[None].expand(2, -1))
    with torch.no_grad():
        full = attn(x, rope=cs, is_causal=True)
        cache = KVCache(1, 2, kv_heads, 8, max_len=12)
        steps = [attn(x[:, :5], rope=(cs[0][:, :5], cs[1][:, :5]), cache=cache, is_causal=True)]
        cache.advance(5)
        for t in range(5, 9):
            steps.append(attn(x[:, t:t + 1], rope=(cs[0][:, t:t + 1], cs[1][:, t:t + 1]), cache=cache))
            cache.advance(1)
    assert cache.length == 9
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_kv_cache_refuses_to_overflow():
    cache = KVCache(1, 1, 1, 4, max_len=3)
    cache.update(0, torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 3, 4))
    cache.advance(3)
    with pytest.raises(RuntimeError, match="full"):
        cache.update(0, torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4))


def test_padded_query_rows_stay_finite():
    """A row that may attend to nothing would be NaN; the Gemma mask keeps the diagonal to avoid it,
    and this checks the layer itself passes a fully allowed diagonal through cleanly."""
    attn = Attention(16, 2)
    x = torch.randn(1, 4, 16)
    mask = torch.eye(4, dtype=torch.bool)[None, None]
    with torch.no_grad():
        out = attn(x, mask)
        # Each position attends only to itself (weight 1): the output is o_proj(v_proj(x)), head by head.
        v = attn.v_proj(x).view(1, 4, attn.num_kv_heads, -1).repeat_interleave(2 // attn.num_kv_heads, dim=2)
        expected = attn.o_proj(v.reshape(1, 4, -1))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- cross-attention
def cross_reference(attn: Attention, x, context, mask=None):
    """softmax(q_h k_g^T * scale + mask) v_g per head, with q from x and k, v from context."""
    B, L, _ = x.shape
    S = context.shape[1]
    H, G, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = attn.q_proj(x).view(B, L, H, D)
    k = attn.k_proj(context).view(B, S, G, D)
    v = attn.v_proj(context).view(B, S, G, D)
    heads = []
    for h in range(H):
        g = h // (H // G)
        s = torch.einsum("bid,bjd->bij", q[:, :, h], k[:, :, g]) * attn.scale
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        heads.append(torch.einsum("bij,bjd->bid", s.softmax(-1), v[:, :, g]))
    return attn.o_proj(torch.cat(heads, dim=-1))


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_cross_attention_equals_reference(kv_heads):
    torch.manual_seed(3)
    attn = Attention(32, 4, kv_heads, bias=True, kv_dim=12)
    x, context = torch.randn(2, 5, 32), torch.randn(2, 9, 12)
    mask = torch.rand(2, 5, 9) > 0.4
    mask[..., 0] = True  # every query sees at least one key
    with torch.no_grad():
        out = attn(x, context=context)
        assert out.shape == (2, 5, 32)
        assert torch.allclose(out, cross_reference(attn, x, context), atol=1e-5)
        assert torch.allclose(attn(x, mask[:, None], context=context), cross_reference(attn, x, context, mask),
                              atol=1e-5)


def test_cross_attention_equals_torch_multihead_attention():
    torch.manual_seed(4)
    D, Dc, H = 24, 10, 3
    ours = Attention(D, H, bias=True, kv_dim=Dc, out_name="out_proj")
    theirs = torch.nn.MultiheadAttention(D, H, bias=True, kdim=Dc, vdim=Dc, batch_first=True)
    with torch.no_grad():
        theirs.q_proj_weight.copy_(ours.q_proj.weight)
        theirs.k_proj_weight.copy_(ours.k_proj.weight)
        theirs.v_proj_weight.copy_(ours.v_proj.weight)
        theirs.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        theirs.out_proj.weight.copy_(ours.out_proj.weight)
        theirs.out_proj.bias.copy_(ours.out_proj.bias)
    x, context = torch.randn(2, 6, D), torch.randn(2, 8, Dc)
    padding = torch.zeros(2, 8, dtype=torch.bool)
    padding[1, 5:] = True  # the last 3 context tokens of row 1 are padding
    with torch.no_grad():
        want, _ = theirs(x, context, context, key_padding_mask=padding, need_weights=False)
        got = ours(x, ~padding[:, None, None, :], context=context)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_cross_attention_refuses_rope_cache_and_causal():
    attn = Attention(16, 2, kv_dim=6)
    x, context = torch.randn(1, 3, 16), torch.randn(1, 4, 6)
    rope = RotaryEmbedding(8)(torch.arange(3)[None])
    for kw in (dict(rope=rope), dict(cache=KVCache(1, 1, 2, 8, max_len=8)), dict(is_causal=True)):
        with pytest.raises(ValueError, match="cross-attention"):
            attn(x, context=context, **kw)
    with pytest.raises(ValueError, match="kv_dim=6"):
        attn(x)  # keys need 6 features: self-attention on x is not possible
