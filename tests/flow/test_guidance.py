"""Classifier-free guidance: the exact special scales, one batched forward, and use through solve_ode."""

import pytest
import torch

from genlab.flow.guidance import CFGModel, guided_velocity
from genlab.flow.models.dit import DiT, DiTConfig
from genlab.flow.solvers import solve_ode

torch.set_num_threads(1)


class Recording(torch.nn.Module):
    """A tiny DiT that records the batch size of every forward."""

    def __init__(self, interval_input=False):
        super().__init__()
        torch.manual_seed(0)
        self.dit = DiT.from_config(DiTConfig(hidden=32, depth=1, heads=4, patch=2, interval_input=interval_input),
                                   channels=2, image_size=4, num_classes=3)
        with torch.no_grad():  # leave the zero init, so labels change the output
            for p in self.dit.parameters():
                p.add_(0.05 * torch.randn_like(p))
        self.batches = []

    @property
    def null_class(self):
        return self.dit.null_class

    def forward(self, x, t, y=None, h=None):
        self.batches.append(x.shape[0])
        return self.dit(x, t, y, h)


def _inputs(B=3):
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, 2, 4, 4, generator=g), torch.rand(B, generator=g), torch.tensor([0, 2, 1])[:B]


def test_scale_one_is_the_conditional_velocity_in_one_forward():
    model = Recording()
    x, t, y = _inputs()
    out = guided_velocity(model, x, t, y, 1.0)
    assert torch.equal(out, model.dit(x, t, y)) and model.batches == [3]


def test_scale_zero_is_unconditional():
    model = Recording()
    x, t, y = _inputs()
    out = guided_velocity(model, x, t, y, 0.0)
    torch.testing.assert_close(out, model.dit(x, t, None))
    assert model.batches == [3]


def test_guided_batch_equals_two_separate_forwards():
    model = Recording(interval_input=True)
    x, t, y = _inputs()
    h = torch.tensor([0.1, 0.0, 0.5])
    out = guided_velocity(model, x, t, y, 3.0, h=h)
    assert model.batches == [6]  # one forward of size 2B
    v_c, v_u = model.dit(x, t, y, h), model.dit(x, t, None, h)
    torch.testing.assert_close(out, v_u + 3.0 * (v_c - v_u), rtol=1e-5, atol=1e-6)


def test_needs_a_null_class():
    x, t, y = _inputs()
    with pytest.raises(ValueError, match="null"):
        guided_velocity(lambda x, t, y=None: x, x, t, y, 2.0)
    assert torch.equal(guided_velocity(lambda x, t, y=None: x, x, t, y, 2.0, null_class=7), x)


def test_cfg_model_through_solve_ode_counts_forwards():
    model = Recording()
    x, _, y = _inputs()
    guided = CFGModel(model, y, scale=2.5)
    res = solve_ode(guided, x, method="heun", steps=3)
    assert res.nfe == 6 and guided.forwards_per_call == 2 and guided.forwards == res.nfe * 2
    assert model.batches == [6] * 6
    ref = solve_ode(lambda x_, t_: guided_velocity(model.dit, x_, t_, y, 2.5), x, method="heun", steps=3)
    torch.testing.assert_close(res.x, ref.x)
    plain = CFGModel(model, y, scale=1.0)
    res1 = solve_ode(plain, x, method="euler", steps=2)
    assert plain.forwards_per_call == 1 and plain.forwards == res1.nfe == 2
    torch.testing.assert_close(res1.x, solve_ode(model.dit, x, method="euler", steps=2, y=y).x)
