"""docs/theory/flow.md, section 7: classifier-free guidance is a score difference.

A closed-form case: data p_1(x | y) = N(mu_y, sigma^2 I) for two classes, noise x_0 ~ N(0, I), the
straight (conditional OT) path x_t = (1 - t) x_0 + t x_1. Then p_t(x | y) = N(t mu_y, s_t^2 I) with
s_t^2 = t^2 sigma^2 + (1 - t)^2, the class velocity v_c is a Gaussian regression E[x_1 - x_0 | x_t, y],
and the unconditional velocity v_u is its posterior average over classes, eq. (2.1). With
a_t = 1 / t and b_t = (1 - t) / t (eq. 5.3 on this path) we check
  (a) v_c = a_t x + b_t grad log p_t(x | y),
  (b) v_c - v_u = b_t grad log p_t(y | x),
  (c) genlab's guided_velocity is v_u + s b_t grad log p_t(y | x) = a_t x + b_t grad log[p_t(x) p_t(y | x)^s],
  (d) yet that field does not transport the tilted density p_t(x) p_t(y | x)^s (continuity equation),
  (e) and the guided ODE overshoots: its samples are not the tilted target's.
"""

import math

import pytest
import torch

from genlab.flow.guidance import guided_velocity

torch.set_num_threads(1)

MU = torch.tensor([[-2.0, 0.5], [1.5, -1.0]], dtype=torch.float64)  # (K=2, d=2) class means
PRIOR = torch.tensor([0.3, 0.7], dtype=torch.float64)  # p(y)
SIGMA = 0.4
NULL = 2  # the null class: label 2 means "unconditional"


def coeffs(t):
    """a_t, b_t of v = a_t x + b_t grad log p_t on the straight path (alpha = t, sigma = 1 - t)."""
    return 1 / t, (1 - t) / t


def var_t(t, sigma=SIGMA):
    return t ** 2 * sigma ** 2 + (1 - t) ** 2  # (B,) variance of p_t(x | y) per coordinate


def v_class(x, t, mu, sigma=SIGMA):
    """E[x_1 - x_0 | x_t = x] for x_1 ~ N(mu, sigma^2 I), x_0 ~ N(0, I), by Gaussian regression
    (no score involved): x (B, d), t (B,), mu (B, d) -> (B, d)."""
    tb, s2 = t[:, None], var_t(t, sigma)[:, None]
    r = x - tb * mu  # x_t minus its mean
    e_x1 = mu + tb * sigma ** 2 / s2 * r
    e_x0 = (1 - tb) / s2 * r
    return e_x1 - e_x0


def log_p_given_y(x, t, mu, sigma=SIGMA):
    """log N(x; t mu, s_t^2 I): x (B, d), t (B,), mu (B, d) -> (B,)."""
    d, s2 = x.shape[-1], var_t(t, sigma)
    return -0.5 * ((x - t[:, None] * mu) ** 2).sum(-1) / s2 - 0.5 * d * torch.log(2 * math.pi * s2)


def log_joint(x, t, mus=MU, prior=PRIOR, sigma=SIGMA):
    """log p(y) + log p_t(x | y) for every class: -> (B, K)."""
    return torch.stack([math.log(prior[k]) + log_p_given_y(x, t, mus[k].expand_as(x), sigma)
                        for k in range(len(prior))], dim=-1)


def log_posterior(x, t, y, **kw):
    """log p_t(y | x) by Bayes: (B,)."""
    lj = log_joint(x, t, **kw)
    return lj.gather(1, y[:, None])[:, 0] - torch.logsumexp(lj, dim=-1)


def v_uncond(x, t, mus=MU, prior=PRIOR, sigma=SIGMA):
    """Marginal velocity of the mixture: the posterior average of the class velocities, eq. (2.1)."""
    w = torch.softmax(log_joint(x, t, mus, prior, sigma), dim=-1)  # (B, K) = p_t(y | x)
    vs = torch.stack([v_class(x, t, mus[k].expand_as(x), sigma) for k in range(len(prior))], dim=-1)  # (B, d, K)
    return (vs * w[:, None, :]).sum(-1)


def grad_x(f, x):
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(f(x).sum(), x)
    return g


class ClosedForm:
    """A "velocity model" with the exact fields: labels 0, 1 -> v_c, the null class -> v_u."""

    null_class = NULL

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, y=None):
        self.calls.append(x.shape[0])
        vu = v_uncond(x, t)
        vc = v_class(x, t, MU[y.clamp(max=1)])
        return torch.where((y == NULL)[:, None], vu, vc)


