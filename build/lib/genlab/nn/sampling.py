"""Choosing the next token from logits: greedy, or sampling with temperature / top-k / top-p.

The order and the tie rules follow ``transformers``' logits processors (temperature, then top-k,
then top-p, then a draw from the softmax), so with the same random stream genlab and
transformers pick the same tokens.
"""

from __future__ import annotations

import numbers

import torch

__all__ = ["check_sampling_args", "filter_logits", "select_next"]


def check_sampling_args(do_sample: bool, temperature: float, top_k: int, top_p: float) -> None:
    """Raise a ValueError naming the option if a sampling setting is out of range.

    ``temperature`` must be > 0 when sampling (greedy decoding ignores it); ``top_k`` must be an
    integer >= 0 (0 = off); ``top_p`` must be in (0, 1] (1 = off). Call it once before generating,
    so a bad option fails before any model work.
    """
    if do_sample and not temperature > 0:  # `not >` also catches NaN
        raise ValueError(f"temperature must be > 0 when sampling (do_sample=True), got {temperature}")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 turns it off), got {top_k!r}")
    if not 0 < top_p <= 1:  # also catches NaN
        raise ValueError(f"top_p must be in (0, 1] (1 turns it off), got {top_p}")


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> torch.Tensor:
    """Logits (B, V) divided by ``temperature``, with the tokens top-k / top-p drop set to -inf.

    top-k keeps the k largest logits (ties at the k-th value are kept too); top-p drops the least
    likely tokens whose total probability is at most ``1 - top_p``, always keeping the most likely
    one. The same as transformers' Temperature-, TopK- and TopPLogitsWarper in that order.
    """
    if temperature != 1.0:
        logits = logits / temperature
    if top_k > 0:  # keep the k largest (ties at the k-th value are kept too)
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:  # drop the least likely tokens whose total mass is at most 1 - top_p
        sorted_logits, order = torch.sort(logits, descending=False)  # (B, V) each, ascending
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def select_next(logits: torch.Tensor, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from float32 ``logits`` (B, V): the argmax when ``do_sample`` is False,
    else one draw (from ``generator``) from the softmax of ``filter_logits(...)``."""
    if not do_sample:
        return logits.argmax(-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
