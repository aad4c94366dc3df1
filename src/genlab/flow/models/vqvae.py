"""A VQ-VAE (van den Oord et al. 2017): conv encoder -> vector quantiser -> conv decoder.

The latent flow-matching recipe trains a flow on its latents (``encode``) and turns generated
latents back into pixels (``decode``). The quantiser learns its codebook either by exponential
moving averages of the vectors assigned to each code (``ema_decay > 0``; the paper's appendix A.1,
Razavi et al. 2019) or by gradient through the codebook loss term (``ema_decay = 0``), and restarts
dead codes (EMA usage below ``dead_code_threshold``) on encoder outputs of the current batch.
Codebook statistics change only in training mode; under DDP they are summed over ranks, so every
rank keeps the same codebook.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from genlab.errors import ConfigError

__all__ = ["VQVAEConfig", "VectorQuantizer", "QuantizerOutput", "VQVAE"]


@dataclass
class VQVAEConfig:
    """The VQ-VAE's own config (a recipe embeds it as ``model``; channels and size come from the data)."""

    hidden: int = 64  # channels of every conv layer
    num_down: int = 1  # stride-2 convs: latents are image_size / 2**num_down a side (digits 8x8 -> 4x4)
    res_blocks: int = 2  # residual blocks after the downsampling (and, mirrored, before the upsampling)
    latent_dim: int = 4  # D: channels of the latents = dimension of a code
    codebook_size: int = 64  # K
    commitment: float = 0.25  # beta: weight of ||z_e - sg(z_q)||^2
    ema_decay: float = 0.99  # EMA codebook updates; 0 = learn the codebook by its loss term instead
    dead_code_threshold: float = 1.0  # restart codes used by fewer vectors per batch (EMA); 0 = never
    eps: float = 1e-5  # Laplace smoothing of the EMA cluster sizes

    def checks(self) -> Iterable[tuple[str, bool, str]]:
        for name in ("hidden", "latent_dim", "codebook_size"):
            yield name, getattr(self, name) >= 1, "must be >= 1"
        yield "codebook_size", self.codebook_size >= 2, "must be >= 2"
        yield "num_down", 0 <= self.num_down <= 6, "must be in [0, 6]"
        yield "res_blocks", self.res_blocks >= 0, "must be >= 0"
        yield "commitment", self.commitment >= 0, "must be >= 0"
        yield "ema_decay", 0 <= self.ema_decay < 1, "must be in [0, 1) (0 = learn the codebook by gradient)"
        yield "dead_code_threshold", self.dead_code_threshold >= 0, "must be >= 0 (0 = no restarts)"
        yield "eps", self.eps > 0, "must be > 0"


# -- DDP helpers: no-ops single-process -----------------------------------------------------------------------
def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum_(t: Tensor) -> Tensor:
    """Sum ``t`` over ranks in place (when torch.distributed is initialised); returns ``t``."""
    if _distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_(t: Tensor, src: int = 0) -> Tensor:
    """Rank ``src``'s ``t`` on every rank (in place, when distributed); returns ``t``."""
    if _distributed():
        dist.broadcast(t, src)
    return t


@dataclass
class QuantizerOutput:
    quantized: Tensor  # (B, D, h, w) straight-through: the codes' values forward, identity backward
    codes: Tensor  # (B, h, w) int64 index of the nearest code
    loss: Tensor  # () commitment (+ codebook) loss
    stats: dict[str, Tensor] = field(default_factory=dict)  # perplexity, used_codes, restarts (detached)


def usage_stats(counts: Tensor) -> dict[str, Tensor]:
    """Perplexity exp(H(p)) of the code usage p = counts / sum (1 .. K; K = all codes equally used)
    and the fraction of codes used at least once."""
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    return {"perplexity": entropy.exp(), "used_codes": (counts > 0).float().mean()}


