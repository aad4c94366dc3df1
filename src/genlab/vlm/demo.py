"""The VLM part of ``genlab demo``: a tiny PaliGemma trained from scratch to caption the shapes
world, checked against transformers' own PaliGemma on the exported checkpoint; then the same model
fine-tuned with LoRA to answer CLEVR-style questions (exact match and ROUGE before / after, the Q/A
grid), and the memory table of full / LoRA / QLoRA training steps of that model.

    from genlab.vlm.demo import demo
    demo(VLMDemoConfig(), Path("runs/demo/vlm"))   # a few minutes on a 2-core CPU

Flags: ``genlab demo --vlm.caption.train.steps 600 --vlm.vqa.train.steps 200``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from genlab.vlm.generation import generate
from genlab.vlm.hf_io import load_paligemma
from genlab.vlm.processor import PaliGemmaProcessor
from genlab.vlm.recipes import ShapesBatchSource, ShapesPaliGemmaConfig, train
from genlab.vlm.vqa import VQAFinetuneConfig, finetune


def _vqa_demo() -> VQAFinetuneConfig:
    """The demo's LoRA fine-tune: the embedded default with a demo's budget (about 2 minutes; the
    preset's 4000 steps take 5-11), scored on 300 held-out questions; its --model is set to the demo's
    caption run."""
    cfg = VQAFinetuneConfig()
    return replace(cfg, data=replace(cfg.data, max_val=300),
                   train=replace(cfg.train, steps=1500, eval_every=0, checkpoint_every=500))


@dataclass
class VLMDemoConfig:
    """The vlm part of ``genlab demo``: the caption model (``--vlm.caption.*``) and its LoRA VQA
    fine-tune (``--vlm.vqa.*``); ``memory`` runs the memory table on the caption model."""

    caption: ShapesPaliGemmaConfig = field(default_factory=ShapesPaliGemmaConfig)
    vqa: VQAFinetuneConfig = field(default_factory=_vqa_demo)
    memory: bool = True  # the full / LoRA / QLoRA memory table of the tiny model (one step each)


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


def demo(cfg: VLMDemoConfig, out_dir: Path) -> dict[str, Any]:
    """Train the caption model in ``out_dir/caption`` (overwriting an earlier demo there), check parity
    with transformers, fine-tune it with LoRA in ``out_dir/vqa``, measure memory; the headline figures."""
    t0 = time.perf_counter()
    cap = replace(cfg.caption, run_dir=str(out_dir / "caption"))
    run = train(cap, overwrite=True)
    train_s = time.perf_counter() - t0
    report = json.loads((run / "eval.json").read_text())
    parity = transformers_parity(run / "hf", cap)
    summary = {
        "run_dir": str(run),
        "task": report["task"],
        "accuracy": report["accuracy"],
        "majority_baseline": report["majority_baseline"],
        "accuracy_by_kind": {k: v["accuracy"] for k, v in report["by_kind"].items()},
        "parity": parity,
        "train_and_eval_seconds": round(train_s, 1),
        "pictures": {"examples": str(run / "examples.png"), "loss": str(run / "loss.png")},
        "hf_folder": str(run / "hf"),
    }
    t1 = time.perf_counter()
    vqa = finetune(replace(cfg.vqa, run_dir=str(out_dir / "vqa"), model=str(run / "hf")), overwrite=True)
    scores = json.loads((vqa / "eval.json").read_text())
    summary["vqa"] = {"run_dir": str(vqa), "mode": scores["mode"], "seconds": round(time.perf_counter() - t1, 1),
                      **{side: _headline(scores[side]) for side in ("before", "after")},
                      "pictures": {"qa_grid": str(vqa / "qa_grid.png"), "loss": str(vqa / "loss.png")},
                      "report": str(vqa / "report.md")}
    if cfg.memory:
        from genlab.vlm.memory import MemoryArgs, memory_cmd

        doc = memory_cmd(MemoryArgs(model=str(run / "hf"), steps=1, out=str(out_dir / "memory")))
        summary["memory"] = {"peak_mib": {r["mode"]: round(r["peak_bytes"] / 2**20, 1) for r in doc["rows"]},
                             "trainable_parameters": {r["mode"]: r["trainable_parameters"] for r in doc["rows"]},
                             "table": str(out_dir / "memory" / "memory.md"),
                             "chart": str(out_dir / "memory" / "memory.png")}
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    return summary


def _headline(s: dict[str, Any] | None) -> dict[str, Any] | None:
    """Exact match (overall, per family) and ROUGE-L F1 of a score, for the summary."""
    if s is None:
        return None
    return {"exact_match": s["accuracy"], "per_family": {k: v["accuracy"] for k, v in s["per_family"].items()},
            "rougeL_f1": (s.get("rouge") or {}).get("rougeL", {}).get("f1")}
