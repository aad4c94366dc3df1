"""Normalisation layers shared by the families.

RMSNorm here follows the Gemma convention when ``offset=1``: the learned weight is stored
as a deviation from one, ``y = x / rms(x) * (1 + w)``, and the whole computation runs in
float32 before casting back (Gemma multiplies by the weight *before* the cast, Llama after;
the order matters in bf16). LayerNorm needs no helper: ``torch.nn.LayerNorm`` is used as is.
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension.

    ``y = x * rsqrt(mean(x^2) + eps) * (offset + weight)``, computed in float32 and cast back
    to the input dtype. With ``offset=1.0`` the weight starts at zero (Gemma); with
    ``offset=0.0`` it starts at one (Llama-style scale).
    """

    def __init__(self, dim: int, eps: float = 1e-6, offset: float = 0.0):
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (self.offset + self.weight.float())).type_as(x)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, offset={self.offset}"
