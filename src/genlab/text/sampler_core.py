"""What every MDLM sampler is built from: the output record, the counted denoiser with its random
stream and token filter (``SamplerContext``), the inverse-CDF draw, ``decode`` (one call on the
rows that have something to decode), the time grid and the schedule's inverse.
See ``genlab.text.samplers`` for the conventions (time from 1 to 0, SUBS, what NFE counts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from genlab.math.schedules import Schedule
from genlab.nn.sampling import filter_logits

Denoiser = Callable[[Tensor, Tensor], Tensor]


@dataclass
class SampleOutput:
    """``tokens`` (B, L) long with no mask left; ``nfe`` denoiser calls (each batched call = 1, on
    however many rows); ``row_evals`` the rows passed through the denoiser over all calls;
    ``trajectory``: the state after each step (a list of (B, L) tensors) when asked for with
    ``return_trajectory=True``."""

    tokens: Tensor
    nfe: int
    trajectory: list[Tensor] | None = None
    row_evals: int = 0

    @property
    def nfe_per_row(self) -> float:
        """Denoiser evaluations per sample: rows passed through the denoiser / B (= ``nfe`` for a
        sampler that always calls on the whole batch; less for ``cached``, which calls on the rows
        that change only)."""
        return self.row_evals / max(self.tokens.shape[0], 1)


class SamplerContext:
    """What every sampler needs: the counted denoiser, the random stream, the token filter."""

    def __init__(self, denoiser: Denoiser, x: Tensor, mask_id: int, generator, temperature: float,
                 top_p: float, return_trajectory: bool):
        self.denoiser, self.mask_id, self.generator = denoiser, mask_id, generator
        self.temperature, self.top_p = temperature, top_p
        self.device, (self.B, self.L) = x.device, x.shape
        self.nfe = 0  # denoiser calls (a call on any number of rows counts 1)
        self.row_evals = 0  # rows (sequences) passed through the denoiser, over all calls
        self.trajectory: list[Tensor] | None = [] if return_trajectory else None

    def logits(self, x: Tensor, t: float | Tensor) -> Tensor:
        """One counted call on b <= B rows: float32 logits (b, L, V); t a float or a (b,) tensor."""
        b = x.shape[0]
        tt = t.to(self.device, torch.float32) if torch.is_tensor(t) else torch.full(
            (b,), float(t), device=self.device)
        self.nfe += 1
        self.row_evals += b
        out = self.denoiser(x, tt).float()
        if out.dim() != 3 or out.shape[:2] != x.shape:
            raise ValueError(f"denoiser must return logits (B, L, V) = ({b}, {self.L}, V), "
                             f"got {tuple(out.shape)}")
        if out.shape[-1] > self.mask_id:
            raise ValueError(f"denoiser predicts {out.shape[-1]} tokens but mask_id is {self.mask_id}: "
                             "the logits must cover the real tokens only (mask id = V, SUBS)")
        return out

    def probs(self, logits: Tensor) -> Tensor:
        """p(x_0 | x_t) after temperature / top-p: (..., V) -> (..., V); one-hot argmax at T = 0."""
        V = logits.shape[-1]
        if self.temperature == 0:
            return torch.nn.functional.one_hot(logits.argmax(-1), V).to(logits.dtype)
        flat = filter_logits(logits.reshape(-1, V), self.temperature, 0, self.top_p)
        return flat.softmax(-1).reshape(logits.shape)

    def rand(self, *shape: int) -> Tensor:
        return torch.rand(shape, generator=self.generator, device=self.device)

    def record(self, x: Tensor) -> None:
        if self.trajectory is not None:
            self.trajectory.append(x.clone())


def draw(probs: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF draw: probs (..., V), u (...) uniform in [0, 1) -> indices (...) long.

    The first index whose cumulative mass exceeds u * total; a zero-probability token is never
    chosen (its cumulative mass equals its predecessor's)."""
    cdf = probs.cumsum(-1)  # (..., V)
    v = (u * cdf[..., -1]).unsqueeze(-1)  # (..., 1)
    return (cdf <= v).sum(-1).clamp_(max=probs.shape[-1] - 1)


def decode(ctx: SamplerContext, x: Tensor, now: Tensor, u_tok: Tensor, t: float) -> tuple[Tensor, Tensor] | None:
    """Draw the tokens of the positions ``now`` (B, L) bool in place in ``x``, each with its uniform
    of ``u_tok`` (B, L): one call at time ``t`` on the rows that have such a position (none, and no
    call, when there is none), the vocabulary read only at those n positions. Returns (probs (n, V),
    tokens (n,)) in row-major order of ``now``, or None. The rows a call skips would not have been
    read: exact for any denoiser whose rows do not depend on each other."""
    rows = now.any(1).nonzero()[:, 0]  # (b,) ascending, so sub[sub_now] is x[now]'s order
    if rows.numel() == 0:
        return None
    sub_now = now[rows]  # (b, L)
    probs = ctx.probs(ctx.logits(x[rows], t)[sub_now])  # (n, V)
    tok = draw(probs, u_tok[now])  # (n,)
    x[now] = tok
    return probs, tok


def time_grid(steps: int) -> list[float]:
    """t_k = 1 - k / steps, k = 0..steps (float64, as a list)."""
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()


def alpha_at(schedule: Schedule, t: float) -> float:
    """alpha(t) of one time, as a float (computed in float64)."""
    return float(schedule.alpha(torch.tensor(t, dtype=torch.float64)))


def alpha_inverse(schedule: Schedule, a: Tensor, iters: int = 60) -> Tensor:
    """The time t in [0, 1] with alpha(t) = a, for a decreasing schedule (elementwise, by bisection;
    a schedule's own ``inverse_alpha`` is used when it has one)."""
    if hasattr(schedule, "inverse_alpha"):
        return schedule.inverse_alpha(a)
    a = a.to(torch.float64)
    lo, hi = torch.zeros_like(a), torch.ones_like(a)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        above = schedule.alpha(mid) > a  # alpha falls with t: the root lies later
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return 0.5 * (lo + hi)
