"""A tiny PaliGemma trained from scratch on the procedural shapes world (the glue the CLI calls).

    genlab vlm train --config vlm/shapes-caption      # captions of 1-2 shapes, a few minutes on CPU
    genlab vlm generate --model runs/vlm-shapes-caption/hf --image x.png --prompt "caption en"

``train`` builds a tokenizer that knows every word of the world, a small SigLIP + Gemma, and a
batch source that draws new scenes for every batch; the engine trains on the answer tokens only;
at the end the run folder holds a Hugging Face folder (``hf/``), eval.json (exact-match accuracy
of greedy answers on held-out scenes), examples.png and loss.png.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from genlab.config import save_yaml
from genlab.data.shapes import QUESTION_KINDS, describe, make_qa, render_scene, sample_scene, text_corpus
from genlab.train.engine import TrainConfig, Trainer, seed_everything
from genlab.vlm.gemma import GemmaConfig
from genlab.vlm.generation import generate
from genlab.vlm.hf_io import save_paligemma
from genlab.vlm.paligemma import PaliGemma, PaliGemmaConfig
from genlab.vlm.processor import PaliGemmaProcessor
from genlab.vlm.siglip import SiglipConfig
from genlab.vlm.plots import plot_examples, plot_loss
from genlab.vlm.tiny_tokenizer import make_tiny_tokenizer


@dataclass
class ShapesData:
    min_objects: int = 1
    max_objects: int = 2
    question_kinds: tuple[str, ...] = QUESTION_KINDS  # vqa only
    vocab_size: int = 320  # tokenizer size: alphabet + specials + merges for the world's words


@dataclass
class VisionSize:
    """SigLIP tower; patches = (image_size / patch_size)^2 image tokens."""

    layers: int = 2
    hidden: int = 96
    intermediate: int = 192
    heads: int = 4
    patch_size: int = 8


@dataclass
class TextSize:
    """Gemma decoder with multi-query attention (one key/value head), as PaliGemma 1."""

    layers: int = 2
    hidden: int = 128
    intermediate: int = 256
    heads: int = 4
    kv_heads: int = 1
    head_dim: int = 32


@dataclass
class VLMEval:
    n: int = 256  # held-out scenes scored by exact match
    batch_size: int = 128
    max_new_tokens: int = 32
    grid: int = 16  # examples drawn in examples.png
    seed: int = 10_007  # held-out scenes come from their own generator


@dataclass
class VLMTrainConfig:
    """Tiny PaliGemma on shapes. The embedded defaults are the CPU preset used by ``genlab demo``."""

    run_dir: str = "runs/vlm-shapes-caption"
    task: Literal["caption", "vqa"] = "caption"
    image_size: int = 32
    data: ShapesData = field(default_factory=ShapesData)
    vision: VisionSize = field(default_factory=VisionSize)
    text: TextSize = field(default_factory=TextSize)
    init_std: float = 0.02  # normal init of every linear / embedding weight, as transformers does
    eval: VLMEval = field(default_factory=VLMEval)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=1200, batch_size=64, lr=3e-3, optimizer="muon", warmup_steps=50, ema_decay=0.0,
        checkpoint_every=600, log_every=10, threads=1,
    ))


# ----------------------------------------------------------------------------- data

class ShapesBatchSource:
    """Endless batches of freshly drawn scenes, tokenized by the processor (labels on the answer only).

    Its whole state is one numpy generator, saved in ``state_dict`` (as JSON text, which the engine's
    weights-only checkpoint loader accepts), so a resumed run draws exactly the scenes it would have.
    """

    def __init__(self, processor: PaliGemmaProcessor, cfg: VLMTrainConfig, seed: int):
        self.processor, self.cfg = processor, cfg
        self.rng = np.random.default_rng(seed)

    def examples(self, n: int) -> tuple[list[np.ndarray], list[str], list[str], list[str]]:
        """``n`` examples as (images (S, S, 3) uint8, prompts, answers, kinds). The kind is the
        question kind for vqa and "1 object", "2 objects"... for captions."""
        images, prompts, answers, kinds = [], [], [], []
        d = self.cfg.data
        for _ in range(n):
            scene = sample_scene(self.rng, min_objects=d.min_objects, max_objects=d.max_objects)
            if self.cfg.task == "caption":
                prompts.append("caption en")
                answers.append(describe(scene))
                kinds.append(f"{len(scene.objects)} object" + "s" * (len(scene.objects) > 1))
            else:
                while not (qas := make_qa(scene, self.rng, d.question_kinds)):  # none of the kinds fits
                    scene = sample_scene(self.rng, min_objects=d.min_objects, max_objects=d.max_objects)
                qa = qas[int(self.rng.integers(len(qas)))]
                prompts.append(f"answer en {qa.question}")
                answers.append(qa.answer)
                kinds.append(qa.kind)
            images.append(render_scene(scene, self.cfg.image_size))
        return images, prompts, answers, kinds

    def next_batch(self, n: int) -> dict[str, torch.Tensor]:
        images, prompts, answers, _ = self.examples(n)
        return self.processor(images, prompts, answers)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": json.dumps(self.rng.bit_generator.state)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = json.loads(state["rng"])


# ----------------------------------------------------------------------------- model and objective

def build_tokenizer(cfg: VLMTrainConfig, folder: Path) -> PaliGemmaProcessor:
    """Train a tokenizer on this world's texts (every word becomes a single token) and write a
    processor folder for it; returns the processor."""
    d = cfg.data
    rng = np.random.default_rng(0)  # a fixed corpus: every rank and every resume gets the same tokenizer
    corpus = text_corpus(rng, 300, min_objects=1, max_objects=max(3, d.max_objects))
    corpus += ["caption en", "answer en"] * 50
    num_patches = (cfg.image_size // cfg.vision.patch_size) ** 2
    make_tiny_tokenizer(folder, d.vocab_size, corpus, image_size=cfg.image_size, num_image_tokens=num_patches)
    return PaliGemmaProcessor.from_pretrained(folder)


def model_config(cfg: VLMTrainConfig, processor: PaliGemmaProcessor) -> PaliGemmaConfig:
    v, t = cfg.vision, cfg.text
    vision = SiglipConfig(hidden_size=v.hidden, intermediate_size=v.intermediate, num_hidden_layers=v.layers,
                          num_attention_heads=v.heads, image_size=cfg.image_size, patch_size=v.patch_size)
    text = GemmaConfig(vocab_size=len(processor), hidden_size=t.hidden, intermediate_size=t.intermediate,
                       num_hidden_layers=t.layers, num_attention_heads=t.heads, num_key_value_heads=t.kv_heads,
                       head_dim=t.head_dim, max_position_embeddings=1024, pad_token_id=processor.pad_token_id,
                       bos_token_id=processor.bos_token_id, eos_token_id=processor.eos_token_id)
    return PaliGemmaConfig(vision=vision, text=text, image_token_id=processor.image_token_id)


def init_weights(model: nn.Module, std: float) -> None:
    """N(0, std) for linear, convolution and embedding weights, zero biases, zero padding row.
    (torch's default N(0, 1) embeddings, scaled by sqrt(D) in Gemma and tied to the head, would start
    with logits of size ~sqrt(D).)"""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()


def suffix_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Next-token cross-entropy on the answer: the logits at position t predict the token at t + 1, so
    logits[:, :-1] are scored against labels[:, 1:] (the last prefix token predicts the first answer
    token; the last answer token predicts <eos>). Labels are -100 off the answer."""
    logits = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                   attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"])  # (B, L, V)
    pred, target = logits[:, :-1].float(), batch["labels"][:, 1:]  # (B, L-1, V), (B, L-1)
    loss = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), ignore_index=-100)
    scored = target != -100
    token_acc = (pred.argmax(-1) == target)[scored].float().mean()
    return loss, {"token_acc": token_acc.detach()}  # a tensor: the engine syncs only when it logs


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def answer(model: PaliGemma, processor: PaliGemmaProcessor, images: list[np.ndarray], prompts: list[str],
           max_new_tokens: int = 32, batch_size: int = 128) -> list[str]:
    """Greedy answers (decoded, stripped) for each (image, prompt)."""
    device = next(model.parameters()).device
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        batch = processor(images[i:i + batch_size], prompts[i:i + batch_size])
        batch = {k: v.to(device) for k, v in batch.items()}
        ids = generate(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                       max_new_tokens=max_new_tokens, eos_token_id=processor.eos_token_id,
                       pad_token_id=processor.pad_token_id, token_type_ids=batch["token_type_ids"])
        out += [processor.decode(row).strip() for row in ids.tolist()]
    return out


