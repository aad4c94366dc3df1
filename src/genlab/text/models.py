"""The text backbone: a transformer of adaLN-Zero blocks with rotary positions.

Bidirectional, it is MDLM's denoiser ``(x_t (B, L), t (B,)) -> logits (B, L, V)`` over the V real
tokens (the mask token, id V, has an input embedding but is never predicted: SUBS). With
``causal=True`` the same layers under a causal mask are the autoregressive baseline (the same
parameter count: only the attention mask differs). Time conditioning (sinusoidal features of t and
an MLP, fed to every block's adaLN) is optional; without it the blocks get a constant zero
condition, so their shifts, scales and gates are learned biases, and the denoiser does not depend on
t (which is what makes the cached sampler exact).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor, nn

from genlab.config import Check, positive
from genlab.nn.attention import RotaryEmbedding, causal_mask
from genlab.nn.blocks import MLP, AdaLNZeroBlock, FinalAdaLNLayer
from genlab.nn.embeddings import timestep_embedding


@dataclass
class TextTransformerConfig:
    """The backbone's own config (the recipe embeds it as its ``model`` section)."""

    vocab_size: int = 0  # V real tokens; 0 = filled in from the tokenizer when the model is built
    hidden: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    max_len: int = 1024  # the longest sequence the model accepts
    time_conditioning: bool = False  # MDLM finds t-conditioning unnecessary for the absorbing process
    causal: bool = False  # True: the autoregressive baseline (same layers, causal mask)

    def checks(self) -> Iterable[Check]:
        yield "vocab_size", self.vocab_size >= 0, "must be >= 0 (0 = from the tokenizer)"
        yield from positive("hidden", "depth", "heads", "max_len", cfg=self)
        yield "heads", self.hidden % self.heads == 0, "must divide --model.hidden"
        yield "heads", (self.hidden // self.heads) % 2 == 0, "must leave an even head size (--model.hidden / heads) for RoPE"
        yield "mlp_ratio", self.mlp_ratio > 0, "must be > 0"


class TextTransformer(nn.Module):
    """``forward(x (B, L) long in [0, V], t (B,) float) -> logits (B, L, V)``; id V is the mask token."""

    def __init__(self, cfg: TextTransformerConfig):
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("TextTransformerConfig.vocab_size must be set (from the tokenizer) before building")
        self.cfg = cfg
        self.mask_id = cfg.vocab_size
        self.embed = nn.Embedding(cfg.vocab_size + 1, cfg.hidden)  # + the mask token (id V)
        self.rope = RotaryEmbedding(cfg.hidden // cfg.heads)
        self.time_mlp = MLP(cfg.hidden, cfg.hidden, "silu") if cfg.time_conditioning else None
        self.blocks = nn.ModuleList(AdaLNZeroBlock(cfg.hidden, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final = FinalAdaLNLayer(cfg.hidden, cfg.vocab_size)
        nn.init.normal_(self.embed.weight, std=0.02)

    def cond(self, t: Tensor, batch: int, device: torch.device) -> Tensor:
        """The adaLN condition (B, hidden): an embedding of t, or zeros without time conditioning."""
        if self.time_mlp is None:
            return torch.zeros(batch, self.cfg.hidden, device=device)
        return self.time_mlp(timestep_embedding(t * 1000.0, self.cfg.hidden))  # t in [0, 1] -> DiT's scale

    def forward(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        B, L = x.shape
        if L > self.cfg.max_len:
            raise ValueError(f"sequence of {L} tokens is longer than max_len={self.cfg.max_len}")
        t = torch.zeros(B, device=x.device) if t is None else t
        h = self.embed(x)  # (B, L, D)
        c = self.cond(t.to(h.dtype), B, x.device)  # (B, D)
        rope = self.rope(torch.arange(L, device=x.device)[None], h.dtype)  # each (1, L, head_dim)
        mask = causal_mask(L, L, x.device) if self.cfg.causal else None  # (L, L)
        for block in self.blocks:
            h = block(h, c, mask=mask, rope=rope)
        return self.final(h, c)  # (B, L, V)


def build_model(cfg: TextTransformerConfig) -> TextTransformer:
    return TextTransformer(cfg)
