"""Cross-entropy through a language-model head, a chunk of rows at a time.

``F.cross_entropy(h @ W.T, y)`` builds the (N, V) logits, keeps them for the backward pass, and the
backward pass builds a second (N, V) tensor for their gradient. With Gemma's 257,216-token
vocabulary that is 1 GiB per 1,000 scored tokens in fp32: more than the weights of a LoRA
fine-tune. ``linear_cross_entropy`` computes the same loss and gradients with one (chunk, V) block
alive at a time: the forward keeps only the per-row log-partition, the backward recomputes each
block's logits and turns them into gradients for ``h`` and ``W`` on the spot.
"""

from __future__ import annotations

import torch


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, softcap: float | None,
                chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = h.shape[0]
        total = h.new_zeros((), dtype=torch.float32)
        correct = torch.zeros((), dtype=torch.long, device=h.device)
        lse = torch.empty(n, dtype=torch.float32, device=h.device)  # (N,) log-partition per row
        for i in range(0, n, chunk):
            logits = _logits(h[i:i + chunk], weight, softcap)  # (C, V) fp32
            lse[i:i + chunk] = torch.logsumexp(logits, dim=-1)
            y = target[i:i + chunk]
            total += (lse[i:i + chunk] - logits.gather(1, y[:, None]).squeeze(1)).sum()
            correct += (logits.argmax(-1) == y).sum()
        ctx.save_for_backward(h, weight, target, lse)
        ctx.softcap, ctx.chunk = softcap, chunk
        ctx.mark_non_differentiable(correct)
        return total / max(n, 1), correct

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_correct: torch.Tensor):
        h, weight, target, lse = ctx.saved_tensors
        n, cap = h.shape[0], ctx.softcap
        grad_h = torch.zeros_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        scale = grad_loss.float() / max(n, 1)
        for i in range(0, n, ctx.chunk):
            hc = h[i:i + ctx.chunk]
            # In place where it can be: at most two (C, V) blocks are alive.
            g = hc.float() @ weight.float().T  # (C, V) logits before the soft cap
            t = None
            if cap is not None:
                t = g.div_(cap).tanh_()  # tanh(x / cap), kept for the cap's derivative
                g = t * cap
            g.sub_(lse[i:i + ctx.chunk, None]).exp_()  # softmax
            g.scatter_add_(1, target[i:i + ctx.chunk, None], -torch.ones_like(g[:, :1]))  # - one-hot
            g.mul_(scale)
            if t is not None:  # d(cap tanh(x / cap)) / dx = 1 - tanh^2
                g.mul_(t.mul_(t).neg_().add_(1))
            if grad_h is not None:
                grad_h[i:i + ctx.chunk] = (g @ weight.float()).to(h.dtype)
            if grad_w is not None:
                grad_w += g.T @ hc.float()
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None