class VectorQuantizer(nn.Module):
    """Nearest-code quantisation of (B, D, h, w) vectors with a straight-through gradient.

    ``codebook`` (K, D) is a parameter when learned by gradient, a buffer under EMA. ``cluster_size``
    (K,) is the EMA of how many vectors each code gets per batch (it finds dead codes in both modes);
    ``embed_sum`` (K, D) the EMA of their sum (EMA mode). Both start as if each code had been
    assigned once, to itself, so the first EMA steps are not divided by near-zero counts.
    """

    def __init__(self, num_codes: int, dim: int, commitment: float = 0.25, ema_decay: float = 0.99,
                 dead_code_threshold: float = 1.0, eps: float = 1e-5):
        super().__init__()
        self.num_codes, self.dim, self.commitment = num_codes, dim, commitment
        self.ema_decay, self.dead_code_threshold, self.eps = ema_decay, dead_code_threshold, eps
        self.ema = ema_decay > 0
        init = torch.empty(num_codes, dim).uniform_(-1 / num_codes, 1 / num_codes)  # (K, D) as in the paper
        if self.ema:
            self.register_buffer("codebook", init)
            self.register_buffer("embed_sum", init.clone())
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("cluster_size", torch.ones(num_codes))
        # usage counts decay like the EMA codebook, or at 0.99 when the codebook is learned by gradient
        self.usage_decay = ema_decay if self.ema else 0.99

    @torch.no_grad()
    def nearest(self, flat: Tensor) -> Tensor:
        """(N, D) -> (N,) index of the nearest code by squared Euclidean distance."""
        cb = self.codebook.detach()
        d2 = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ cb.t() + cb.pow(2).sum(1)  # (N, K)
        return d2.argmin(1)

    def lookup(self, codes: Tensor) -> Tensor:
        """(B, h, w) code indices -> (B, D, h, w) code vectors."""
        return F.embedding(codes, self.codebook).permute(0, 3, 1, 2)

    def quantize(self, z: Tensor) -> Tensor:
        """(B, D, h, w) -> the nearest code vectors (B, D, h, w); no gradient, no statistics."""
        b, d, h, w = z.shape
        codes = self.nearest(z.permute(0, 2, 3, 1).reshape(-1, d)).view(b, h, w)
        return self.lookup(codes).detach()

    @torch.no_grad()
    def restart_dead_codes(self, flat: Tensor) -> int:
        """Move every code whose ``cluster_size`` is below the threshold onto a random row of ``flat``
        (N, D) (rank 0's rows under DDP); it restarts with ``cluster_size = threshold``, so it lives on
        if it then gets at least ``threshold`` vectors a batch. Returns how many codes moved."""
        dead = self.cluster_size < self.dead_code_threshold  # (K,) the same on every rank
        n = int(dead.sum())
        if n == 0:
            return 0
        rows = torch.randperm(flat.shape[0], device=flat.device)[:n]
        if rows.numel() < n:  # fewer vectors than dead codes: draw with replacement
            rows = torch.randint(0, flat.shape[0], (n,), device=flat.device)
        new = broadcast_(flat[rows].to(self.codebook.dtype).contiguous())  # (n, D)
        self.codebook.data[dead] = new
        self.cluster_size[dead] = self.dead_code_threshold
        if self.ema:
            self.embed_sum[dead] = new * self.dead_code_threshold
        return n

    @torch.no_grad()
    def update_statistics(self, flat: Tensor, codes: Tensor) -> Tensor:
        """One EMA step of the usage counts (and, in EMA mode, of the codebook) from this batch's
        assignments, summed over ranks; returns the batch's counts per code (K,)."""
        counts = torch.bincount(codes, minlength=self.num_codes).to(self.cluster_size.dtype)  # (K,)
        all_reduce_sum_(counts)
        d = self.usage_decay
        self.cluster_size.mul_(d).add_(counts, alpha=1 - d)
        if self.ema:
            sums = torch.zeros_like(self.embed_sum).index_add_(0, codes, flat.to(self.embed_sum.dtype))  # (K, D)
            all_reduce_sum_(sums)
            self.embed_sum.mul_(d).add_(sums, alpha=1 - d)
            # Laplace smoothing: no code is divided by a zero count, the total stays n.
            n = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.eps) / (n + self.num_codes * self.eps) * n  # (K,)
            self.codebook.copy_(self.embed_sum / smoothed[:, None])
        return counts

    def forward(self, z: Tensor) -> QuantizerOutput:
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # (N, D), N = B*h*w
        restarts = 0
        if self.training and self.dead_code_threshold > 0:
            restarts = self.restart_dead_codes(flat.detach())  # before the look-up: the graph sees the new codes
        codes = self.nearest(flat.detach())  # (N,)
        q = F.embedding(codes, self.codebook)  # (N, D), differentiable w.r.t. a learned codebook
        loss = self.commitment * F.mse_loss(flat, q.detach())  # pulls the encoder to its codes
        if not self.ema:
            loss = loss + F.mse_loss(q, flat.detach())  # pulls the codes to the encoder outputs
        if self.training:
            counts = self.update_statistics(flat.detach(), codes)
        else:
            counts = torch.bincount(codes, minlength=self.num_codes).float()
        # Straight-through: the forward value is q, the gradient w.r.t. z is the identity.
        q_st = flat + (q - flat).detach()
        quantized = q_st.view(b, h, w, d).permute(0, 3, 1, 2)  # (B, D, h, w)
        stats = {**usage_stats(counts), "restarts": torch.tensor(float(restarts))}
        return QuantizerOutput(quantized, codes.view(b, h, w), loss, stats)


class ResBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))), the paper's residual block."""

    def __init__(self, ch: int):
        super().__init__()
        self.net = nn.Sequential(nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(), nn.Conv2d(ch, ch, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


class VQVAE(nn.Module):
    """Images (B, C, H, W) in [-1, 1] <-> latents (B, latent_dim, H / 2**num_down, W / 2**num_down).

    ``forward(x) -> (recon, vq_loss, stats)``; the recipe adds the reconstruction loss.
    """

    def __init__(self, channels: int = 1, image_size: int = 8, hidden: int = 64, num_down: int = 1,
                 res_blocks: int = 2, latent_dim: int = 4, codebook_size: int = 64, commitment: float = 0.25,
                 ema_decay: float = 0.99, dead_code_threshold: float = 1.0, eps: float = 1e-5):
        super().__init__()
        if image_size % 2 ** num_down:
            raise ConfigError(f"--model.num-down={num_down}: {image_size}-pixel images cannot be halved "
                              f"{num_down} times; use fewer downsamplings or --data.image-size divisible by "
                              f"{2 ** num_down}")
        self.channels, self.image_size, self.num_down = channels, image_size, num_down
        down = [nn.Conv2d(channels, hidden, 3, padding=1)]
        for _ in range(num_down):
            down += [nn.ReLU(), nn.Conv2d(hidden, hidden, 4, stride=2, padding=1)]  # halves H and W
        self.encoder = nn.Sequential(*down, *[ResBlock(hidden) for _ in range(res_blocks)], nn.ReLU(),
                                     nn.Conv2d(hidden, latent_dim, 1))
        up = [nn.Conv2d(latent_dim, hidden, 3, padding=1), *[ResBlock(hidden) for _ in range(res_blocks)]]
        for _ in range(num_down):
            up += [nn.ReLU(), nn.ConvTranspose2d(hidden, hidden, 4, stride=2, padding=1)]  # doubles H and W
        self.decoder = nn.Sequential(*up, nn.ReLU(), nn.Conv2d(hidden, channels, 3, padding=1))
        self.quantizer = VectorQuantizer(codebook_size, latent_dim, commitment, ema_decay, dead_code_threshold, eps)

    @classmethod
    def from_config(cls, cfg: VQVAEConfig, channels: int, image_size: int) -> "VQVAE":
        return cls(channels, image_size, cfg.hidden, cfg.num_down, cfg.res_blocks, cfg.latent_dim,
                   cfg.codebook_size, cfg.commitment, cfg.ema_decay, cfg.dead_code_threshold, cfg.eps)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(latent_dim, h, w) of the latents of one image."""
        side = self.image_size // 2 ** self.num_down
        return (self.quantizer.dim, side, side)

    def encode(self, x: Tensor, quantize: bool = True) -> Tensor:
        """(B, C, H, W) -> (B, D, h, w): the encoder output, snapped to its nearest codes when
        ``quantize`` (no codebook statistics change, in any mode)."""
        z = self.encoder(x)
        return self.quantizer.quantize(z) if quantize else z

    def codes(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, h, w) int64 code indices."""
        z = self.encoder(x)
        b, d, h, w = z.shape
        return self.quantizer.nearest(z.permute(0, 2, 3, 1).reshape(-1, d)).view(b, h, w)

    def decode(self, z: Tensor, quantize: bool = False) -> Tensor:
        """(B, D, h, w) -> (B, C, H, W); ``quantize`` snaps ``z`` (e.g. generated latents) to the codebook first."""
        return self.decoder(self.quantizer.quantize(z) if quantize else z)

    def decode_codes(self, codes: Tensor) -> Tensor:
        """(B, h, w) code indices -> (B, C, H, W)."""
        return self.decoder(self.quantizer.lookup(codes))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        q = self.quantizer(self.encoder(x))
        return self.decoder(q.quantized), q.loss, q.stats
