"""The VLM part of ``genlab demo``: a tiny PaliGemma trained from scratch on shapes, then checked
against transformers' own PaliGemma on the exported checkpoint.

    from genlab.vlm.demo import demo
    demo(ShapesPaliGemmaConfig(), Path("runs/demo/vlm"))   # a few minutes on a 2-core CPU
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from genlab.vlm.generation import generate
from genlab.vlm.hf_io import load_paligemma
from genlab.vlm.processor import PaliGemmaProcessor
from genlab.vlm.recipes import ShapesBatchSource, ShapesPaliGemmaConfig, train


def hf_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as transformers' PaliGemma generate makes them for a left-padded batch: the first
    real token is 1 (genlab's decoder counts the same way on its own)."""
    return (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0) + 1


def _strip(row: list[int], eos: int, pad: int) -> list[int]:
    """Tokens up to and including the first <eos>, without padding."""
    out = []
    for t in row:
        if t != pad:
            out.append(t)
        if t == eos:
            break
    return out


@torch.no_grad()
def transformers_parity(folder: Path, cfg: ShapesPaliGemmaConfig, n: int = 16, max_new_tokens: int = 32) -> dict[str, Any]:
    """Load ``folder`` with genlab and with transformers' PaliGemmaForConditionalGeneration; on ``n``
    held-out scenes report the largest |logit difference| (teacher-forced answer, real tokens only)
    and whether greedy generations agree token for token. Skips with a note without transformers."""
    try:
        import transformers
    except ImportError as e:  # a dev dependency: the demo still runs without it
        return {"skipped": f"transformers is not importable ({e})"}
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    ref = transformers.PaliGemmaForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32).eval()
    ours, _ = load_paligemma(folder)
    processor = PaliGemmaProcessor.from_pretrained(folder)
    images, prompts, truths, _ = ShapesBatchSource(processor, cfg, seed=cfg.eval.seed + 1).examples(n)

    batch = processor(images, prompts, truths)
    ids, mask, types, pixels = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], \
        batch["pixel_values"]
    mine = ours(ids, pixels, mask, types)  # (B, L, V)
    theirs = ref(input_ids=ids, pixel_values=pixels, attention_mask=mask, token_type_ids=types,
                 position_ids=hf_positions(mask)).logits
    diff = (mine - theirs)[mask.bool()].abs().max().item()

    prompt = processor(images, prompts)
    eos, pad = processor.eos_token_id, processor.pad_token_id
    a = generate(ours, prompt["input_ids"], prompt["attention_mask"], prompt["pixel_values"], max_new_tokens,
                 eos_token_id=eos, pad_token_id=pad, token_type_ids=prompt["token_type_ids"])
    b = ref.generate(input_ids=prompt["input_ids"], attention_mask=prompt["attention_mask"],
                     pixel_values=prompt["pixel_values"], token_type_ids=prompt["token_type_ids"],
                     max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    b = b[:, prompt["input_ids"].shape[1]:]
    same = [_strip(x, eos, pad) == _strip(y, eos, pad) for x, y in zip(a.tolist(), b.tolist())]
    return {"n": n, "transformers": transformers.__version__, "max_abs_logit_diff": diff,
            "greedy_match": sum(same) / n}


def demo(cfg: ShapesPaliGemmaConfig, out_dir: Path) -> dict[str, Any]:
    """Train ``cfg`` (the embedded default: captions of 1-2 shapes) in ``out_dir`` (overwriting an
    earlier demo there), evaluate it, check parity with transformers; return the headline figures."""
    t0 = time.perf_counter()
    cfg = replace(cfg, run_dir=str(out_dir))
    run = train(cfg, overwrite=True)
    train_s = time.perf_counter() - t0
    report = json.loads((run / "eval.json").read_text())
    parity = transformers_parity(run / "hf", cfg)
    return {
        "run_dir": str(run),
        "task": report["task"],
        "accuracy": report["accuracy"],
        "majority_baseline": report["majority_baseline"],
        "accuracy_by_kind": {k: v["accuracy"] for k, v in report["by_kind"].items()},
        "parity": parity,
        "train_and_eval_seconds": round(train_s, 1),
        "seconds": round(time.perf_counter() - t0, 1),
        "pictures": {"examples": str(run / "examples.png"), "loss": str(run / "loss.png")},
        "hf_folder": str(run / "hf"),
    }
