"""Drawing text from a trained run: MDLM runs through ``genlab.text.samplers``, the causal baseline
left to right; prefix prompts, the run's vocabulary checked, the tokenizer's special tokens never drawn."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import torch

from genlab.data.text import encode_text
from genlab.data.tokenizers import SPECIAL_TOKENS
from genlab.errors import ConfigError
from genlab.text.models import TextTransformer
from genlab.text.objective import make_schedule

if TYPE_CHECKING:
    from genlab.text.recipes import TextConfig


@torch.no_grad()
def ar_generate(model, x_init: torch.Tensor, prefix_len: int, bos_id: int, temperature: float = 1.0,
                top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Left-to-right sampling with the causal model (``model(x) -> logits``): keep x_init[:, :prefix_len],
    draw the rest; ``bos_id`` (the mask id) starts every input, as in training."""
    from genlab.nn.sampling import select_next

    x = x_init.clone()
    bos = torch.full_like(x[:, :1], bos_id)
    for pos in range(prefix_len, x.shape[1]):
        logits = model(torch.cat([bos, x[:, :pos]], dim=1))[:, -1].float()  # (B, V)
        x[:, pos] = select_next(logits, True, temperature, 0, top_p, generator).to(x.device)
    return x


def generate(model: TextTransformer, cfg: "TextConfig", tok, n: int, length: int, sampler: str, steps: int,
             prefix: str = "", seed: int = 0, temperature: float = 1.0, top_p: float = 1.0) -> list[dict]:
    """``n`` samples of ``length`` tokens (``prefix`` fixed first), one record each: text, sampler,
    steps, nfe, seconds (the batch's wall time shared out over its samples)."""
    device = next(model.parameters()).device
    ids = encode_text(tok, prefix, cfg.tokenizer.kind).tolist() if prefix else []
    if cfg.tokenizer.kind == "char":
        unknown = sorted(set(prefix) - set(tok.get_vocab()))
        if unknown:
            raise ConfigError(f"--prefix: {''.join(unknown)!r} not in the run's character vocabulary (the model "
                              f"never saw them)")
    if len(ids) >= length:
        raise ConfigError(f"--prefix: {len(ids)} tokens leave nothing to sample in --length {length}")
    mask_id = cfg.model.vocab_size
    x_init = torch.full((n, length), mask_id, dtype=torch.long, device=device)
    if ids:
        x_init[:, :len(ids)] = torch.tensor(ids, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    # The tokenizer's special tokens never occur in the training text: never sample them either.
    banned = torch.tensor([i for i in map(tok.token_to_id, SPECIAL_TOKENS) if i is not None], device=device)

    def denoiser(x, t=None):
        return model(x, t).index_fill(-1, banned, -math.inf)  # (B, L, V)

    start = time.perf_counter()
    if cfg.model.causal:
        tokens, nfe, sampler, steps = ar_generate(denoiser, x_init, len(ids), mask_id, temperature, top_p, g), \
            length - len(ids), "autoregressive", length - len(ids)
    else:
        from genlab.text.samplers import sample_tokens

        schedule = make_schedule(cfg.objective.schedule, cfg.objective.schedule_eps)
        out = sample_tokens(denoiser, x_init, mask_id=mask_id, schedule=schedule, steps=steps,
                            sampler=sampler, generator=g, temperature=temperature, top_p=top_p)
        tokens, nfe = out.tokens, out.nfe
    seconds = (time.perf_counter() - start) / n
    return [{"text": tok.decode(row.tolist(), skip_special_tokens=False), "sampler": sampler, "steps": steps,
             "nfe": int(nfe), "seconds": seconds} for row in tokens.cpu()]