def _points(B=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 2.0 * torch.randn(B, 2, generator=g, dtype=torch.float64)
    t = 0.05 + 0.9 * torch.rand(B, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (B,), generator=g)
    return x, t, y


def test_a_class_velocity_is_affine_in_the_class_score():
    x, t, y = _points()
    a, b = coeffs(t)
    score = grad_x(lambda z: log_p_given_y(z, t, MU[y]), x)
    torch.testing.assert_close(v_class(x, t, MU[y]), a[:, None] * x + b[:, None] * score, rtol=1e-10, atol=1e-10)
    # the same coefficients for the mixture: v_u = a_t x + b_t grad log p_t(x)
    score_u = grad_x(lambda z: torch.logsumexp(log_joint(z, t), dim=-1), x)
    torch.testing.assert_close(v_uncond(x, t), a[:, None] * x + b[:, None] * score_u, rtol=1e-10, atol=1e-10)


def test_b_velocity_difference_is_the_implicit_classifier_gradient():
    x, t, y = _points(seed=1)
    _, b = coeffs(t)
    grad_log_cls = grad_x(lambda z: log_posterior(z, t, y), x)
    diff = v_class(x, t, MU[y]) - v_uncond(x, t)
    torch.testing.assert_close(diff, b[:, None] * grad_log_cls, rtol=1e-10, atol=1e-10)
    assert diff.abs().max() > 0.1  # not a vacuous check: the classes pull apart


@pytest.mark.parametrize("scale", [0.0, 1.0, 2.5, 4.0])
def test_c_guided_velocity_is_the_tilted_score_field(scale):
    x, t, y = _points(seed=2)
    a, b = coeffs(t)
    model = ClosedForm()
    v = guided_velocity(model, x, t, y, scale)
    grad_log_cls = grad_x(lambda z: log_posterior(z, t, y), x)
    torch.testing.assert_close(v, v_uncond(x, t) + scale * b[:, None] * grad_log_cls, rtol=1e-10, atol=1e-10)
    # ... = a_t x + b_t grad log[p_t(x) p_t(y | x)^s]
    tilted = grad_x(lambda z: torch.logsumexp(log_joint(z, t), -1) + scale * log_posterior(z, t, y), x)
    torch.testing.assert_close(v, a[:, None] * x + b[:, None] * tilted, rtol=1e-10, atol=1e-10)
    assert model.calls == ([2 * len(x)] if scale not in (0.0, 1.0) else [len(x)])  # one forward (2B if guided)
    if scale == 1.0:
        torch.testing.assert_close(v, v_class(x, t, MU[y]), rtol=0, atol=0)


def test_d_guided_field_does_not_transport_the_tilted_density():
    """1-D mixture: the continuity residual d_t q + d_x (q v) of q_t ∝ p_t(x) p_t(y|x)^s under the
    guided field vanishes for s = 1 (q = p_t(x | y), v = v_c) but not for s = 3."""
    mus, prior, sigma = torch.tensor([[-1.5], [1.5]], dtype=torch.float64), PRIOR, 0.5
    xs = torch.linspace(-7, 7, 2801, dtype=torch.float64)[:, None]  # (N, 1)
    dx, y = (xs[1, 0] - xs[0, 0]).item(), torch.ones(len(xs), dtype=torch.long)

    def q(t, s):
        tt = torch.full((len(xs),), t, dtype=torch.float64)
        lj = log_joint(xs, tt, mus, prior, sigma)
        logq = torch.logsumexp(lj, -1) + s * (lj[:, 1] - torch.logsumexp(lj, -1))
        p = torch.exp(logq - logq.max())
        return p / (p.sum() * dx)  # (N,) normalised on the grid

    def v(t, s):
        tt = torch.full((len(xs),), t, dtype=torch.float64)
        vu, vc = v_uncond(xs, tt, mus, prior, sigma), v_class(xs, tt, mus[y], sigma)
        return (vu + s * (vc - vu))[:, 0]

    def residual(t, s, eps=1e-4):
        dqdt = (q(t + eps, s) - q(t - eps, s)) / (2 * eps)
        flux = torch.gradient(q(t, s) * v(t, s), spacing=dx)[0]
        r = (dqdt + flux).abs().max() / dqdt.abs().max()
        return r

    for t in (0.3, 0.6):
        assert residual(t, 1.0) < 1e-3
        assert residual(t, 3.0) > 0.3


def test_e_guided_ode_overshoots_the_tilted_target():
    """Same 1-D mixture at s = 3: p_1(x) p_1(y | x)^3 is about N(1.5, 0.5^2) (the classes barely overlap
    at t = 1), but the guided ODE ends near mean 1.85, std 0.34: pushed away from the other class and
    narrowed, more than a sharpening of the tilted target. s = 1 lands on N(1.5, 0.5^2)."""
    mus, prior, sigma = torch.tensor([[-1.5], [1.5]], dtype=torch.float64), PRIOR, 0.5
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4000, 1, generator=g, dtype=torch.float64)
    y, n = torch.ones(len(x0), dtype=torch.long), 200

    def endpoint(s):
        x = x0.clone()
        for i in range(n):  # midpoint-in-time Euler
            t = torch.full((len(x),), (i + 0.5) / n, dtype=torch.float64)
            vu, vc = v_uncond(x, t, mus, prior, sigma), v_class(x, t, mus[y], sigma)
            x = x + (vu + s * (vc - vu)) / n
        return x[:, 0]

    xs = torch.linspace(-6, 8, 14001, dtype=torch.float64)[:, None]  # the tilted target on a grid
    lj = log_joint(xs, torch.ones(len(xs), dtype=torch.float64), mus, prior, sigma)
    q = torch.softmax(3.0 * lj[:, 1] - 2.0 * torch.logsumexp(lj, -1), dim=0)  # ∝ p_1(x) p_1(y|x)^3
    q_mean = (q * xs[:, 0]).sum()
    q_std = (q * (xs[:, 0] - q_mean) ** 2).sum().sqrt()
    assert abs(q_mean - 1.5) < 0.01 and abs(q_std - 0.5) < 0.01

    plain, guided = endpoint(1.0), endpoint(3.0)
    assert abs(plain.mean() - 1.5) < 0.05 and abs(plain.std() - 0.5) < 0.05
    assert guided.mean() > 1.75 and guided.std() < 0.4
