"""A small MLP velocity field v_theta(x, t) for low-dimensional flow matching."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor, nn

from genlab.nn.blocks import Activation, activation as find_activation
from genlab.nn.embeddings import timestep_embedding

__all__ = ["MLPConfig", "VelocityMLP"]


@dataclass
class MLPConfig:
    """The MLP's own config (a recipe embeds it as its ``model`` section; the data dimension comes
    from the data)."""

    hidden: int = 256
    depth: int = 3
    time_embed_dim: int = 64
    activation: str = "silu"
    time_scale: float = 100.0

    def checks(self) -> Iterable[tuple[str, bool, str]]:
        from genlab.nn.blocks import ACTIVATIONS

        for name in ("hidden", "depth", "time_embed_dim"):
            yield name, getattr(self, name) >= 1, "must be >= 1"
        yield "activation", self.activation in ACTIVATIONS, f"choose one of {', '.join(ACTIVATIONS)}"
        yield "time_scale", self.time_scale > 0, "must be > 0"


class VelocityMLP(nn.Module):
    """v_theta(x, t): concat(x, sinusoidal(t)) -> ``depth`` hidden layers -> ``dim`` outputs.

    Args:
        dim: data dimension D (input and output size).
        hidden: width of every hidden layer.
        depth: number of hidden layers (each Linear + activation).
        time_embed_dim: number of sinusoidal time features.
        activation: a name in ``genlab.nn.blocks.ACTIVATIONS`` (silu, gelu, relu, elu, selu, tanh, ...).
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
        find_activation(activation)  # ValueError naming the known activations, before anything else
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.dim, self.time_embed_dim, self.time_scale = dim, time_embed_dim, time_scale
        layers: list[nn.Module] = []
        width_in = dim + time_embed_dim
        for _ in range(depth):
            layers += [nn.Linear(width_in, hidden), Activation(activation)]  # no parameters: keys net.0, net.2, ...
            width_in = hidden
        layers.append(nn.Linear(hidden, dim))
        self.net = nn.Sequential(*layers)

    @classmethod
    def from_config(cls, cfg: MLPConfig, dim: int) -> "VelocityMLP":
        return cls(dim=dim, hidden=cfg.hidden, depth=cfg.depth, time_embed_dim=cfg.time_embed_dim,
                   activation=cfg.activation, time_scale=cfg.time_scale)

    def forward(self, x: Tensor, t: Tensor | float, **extras: object) -> Tensor:
        """x: (B, D), t: (B,) | scalar -> velocity (B, D)."""
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        temb = timestep_embedding(t * self.time_scale, self.time_embed_dim).to(x.dtype)  # (B, E)
        return self.net(torch.cat([x, temb], dim=-1))  # (B, D)