def _logits(h: torch.Tensor, weight: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = h.float() @ weight.float().T
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         softcap: float | None = None, chunk: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of the logits ``softcap * tanh(h W^T / softcap)`` (plain ``h W^T`` without a
    cap) against ``target``, and the number of rows whose argmax is the target (no gradient).

    h (N, D), weight (V, D), target (N,) long. Equal to ``F.cross_entropy`` on the full logits, with
    gradients for ``h`` and ``weight``; memory O(chunk x V) instead of O(N x V)."""
    return _LinearCrossEntropy.apply(h, weight, target, softcap, chunk)


# --------------------------------------------------------------------------------------------------
# Image-text contrastive losses (CLIP / BLIP-2 ITC and SigLIP) on a precomputed logit matrix.
# --------------------------------------------------------------------------------------------------

def _positives(logits: torch.Tensor, positives: torch.Tensor | None, name: str) -> torch.Tensor:
    """The (N_img, N_txt) bool matrix of matching pairs: ``positives`` checked, or the diagonal."""
    if logits.ndim != 2:
        raise ValueError(f"{name}: logits must be (N_img, N_txt), got shape {tuple(logits.shape)}")
    if positives is None:
        if logits.shape[0] != logits.shape[1]:
            raise ValueError(f"{name}: the default positives are the diagonal, which needs square logits; "
                             f"got {tuple(logits.shape)}: pass positives=")
        return torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
    if positives.shape != logits.shape:
        raise ValueError(f"{name}: positives has shape {tuple(positives.shape)} but logits {tuple(logits.shape)}")
    if positives.dtype != torch.bool:
        raise ValueError(f"{name}: positives must be a bool tensor, got {positives.dtype}")
    return positives.to(logits.device)


def _soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Mean over rows of ``-sum_j q_ij log softmax(logits)_ij``, q = target smoothed towards uniform."""
    n_cls = logits.shape[1]
    if label_smoothing:
        target = (1.0 - label_smoothing) * target + label_smoothing / n_cls
    logp = torch.log_softmax(logits, dim=1)  # (R, C); stable for any finite logits
    # where(q > 0): a -inf logit (a masked pair) with zero weight adds 0, not 0 * -inf = nan.
    return -torch.where(target > 0, target * logp, torch.zeros_like(logp)).sum(1).mean()


def contrastive_loss(logits: torch.Tensor, positives: torch.Tensor | None = None,
                     label_smoothing: float = 0.0) -> torch.Tensor:
    """The symmetric InfoNCE loss of CLIP and of BLIP-2's image-text contrastive (ITC) objective.

    ``logits`` (N_img, N_txt) are the scaled similarities (``t * cos``). Returns the scalar
    ``(CE_i2t + CE_t2i) / 2``: CE_i2t is the mean over images (rows) of the cross-entropy of the
    row's softmax against its target, CE_t2i the same over captions (columns). The target of a row
    is uniform over that row's positives, and likewise for a column, so a batch that holds one
    caption twice (or one image with several captions) asks for equal probability on each match
    instead of pushing true matches apart. ``positives`` is bool (N_img, N_txt); the default is the
    diagonal and needs square logits. Every row and column needs at least one positive
    (``ValueError`` otherwise). ``label_smoothing`` mixes each target with the uniform
    distribution, as ``F.cross_entropy`` does. Computed in at least float32 with ``log_softmax``, so
    logits of 1e4 give a finite, exact loss; with one-hot targets it equals the usual
    ``(F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y)) / 2``.
    """
    pos = _positives(logits, positives, "contrastive_loss")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"contrastive_loss: label_smoothing must be in [0, 1), got {label_smoothing}")
    per_row, per_col = pos.sum(1), pos.sum(0)  # (N_img,), (N_txt,)
    if bool((per_row == 0).any()) or bool((per_col == 0).any()):
        raise ValueError(f"contrastive_loss: every image and every caption needs a positive; "
                         f"{int((per_row == 0).sum())} rows and {int((per_col == 0).sum())} columns have none")
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    q = pos.to(x.dtype)  # (N_img, N_txt)
    i2t = _soft_cross_entropy(x, q / per_row[:, None], label_smoothing)
    t2i = _soft_cross_entropy(x.T, (q / per_col[None, :]).T, label_smoothing)
    return (i2t + t2i) / 2


def sigmoid_loss(logits: torch.Tensor, positives: torch.Tensor | None = None) -> torch.Tensor:
    """The pairwise sigmoid loss of SigLIP (Zhai et al., 2023, "Sigmoid Loss for Language Image
    Pre-Training"), eq. 1.

    ``logits`` (N_img, N_txt) already hold ``t * cos + b``. Each pair is an independent binary
    problem with label z = +1 on ``positives`` (bool, same shape; default the diagonal, square
    logits) and -1 elsewhere. Returns ``-(1 / N_img) * sum_ij log sigmoid(z_ij * logits_ij)``: a
    sum over all pairs divided by the number of images, as in the paper, not a mean over pairs.
    Uses ``F.logsigmoid`` in at least float32, so logits of +-1e4 give finite, exact values.
    """
    pos = _positives(logits, positives, "sigmoid_loss")
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    z = pos.to(x.dtype) * 2 - 1  # (N_img, N_txt): +1 positives, -1 negatives
    return -torch.nn.functional.logsigmoid(z * x).sum() / x.shape[0]
