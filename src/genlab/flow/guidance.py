"""Classifier-free guidance (Ho & Salimans 2022) for class-conditional velocity models.

    v_guided = v_u + s (v_c - v_u),   v_c = v(x, t | y),  v_u = v(x, t | null).

Why this is guidance: on a Gaussian path the velocity is affine in the score, v = a_t x + b_t
grad log p_t(x | y), so v_c - v_u is b_t grad log p_t(y | x) (Bayes) and the guided velocity
follows the score of p_t(x) p_t(y | x)^s: a classifier's pull, sharpened by s, with no classifier.

The model must accept ``y=`` labels and know its null class (``model.null_class``, e.g. ``DiT``;
or pass ``null_class=``); it is trained for this by replacing labels by the null class now and then.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["guided_velocity", "CFGModel", "null_class_of"]


def null_class_of(model: Callable[..., Tensor], null_class: int | None = None) -> int:
    """``null_class`` if given, else the model's (or its wrapped ``.module``'s) ``null_class``."""
    if null_class is not None:
        return null_class
    for m in (model, getattr(model, "module", None)):  # DDP / AveragedModel keep the model in .module
        if m is not None and hasattr(m, "null_class"):
            return int(m.null_class)
    raise ValueError("classifier-free guidance needs the null class: give the model a null_class "
                     "attribute or pass null_class=...")


def _stack(v: object, n: int) -> object:
    """Extras that are per-sample tensors (first dim n) are repeated for the doubled batch."""
    return torch.cat([v, v]) if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == n else v


def guided_velocity(model: Callable[..., Tensor], x: Tensor, t: Tensor, y: Tensor | None, scale: float,
                    null_class: int | None = None, **extras) -> Tensor:
    """v_u + scale (v_c - v_u) for x (B, *dims), t (B,), y (B,) -> (B, *dims).

    scale == 1 is the conditional velocity exactly (one forward of size B), scale == 0 the
    unconditional one (likewise); any other scale runs ONE forward of size 2B with the conditional
    rows first and the null rows after (per-sample extras such as MeanFlow's h are repeated), which
    keeps the accelerator busier than two forwards of size B. y=None is unconditional at any scale.
    """
    if y is None:
        return model(x, t, y=None, **extras)
    if scale == 1:
        return model(x, t, y=y, **extras)
    null = torch.full_like(y, null_class_of(model, null_class))  # (B,)
    if scale == 0:
        return model(x, t, y=null, **extras)
    B = x.shape[0]
    t = torch.as_tensor(t, device=x.device)
    t2 = torch.cat([t, t]) if t.dim() else t
    extras2 = {k: _stack(v, B) for k, v in extras.items()}
    v_c, v_u = model(torch.cat([x, x]), t2, y=torch.cat([y, null]), **extras2).chunk(2)  # each (B, *dims)
    return v_u + scale * (v_c - v_u)


class CFGModel:
    """``CFGModel(model, y, scale)`` is a velocity model ``(x, t, **extras) -> v`` with the labels and
    guidance scale bound, for ``solve_ode`` and friends.

    ``forwards_per_call`` is 2 when guided (0 != scale != 1: one call of batch 2B costs two
    forwards) and 1 otherwise, so ``result.nfe * forwards_per_call`` compares guided and unguided
    samplers fairly; ``forwards`` counts the forwards made so far in those units.
    """

    def __init__(self, model: Callable[..., Tensor], y: Tensor | None, scale: float, null_class: int | None = None):
        self.model, self.y, self.scale = model, y, float(scale)
        # resolved once, so a model without a null class fails here rather than mid-solve
        self.null_class = null_class_of(model, null_class) if (y is not None and self.scale != 1.0) else null_class
        self.forwards = 0

    @property
    def forwards_per_call(self) -> int:
        return 1 if (self.y is None or self.scale in (0.0, 1.0)) else 2

    def __call__(self, x: Tensor, t: Tensor, **extras) -> Tensor:
        self.forwards += self.forwards_per_call
        return guided_velocity(self.model, x, t, self.y, self.scale, null_class=self.null_class, **extras)
