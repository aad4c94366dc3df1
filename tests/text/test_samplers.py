import math

import pytest
import torch
from scipy.stats import kstest

from genlab.math.schedules import LogLinearSchedule
from genlab.text.samplers import SAMPLERS, alpha_inverse, sample_tokens

torch.set_num_threads(1)

V = 6
MASK = V


class CosineMasking:
    """MDLM's cosine schedule alpha(t) = eps + (1 - eps) cos(pi t / 2): not linear, so the tests
    see whether the samplers read the schedule (log-linear would make many ratios equal to t)."""

    eps = 1e-3

    def alpha(self, t):
        return self.eps + (1 - self.eps) * torch.cos(0.5 * math.pi * t)

    def d_alpha(self, t):
        return -(1 - self.eps) * 0.5 * math.pi * torch.sin(0.5 * math.pi * t)


class Table:
    """A time- and context-independent denoiser: fixed logits per position (L, V); counts calls
    and records (masked count per row, t) of each call."""

    def __init__(self, L, seed=0, scale=2.0, table=None):
        g = torch.Generator().manual_seed(seed)
        self.table = table if table is not None else scale * torch.randn(L, V, generator=g)
        self.calls, self.log = 0, []

    def __call__(self, x, t):
        assert x.dtype == torch.long and t.shape == (x.shape[0],)
        self.calls += 1
        self.log.append(((x == MASK).sum(1).clone(), t.clone()))
        return self.table.expand(x.shape[0], -1, -1).clone()


class Contextual:
    """Depends on the tokens and on t (so cached is only approximate for it): used for the
    invariants every sampler must keep whatever the model."""

    def __init__(self, seed=1):
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.randn(V + 1, V, generator=g)
        self.calls = 0

    def __call__(self, x, t):
        self.calls += 1
        ctx = self.emb[x].mean(1, keepdim=True)  # (B, 1, V)
        return self.emb[x] + ctx + t[:, None, None]


CASES = [
    ("ancestral", {}), ("cached", {}), ("first_hitting", {}), ("confidence", {}),
    ("confidence", {"threshold": 0.5}), ("confidence", {"score": "sampled"}),
    ("semi_ar", {"block_size": 3}), ("semi_ar", {"block_size": 4, "inner": "cached"}),
    ("semi_ar", {"block_size": 5, "inner": "confidence"}), ("dfm", {}), ("dfm", {"eta": 2.0}),
    ("remdm", {}), ("remdm", {"sigma": 0.5, "strategy": "rescale"}), ("remdm", {"strategy": "conf", "sigma": 0.3}),
    ("remdm", {"strategy": "loop", "sigma": 0.2}), ("first_hitting", {"steps": 100}),
]


def _run(den, x, sampler, steps=8, seed=0, schedule=None, **kw):
    return sample_tokens(den, x, mask_id=MASK, schedule=schedule or LogLinearSchedule(),
                         steps=steps, sampler=sampler, generator=torch.Generator().manual_seed(seed), **kw)


