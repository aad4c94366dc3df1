"""Autoregressive generation for PaliGemma with a preallocated KV cache.

The prompt (image + text, left-padded) is run once (prefill, the only time the vision tower
runs); then one token per step is decoded against the cache. Token selection
(``genlab.nn.sampling.select_next``) follows ``transformers``: logits in float32, then temperature,
top-k, top-p, then sampling from the softmax (or argmax when ``do_sample=False``). A row that has
emitted an EOS token emits ``pad_token_id`` afterwards; generation stops when every row has
finished.

Decode steps run ``PaliGemma.decode_step``, whose shapes never change (attention spans the whole
preallocated cache under its key mask), so ``compile=True`` wraps it in ``torch.compile`` once
per (batch, cache length) and CUDA graphs can replay it. Under ``compile=True`` the cache length
is rounded up to a multiple of ``COMPILE_LENGTH_BUCKET``, so prompts of nearby lengths share a
graph.
"""

from __future__ import annotations

import contextlib

import torch

from genlab.nn.attention import KVCache
from genlab.nn.sampling import check_sampling_args, select_next
from genlab.vlm.paligemma import PaliGemma

# With compile=True the KV cache length is rounded up to a multiple of this. The step attends over
# the whole cache (unfilled slots masked), so a few spare slots cost little, and prompts whose
# lengths differ by less than this reuse one compiled graph instead of compiling their own.
COMPILE_LENGTH_BUCKET = 64


@torch.inference_mode()
def generate(model: PaliGemma, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             pixel_values: torch.Tensor | None = None, max_new_tokens: int = 32, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             generator: torch.Generator | None = None,
             token_type_ids: torch.Tensor | None = None, compile: bool = False) -> torch.Tensor:
    """New token ids (B, T) with T <= ``max_new_tokens`` for a left-padded prompt batch.

    ``input_ids``/``attention_mask``/``token_type_ids`` are (B, P) (mask and types default to
    "all real" and "all prefix"); ``pixel_values`` is (B, C, H, W). ``eos_token_id`` and
    ``pad_token_id`` default to the model config's. Sampling draws from ``generator``.
    ``compile=True`` runs the decode step through ``torch.compile`` (the first call per shape
    pays the compile time; on CUDA it also captures CUDA graphs); only the first compiled step of
    a call checks dynamo's guards. Out-of-range sampling options are a ValueError before any work
    (``genlab.nn.sampling.check_sampling_args``).
    """
    check_sampling_args(do_sample, temperature, top_k, top_p)
    cfg = model.config.text
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    pad = cfg.pad_token_id if pad_token_id is None else pad_token_id
    B, P = input_ids.shape
    device = input_ids.device
    eos_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos), device=device)
    out = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=device)
    if max_new_tokens == 0:
        return out
    cache_len = P + max_new_tokens
    if compile:  # graphs are per cache length: round up so that nearby prompt lengths share one
        cache_len = -(-cache_len // COMPILE_LENGTH_BUCKET) * COMPILE_LENGTH_BUCKET
    cache = model.new_cache(B, cache_len)
    logits = model(input_ids, pixel_values, attention_mask, token_type_ids, cache=cache, num_logits_to_keep=1)
    step = compiled_decode_step(model, cache) if compile else model.decode_step
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    with contextlib.ExitStack() as stack:
        for t in range(max_new_tokens):
            token = select_next(logits[:, -1].float(), do_sample, temperature, top_k, top_p, generator)
            token = token.masked_fill(finished, pad)
            out[:, t] = token
            finished |= torch.isin(token, eos_ids)
            if t == max_new_tokens - 1 or bool(finished.all()):
                return out[:, : t + 1]
            logits = step(token[:, None], cache)
            cache.advance(1)
            if compile and t == 0:
                # The first compiled call checked every guard and compiled if needed. Later steps pass
                # the same model, cache and shapes, so dynamo's guards (0.15-0.3 ms of a ~6 ms CPU
                # step, measured) can only repeat that answer; where other graphs are cached, the
                # guards that tell them apart still run.
                stack.enter_context(torch.compiler.set_stance(skip_guard_eval_unsafe=True))
    return out


def compiled_decode_step(model: PaliGemma, cache: KVCache):
    """``model.decode_step`` through ``torch.compile`` (inductor, static shapes). On CPU the
    generated wrapper is C++ (``cpp_wrapper``): a decode step launches ~100 small kernels, and
    calling them from Python cost about 0.5 ms of a ~7 ms step on a 2-core CPU. On CUDA the cache
    tensors are marked as living at fixed addresses, so "reduce-overhead" can capture CUDA graphs
    that write into them."""
    if cache.pos.device.type != "cuda":
        return torch.compile(model.decode_step, dynamic=False, options={"cpp_wrapper": True})
    for t in (*cache.k, *cache.v, cache.key_mask, cache.seen, cache.pos):
        torch._dynamo.mark_static_address(t)
    return torch.compile(model.decode_step, dynamic=False, mode="reduce-overhead")
