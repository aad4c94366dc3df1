"""Closed forms for discrete diffusion: the forward marginals, the Bayes posterior
q(x_s | x_t, x_0), categorical KLs, and the discrete- and continuous-time masked NELBO.

A token is one of K states. The forward process mixes the data with a noise distribution m:

    q(x_t | x_0) = alpha_t onehot(x_0) + (1 - alpha_t) m,

with m = onehot(mask) (absorbing, K = V + 1) or m = 1 / K (uniform, K = V); alpha falls from 1 at
t = 0 (see ``genlab.math.schedules``). From s < t to t the process is the same mixture with
alpha_{t|s} = alpha_t / alpha_s. The derivations are in docs/theory/text.md.

Shapes: x_t (...) long, x0 probabilities (..., K), alphas broadcastable to (...); results (..., K)
or (...). A probability vector for x_0 (a model's prediction) gives the plug-in posterior
q(x_s | x_t, x0 = mu), the reverse model of D3PM / MDLM.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "categorical_kl", "forward_marginal", "transition_matrix", "bayes_posterior",
    "absorbing_posterior", "uniform_posterior", "absorbing_kl_terms", "absorbing_nelbo_continuous",
]


def _a(alpha, like: Tensor) -> Tensor:
    return torch.as_tensor(alpha, dtype=like.dtype, device=like.device)


def categorical_kl(p: Tensor, q: Tensor) -> Tensor:
    """KL(p || q) = sum_k p_k log(p_k / q_k) over the last dim, with 0 log 0 = 0 (inf where q_k = 0
    < p_k): (..., K) -> (...), in nats."""
    terms = torch.where(p > 0, p * (torch.log(p) - torch.log(q)), torch.zeros_like(p))
    return terms.sum(-1)


def forward_marginal(x0: Tensor, alpha, m: Tensor) -> Tensor:
    """q(x_t | x_0) = alpha onehot(x_0) + (1 - alpha) m, for x_0 probabilities (..., K)."""
    a = _a(alpha, x0).unsqueeze(-1)
    return a * x0 + (1 - a) * m


def transition_matrix(alpha_ts, m: Tensor) -> Tensor:
    """Q_{t|s}[i, j] = q(x_t = j | x_s = i) = alpha_{t|s} [i = j] + (1 - alpha_{t|s}) m_j: (..., K, K)."""
    a = _a(alpha_ts, m)[..., None, None]
    K = m.shape[-1]
    return a * torch.eye(K, dtype=m.dtype, device=m.device) + (1 - a) * m.expand(K, K)


def bayes_posterior(x_t: Tensor, x0: Tensor, alpha_s, alpha_t, m: Tensor) -> Tensor:
    """q(x_s | x_t, x_0) = q(x_t | x_s) q(x_s | x_0) / q(x_t | x_0), for any noise m:
    x_t (...) long, x0 probabilities (..., K) -> (..., K) over x_s."""
    a_s, a_t = _a(alpha_s, x0).unsqueeze(-1), _a(alpha_t, x0).unsqueeze(-1)
    a_ts = a_t / a_s  # alpha_{t|s}
    onehot_t = torch.nn.functional.one_hot(x_t, x0.shape[-1]).to(x0.dtype)  # (..., K)
    m_xt = m[x_t].unsqueeze(-1)  # (..., 1): m at the observed x_t
    likelihood = a_ts * onehot_t + (1 - a_ts) * m_xt  # q(x_t | x_s = k) for every k
    prior = a_s * x0 + (1 - a_s) * m  # q(x_s = k | x_0)
    joint = likelihood * prior
    return joint / joint.sum(-1, keepdim=True)


def absorbing_posterior(x_t: Tensor, x0: Tensor, alpha_s, alpha_t, mask_id: int) -> Tensor:
    """The closed form for m = onehot(mask) (x0 (..., K) puts no mass on the mask):
    x_t = mask: (1 - alpha_s) / (1 - alpha_t) on the mask, (alpha_s - alpha_t) / (1 - alpha_t) x0
    on the tokens; x_t a token: onehot(x_t) (an unmasked token is carried over)."""
    a_s, a_t = _a(alpha_s, x0).unsqueeze(-1), _a(alpha_t, x0).unsqueeze(-1)
    K = x0.shape[-1]
    onehot_mask = torch.nn.functional.one_hot(torch.tensor(mask_id, device=x0.device), K).to(x0)
    masked = ((a_s - a_t) * x0 + (1 - a_s) * onehot_mask) / (1 - a_t)
    kept = torch.nn.functional.one_hot(x_t, K).to(x0.dtype)
    return torch.where((x_t == mask_id).unsqueeze(-1), masked, kept)


def uniform_posterior(x_t: Tensor, x0: Tensor, alpha_s, alpha_t) -> Tensor:
    """The closed form for m = 1 / K: with a = alpha_t / alpha_s,
    q(x_s = k) = (a [k = x_t] + (1 - a) / K) (alpha_s x0_k + (1 - alpha_s) / K)
                 / (alpha_t x0_{x_t} + (1 - alpha_t) / K)."""
    a_s, a_t = _a(alpha_s, x0).unsqueeze(-1), _a(alpha_t, x0).unsqueeze(-1)
    K = x0.shape[-1]
    a = a_t / a_s
    onehot_t = torch.nn.functional.one_hot(x_t, K).to(x0.dtype)
    num = (a * onehot_t + (1 - a) / K) * (a_s * x0 + (1 - a_s) / K)
    den = a_t * x0.gather(-1, x_t.unsqueeze(-1)) + (1 - a_t) / K
    return num / den


ModelProbs = Callable[[float], Tensor]  # t -> mu_theta(t): (L, V) probabilities over the real tokens


def _pad_mask(probs: Tensor) -> Tensor:
    """(..., V) over the real tokens -> (..., V + 1) with no mass on the mask (SUBS)."""
    return torch.cat([probs, torch.zeros_like(probs[..., :1])], -1)


def absorbing_kl_terms(x0: Tensor, model: ModelProbs, schedule, steps: int) -> Tensor:
    """The diffusion terms of the T-step NELBO of the absorbing process (mask id = V), on the grid
    t_i = i / T, summed over the L tokens:

        term_i = E_{x_{t_i} ~ q(. | x_0)} KL( q(x_s | x_t, x_0) || q(x_s | x_t, mu_theta(t_i)) ),
        s = t_{i-1},

    computed by enumerating both values of each token's x_t (x_0 with probability alpha_t, the mask
    otherwise) and the full (V + 1)-state KL. x0 (L,) long; returns (T,) with term_i at index i - 1.
    With alpha(0) = 1 the i = 1 term is the reconstruction -log p(x_0 | x_{t_1}); with
    alpha(1) = 0 the prior term KL(q(x_1 | x_0) || onehot(mask)) is 0, so the sum is the NELBO."""
    L = x0.shape[0]
    out = []
    for i in range(1, steps + 1):
        t, s = i / steps, (i - 1) / steps
        a_t = float(schedule.alpha(torch.tensor(t, dtype=torch.float64)))
        a_s = float(schedule.alpha(torch.tensor(s, dtype=torch.float64)))
        mu = _pad_mask(model(t).to(torch.float64))  # (L, V + 1)
        V = mu.shape[-1] - 1
        x0_hot = torch.nn.functional.one_hot(x0, V + 1).to(torch.float64)  # (L, V + 1)
        m = torch.nn.functional.one_hot(torch.tensor(V), V + 1).to(torch.float64)
        term = torch.zeros((), dtype=torch.float64)
        for x_t, weight in ((x0, a_t), (torch.full((L,), V), 1 - a_t)):
            if weight == 0:
                continue
            q = bayes_posterior(x_t, x0_hot, a_s, a_t, m)
            p = bayes_posterior(x_t, mu, a_s, a_t, m)
            term = term + weight * categorical_kl(q, p).sum()
        out.append(term)
    return torch.stack(out)


def absorbing_nelbo_continuous(x0: Tensor, model: ModelProbs, schedule, points: int = 64) -> Tensor:
    """The continuous-time masked NELBO (MDLM), integrated by Gauss-Legendre on [0, 1]:

        int_0^1 -alpha'(t) / (1 - alpha(t)) E_{x_t} [ sum_l [x_t^l = mask] (-log mu_theta(t)_l[x_0^l]) ] dt,

    where E_{x_t}[x_t^l = mask] = 1 - alpha(t). x0 (L,) long -> a scalar in nats."""
    nodes, weights = np.polynomial.legendre.leggauss(points)
    total = torch.zeros((), dtype=torch.float64)
    for z, w in zip(nodes, weights):
        t = 0.5 * (float(z) + 1.0)
        tt = torch.tensor(t, dtype=torch.float64)
        a, da = schedule.alpha(tt), schedule.d_alpha(tt)
        ce = -torch.log(model(t).to(torch.float64).gather(-1, x0[:, None])).sum()
        total = total + 0.5 * float(w) * (-da / (1 - a)) * (1 - a) * ce
    return total
