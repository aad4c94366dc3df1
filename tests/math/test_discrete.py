import itertools
import math

import pytest
import torch
from scipy.stats import entropy

from genlab.math.discrete import (
    absorbing_kl_terms,
    absorbing_nelbo_continuous,
    absorbing_posterior,
    bayes_posterior,
    categorical_kl,
    forward_marginal,
    transition_matrix,
    uniform_posterior,
)
from genlab.math.schedules import LogLinearSchedule

torch.set_num_threads(1)
D = torch.float64


class Cosine:
    def __init__(self, eps=1e-3):
        self.eps = eps

    def alpha(self, t):
        return self.eps + (1 - self.eps) * torch.cos(0.5 * math.pi * t)

    def d_alpha(self, t):
        return -(1 - self.eps) * 0.5 * math.pi * torch.sin(0.5 * math.pi * t)


def _noise(kind, V):
    """(K, m): absorbing has K = V + 1 states with m = onehot(mask = V); uniform K = V, m = 1 / K."""
    if kind == "absorbing":
        return V + 1, torch.nn.functional.one_hot(torch.tensor(V), V + 1).to(D)
    return V, torch.full((V,), 1.0 / V, dtype=D)


def _brute_posterior(K, m, x0, x_t, a_s, a_t):
    """Enumerate x_s: P(x_s, x_t | x_0) = q(x_s | x_0) q(x_t | x_s), written entry by entry."""
    a_ts = a_t / a_s
    joint = []
    for xs in range(K):
        q_s = a_s * (xs == x0) + (1 - a_s) * float(m[xs])
        q_t = a_ts * (x_t == xs) + (1 - a_ts) * float(m[x_t])
        joint.append(q_s * q_t)
    z = sum(joint)
    return None if z == 0 else torch.tensor([j / z for j in joint], dtype=D)


@pytest.mark.parametrize("kind", ["absorbing", "uniform"])
def test_posterior_matches_enumeration(kind):
    V = 3
    K, m = _noise(kind, V)
    for a_s, a_t in [(0.9, 0.5), (0.6, 0.59), (1.0, 0.2), (0.3, 0.0)]:
        for x0, x_t in itertools.product(range(V), range(K)):
            want = _brute_posterior(K, m, x0, x_t, a_s, a_t)
            if want is None:  # x_t impossible given x_0
                continue
            hot = torch.nn.functional.one_hot(torch.tensor(x0), K).to(D)
            xt = torch.tensor(x_t)
            got = bayes_posterior(xt, hot, a_s, a_t, m)
            assert torch.allclose(got, want, atol=1e-12), (a_s, a_t, x0, x_t)
            closed = (absorbing_posterior(xt, hot, a_s, a_t, V) if kind == "absorbing"
                      else uniform_posterior(xt, hot, a_s, a_t))
            assert torch.allclose(closed, want, atol=1e-12)


@pytest.mark.parametrize("kind", ["absorbing", "uniform"])
def test_marginals_chain_and_posterior_averages_to_the_prior(kind):
    V, a_s, a_t = 4, 0.7, 0.3
    K, m = _noise(kind, V)
    x0 = torch.nn.functional.one_hot(torch.tensor(2), K).to(D)
    # q(x_t | x_0) = q(x_s | x_0) Q_{t|s}
    chained = forward_marginal(x0, a_s, m) @ transition_matrix(a_t / a_s, m)
    assert torch.allclose(chained, forward_marginal(x0, a_t, m))
    # sum_{x_t} q(x_t | x_0) q(x_s | x_t, x_0) = q(x_s | x_0)
    qt = forward_marginal(x0, a_t, m)
    zero = torch.zeros(K, dtype=D)
    post = torch.stack([bayes_posterior(torch.tensor(j), x0, a_s, a_t, m) if qt[j] > 0 else zero for j in range(K)])
    assert torch.allclose(qt @ post, forward_marginal(x0, a_s, m))


def test_absorbing_plug_in_posterior_is_the_mixture_over_x0():
    """For absorbing noise q(x_t = mask | x_0) = 1 - alpha_t does not depend on x_0, so the plug-in
    q(x_s | mask, mu) is exactly E_{x_0 ~ mu} q(x_s | mask, x_0): MDLM's reverse model is exact
    when mu = p(x_0 | x_t)."""
    V = 5
    K, m = _noise("absorbing", V)
    mu = torch.cat([torch.softmax(torch.randn(V, dtype=D), 0), torch.zeros(1, dtype=D)])
    xt = torch.tensor(V)
    mix = sum(mu[k] * bayes_posterior(xt, torch.nn.functional.one_hot(torch.tensor(k), K).to(D), 0.8, 0.4, m)
              for k in range(V))
    assert torch.allclose(bayes_posterior(xt, mu, 0.8, 0.4, m), mix)
    assert torch.allclose(absorbing_posterior(xt, mu, 0.8, 0.4, V), mix)


def test_categorical_kl():
    p = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=D)
    q = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=D)
    assert float(categorical_kl(p, q)) == pytest.approx(entropy(p.numpy(), q.numpy()), abs=1e-14)
    hand = 0.5 * math.log(2) + 0.3 * math.log(1.2) + 0.2 * math.log(0.8)
    assert float(categorical_kl(p, q)) == pytest.approx(hand, abs=1e-14)
    assert float(categorical_kl(p, p)) == 0
    assert categorical_kl(q, p) == float("inf")


