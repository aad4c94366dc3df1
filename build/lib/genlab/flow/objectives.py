"""The conditional flow-matching loss (Lipman et al. 2023; Tong et al. 2023 for OT pairing)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from genlab.flow.coupling import ot_pairing
from genlab.flow.paths import AffinePath, sample_time


def flow_matching_loss(
    model: Callable[..., Tensor],
    x0: Tensor,
    x1: Tensor,
    path: AffinePath,
    t: Tensor | None = None,
    time_sampler: str = "uniform",
    coupling: str = "none",
    generator: torch.Generator | None = None,
    **extras,
) -> tuple[Tensor, dict[str, Tensor]]:
    """MSE between model(x_t, t, **extras) and the path velocity dx_t, averaged over all elements.

    x0: source batch (B, *dims); x1: data batch (B, *dims). With coupling "exact" or
    "sinkhorn" the data batch is first re-ordered by minibatch OT; tensor extras whose
    first dim is B (class labels, ...) are taken to belong to x1 and re-ordered with it.
    t: times (B,), or None to draw them with `time_sampler` ("uniform", "logit_normal").
    Returns (scalar loss, metrics of detached 0-dim tensors, so logging costs no sync).
    """
    n = x1.shape[0]
    if coupling != "none":
        perm = ot_pairing(x0, x1, method=coupling, generator=generator)
        x1 = x1[perm]
        extras = {k: v[perm] if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == n else v for k, v in extras.items()}
    if t is None:
        t = sample_time(n, kind=time_sampler, generator=generator, device=x1.device)
    t = t.to(device=x1.device)  # (B,); the path casts it to x's dtype where it multiplies
    ps = path.sample(x0, x1, t)
    v = model(ps.x_t, ps.t, **extras)  # (B, *dims)
    loss = F.mse_loss(v, ps.dx_t)
    with torch.no_grad():
        pair_dist = (x1 - x0).flatten(1).pow(2).sum(dim=1).mean()  # how straight the pairs are
    return loss, {"fm_loss": loss.detach(), "pair_sq_dist": pair_dist}
