"""DiT: a class-conditional diffusion transformer as a velocity model (Peebles & Xie 2023).

An image (B, C, H, W) is cut into p x p patches, each a token (row-major, N = H W / p^2), plus a
fixed 2-D sin-cos position embedding. One conditioning vector per sample,
    c = MLP(sinusoidal(1000 t)) + class_table[y] (+ MLP(sinusoidal(1000 h)) with ``interval_input``),
drives every adaLN-Zero block and the final layer; a linear map turns each token back into its
p x p x C patch. The class table has ``num_classes + 1`` rows: the last is the "null" class that
classifier-free guidance uses for the unconditional velocity (``y=None`` means all-null).

``interval_input`` adds MeanFlow's second time input h = t_end - t (Geng et al. 2025): the model
then predicts the average velocity over [t, t + h]; h = 0 is the ordinary instantaneous velocity.

Initialised as DiT's reference code: xavier-uniform linears, normal(0.02) class table and timestep
MLPs, and zero adaLN modulation and output layer, so a fresh model predicts exactly 0 and each
block starts as the identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from genlab.config import Check, positive
from genlab.nn.blocks import MLP, AdaLNZeroBlock, FinalAdaLNLayer
from genlab.nn.embeddings import PatchEmbedding, sincos_2d_position_embedding, timestep_embedding

__all__ = ["DiTConfig", "DiT", "drop_labels", "patchify", "unpatchify"]

FREQ_DIM = 256  # sinusoidal features fed to the timestep MLPs (DiT's frequency_embedding_size)
TIME_SCALE = 1000.0  # t in [0, 1] -> DiT's step range, see DiT.embed_time


@dataclass
class DiTConfig:
    """The DiT's own config (a recipe embeds it as its ``model`` section); channels, image size and
    the number of classes come from the data. The defaults are DiT-B."""

    hidden: int = 768
    depth: int = 12
    heads: int = 12
    patch: int = 2
    mlp_ratio: float = 4.0
    class_dropout: float = 0.1  # training-time share of labels replaced by the null class (for CFG)
    interval_input: bool = False  # MeanFlow's second time input h = t_end - t
    grad_checkpointing: bool = False  # recompute each block in backward: less memory, ~1/3 more compute
    time_scale: float = TIME_SCALE  # t -> sinusoid(time_scale * t); MeanFlow wants a smoother embedding (see embed_time)

    def checks(self) -> Iterable[Check]:
        yield from positive("hidden", "depth", "heads", "patch", cfg=self)
        yield "heads", self.hidden % self.heads == 0, "must divide --model.hidden"
        yield "hidden", self.hidden % 4 == 0, "must be a multiple of 4 (the 2-D sin-cos position embedding)"
        yield "mlp_ratio", self.mlp_ratio > 0, "must be > 0"
        yield "class_dropout", 0.0 <= self.class_dropout < 1.0, "must be in [0, 1)"
        yield "time_scale", self.time_scale > 0, "must be > 0"


def patchify(x: Tensor, patch: int) -> Tensor:
    """(B, C, H, W) -> (B, N, p * p * C): token n = i * (W/p) + j holds patch (i, j), features in
    (row-in-patch, column-in-patch, channel) order; the inverse of ``unpatchify``."""
    B, C, H, W = x.shape
    p = patch
    x = x.reshape(B, C, H // p, p, W // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(tokens: Tensor, patch: int, channels: int, grid_h: int, grid_w: int) -> Tensor:
    """(B, N, p * p * C) -> (B, C, H, W): DiT's (and diffusers') layout "nhwpqc -> nchpwq"."""
    B = tokens.shape[0]
    p = patch
    x = tokens.reshape(B, grid_h, grid_w, p, p, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(B, channels, grid_h * p, grid_w * p)


def drop_labels(y: Tensor, p: float, null_class: int, generator: torch.Generator | None = None) -> Tensor:
    """Replace each label by ``null_class`` independently with probability ``p`` (training for CFG:
    the same network then learns the conditional and the unconditional velocity). Returns a new tensor."""
    if p <= 0:
        return y
    gen_device = generator.device if generator is not None else y.device
    drop = torch.rand(y.shape, generator=generator, device=gen_device).to(y.device) < p  # (B,)
    return torch.where(drop, torch.full_like(y, null_class), y)


class DiT(nn.Module):
    """``forward(x (B, C, H, W), t (B,), y (B,) int64 | None, h (B,) | None) -> v (B, C, H, W)``.

    forward never drops labels itself (guidance and MeanFlow's JVP must see the labels they pass);
    a training step calls ``drop_labels`` on the batch's labels first.
    """

    def __init__(self, cfg: DiTConfig, channels: int, image_size: int, num_classes: int):
        super().__init__()
        if image_size % cfg.patch:
            raise ValueError(f"image_size={image_size} is not divisible by the patch size {cfg.patch}; "
                             f"choose a patch that divides it (or resize the images)")
        if cfg.hidden % cfg.heads or cfg.hidden % 4:
            raise ValueError(f"hidden={cfg.hidden} must be divisible by heads={cfg.heads} and by 4 (sin-cos)")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.cfg = cfg
        self.channels, self.image_size, self.num_classes = channels, image_size, num_classes
        self.grid = image_size // cfg.patch
        D = cfg.hidden
        self.x_embedder = PatchEmbedding(channels, D, cfg.patch)
        # A function of the config, not learned: a buffer, and not saved in checkpoints.
        pos = sincos_2d_position_embedding(D, self.grid, self.grid)[None]  # (1, N, D)
        self.register_buffer("pos_embed", pos, persistent=False)
        self.t_embedder = MLP(FREQ_DIM, D, "silu", out_dim=D)
        self.h_embedder = MLP(FREQ_DIM, D, "silu", out_dim=D) if cfg.interval_input else None
        self.y_embedder = nn.Embedding(num_classes + 1, D)  # + the null class (last row)
        self.blocks = nn.ModuleList(AdaLNZeroBlock(D, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final = FinalAdaLNLayer(D, cfg.patch * cfg.patch * channels)
        self.reset_parameters()

    @classmethod
    def from_config(cls, cfg: DiTConfig, channels: int, image_size: int, num_classes: int) -> "DiT":
        return cls(cfg, channels=channels, image_size=image_size, num_classes=num_classes)

    @property
    def null_class(self) -> int:
        """The label of the unconditional ("null") class: the last row of the class table."""
        return self.num_classes

    def drop_labels(self, y: Tensor, p: float | None = None, generator: torch.Generator | None = None) -> Tensor:
        """``drop_labels`` with this model's null class; ``p`` defaults to ``cfg.class_dropout``."""
        return drop_labels(y, self.cfg.class_dropout if p is None else p, self.null_class, generator)

    def reset_parameters(self) -> None:
        """DiT's initialize_weights."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for block in self.blocks:  # DiT has one fused qkv Linear(D, 3D): xavier over (3D, D), then split
            a = block.attn
            w = torch.empty(3 * a.q_proj.out_features, a.q_proj.in_features)
            nn.init.xavier_uniform_(w)
            for proj, part in zip((a.q_proj, a.k_proj, a.v_proj), w.chunk(3)):
                proj.weight.data.copy_(part)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))  # as a Linear on the flattened patch
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        for emb in (self.t_embedder, self.h_embedder):
            if emb is not None:
                nn.init.normal_(emb.fc1.weight, std=0.02)
                nn.init.normal_(emb.fc2.weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every gate starts at 0, each block is the identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final.adaLN_modulation[-1], self.final.linear):  # the model starts at output 0
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def embed_time(self, mlp: MLP, t: Tensor) -> Tensor:
        """(B,) times in [0, 1] -> (B, D). The sinusoid's frequencies run from 1 down to 1e-4 per unit;
        on [0, 1] only the fastest few would move, so t is scaled by 1000 (DiT's step range), which
        spreads the features over the interval and keeps DiT's tested embedding as it is. MeanFlow
        differentiates the model in t (its target holds du/dt), and the fastest features then make
        du/dt large and noisy: its presets use a smaller ``time_scale``."""
        dtype = mlp.fc1.weight.dtype
        return mlp(timestep_embedding(t * self.cfg.time_scale, FREQ_DIM).to(dtype))

    def condition(self, t: Tensor, y: Tensor | None, h: Tensor | None, batch: int) -> Tensor:
        """The adaLN condition c (B, D)."""
        if y is None:
            y = torch.full((batch,), self.null_class, dtype=torch.long, device=t.device)
        c = self.embed_time(self.t_embedder, t) + self.y_embedder(y)  # (B, D)
        if self.h_embedder is not None:
            c = c + self.embed_time(self.h_embedder, torch.zeros_like(t) if h is None else h)
        return c

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | None = None, h: Tensor | None = None) -> Tensor:
        B, C, H, W = x.shape
        if (C, H, W) != (self.channels, self.image_size, self.image_size):
            raise ValueError(f"expected images ({self.channels}, {self.image_size}, {self.image_size}), "
                             f"got {tuple(x.shape[1:])}")
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(B) if t.dim() == 0 else t
        if h is not None:
            h = torch.as_tensor(h, device=x.device)
            h = h.expand(B) if h.dim() == 0 else h
        tokens = self.x_embedder(x) + self.pos_embed  # (B, N, D)
        c = self.condition(t, y, h, B)  # (B, D)
        recompute = self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            tokens = checkpoint(block, tokens, c, use_reentrant=False) if recompute else block(tokens, c)
        out = self.final(tokens, c)  # (B, N, p * p * C)
        return unpatchify(out, self.cfg.patch, C, self.grid, self.grid)  # (B, C, H, W)
