"""Building blocks shared by the families: the activation table, an MLP, and DiT's adaLN-Zero blocks.

Activations. ``ACTIVATIONS`` maps a name to a plain function ``Tensor -> Tensor``; the names are
those of Hugging Face configs (``hidden_act`` / ``hidden_activation``) plus torch's usual ones.
``activation(name)`` looks one up (unknown names are a ``ValueError`` listing the known ones) and
``Activation(name)`` wraps it as a parameter-free module for ``nn.Sequential``.

adaLN-Zero (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers"). A conditioning
vector ``c`` (B, C), e.g. a timestep + label embedding, is mapped by ``SiLU -> Linear`` to shifts,
scales and gates that modulate a pre-LN transformer block whose LayerNorms have no affine
parameters of their own. The ``Linear`` starts at zero, so every gate is zero and a freshly built
block is exactly the identity: a deep stack starts as the identity map and learns to move away.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genlab.nn.attention import Attention

__all__ = ["ACTIVATIONS", "activation", "Activation", "MLP", "modulate", "AdaLNZeroBlock", "FinalAdaLNLayer"]


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU with the tanh approximation, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,  # exact (erf) GELU: HF "gelu", torch's nn.GELU()
    "gelu_pytorch_tanh": gelu_tanh,  # HF name of torch's tanh approximation (SigLIP, Gemma)
    "gelu_new": gelu_tanh,  # HF's NewGELU writes the same tanh formula out; equal up to rounding
    "silu": F.silu,
    "relu": F.relu,
    "elu": F.elu,
    "selu": F.selu,
    "tanh": torch.tanh,
}


def activation(name: str) -> Callable[[Tensor], Tensor]:
    """The elementwise function called ``name`` in ``ACTIVATIONS``; ValueError if there is none."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name]


class Activation(nn.Module):
    """``activation(name)`` as a module without parameters (so it takes a slot in ``nn.Sequential``
    without adding state_dict keys)."""

    def __init__(self, name: str):
        super().__init__()
        self.fn = activation(name)
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


class MLP(nn.Module):
    """``fc2(act(fc1(x)))``: dim -> hidden -> out_dim (default dim), on the last axis.

    Module names ``fc1`` / ``fc2`` are those of transformers' SigLIP and timm's Mlp (used by DiT).
    """

    def __init__(self, dim: int, hidden: int, activation: str = "gelu_pytorch_tanh", out_dim: int | None = None,
                 bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = Activation(activation)
        self.fc2 = nn.Linear(hidden, out_dim or dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))  # (..., out_dim)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """``x * (1 + scale) + shift`` with per-sample ``shift``/``scale`` (B, D) broadcast over the
    tokens of ``x`` (B, L, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


def _zero_linear(layer: nn.Linear) -> nn.Linear:
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


class AdaLNZeroBlock(nn.Module):
    """DiT block with adaLN-Zero conditioning.

    With ``(shift1, scale1, gate1, shift2, scale2, gate2) = adaLN_modulation(c)``, each (B, D):
        x = x + gate1 * attn(modulate(LN(x), shift1, scale1))
        x = x + gate2 * mlp(modulate(LN(x), shift2, scale2))
    where LN has no affine parameters (eps 1e-6), attention is bidirectional multi-head
    self-attention with biases (``mask`` and ``rope`` are passed through, so a text backbone with
    rotary positions can use the block) and the MLP is dim -> mlp_ratio * dim -> dim with tanh-GELU.
    ``adaLN_modulation = Sequential(SiLU, Linear(cond_dim, 6 * dim))`` starts at zero, so a fresh
    block returns its input exactly.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, cond_dim: int | None = None):
        super().__init__()
        cond_dim = cond_dim or dim
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, bias=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio), "gelu_pytorch_tanh")
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), _zero_linear(nn.Linear(cond_dim, 6 * dim)))

    def forward(self, x: Tensor, c: Tensor, mask: Tensor | None = None,
                rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """x (B, L, D), c (B, C), mask broadcastable to (B, 1, L, L) (True = may attend),
        rope a (cos, sin) pair (B, L, head_dim) -> (B, L, D)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)  # each (B, D)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1), mask=mask, rope=rope)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))  # (B, L, D)


class FinalAdaLNLayer(nn.Module):
    """DiT's output layer: ``linear(modulate(LN(x), shift, scale))`` with ``(shift, scale)`` from
    ``adaLN_modulation(c)``. Modulation and output projection start at zero (a fresh DiT predicts 0)."""

    def __init__(self, dim: int, out_dim: int, cond_dim: int | None = None):
        super().__init__()
        cond_dim = cond_dim or dim
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = _zero_linear(nn.Linear(dim, out_dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), _zero_linear(nn.Linear(cond_dim, 2 * dim)))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x (B, L, D), c (B, C) -> (B, L, out_dim)."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)  # each (B, D)
        return self.linear(modulate(self.norm_final(x), shift, scale))
