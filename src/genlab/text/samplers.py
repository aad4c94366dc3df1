"""Samplers for masked discrete diffusion (MDLM): one interface, denoiser calls (NFE) counted.

Conventions (see docs/theory/text.md):

* time runs from t = 1 (all free positions masked) down to t = 0; ``schedule.alpha(t)`` is the
  probability that a token is still unmasked at t (1 at t = 0, about 0 at t = 1); the grid is
  ``steps`` equal steps t_k = 1 - k / steps;
* ``denoiser(x (B, L) long, t (B,) float) -> logits (B, L, V)`` over the V real tokens only: the
  mask id (= V) is never predicted (SUBS), so a draw is never the mask;
* ``x_init`` (B, L) holds ``mask_id`` at the free positions and fixed tokens elsewhere (prefix
  prompts, infilling): fixed tokens never change, and every sampler returns no mask token;
* ``temperature`` / ``top_p`` act on the denoiser's distribution p(x_0 | x_t) through
  ``genlab.nn.sampling.filter_logits``; temperature 0 is greedy (the argmax);
* ``nfe`` counts the denoiser calls, each batched call = 1 (on however many rows);
  ``row_evals`` counts the rows passed through it, so ``row_evals / B`` is the calls per sample.

A categorical draw is an inverse-CDF lookup of one uniform number per position. ``ancestral`` and
``cached`` draw the same numbers in the same order before any call: with SUBS, *which* masked
positions unmask at a step does not depend on the denoiser, so each position's unmasking step
(one uniform) and its token's uniform are drawn first; the denoiser is then needed only for the
tokens to draw. ``cached`` skips every call whose output no draw would use, and reproduces
``ancestral`` token for token for any denoiser whose rows do not depend on each other. ``dfm`` and
``remdm`` decide each step's jumps the same way (one uniform per position) before the call, make
the call on the rows that decode a token only, and read the vocabulary (temperature, top-p, the
inverse CDF) only at the positions that decode; ``confidence`` only at the masked positions.

NFE per sampler: ancestral = ``steps``; cached = the steps at which some token unmasks, each call
on the rows that unmask a token (with L tokens a row gets at most L evaluations, whatever
``steps``); first_hitting = min(``steps``, the largest number of free positions in a row);
confidence = the steps that had something to do (a masked token); dfm, remdm = the steps at
which some token is decoded, each call on the rows that decode one; semi_ar = the sum over its
blocks.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable

import torch
from torch import Tensor

from genlab.math.schedules import Schedule
from genlab.text.sampler_core import (Denoiser, SampleOutput, SamplerContext, alpha_at, alpha_inverse, decode, draw,
                                      time_grid)

__all__ = ["SAMPLERS", "SampleOutput", "sample_tokens", "alpha_inverse"]



# ---------------------------------------------------------------------------------------------
# ancestral and cached: the exact reverse step of the absorbing process


def _unmask_steps(ctx: SamplerContext, schedule: Schedule, steps: int) -> Tensor:
    """(B, L) long: the step k in [0, steps) at which each position unmasks under the ancestral
    chain, one uniform per position (inverse CDF).

    From t to s < t a masked token stays masked with probability (1 - alpha_s) / (1 - alpha_t);
    the product telescopes, so a token masked at t_0 = 1 is still masked after step k with
    probability S_k = (1 - alpha(t_{k+1})) / (1 - alpha(1)) (S = 0 after the last step). With SUBS
    this does not depend on the denoiser: it is decided before any call. K = #{k : S_k > u} has
    P(K > k) = S_k."""
    a = schedule.alpha(torch.tensor(time_grid(steps), dtype=torch.float64))  # (steps + 1,)
    survive = ((1.0 - a[1:]) / (1.0 - a[0])).clamp(0.0, 1.0)  # (steps,) decreasing
    survive[-1] = 0.0
    u = ctx.rand(ctx.B, ctx.L).to(torch.float64)
    ascending = survive.flip(0).to(u.device)
    return steps - torch.searchsorted(ascending, u.contiguous(), right=True)  # (B, L) in [0, steps)


def _ancestral_core(ctx: SamplerContext, x: Tensor, active: Tensor, schedule: Schedule, steps: int,
                    cache: bool) -> Tensor:
    """The ancestral chain with the "which positions unmask at step k" decision drawn first (one
    uniform per position for its step, one per position for its token, both before any call):
    ancestral calls the denoiser at every step on the whole batch; cached only at the steps where
    a token unmasks, on the rows where one does. Every token is drawn from the same logits row with
    the same uniform in both, so the two agree token for token, whatever the denoiser (t included),
    as long as a row's logits do not depend on which other rows share its batch."""
    grid = time_grid(steps)
    masked = (x == ctx.mask_id) & active  # (B, L)
    when = torch.where(masked, _unmask_steps(ctx, schedule, steps), steps)  # (B, L); steps = never
    u_tok = ctx.rand(ctx.B, ctx.L)  # (B, L) the uniform of each position's token draw
    if cache:
        # the (step, row) pairs that have an unmasking, sorted by step: one host sync here, then no
        # work at all for the steps where nothing changes
        rows_ix = torch.arange(ctx.B, device=x.device)[:, None].expand_as(when)
        keys = torch.unique(when[masked] * ctx.B + rows_ix[masked])  # sorted
        ks, counts = torch.unique_consecutive(keys // ctx.B, return_counts=True)
        plan = zip(ks.tolist(), (keys % ctx.B).split(counts.tolist()))
    else:
        every = torch.arange(ctx.B, device=x.device)
        plan = ((k, every) for k in range(steps))
    done = 0  # steps recorded so far
    for k, rows in plan:
        for _ in range(done, k):  # the steps cached skipped: the state did not change
            ctx.record(x)
        sub = x[rows]  # (b, L)
        now = when[rows] == k  # (b, L) the positions that unmask at this step
        logits = ctx.logits(sub, grid[k])  # one call on b rows: (b, L, V)
        if cache or now.any():
            sub[now] = draw(ctx.probs(logits[now]), u_tok[rows][now])  # (n,) tokens of the n positions
            x[rows] = sub
        ctx.record(x)
        done = k + 1
    for _ in range(done, steps):
        ctx.record(x)
    return x


def _ancestral(ctx, x, free, schedule, steps):
    """MDLM's ancestral sampler: ``steps`` calls on the whole batch."""
    return _ancestral_core(ctx, x, free, schedule, steps, cache=False)


def _cached(ctx, x, free, schedule, steps):
    """Ancestral without the calls whose output no draw uses: the denoiser runs only at the steps
    where some token unmasks, and only on the rows where one does (MDLM's cache, per row). The same
    tokens as ancestral for the same seed."""
    return _ancestral_core(ctx, x, free, schedule, steps, cache=True)


# ---------------------------------------------------------------------------------------------
# first hitting: jump straight to each token's unmasking time


def _first_hitting(ctx, x, free, schedule, steps):
    """Each masked token's unmasking time tau has P(tau < s) = (1 - alpha_s) / (1 - alpha_1)
    (the reverse process, read from t = 1); sampling them all at once and visiting them in
    decreasing order is the first-hitting sampler (Zheng et al. 2024). A row with n masked tokens
    makes min(steps, n) jumps: its unmasking events, in time order, split into that many runs of
    consecutive events (sizes differing by at most one); a jump calls the denoiser at the time of its
    first event, on the state before it, and draws every token of its run from that output. With
    ``steps`` >= n it is the exact sampler (one token per jump, n calls); with fewer, the run's later
    tokens are drawn a little early (as ancestral does within a step). The call of a jump is made on
    the rows that still have one."""
    a1 = alpha_at(schedule, 1.0)
    u = ctx.rand(ctx.B, ctx.L).to(torch.float64)
    u_tok = ctx.rand(ctx.B, ctx.L)  # (B, L) the uniform of each position's token draw
    tau = alpha_inverse(schedule, 1.0 - (1.0 - a1) * u)  # (B, L)
    masked = (x == ctx.mask_id) & free
    tau = torch.where(masked, tau, torch.full_like(tau, -1.0))  # fixed positions never jump
    tau_sorted, order = torch.sort(tau, dim=1, descending=True)  # (B, L) each
    n = masked.sum(1)  # (B,) events per row
    jumps = n.clamp(max=steps)  # (B,)
    j = torch.arange(ctx.L, device=x.device)[None]  # (1, L) rank of an event in its row
    run = torch.where(j < n[:, None], j * jumps[:, None] // n.clamp(min=1)[:, None], ctx.L)  # (B, L) by rank
    run = torch.empty_like(run).scatter_(1, order, run)  # (B, L) by position
    for g in range(int(jumps.max())):
        rows = (g < jumps).nonzero()[:, 0]  # (b,) rows that still have a jump
        now = run[rows] == g  # (b, L) the positions of this run
        first = (g * n[rows] + jumps[rows] - 1) // jumps[rows]  # (b,) rank of the run's first event
        t = tau_sorted[rows, first].clamp(min=0.0)  # (b,)
        sub = x[rows]
        logits = ctx.logits(sub, t)  # (b, L, V)
        sub[now] = draw(ctx.probs(logits[now]), u_tok[rows][now])
        x[rows] = sub
        ctx.record(x)
    return x


# ---------------------------------------------------------------------------------------------
# confidence-ordered parallel decoding


def _confidence_core(ctx, x, active, schedule, steps, threshold, score):
    if score not in ("max_prob", "sampled"):
        raise ValueError(f"confidence score must be 'max_prob' or 'sampled', got {score!r}")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    grid, a1 = time_grid(steps), alpha_at(schedule, 1.0)
    n0 = ((x == ctx.mask_id) & active).sum(1).to(torch.float64)  # (B,)
    for k in range(steps):
        u_tok = ctx.rand(ctx.B, ctx.L)
        masked = (x == ctx.mask_id) & active
        m = masked.sum(1)  # (B,)
        ratio = 0.0 if k == steps - 1 else (1.0 - alpha_at(schedule, grid[k + 1])) / (1.0 - a1)
        target = torch.floor(n0 * ratio + 1e-6).long()  # masked count the schedule asks for at s
        kk = (m - target).clamp(min=0)  # (B,) how many to unmask now
        if not (kk.any() or (threshold is not None and m.any())):
            ctx.record(x)
            continue
        logits = ctx.logits(x, grid[k])[masked]  # (n, V): only the masked positions are read
        probs = ctx.probs(logits)  # (n, V)
        tok_m = draw(probs, u_tok[masked])  # (n,)
        if ctx.temperature == 0:  # greedy draws are one-hot: rank by the model's own softmax
            probs = logits.softmax(-1)
        conf_m = probs.max(-1).values if score == "max_prob" else probs.gather(-1, tok_m[:, None])[:, 0]
        conf = torch.full((ctx.B, ctx.L), -1.0, device=x.device)
        conf[masked] = conf_m  # (B, L), -1 where nothing is masked
        tok = x.clone()
        tok[masked] = tok_m  # (B, L)
        if threshold is not None:
            kk = torch.maximum(kk, (conf > threshold).sum(1))
            kk = torch.maximum(kk, (m > 0).long())  # at least one per step
        order = torch.sort(conf, dim=1, descending=True, stable=True).indices
        positions = torch.arange(ctx.L, device=x.device).expand_as(order)
        rank = torch.empty_like(order).scatter_(1, order, positions)  # (B, L) rank of each position
        x = torch.where(masked & (rank < kk[:, None]), tok, x)
        ctx.record(x)
    return x


def _confidence(ctx, x, free, schedule, steps, threshold: float | None = None, score: str = "max_prob"):
    """Per step, unmask the k most confident masked positions (score: the largest probability,
    or the probability of the drawn token), k such that the masked count follows the schedule
    (n (1 - alpha_s) / (1 - alpha_1), rounded down; none left after ``steps`` steps). With
    ``threshold``: also every position whose score exceeds it, at least one per step."""
    return _confidence_core(ctx, x, free, schedule, steps, threshold, score)


# ---------------------------------------------------------------------------------------------
# semi-autoregressive blocks


def _semi_ar(ctx, x, free, schedule, steps, block_size: int = 32, inner: str = "ancestral",
             threshold: float | None = None):
    """Blocks of ``block_size`` positions left to right; each is sampled by ``inner`` (ancestral,
    cached or confidence) with ``steps`` steps while the earlier blocks stay fixed and the later
    ones stay masked. A block with nothing masked costs no call."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
    if inner not in ("ancestral", "cached", "confidence"):
        raise ValueError(f"semi_ar inner sampler must be ancestral, cached or confidence, got {inner!r}")
    for start in range(0, ctx.L, block_size):
        active = free.clone()
        active[:, :start] = False
        active[:, start + block_size:] = False
        if not ((x == ctx.mask_id) & active).any():
            continue
        if inner == "confidence":
            x = _confidence_core(ctx, x, active, schedule, steps, threshold, "max_prob")
        else:
            x = _ancestral_core(ctx, x, active, schedule, steps, cache=inner == "cached")
    return x


# ---------------------------------------------------------------------------------------------
# discrete flow matching (Euler) and ReMDM remasking


def _dfm(ctx, x, free, schedule, steps, eta: float = 0.0):
    """Discrete flow matching, Euler steps of the masked CTMC (Gat et al. 2024; Campbell et al.
    2024 for eta). Rates at t, with kappa = alpha the data weight: masked -> decoded
    (-alpha'(t) + eta alpha(t)) / (1 - alpha(t)) (the decoded token drawn from p(x_0 | x_t)),
    decoded -> masked eta (the detailed-balance term; eta = 0 is the plain rate). A jump over a
    step of length h happens with probability 1 - exp(-h rate); the last step decodes every
    masked token and remasks none.

    Which positions jump does not depend on the denoiser (one uniform per position, drawn with
    its token's uniform before the call): the call is made on the rows where a masked token
    decodes, none at a step where none does, and a token is drawn only where one decodes."""
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    grid = time_grid(steps)
    tg = torch.tensor(grid[:-1], dtype=torch.float64)
    alphas, d_alphas = schedule.alpha(tg).tolist(), schedule.d_alpha(tg).tolist()
    for k in range(steps):
        t, h, a, da = grid[k], grid[k] - grid[k + 1], alphas[k], d_alphas[k]
        u_jump, u_tok = ctx.rand(ctx.B, ctx.L), ctx.rand(ctx.B, ctx.L)
        masked = (x == ctx.mask_id) & free
        last = k == steps - 1
        p_unmask = 1.0 if last else 1.0 - math.exp(-h * (-da + eta * a) / (1.0 - a))
        p_remask = 0.0 if last else 1.0 - math.exp(-h * eta)
        remask = free & ~masked & (u_jump < p_remask)  # decoded -> masked: needs no call
        decode(ctx, x, masked & (u_jump < p_unmask), u_tok, t)  # masked -> decoded
        if p_remask > 0:
            x.masked_fill_(remask, ctx.mask_id)
        ctx.record(x)
    return x


REMDM_STRATEGIES = ("cap", "rescale", "conf", "loop")


def _loop_alphas(schedule: Schedule, grid: list[float], t_on: float, t_off: float,
                 alpha_on: float) -> tuple[list[float], list[bool]]:
    """ReMDM-loop's time warp: alpha on the grid and which steps are loop steps. From t = 1 to
    t_on the schedule runs from alpha(1) to alpha_on, from t_on to t_off alpha stays at alpha_on
    (the loop: remask and re-decode at a fixed noise level), from t_off to 0 it runs from alpha_on
    to alpha(0)."""
    t_star = float(alpha_inverse(schedule, torch.tensor(alpha_on, dtype=torch.float64)))
    def warp(t):
        if t >= t_on:
            return t_star + (t - t_on) * (1.0 - t_star) / (1.0 - t_on)
        return t_star if t >= t_off else t * t_star / t_off
    alphas = [alpha_at(schedule, warp(t)) for t in grid]
    loop = [t_off <= grid[k + 1] and grid[k] <= t_on for k in range(len(grid) - 1)]
    return alphas, loop


def _remdm(ctx, x, free, schedule, steps, sigma: float = 0.05, strategy: str = "cap",
           t_on: float = 0.55, t_off: float = 0.05, alpha_on: float = 0.9):
    """ReMDM (Wang et al. 2025): the reverse step with remasking probability sigma_t,
    sigma_t <= sigma_max = min(1, (1 - alpha_s) / alpha_t): a decoded free token is remasked with
    probability sigma_t; a masked token is decoded with probability
    (alpha_s - (1 - sigma_t) alpha_t) / (1 - alpha_t). sigma = 0 is the ancestral chain.
    Strategies:

    * "cap": sigma_t = min(sigma, sigma_max); "rescale": sigma_t = sigma * sigma_max;
    * "conf": cap's sigma_t, shared out over the decoded positions in proportion to
      softmax(-psi), psi the probability the model gave a token when it was decoded (the least
      confident go first; the expected number remasked is cap's, each probability clipped at
      sigma_max);
    * "loop": no remasking until t_on while alpha climbs to ``alpha_on``; from t_on to t_off alpha
      stays at alpha_on and each step remasks with min(sigma, sigma_max) and re-decodes; then
      plain steps from alpha_on to 1 (``_loop_alphas``; the paper's t_on 0.55, t_off 0.05,
      alpha_on 0.9 by default).

    The last step (alpha_s = 1) has sigma_t = 0 and decodes everything: no mask is left. A step
    at which no token decodes makes no call; a call is made on the rows that decode one (the jumps
    are decided before it, as in ``dfm``)."""
    if strategy not in REMDM_STRATEGIES:
        raise ValueError(f"remdm strategy must be one of {', '.join(REMDM_STRATEGIES)}, got {strategy!r}")
    if not 0.0 <= sigma <= 1.0:
        raise ValueError(f"sigma must be in [0, 1], got {sigma}")
    if not 0.0 < t_off < t_on < 1.0 or not 0.0 < alpha_on < 1.0:
        raise ValueError(f"remdm loop needs 0 < t_off < t_on < 1 and 0 < alpha_on < 1, got t_on={t_on}, "
                         f"t_off={t_off}, alpha_on={alpha_on}")
    grid = time_grid(steps)
    if strategy == "loop":
        alphas, loop = _loop_alphas(schedule, grid, t_on, t_off, alpha_on)
    else:
        alphas, loop = [alpha_at(schedule, t) for t in grid], [True] * steps
    psi = torch.ones(ctx.B, ctx.L, device=x.device)  # (B, L) confidence of each decoded token
    for k in range(steps):
        a_t, a_s = alphas[k], alphas[k + 1]
        u_jump, u_tok = ctx.rand(ctx.B, ctx.L), ctx.rand(ctx.B, ctx.L)
        masked = (x == ctx.mask_id) & free
        last = k == steps - 1
        s_max = 0.0 if last or not loop[k] else min(1.0, (1.0 - a_s) / a_t)
        sig = sigma * s_max if strategy == "rescale" else min(sigma, s_max)
        # a masked token stays masked with probability (1 - alpha_s - sigma_t alpha_t) / (1 - alpha_t)
        stay = 0.0 if last else (1.0 - a_s - sig * a_t) / (1.0 - a_t)
        decoded = free & ~masked
        if strategy == "conf" and sig > 0:  # (B, L): sig on average over a row's decoded positions
            w = (-psi).masked_fill(~decoded, -math.inf).softmax(-1).nan_to_num(0.0)
            sig_pos = (sig * decoded.sum(1, keepdim=True) * w).clamp(max=s_max)
        else:
            sig_pos = sig
        remask = decoded & (u_jump < sig_pos)  # needs no call
        now = masked & (u_jump >= stay)  # the positions decoded at this step, decided before the call
        drawn = decode(ctx, x, now, u_tok, grid[k])  # a call on the rows with one, if any
        if strategy == "conf" and drawn is not None:
            probs, tok = drawn
            psi[now] = probs.gather(-1, tok[:, None])[:, 0]
        x.masked_fill_(remask, ctx.mask_id)
        ctx.record(x)
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ancestral": _ancestral,
    "cached": _cached,
    "first_hitting": _first_hitting,
    "confidence": _confidence,
    "semi_ar": _semi_ar,
    "dfm": _dfm,
    "remdm": _remdm,
}
"""name -> fn(ctx, x, free, schedule, steps, **options) -> tokens; call them through sample_tokens."""


def _options_of(fn) -> list[str]:
    return [p.name for p in list(inspect.signature(fn).parameters.values())[5:]]


@torch.no_grad()
def sample_tokens(denoiser: Denoiser, x_init: Tensor, *, mask_id: int, schedule: Schedule, steps: int,
                  sampler: str = "ancestral", generator: torch.Generator | None = None,
                  temperature: float = 1.0, top_p: float = 1.0, return_trajectory: bool = False,
                  **options) -> SampleOutput:
    """Fill every ``mask_id`` of ``x_init`` (B, L) with sampler ``sampler`` (a key of SAMPLERS);
    the other tokens are kept. Options per sampler: confidence (threshold, score), semi_ar
    (block_size, inner, threshold), dfm (eta), remdm (sigma, strategy: cap / rescale / conf / loop,
    and t_on, t_off, alpha_on for loop)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    fn = SAMPLERS[sampler]
    unknown = sorted(set(options) - set(_options_of(fn)))
    if unknown:
        raise ValueError(f"sampler {sampler!r} takes no option {', '.join(unknown)}; "
                         f"its options: {', '.join(_options_of(fn)) or 'none'}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 turns it off), got {top_p}")
    if x_init.dim() != 2 or x_init.dtype != torch.long:
        raise ValueError(f"x_init must be a (B, L) long tensor, got {tuple(x_init.shape)} {x_init.dtype}")
    ctx = SamplerContext(denoiser, x_init, mask_id, generator, temperature, top_p, return_trajectory)
    free = x_init == mask_id  # (B, L) positions to fill
    x = x_init.clone()
    if free.any():
        x = fn(ctx, x, free, schedule, steps, **options)
        left = x == mask_id
        if left.any():  # only for a schedule with alpha(0) < 1: one last denoising call
            decode(ctx, x, left, ctx.rand(ctx.B, ctx.L), 0.0)
            ctx.record(x)
    return SampleOutput(tokens=x, nfe=ctx.nfe, trajectory=ctx.trajectory, row_evals=ctx.row_evals)
