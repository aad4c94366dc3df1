"""Embeddings shared by several families: timestep (sinusoidal) features, fixed 2-D sin-cos
positions, and a patch embedding for vision transformers."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["timestep_embedding", "sincos_2d_position_embedding", "PatchEmbedding"]


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of scalar times, as in Transformers / DDPM / DiT.

    For ``half = dim // 2`` frequencies ``f_k = max_period ** (-k / half)``
    (k = 0 .. half-1, geometric from 1 down towards 1/max_period) returns
    ``[cos(t f_0), ..., cos(t f_{half-1}), sin(t f_0), ..., sin(t f_{half-1})]``
    and one trailing zero when ``dim`` is odd.

    Args:
        t: (B,) times (any float scale; callers choose how to scale t in [0, 1]).
        dim: number of output features.
        max_period: the slowest period is about ``2 pi max_period``.

    Returns:
        (B, dim) float tensor on t's device (float32 unless t is float64).
    """
    if t.dim() != 1:
        raise ValueError(f"t must have shape (B,), got {tuple(t.shape)}")
    half = dim // 2
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    k = torch.arange(half, device=t.device, dtype=dtype)
    freqs = torch.exp(-math.log(max_period) * k / half)  # (half,)
    args = t.to(dtype)[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2 * half)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def sincos_2d_position_embedding(dim: int, grid_h: int, grid_w: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding of MAE / DiT: (grid_h * grid_w, dim), float32.

    Token ``n = i * grid_w + j`` (row i, column j: row-major, as ``PatchEmbedding`` orders its
    patches) gets ``[sin(j w), cos(j w), sin(i w), cos(i w)]``, each block ``dim / 4`` wide, with
    frequencies ``w_k = 10000 ** (-k / (dim / 4))`` for k = 0 .. dim/4 - 1: the first half of the
    features encodes the column, the second half the row (the order of MAE's
    ``get_2d_sincos_pos_embed``). Computed in float64, returned as float32. ``dim % 4 == 0``.
    """
    if dim % 4:
        raise ValueError(f"dim must be a multiple of 4 for a 2-D sin-cos embedding, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (dim/4,)
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                                torch.arange(grid_w, dtype=torch.float64), indexing="ij")  # (h, w) each

    def one_axis(pos: Tensor) -> Tensor:  # (N,) -> (N, dim/2)
        angles = pos[:, None] * omega[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)

    return torch.cat([one_axis(cols.flatten()), one_axis(rows.flatten())], dim=-1).float()  # (N, dim)


class PatchEmbedding(nn.Conv2d):
    """Images (B, C, H, W) -> patch tokens (B, N, D), N = (H / p) * (W / p), in row-major order.

    A ``Conv2d`` with kernel = stride = ``patch_size``, i.e. one linear map per non-overlapping
    p x p patch. It *is* the convolution (a subclass), so its parameters are ``weight``
    (D, C, p, p) and ``bias`` (D,) exactly as in transformers' ``patch_embedding`` (HF checkpoints
    load as they are) and code that treats convolutions alike (initialisers) still sees one.
    H and W must be multiples of ``patch_size`` (ValueError otherwise).
    """

    def __init__(self, in_channels: int, dim: int, patch_size: int, bias: bool = True):
        super().__init__(in_channels, dim, patch_size, stride=patch_size, bias=bias)
        self.patch_size = patch_size

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
        H, W = x.shape[-2:]
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not divisible by the patch size {p}")
        return super().forward(x).flatten(2).transpose(1, 2)  # (B, D, H/p, W/p) -> (B, N, D)