def _prompted(B=6, L=12, seed=3):
    """Rows with a prefix prompt, an infill hole, and a different free set per row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (B, L), generator=g)
    free = torch.rand(B, L, generator=g) < 0.6
    free[:, :2] = False  # a prefix everyone keeps
    free[0] = True  # one fully free row
    free[1] = False  # one row with nothing to fill
    return torch.where(free, torch.full_like(x, MASK), x), free


def test_every_sampler_is_registered():
    assert set(SAMPLERS) == {"ancestral", "cached", "first_hitting", "confidence", "semi_ar", "dfm", "remdm"}


@pytest.mark.parametrize("sampler,opts", CASES)
def test_no_mask_left_fixed_tokens_kept_nfe_counted(sampler, opts):
    x0, free = _prompted()
    for den in (Contextual(), Table(x0.shape[1])):
        out = _run(den, x0, sampler, **opts)
        assert out.row_evals <= out.nfe * x0.shape[0]
        assert out.tokens.shape == x0.shape and out.tokens.dtype == torch.long
        assert not (out.tokens == MASK).any()
        assert torch.equal(out.tokens[~free], x0[~free])
        assert ((out.tokens >= 0) & (out.tokens < V)).all()
        assert out.nfe == den.calls


@pytest.mark.parametrize("sampler,opts", CASES)
def test_temperature_zero_and_tiny_top_p_give_argmax(sampler, opts):
    x0, free = _prompted()
    den = Table(x0.shape[1])
    argmax = den.table.argmax(-1).expand_as(x0)
    want = torch.where(free, argmax, x0)
    assert torch.equal(_run(den, x0, sampler, temperature=0.0, **opts).tokens, want)
    assert torch.equal(_run(den, x0, sampler, temperature=1e-4, **opts).tokens, want)
    assert torch.equal(_run(den, x0, sampler, top_p=1e-6, **opts).tokens, want)


def test_nothing_to_fill_costs_no_call():
    x = torch.randint(0, V, (3, 5))
    for name in SAMPLERS:
        den = Table(5)
        out = _run(den, x, name)
        assert torch.equal(out.tokens, x) and out.nfe == 0 == den.calls


def test_ancestral_transition_probabilities_and_draws():
    """Over many positions: among the tokens masked at t_k, the fraction still masked at t_{k+1}
    is (1 - alpha_s) / (1 - alpha_t), and the unmasked ones follow softmax(table)."""
    B, L, steps = 4000, 5, 4
    sched = CosineMasking()
    den = Table(L, seed=5, scale=1.0)
    out = _run(den, torch.full((B, L), MASK), "ancestral", steps=steps, schedule=sched,
               return_trajectory=True)
    assert out.nfe == steps and len(out.trajectory) == steps
    states = [torch.full((B, L), MASK)] + out.trajectory
    grid = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    a = sched.alpha(grid)
    for k in range(steps - 1):
        was = states[k] == MASK
        n = int(was.sum())
        frac = float((states[k + 1][was] == MASK).float().mean())
        p = float((1 - a[k + 1]) / (1 - a[k]))
        assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-9, (k, frac, p)
    probs = den.table.softmax(-1)  # (L, V)
    for pos in range(L):
        freq = torch.bincount(out.tokens[:, pos], minlength=V).double() / B
        sd = torch.sqrt(probs[pos] * (1 - probs[pos]) / B).double()
        assert ((freq - probs[pos].double()).abs() < 5 * sd + 1e-3).all(), pos


def test_draws_follow_temperature_and_top_p():
    B, L = 20000, 1
    den = Table(L, table=torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]))
    out = _run(den, torch.full((B, L), MASK), "ancestral", steps=2, temperature=0.7, top_p=0.8)
    p = (den.table[0] / 0.7).softmax(-1)  # sorted descending already: keep the top until mass >= 0.8
    keep = torch.cumsum(p, 0) - p < 0.8
    q = torch.where(keep, p, torch.zeros_like(p))
    q = q / q.sum()
    freq = torch.bincount(out.tokens[:, 0], minlength=V).double() / B
    assert ((freq - q.double()).abs() < 5 * torch.sqrt(q * (1 - q) / B).double() + 1e-3).all()
    assert freq[~keep].sum() == 0


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.8, 0.9)])
def test_cached_equals_ancestral_with_fewer_calls(temperature, top_p):
    x0, free = _prompted(B=4, L=10)
    steps = 200
    a = _run(Table(10), x0, "ancestral", steps=steps, seed=7, temperature=temperature, top_p=top_p)
    c = _run(Table(10), x0, "cached", steps=steps, seed=7, temperature=temperature, top_p=top_p)
    assert torch.equal(a.tokens, c.tokens)
    assert a.nfe == steps
    # cached calls once per distinct state: at most one per unmasking event, plus the first
    assert c.nfe <= int(free.sum()) + 1 and c.nfe < a.nfe / 4


def test_cached_equals_ancestral_for_a_time_dependent_denoiser():
    """The unmasking decisions are drawn before any call, so skipping the unused calls is exact
    even when the denoiser reads t and the context; each row is evaluated only when it changes."""
    x0, free = _prompted(B=5, L=12)
    a = _run(Contextual(), x0, "ancestral", steps=300, seed=4)
    den = Contextual()
    c = _run(den, x0, "cached", steps=300, seed=4)
    assert torch.equal(a.tokens, c.tokens)
    assert a.nfe == 300 and a.row_evals == 300 * 5
    assert c.nfe == den.calls <= int(free.sum())
    assert c.row_evals <= int(free.sum()) and c.nfe_per_row <= free.sum(1).max()


def test_cached_trajectory_matches_ancestral_step_by_step():
    x0, _ = _prompted(B=3, L=8)
    a = _run(Contextual(), x0, "ancestral", steps=40, seed=1, return_trajectory=True)
    c = _run(Contextual(), x0, "cached", steps=40, seed=1, return_trajectory=True)
    assert len(c.trajectory) == 40 and all(torch.equal(p, q) for p, q in zip(a.trajectory, c.trajectory))


def test_remdm_sigma_zero_has_the_ancestral_transitions():
    """sigma = 0: no decoded token is ever remasked, and a masked token stays masked with the
    ancestral probability (1 - alpha_s) / (1 - alpha_t)."""
    B, L, steps = 3000, 4, 4
    sched = CosineMasking()
    out = _run(Table(L), torch.full((B, L), MASK), "remdm", steps=steps, sigma=0.0, schedule=sched,
               return_trajectory=True)
    states = [torch.full((B, L), MASK)] + out.trajectory
    a = sched.alpha(torch.linspace(1, 0, steps + 1, dtype=torch.float64))
    for k in range(steps - 1):
        assert not (states[k + 1][states[k] != MASK] == MASK).any()
        was = states[k] == MASK
        frac, p = float((states[k + 1][was] == MASK).float().mean()), float((1 - a[k + 1]) / (1 - a[k]))
        assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / int(was.sum())) + 1e-9, (k, frac, p)


def test_remdm_remasks_a_fraction_sigma():
    B, L, steps, sigma = 3000, 4, 4, 0.2
    out = _run(Table(L), torch.full((B, L), MASK), "remdm", steps=steps, sigma=sigma, return_trajectory=True)
    s1, s2 = out.trajectory[0], out.trajectory[1]  # states at t = 3/4 and t = 1/2
    decoded = s1 != MASK
    frac = float((s2[decoded] == MASK).float().mean())
    n = int(decoded.sum())
    # cap: sigma_t = min(0.2, (1 - alpha_s) / alpha_t) = 0.2 here
    assert abs(frac - sigma) < 5 * math.sqrt(sigma * (1 - sigma) / n)


def test_remdm_loop_remasks_only_inside_the_loop():
    """loop: no decoded token is remasked outside t in [t_off, t_on]; inside, alpha is held at
    alpha_on and a decoded token is remasked with probability min(sigma, (1 - alpha_on) / alpha_on)."""
    B, L, steps, sigma = 2000, 4, 20, 0.05
    out = _run(Table(L), torch.full((B, L), MASK), "remdm", steps=steps, sigma=sigma, strategy="loop",
               return_trajectory=True)
    states = [torch.full((B, L), MASK)] + out.trajectory
    grid = torch.linspace(1, 0, steps + 1, dtype=torch.float64).tolist()
    fracs = []
    for k in range(steps):
        dec = states[k] != MASK
        remasked = float((states[k + 1][dec] == MASK).float().mean()) if dec.any() else 0.0
        if grid[k] <= 0.55 and grid[k + 1] >= 0.05:
            fracs.append((remasked, int(dec.sum())))
        else:
            assert remasked == 0.0, k
    assert len(fracs) == 10  # t from 0.5 to 0.05 in steps of 0.05
    n = sum(c for _, c in fracs)
    mean = sum(f * c for f, c in fracs) / n
    assert abs(mean - sigma) < 5 * math.sqrt(sigma * (1 - sigma) / n)
    # alpha is held: the masked fraction stays near 1 - alpha_on = 0.1 through the loop
    for k in range(10, 19):
        assert abs(float((states[k] == MASK).float().mean()) - 0.1) < 0.03, k


def test_remdm_conf_remasks_the_least_confident_first():
    """conf: cap's sigma_t on average over a row's decoded positions, shared out by softmax(-psi).
    Position 0 is decoded at psi = p about 1, position 1 at psi = 1/6 (a flat row); in a row with
    both decoded they are remasked with probability 2 sigma_t w, w = softmax(-1, -1/6)."""
    B, L, steps, sigma = 6000, 2, 3, 0.2
    table = torch.zeros(L, V)
    table[0, 0] = 12.0
    out = _run(Table(L, table=table), torch.full((B, L), MASK), "remdm", steps=steps, sigma=sigma,
               strategy="conf", return_trajectory=True)
    s1, s2 = out.trajectory[0], out.trajectory[1]
    both = (s1 != MASK).all(1)  # rows with both decoded after the first step
    n = int(both.sum())
    psi = torch.tensor([torch.tensor([12.0] + [0.0] * (V - 1)).softmax(0)[0].item(), 1 / V])
    want = 2 * sigma * (-psi).softmax(0)  # sigma_t = min(0.2, sigma_max = 1) on this grid
    got = (s2[both] == MASK).float().mean(0)
    assert (got - want).abs().max() < 5 * math.sqrt(0.25 / n), (got, want)
    assert got[1] > 2 * got[0]


def test_dfm_jump_probabilities():
    """One Euler step from t = 1/2 to 1/4: P(masked -> decoded) = 1 - exp(-h (-alpha' + eta alpha) /
    (1 - alpha)), P(decoded -> masked) = 1 - exp(-h eta)."""
    B, L, steps, eta = 4000, 4, 4, 1.5
    sched = CosineMasking()
    out = _run(Table(L), torch.full((B, L), MASK), "dfm", steps=steps, eta=eta, schedule=sched,
               return_trajectory=True)
    s1, s2 = out.trajectory[1], out.trajectory[2]  # t = 1/2 -> t = 1/4
    t, h = torch.tensor(0.5, dtype=torch.float64), 0.25
    a, da = float(sched.alpha(t)), float(sched.d_alpha(t))
    p_u = 1 - math.exp(-h * (-da + eta * a) / (1 - a))
    p_r = 1 - math.exp(-h * eta)
    for was, p in ((s1 == MASK, p_u), (s1 != MASK, 1 - p_r)):
        frac = float((s2[was] != MASK).float().mean())
        assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / int(was.sum())), (frac, p)


def test_first_hitting_times_follow_the_schedule():
    """With steps >= L (the exact sampler) the times the denoiser is called at are the unmasking
    times: i.i.d. with P(tau < s) = (1 - alpha(s)) / (1 - alpha(1)); one call per token, the masked
    count falls by one."""
    B, L = 100, 20
    sched = CosineMasking()
    den = Table(L)
    out = _run(den, torch.full((B, L), MASK), "first_hitting", steps=1000, schedule=sched)
    assert out.nfe == L == den.calls
    ts = torch.stack([t for _, t in den.log]).double()  # (L, B), decreasing along calls
    assert (ts[1:] <= ts[:-1]).all()
    assert all(torch.equal(m, torch.full((B,), L - j)) for j, (m, _) in enumerate(den.log))
    a1 = float(sched.alpha(torch.tensor(1.0)))
    cdf = lambda s: (1 - sched.alpha(torch.as_tensor(s, dtype=torch.float64)).numpy()) / (1 - a1)
    assert kstest(ts.flatten().numpy(), cdf).pvalue > 1e-3
    # the mean against the analytic one, E tau = int_0^1 (1 - F(s)) ds
    grid = torch.linspace(0, 1, 20001, dtype=torch.float64)
    mean = torch.trapezoid(1 - torch.as_tensor(cdf(grid)), grid)
    assert abs(float(ts.mean()) - float(mean)) < 4 * float(ts.std()) / math.sqrt(ts.numel())


def test_first_hitting_with_fewer_steps_makes_runs_of_events():
    """steps < n: min(steps, n) jumps per row, runs of n // steps or n // steps + 1 events (10
    events in 4 jumps: 3, 2, 3, 2 by j * 4 // 10), each call at the time of its run's first event."""
    B, L = 50, 10
    den = Table(L)
    _run(den, torch.full((B, L), MASK), "first_hitting", steps=4, schedule=CosineMasking())
    assert den.calls == 4
    assert [int(m[0]) for m, _ in den.log] == [10, 7, 5, 2] and all((m == m[0]).all() for m, _ in den.log)
    ts = torch.stack([t for _, t in den.log])
    assert (ts[1:] <= ts[:-1]).all()


def test_first_hitting_nfe_is_the_largest_row_count():
    x0, free = _prompted()
    den = Table(x0.shape[1])
    assert _run(den, x0, "first_hitting", steps=100).nfe == int(free.sum(1).max()) == den.calls
    den = Table(x0.shape[1])
    assert _run(den, x0, "first_hitting", steps=3).nfe == 3 == den.calls  # the fullest row has >= 3 free


def test_alpha_inverse():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    for sched in (CosineMasking(), LogLinearSchedule(1e-3)):
        assert torch.allclose(alpha_inverse(sched, sched.alpha(t)), t, atol=1e-9)


def test_confidence_unmasks_the_most_confident_first():
    L = 8
    # the top probability rises with the row's scale: position order by confidence is known
    scale = torch.tensor([0.3, 2.0, 0.1, 1.5, 3.0, 0.7, 1.0, 2.5])
    table = scale[:, None] * torch.arange(V, dtype=torch.float32)[None]
    den = Table(L, table=table)
    out = _run(den, torch.full((1, L), MASK), "confidence", steps=L, temperature=0.0, return_trajectory=True)
    order = [int((prev == MASK).logical_and(cur != MASK).nonzero()[0, 1])
             for prev, cur in zip([torch.full((1, L), MASK)] + out.trajectory[:-1], out.trajectory)]
    assert order == torch.argsort(scale, descending=True).tolist()
    assert out.nfe == L
    # fewer steps: k per step from the schedule (L = 8, 4 steps, log-linear: 2 per step)
    out = _run(Table(L, table=table), torch.full((1, L), MASK), "confidence", steps=4, return_trajectory=True)
    assert [int((s == MASK).sum()) for s in out.trajectory] == [6, 4, 2, 0] and out.nfe == 4


def test_confidence_threshold_takes_all_above_and_at_least_one():
    L = 6
    table = torch.full((L, V), 0.0)
    table[[0, 3], 2] = 10.0  # two positions nearly certain, the rest uniform
    out = _run(Table(L, table=table), torch.full((1, L), MASK), "confidence", steps=100,
               threshold=0.9, return_trajectory=True)
    first = out.trajectory[0][0]
    assert (first != MASK).nonzero().flatten().tolist() == [0, 3]
    # afterwards nothing passes the threshold: at least one per step (the schedule asks for
    # fewer than one per step at 100 steps), so 1 + 4 calls
    assert out.nfe == 5


def test_semi_ar_goes_block_by_block():
    B, L, bs, steps = 3, 10, 4, 5
    den = Table(L)
    out = _run(den, torch.full((B, L), MASK), "semi_ar", steps=steps, block_size=bs, return_trajectory=True)
    assert out.nfe == 3 * steps  # blocks [0, 4), [4, 8), [8, 10)
    for k, s in enumerate(out.trajectory):
        block = k // steps
        assert (s[:, bs * (block + 1):] == MASK).all()  # later blocks untouched
        if block > 0:
            assert (s[:, : bs * block] != MASK).all()  # earlier blocks complete


def test_bad_arguments_name_the_problem():
    x = torch.full((2, 4), MASK)
    with pytest.raises(ValueError, match="unknown sampler"):
        _run(Table(4), x, "nope")
    with pytest.raises(ValueError, match="no option eta"):
        _run(Table(4), x, "ancestral", eta=1.0)
    with pytest.raises(ValueError, match="steps"):
        _run(Table(4), x, "ancestral", steps=0)
    with pytest.raises(ValueError, match="block_size"):
        _run(Table(4), x, "semi_ar", block_size=0)
    with pytest.raises(ValueError, match="mask_id"):
        sample_tokens(Table(4), torch.full((2, 4), 3), mask_id=3, schedule=LogLinearSchedule(), steps=2)


def _dfm_full_vocabulary(den, x, steps, eta, schedule, seed):
    """dfm as first written: a call on the whole batch at every step with a masked token, a token
    drawn at every position (inverse CDF of softmax), then the jumps applied; the same uniforms."""
    g = torch.Generator().manual_seed(seed)
    free, x = x == MASK, x.clone()
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    for k in range(steps):
        t, h = grid[k], grid[k] - grid[k + 1]
        u_jump, u_tok = torch.rand(x.shape, generator=g), torch.rand(x.shape, generator=g)
        masked = (x == MASK) & free
        tt = torch.tensor(t, dtype=torch.float64)
        a, da = float(schedule.alpha(tt)), float(schedule.d_alpha(tt))
        last = k == steps - 1
        p_unmask = 1.0 if last else 1.0 - math.exp(-h * (-da + eta * a) / (1.0 - a))
        p_remask = 0.0 if last else 1.0 - math.exp(-h * eta)
        decoded = free & ~masked
        if masked.any():
            cdf = den(x, torch.full((x.shape[0],), t)).float().softmax(-1).cumsum(-1)
            tok = (cdf <= (u_tok * cdf[..., -1])[..., None]).sum(-1).clamp(max=V - 1)
            x = torch.where(masked & (u_jump < p_unmask), tok, x)
        x = torch.where(decoded & (u_jump < p_remask), torch.full_like(x, MASK), x)
    return x


@pytest.mark.parametrize("eta", [0.0, 2.0])
def test_dfm_draws_only_where_it_jumps_and_keeps_the_full_vocabulary_samples(eta):
    """The jumps are decided before the call, the call is made on the rows that decode a token and
    a token drawn only where one decodes: the same tokens, for the same seed, as drawing every
    position from a whole-batch call (for a denoiser whose rows do not depend on each other)."""
    x0, _ = _prompted(B=8, L=12)
    for sched in (LogLinearSchedule(), CosineMasking()):
        for steps in (3, 40):
            want = _dfm_full_vocabulary(Contextual(), x0, steps, eta, sched, seed=4)
            got = _run(Contextual(), x0, "dfm", steps=steps, seed=4, eta=eta, schedule=sched)
            assert torch.equal(got.tokens, want)
    # each call is on exactly the rows that decode a token at its step; a step with none makes no call
    B, L, steps = 6, 5, 40
    den = Table(L)
    out = _run(den, torch.full((B, L), MASK), "dfm", steps=steps, eta=eta, return_trajectory=True)
    states = [torch.full((B, L), MASK)] + out.trajectory
    decoding = [int(((p == MASK) & (q != MASK)).any(1).sum()) for p, q in zip(states[:-1], states[1:])]
    assert [len(m) for m, _ in den.log] == [d for d in decoding if d]
    assert out.nfe == den.calls == sum(d > 0 for d in decoding) < steps
    assert out.row_evals == sum(decoding)