def _model(L, V, seed, time_dependent=True):
    g = torch.Generator().manual_seed(seed)
    A, B = torch.randn(L, V, generator=g, dtype=D), torch.randn(L, V, generator=g, dtype=D)
    return lambda t: torch.softmax(A + (3.0 * t * B if time_dependent else 0), -1)


def test_absorbing_kl_term_closed_form():
    """With SUBS only the masked tokens pay: term_i = (alpha_s - alpha_t) sum_l -log mu_l[x_0^l]."""
    L, V, T = 3, 4, 5
    x0, model, sched = torch.tensor([0, 3, 1]), _model(3, 4, 0), Cosine()
    terms = absorbing_kl_terms(x0, model, sched, T)
    for i in range(1, T + 1):
        a = lambda u: float(sched.alpha(torch.tensor(u, dtype=D)))
        ce = -torch.log(model(i / T)[torch.arange(L), x0]).sum()
        assert float(terms[i - 1]) == pytest.approx((a((i - 1) / T) - a(i / T)) * float(ce), rel=1e-12)


def test_time_independent_model_telescopes():
    """For mu independent of t the T-step sum is (alpha(0) - alpha(1)) CE for every T."""
    x0, model = torch.tensor([2, 0]), _model(2, 3, 1, time_dependent=False)
    ce = float(-torch.log(model(0.0)[torch.arange(2), x0]).sum())
    for sched in (Cosine(), LogLinearSchedule(1e-3)):
        gap = float(sched.alpha(torch.tensor(0.0, dtype=D)) - sched.alpha(torch.tensor(1.0, dtype=D)))
        for T in (1, 4, 37):
            assert float(absorbing_kl_terms(x0, model, sched, T).sum()) == pytest.approx(gap * ce, rel=1e-12)
        assert float(absorbing_nelbo_continuous(x0, model, sched)) == pytest.approx(gap * ce, rel=1e-10)


@pytest.mark.parametrize("sched", [Cosine(), LogLinearSchedule(1e-3)])
def test_discrete_sum_converges_to_continuous_nelbo(sched):
    """The T-step NELBO tends to the integral with weight -alpha'/(1 - alpha) at rate 1/T."""
    x0, model = torch.tensor([1, 3, 0, 2]), _model(4, 5, 2)
    exact = float(absorbing_nelbo_continuous(x0, model, sched, points=96))
    errs = [abs(float(absorbing_kl_terms(x0, model, sched, T).sum()) - exact) for T in (16, 64, 256)]
    assert errs[0] > errs[1] > errs[2]
    assert 3.0 < errs[0] / errs[1] < 5.0 and 3.0 < errs[1] / errs[2] < 5.0  # first order
    assert errs[2] < 2e-2 * exact


def test_nelbo_is_the_elbo_of_the_reverse_chain():
    """With alpha(1) = 0 (prior onehot(mask)) and alpha(0) = 1, the sum of the KL terms equals
    E_q[log q(x_{1:T} | x_0) - log p(x_0, x_{1:T})] enumerated over every path, and bounds
    -log p(x_0) = -log sum_paths p(x_0, path) from above."""
    V, T = 3, 3
    K, m = _noise("absorbing", V)
    sched = LogLinearSchedule(0.0)
    model = _model(1, V, 3)
    x0 = torch.tensor([1])
    grid = [i / T for i in range(T + 1)]  # t_0 = 0, ..., t_T = 1
    alpha = [float(sched.alpha(torch.tensor(t, dtype=D))) for t in grid]
    hot = torch.nn.functional.one_hot(x0[0], K).to(D)
    mu = lambda t: torch.cat([model(t)[0], torch.zeros(1, dtype=D)])
    elbo_gap, px0 = 0.0, 0.0
    for path in itertools.product(range(K), repeat=T - 1):  # x at t_{T-1}, ..., t_1; x_{t_T} = mask
        states = [V, *path, int(x0)]  # from t_T down to t_0
        log_q = log_p = 0.0
        for j in range(T):  # step from t = grid[T - j] to s = grid[T - j - 1]
            t_i, s_i = T - j, T - j - 1
            x_t, x_s = torch.tensor(states[j]), states[j + 1]
            q = bayes_posterior(x_t, hot, alpha[s_i], alpha[t_i], m)[x_s]
            p = bayes_posterior(x_t, mu(grid[t_i]), alpha[s_i], alpha[t_i], m)[x_s]
            log_q += math.log(q) if q > 0 else -math.inf
            log_p += math.log(p) if p > 0 else -math.inf
        if log_q == -math.inf:
            continue
        elbo_gap += math.exp(log_q) * (log_q - log_p)
        px0 += math.exp(log_p)
    # q(x_{1:T} | x_0) written backwards through the posteriors is the forward chain (alpha(1) = 0)
    nelbo = float(absorbing_kl_terms(x0, model, sched, T).sum())
    assert nelbo == pytest.approx(elbo_gap, rel=1e-12)
    assert -math.log(px0) <= nelbo + 1e-12
    assert -math.log(px0) < nelbo  # strict here: the model is not the true posterior
