"""The MDLM objective: NELBO against a hand computation, SUBS carry-over, a uniform model's bits."""

import math

import torch

from genlab.math.schedules import LogLinearSchedule, MaskingCosineSchedule
from genlab.text.objective import (ar_inputs, ar_nll, forward_mask, mdlm_loss, mdlm_nelbo, sample_times,
                                   subs_log_probs)

V = 5
MASK = V


def test_nelbo_equals_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, V, (3, 4), generator=g)
    x_t = x0.clone()
    x_t[0, 1] = x_t[1, 0] = x_t[1, 3] = x_t[2, 2] = MASK
    logits = torch.randn(3, 4, V, generator=g)
    t = torch.tensor([0.2, 0.5, 0.9])
    s = LogLinearSchedule(1e-3)
    got = mdlm_nelbo(logits, x0, x_t, t, s, MASK)
    for b in range(3):
        a, da = 1 - (1 - 1e-3) * t[b].item(), -(1 - 1e-3)
        total = 0.0
        for pos in range(4):
            if x_t[b, pos] == MASK:
                z = [math.exp(v) for v in logits[b, pos].tolist()]
                total += -math.log(z[x0[b, pos]] / sum(z))
        assert math.isclose(got[b].item(), -da / (1 - a) * total / 4, rel_tol=1e-5)


def test_subs_carries_unmasked_tokens_over():
    x0 = torch.tensor([[1, 2, 3]])
    x_t = torch.tensor([[1, MASK, 3]])
    logp = subs_log_probs(torch.randn(1, 3, V), x_t, MASK)
    assert logp[0, 0, 1] == 0 and torch.isinf(logp[0, 0, [0, 2, 3, 4]]).all()
    assert torch.allclose(logp[0, 1].exp().sum(), torch.tensor(1.0))
    nelbo = mdlm_nelbo(torch.randn(1, 3, V), x0, x0, torch.tensor([0.5]), LogLinearSchedule(), MASK)
    assert nelbo.item() == 0.0  # nothing masked: nothing to pay


def test_antithetic_times_are_evenly_spaced():
    t = sample_times(8, True, 1e-3, generator=torch.Generator().manual_seed(1))
    gaps = torch.sort(t).values.diff()
    assert torch.allclose(gaps, torch.full_like(gaps, 1 / 8), atol=1e-6) and t.min() >= 1e-3


def test_forward_mask_rate():
    x0 = torch.zeros(200, 200, dtype=torch.long)
    x_t, masked = forward_mask(x0, torch.full((200,), 0.3), MASK, torch.Generator().manual_seed(0))
    assert abs(masked.float().mean().item() - 0.7) < 0.01 and (x_t[masked] == MASK).all()


def test_uniform_model_costs_log_v_per_token():
    """All-zero logits: each masked token costs ln V; the expected weighted sum is
    int_0^1 -alpha'(t) dt * ln V = (1 - alpha(1)) ln V per token, for any schedule."""
    class Uniform(torch.nn.Module):
        def forward(self, x, t):
            return torch.zeros(*x.shape, V)

    x0 = torch.randint(0, V, (8192, 32), generator=torch.Generator().manual_seed(0))
    for s in (LogLinearSchedule(1e-3), MaskingCosineSchedule(1e-3)):
        loss, _ = mdlm_loss(Uniform(), x0, s, MASK, antithetic=True, eps_t=1e-3,
                            generator=torch.Generator().manual_seed(1))
        bits = loss.item() / math.log(2)
        assert abs(bits - (1 - 1e-3) * math.log2(V)) < 0.01 * math.log2(V), (s, bits)


def test_ar_loss_predicts_every_token_from_its_prefix():
    x0 = torch.tensor([[1, 2, 3]])
    assert ar_inputs(x0, MASK).tolist() == [[MASK, 1, 2]]
    assert math.isclose(ar_nll(torch.zeros(1, 3, V), x0).item(), math.log(V), rel_tol=1e-6)
