"""A small MLP velocity field v_theta(x, t) for low-dimensional flow matching."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from genlab.nn.embeddings import timestep_embedding

__all__ = ["VelocityMLP"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "selu": nn.SELU,
    "tanh": nn.Tanh,
}


class VelocityMLP(nn.Module):
    """v_theta(x, t): concat(x, sinusoidal(t)) -> ``depth`` hidden layers -> ``dim`` outputs.

    Args:
        dim: data dimension D (input and output size).
        hidden: width of every hidden layer.
        depth: number of hidden layers (each Linear + activation).
        time_embed_dim: number of sinusoidal time features.
        activation: one of silu, gelu, relu, elu, selu, tanh.
        time_scale: t in [0, 1] is multiplied by this before the sinusoidal
            embedding, so its frequencies (1 down to 1/10000 per unit) cover
            periods from a fraction of the unit interval to far beyond it.

    ``forward(x, t, **extras)`` accepts t as a (B,) tensor, a 0-dim tensor or a
    python float (broadcast to the batch) and ignores ``extras`` (class labels
    etc. are for conditional models), so any solver can call it.
    """

    def __init__(
        self,
        dim: int = 2,
        hidden: int = 256,
        depth: int = 4,
        time_embed_dim: int = 64,
        activation: str = "silu",
        time_scale: float = 100.0,
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(_ACTIVATIONS)}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.dim, self.time_embed_dim, self.time_scale = dim, time_embed_dim, time_scale
        act = _ACTIVATIONS[activation]
        layers: list[nn.Module] = []
        width_in = dim + time_embed_dim
        for _ in range(depth):
            layers += [nn.Linear(width_in, hidden), act()]
            width_in = hidden
        layers.append(nn.Linear(hidden, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, t: Tensor | float, **extras: object) -> Tensor:
        """x: (B, D), t: (B,) | scalar -> velocity (B, D)."""
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        temb = timestep_embedding(t * self.time_scale, self.time_embed_dim).to(x.dtype)  # (B, E)
        return self.net(torch.cat([x, temb], dim=-1))  # (B, D)