def evaluate(model: PaliGemma, processor: PaliGemmaProcessor, cfg: VLMTrainConfig, run_dir: Path,
             step: int) -> dict[str, float]:
    """Exact-match accuracy of greedy answers on ``cfg.eval.n`` held-out scenes, overall and per kind,
    beside the accuracy of always giving the most common answer of each kind (the chance level);
    writes eval.json, examples.png and loss.png; returns the flat figures for the metrics log."""
    ev = cfg.eval
    images, prompts, truths, kinds = ShapesBatchSource(processor, cfg, seed=ev.seed).examples(ev.n)
    preds = answer(model, processor, images, prompts, ev.max_new_tokens, ev.batch_size)
    right = [p == t for p, t in zip(preds, truths)]
    by_kind, majority = {}, 0
    for kind in sorted(set(kinds)):
        rows = [i for i, k in enumerate(kinds) if k == kind]
        by_kind[kind] = {"n": len(rows), "accuracy": float(np.mean([right[i] for i in rows]))}
        majority += max(np.unique([truths[i] for i in rows], return_counts=True)[1])
    report = {"step": step, "task": cfg.task, "n": ev.n, "accuracy": float(np.mean(right)),
              "majority_baseline": majority / ev.n, "by_kind": by_kind,
              "examples": [{"prompt": p, "answer": a, "truth": t} for p, a, t in
                           zip(prompts[:ev.grid], preds[:ev.grid], truths[:ev.grid])]}
    run_dir = Path(run_dir)
    tmp = run_dir / "eval.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, run_dir / "eval.json")
    plot_examples(images[:ev.grid], prompts[:ev.grid], preds[:ev.grid], truths[:ev.grid],
                        run_dir / "examples.png")
    plot_loss(run_dir, run_dir / "loss.png")
    flat = {"accuracy": report["accuracy"], "majority_baseline": report["majority_baseline"]}
    flat.update({f"accuracy/{k}": v["accuracy"] for k, v in by_kind.items()})
    return flat


