"""The 2-D sin-cos position embedding and the patch embedding, against independent formulas."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from genlab.nn.embeddings import PatchEmbedding, sincos_2d_position_embedding

torch.set_num_threads(1)


def mae_sincos_2d(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """MAE's get_2d_sincos_pos_embed (facebookresearch/mae, util/pos_embed.py), for a grid_h x grid_w grid."""

    def one_d(d, pos):
        omega = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(grid_w, dtype=np.float32), np.arange(grid_h, dtype=np.float32))  # w first
    grid = np.stack(grid, axis=0).reshape(2, 1, grid_h, grid_w)
    return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)


@pytest.mark.parametrize("dim,h,w", [(16, 4, 4), (32, 3, 5), (8, 1, 6)])
def test_sincos_2d_matches_mae(dim, h, w):
    got = sincos_2d_position_embedding(dim, h, w)
    assert got.shape == (h * w, dim) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), mae_sincos_2d(dim, h, w), rtol=0, atol=1e-6)


def test_sincos_2d_token_order_and_bad_dim():
    emb = sincos_2d_position_embedding(8, 2, 3)  # tokens row-major: n = i * 3 + j
    # column j = 2, row i = 1 at token 5: first quarter is sin(j * w_k), third is sin(i * w_k)
    w = torch.tensor([1.0, 0.01])
    torch.testing.assert_close(emb[5, :2], torch.sin(2 * w))
    torch.testing.assert_close(emb[5, 4:6], torch.sin(1 * w))
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_2d_position_embedding(6, 2, 2)


def test_patch_embedding_is_a_linear_map_per_patch():
    torch.manual_seed(0)
    p, C, D = 4, 3, 10
    embed = PatchEmbedding(C, D, p)
    x = torch.randn(2, C, 8, 12)
    out = embed(x)
    assert out.shape == (2, (8 // p) * (12 // p), D)
    # token n = i * (W/p) + j is W @ flatten(patch (i, j)) + b
    patches = x.unfold(2, p, p).unfold(3, p, p)  # (B, C, H/p, W/p, p, p)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(2, -1, C * p * p)  # (B, N, C p p) row-major
    want = F.linear(patches, embed.weight.reshape(D, -1), embed.bias)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert sorted(embed.state_dict()) == ["bias", "weight"]  # the keys of an HF patch_embedding
    assert isinstance(embed, torch.nn.Conv2d)


def test_patch_embedding_rejects_sizes_not_divisible():
    embed = PatchEmbedding(3, 8, 4)
    with pytest.raises(ValueError, match="10x8 is not divisible by the patch size 4"):
        embed(torch.randn(1, 3, 10, 8))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        embed(torch.randn(3, 8, 8))
