"""The masked-diffusion (MDLM) objective and the autoregressive baseline's loss.

Absorbing forward process: q(x_t | x_0) masks each token independently with probability
1 - alpha(t) (it becomes the mask id V), keeping it with probability alpha(t).

SUBS parameterisation (Sahoo et al. 2024): the denoiser has V outputs (the mask is never
predicted), and an unmasked position carries its token over: p(x_0 = x_t | x_t) = 1 there, so its
loss is exactly 0. The continuous-time NELBO per token is

    NELBO = E_t [ -alpha'(t) / (1 - alpha(t)) * sum_{l masked in x_t} -log p_theta(x_0^l | x_t) ] / L

with t drawn uniformly; antithetic (low-discrepancy) times t_i = (u + i / B) mod 1 cut its variance,
and t is clamped to [eps_t, 1] where the weight is finite. In nats per token; / ln 2 is bits per
token (bits per character for a character tokenizer).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from genlab.math.schedules import LogLinearSchedule, MaskingCosineSchedule, Schedule

SCHEDULES = ("loglinear", "cosine")


def make_schedule(name: str, eps: float = 1e-3) -> Schedule:
    if name == "loglinear":
        return LogLinearSchedule(eps)
    if name == "cosine":
        return MaskingCosineSchedule(eps)
    raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")


def sample_times(batch: int, antithetic: bool = True, eps_t: float = 1e-3, device=None,
                 generator: torch.Generator | None = None) -> Tensor:
    """(B,) times in [eps_t, 1]: ``(u + i / B) mod 1`` for one uniform u when ``antithetic``, else B
    independent uniforms; clamped below at ``eps_t``."""
    if antithetic:
        u = torch.rand(1, generator=generator)
        t = (u + torch.arange(batch) / batch) % 1.0
    else:
        t = torch.rand(batch, generator=generator)
    return t.clamp(min=eps_t).to(device)


def forward_mask(x0: Tensor, alpha: Tensor, mask_id: int, generator: torch.Generator | None = None
                 ) -> tuple[Tensor, Tensor]:
    """Draw x_t ~ q(x_t | x_0): each token of x0 (B, L) is replaced by ``mask_id`` with probability
    1 - alpha (B,). Returns (x_t (B, L), masked (B, L) bool)."""
    u = torch.rand(x0.shape, generator=generator).to(x0.device)
    masked = u >= alpha[:, None].to(x0.device)  # P(masked) = 1 - alpha
    return torch.where(masked, torch.full_like(x0, mask_id), x0), masked


def subs_log_probs(logits: Tensor, x_t: Tensor, mask_id: int) -> Tensor:
    """SUBS: log p_theta(x_0 | x_t) (B, L, V) in float32: the softmax of the V logits at masked
    positions, and a point mass on the carried-over token (log 1 = 0, else -inf) at unmasked ones."""
    logp = F.log_softmax(logits.float(), dim=-1)
    keep = x_t != mask_id  # (B, L)
    carry = torch.full_like(logp, -math.inf).scatter(-1, x_t.clamp(max=logits.shape[-1] - 1)[..., None], 0.0)
    return torch.where(keep[..., None], carry, logp)


def mdlm_nelbo(logits: Tensor, x0: Tensor, x_t: Tensor, t: Tensor, schedule: Schedule, mask_id: int) -> Tensor:
    """The per-sequence NELBO estimate (B,) in nats per token for one draw (t, x_t):
    ``-alpha'(t) / (1 - alpha(t)) * sum_l -log p(x_0^l | x_t) / L`` (unmasked positions add 0)."""
    logp = subs_log_probs(logits, x_t, mask_id)  # (B, L, V)
    nll = -logp.gather(-1, x0[..., None]).squeeze(-1)  # (B, L); 0 where carried over
    nll = torch.where(x_t == mask_id, nll, torch.zeros_like(nll))  # (-inf * 0 never appears: exact zeros)
    weight = -schedule.d_alpha(t) / (1.0 - schedule.alpha(t))  # (B,)
    return weight.to(nll.device) * nll.sum(-1) / x0.shape[1]


def mdlm_loss(model, x0: Tensor, schedule: Schedule, mask_id: int, antithetic: bool = True, eps_t: float = 1e-3,
              generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """One Monte-Carlo estimate of the NELBO (nats per token) for a batch x0 (B, L); metrics: the
    masked fraction."""
    t = sample_times(x0.shape[0], antithetic, eps_t, x0.device, generator)
    x_t, masked = forward_mask(x0, schedule.alpha(t), mask_id, generator)
    nelbo = mdlm_nelbo(model(x_t, t), x0, x_t, t, schedule, mask_id)
    return nelbo.mean(), {"masked": masked.float().mean()}


def ar_inputs(x0: Tensor, bos_id: int) -> Tensor:
    """The causal model's input: ``bos_id`` (the mask id serves) then x0 shifted right by one, so
    position l predicts x0[l] from x0[:l] and every token is predicted (the first unconditionally)."""
    return torch.cat([torch.full_like(x0[:, :1], bos_id), x0[:, :-1]], dim=1)


def ar_nll(logits: Tensor, x0: Tensor) -> Tensor:
    """Next-token cross-entropy (B,) in nats per token."""
    return F.cross_entropy(logits.float().transpose(1, 2), x0, reduction="none").mean(-1)


def ar_loss(model, x0: Tensor, bos_id: int) -> tuple[Tensor, dict[str, Tensor]]:
    """The exact NLL (nats per token) of x0 (B, L) under the causal model."""
    return ar_nll(model(ar_inputs(x0, bos_id)), x0).mean(), {}


def bits(nats: float) -> float:
    return nats / math.log(2)
