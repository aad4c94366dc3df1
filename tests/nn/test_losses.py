"""linear_cross_entropy: the same loss, argmax hits and gradients as F.cross_entropy on the full logits."""

import pytest
import torch
import torch.nn.functional as F

from genlab.nn.losses import linear_cross_entropy


@pytest.mark.parametrize("softcap, chunk", [(None, 4), (None, 64), (3.0, 5)])
def test_equals_cross_entropy_on_the_full_logits(softcap, chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(13, 8, generator=g, requires_grad=True)
    w = torch.randn(37, 8, generator=g, requires_grad=True)
    y = torch.randint(0, 37, (13,), generator=g)
    loss, correct = linear_cross_entropy(h, w, y, softcap, chunk)
    loss.backward()
    got = (loss.detach(), h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    logits = h @ w.T
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    want = F.cross_entropy(logits, y)
    want.backward()
    torch.testing.assert_close(got[0], want.detach())
    torch.testing.assert_close(got[1], h.grad)
    torch.testing.assert_close(got[2], w.grad)
    assert int(correct) == int((logits.argmax(-1) == y).sum())


def test_frozen_weight_gets_no_gradient_and_no_rows_give_zero():
    h = torch.randn(6, 4, requires_grad=True)
    w = torch.randn(10, 4)
    loss, _ = linear_cross_entropy(h, w, torch.arange(6), None, 4)
    loss.backward()
    assert h.grad is not None and w.grad is None
    empty, n = linear_cross_entropy(torch.zeros(0, 4), w, torch.zeros(0, dtype=torch.long))
    assert float(empty) == 0.0 and int(n) == 0