# ----------------------------------------------------------------------------- entry point

def train(cfg: VLMTrainConfig, resume: bool = False) -> Path:
    """Train, evaluate and export; returns the run folder (config.yaml, metrics, checkpoints, hf/,
    eval.json, examples.png, loss.png). ``resume`` continues from the last checkpoint exactly."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", 0))
    hf_dir = run_dir / "hf"
    if rank == 0:
        save_yaml(cfg, run_dir / "config.yaml")
    # Rank 0 writes the tokenizer into the HF folder; other ranks build the same one in a folder that is
    # removed once the processor holds it in memory.
    if rank == 0:
        processor = build_tokenizer(cfg, hf_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="genlab-tok-") as tmp:
            processor = build_tokenizer(cfg, Path(tmp))
    seed_everything(cfg.train.seed + rank)
    mcfg = model_config(cfg, processor)
    model = PaliGemma(mcfg)
    init_weights(model, cfg.init_std)
    data = ShapesBatchSource(processor, cfg, seed=cfg.train.seed + 1000 * rank)

    def eval_fn(step: int, m: nn.Module) -> dict[str, float]:
        return evaluate(m, processor, cfg, run_dir, step)

    trained = Trainer(model, suffix_loss, data, cfg.train, run_dir, eval_fn=eval_fn, resume=resume).fit()
    if rank == 0:
        save_paligemma(trained, mcfg, hf_dir)
    return run_dir
