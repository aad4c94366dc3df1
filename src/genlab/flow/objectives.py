"""The conditional flow-matching loss (Lipman et al. 2023; Tong et al. 2023 for OT pairing) and the
MeanFlow loss for one-step generation (Geng et al. 2025)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from genlab.flow.coupling import ot_pairing
from genlab.flow.guidance import null_class_of
from genlab.flow.paths import AffinePath, _expand_like, sample_time


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


# ----------------------------------------------------------------------------- MeanFlow
# In genlab's time (t = 0 noise, t = 1 data) the average velocity over [t, s], s = t_end >= t, is
#     u(z_t, t, s) = 1 / (s - t) * int_t^s v(z_tau, tau) dtau,   so   z_s = z_t + (s - t) u.
# Differentiate (s - t) u(z_t, t, s) = int_t^s v dtau in t, along the flow (dz_t/dt = v), s fixed:
#     -u + (s - t) du/dt = -v(z_t, t)   =>   u = v(z_t, t) + (s - t) du/dt,
#     du/dt = v . d_z u + d_t u  (the total derivative; Geng et al. write it with r < t, hence their minus).
# The model takes h = s - t as its second time, so along the flow dh/dt = -1: the JVP tangents on
# (z, t, h) are (v, 1, -1). The right-hand side, with the stop-gradient, is the regression target.


def sample_time_pairs(
    n: int,
    equal_share: float = 0.75,
    kind: str = "logit_normal",
    mean: float = 0.4,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """MeanFlow's training times: (t, t_end), each (n,), with t <= t_end.

    Two independent draws of ``sample_time(kind, mean, std)``, sorted; then a share ``equal_share``
    of the pairs (chosen at random) gets t_end = t, where MeanFlow is plain flow matching (MeanFlow's
    best ablation keeps 75% such pairs). mean=0.4 is the paper's logit-normal mean -0.4 written in
    genlab's time (their t is 1 - ours): a little more weight near the data.
    """
    if not 0.0 <= equal_share <= 1.0:
        raise ValueError(f"equal_share must be in [0, 1], got {equal_share}")
    a = sample_time(n, kind=kind, mean=mean, std=std, generator=generator, device=device)
    b = sample_time(n, kind=kind, mean=mean, std=std, generator=generator, device=device)
    t, t_end = torch.minimum(a, b), torch.maximum(a, b)
    gen_device = generator.device if generator is not None else device
    equal = (torch.rand(n, generator=generator, device=gen_device) < equal_share).to(t.device)
    return t, torch.where(equal, t, t_end)


def _checkpointed(model) -> bool:
    """Whether the model recomputes its blocks in backward (``DiT(grad_checkpointing=True)``)."""
    for m in (model, getattr(model, "module", None)):
        cfg = getattr(m, "cfg", None)
        if getattr(m, "grad_checkpointing", False) or getattr(cfg, "grad_checkpointing", False):
            return True
    return False


def meanflow_target(
    model: Callable[..., Tensor], z: Tensor, t: Tensor, t_end: Tensor, v: Tensor, y: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """u = model(z, t, y=y, h=t_end - t) (with its graph), du/dt along dz/dt = v, and the
    stop-gradient target v + (t_end - t) du/dt. z, v (B, *dims); t, t_end (B,). Returns (u, dudt, target).

    One ``torch.func.jvp`` gives u and du/dt together; u keeps its graph for the loss. Forward-mode
    AD has no rule for the fused SDPA kernels, so attention runs on the math backend inside it. A
    checkpointed model cannot recompute under forward AD (torch raises CheckpointError): there the
    JVP runs without a graph and u comes from a second, ordinary (checkpointed) forward.
    """
    h = t_end - t  # (B,)

    def u_fn(z_, t_, h_):
        return model(z_, t_, y=y, h=h_)

    tangents = (v, torch.ones_like(t), -torch.ones_like(h))  # dz/dt = v, dt/dt = 1, dh/dt = -1
    with sdpa_kernel([SDPBackend.MATH]):
        if _checkpointed(model) and torch.is_grad_enabled():
            with torch.no_grad():
                _, dudt = torch.func.jvp(u_fn, (z, t, h), tangents)
            u = None
        else:
            u, dudt = torch.func.jvp(u_fn, (z, t, h), tangents)
    if u is None:
        u = u_fn(z, t, h)
    dudt = dudt.detach()
    target = (v + _expand_like(h, v) * dudt).detach()
    return u, dudt, target


def meanflow_loss(
    model: Callable[..., Tensor],
    x0: Tensor,
    x1: Tensor,
    t: Tensor | None = None,
    t_end: Tensor | None = None,
    y: Tensor | None = None,
    cfg_scale: float = 1.0,
    generator: torch.Generator | None = None,
    adaptive_p: float = 0.0,
    adaptive_c: float = 1e-3,
) -> tuple[Tensor, dict[str, Tensor]]:
    """MeanFlow (Geng et al. 2025) on the straight path z_t = (1 - t) x0 + t x1 (x0 noise, x1 data).

    Regresses u = model(z_t, t, y=y, h=t_end - t) on sg(v + (t_end - t) du/dt) with v = x1 - x0
    (see ``meanflow_target``); where t_end == t this is exactly ``flow_matching_loss`` on CondOTPath.
    t, t_end: (B,) with t <= t_end, or None to draw both with ``sample_time_pairs(generator=...)``.

    cfg_scale = w != 1 trains a guided model (the paper's sec. 4.2): for rows whose label is not the
    null class, the instantaneous velocity becomes w (x1 - x0) + (1 - w) u(z_t, t, t | null), the
    unconditional prediction taken without gradient; null rows keep x1 - x0. Sampling the trained
    model then needs one forward per step, no guidance pass.
    adaptive_p > 0: the paper's adaptive weighting, each sample's mean squared error e scaled by
    sg(1 / (e + adaptive_c) ** p) (p = 1 was its best); 0 is the plain MSE.
    Returns (scalar loss, metrics of detached 0-dim tensors).
    """
    if x0.shape != x1.shape:
        raise ValueError(f"x0 and x1 must have the same shape, got {tuple(x0.shape)} and {tuple(x1.shape)}")
    n = x1.shape[0]
    if t is None or t_end is None:
        t, t_end = sample_time_pairs(n, generator=generator, device=x1.device)
    t, t_end = t.to(device=x1.device), t_end.to(device=x1.device)
    if bool((t_end < t).any()):
        raise ValueError("meanflow_loss needs t <= t_end for every sample")
    tb = _expand_like(t, x1)  # (B, 1, ..., 1)
    z = (1 - tb) * x0 + tb * x1  # (B, *dims)
    v = x1 - x0
    if cfg_scale != 1.0 and y is not None:
        null = null_class_of(model)
        with torch.no_grad():
            u_null = model(z, t, y=torch.full_like(y, null), h=torch.zeros_like(t))  # = v(z_t, t | null)
        guided = cfg_scale * v + (1 - cfg_scale) * u_null
        v = torch.where(_expand_like((y != null).to(v.dtype), v) > 0, guided, v)
    u, dudt, target = meanflow_target(model, z, t, t_end, v, y)
    err = (u - target).flatten(1).pow(2).mean(dim=1)  # (B,)
    if adaptive_p > 0:
        loss = (err / (err.detach() + adaptive_c) ** adaptive_p).mean()
    else:
        loss = err.mean()
    with torch.no_grad():
        metrics = {"mf_loss": loss.detach(), "mf_mse": err.mean(), "dudt_rms": dudt.pow(2).mean().sqrt(),
                   "equal_share": (t_end == t).float().mean()}
    return loss, metrics
