"""Embeddings shared by several families: timestep (sinusoidal) features."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["timestep_embedding"]


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
