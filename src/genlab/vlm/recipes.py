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
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Literal

import numpy as np
import torch
from torch import nn

from genlab.config import Check, ConfigError, positive, validate
from genlab.data.shapes import (QUESTION_KINDS, describe, make_qa, max_objects_that_fit, render_scene, sample_scene,
                                text_corpus)
from genlab.train.engine import TrainConfig, Trainer
from genlab.train.run import start_run, write_report
from genlab.vlm.gemma import GemmaConfig
from genlab.vlm.generation import generate
from genlab.vlm.hf_io import save_paligemma
from genlab.vlm.paligemma import PaliGemma, PaliGemmaConfig
from genlab.vlm.processor import PaliGemmaProcessor
from genlab.vlm.siglip import SiglipConfig
from genlab.vlm.plots import plot_examples
from genlab.data.tokenizers import make_tiny_tokenizer


MAX_REDRAWS = 1000  # scenes drawn for one question before the question kinds are declared impossible


@dataclass
class ShapesData:
    min_objects: int = 1
    max_objects: int = 2
    question_kinds: tuple[str, ...] = QUESTION_KINDS  # vqa only: CLEVR's families (exist, count, ...)
    vocab_size: int = 448  # tokenizer size: alphabet + specials + merges for the world's ~60 words

    def checks(self) -> Iterable[Check]:
        yield from positive("min_objects", cfg=self)
        yield "max_objects", self.max_objects >= self.min_objects, "must be >= --data.min-objects"
        fit = max_objects_that_fit()
        yield "max_objects", self.max_objects <= fit, (f"at most {fit} objects of the world's sizes fit in one scene "
                                                       f"without overlapping; use fewer")
        unknown = [k for k in self.question_kinds if k not in QUESTION_KINDS]
        yield "question_kinds", bool(self.question_kinds) and not unknown, f"choose from {list(QUESTION_KINDS)}"


def tiny_vision() -> SiglipConfig:
    """SigLIP 2 layers x 96 at 32 px / patch 8: 16 image tokens."""
    return SiglipConfig(hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                        image_size=32, patch_size=8)


def tiny_text() -> GemmaConfig:
    """A Gemma (PaliGemma 1's decoder) of 2 layers x 128 with one key/value head (multi-query attention).
    vocab_size and the pad / bos / eos ids are set from the tokenizer the recipe trains."""
    return GemmaConfig(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=1, head_dim=32, max_position_embeddings=1024)


@dataclass
class VLMEval:
    n: int = 256  # held-out scenes scored by exact match
    batch_size: int = 128
    max_new_tokens: int = 32
    grid: int = 16  # examples drawn in examples.png
    seed: int = 10_007  # held-out scenes come from their own generator

    def checks(self) -> Iterable[Check]:
        yield from positive("n", "batch_size", "max_new_tokens", cfg=self)
        yield "grid", 0 <= self.grid <= self.n, "must be in [0, --eval.n]"


@dataclass
class ShapesPaliGemmaConfig:
    """A tiny PaliGemma trained from scratch on the shapes world. The embedded defaults are the CPU
    preset used by ``genlab demo``; ``vision`` and ``text`` are the model's own configs."""

    run_dir: str = "runs/vlm-shapes-caption"
    task: Literal["caption", "vqa"] = "caption"
    data: ShapesData = field(default_factory=ShapesData)
    vision: SiglipConfig = field(default_factory=tiny_vision)
    text: GemmaConfig = field(default_factory=tiny_text)
    init_std: float = 0.02  # normal init of every linear / embedding weight, as transformers does
    eval: VLMEval = field(default_factory=VLMEval)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=1200, batch_size=64, lr=3e-3, optimizer="muon", warmup_steps=50, ema_decay=0.0,
        checkpoint_every=600, log_every=10, threads=1,
    ))

    def checks(self) -> Iterable[Check]:
        yield "init_std", self.init_std > 0, "must be > 0"
        tokens = self.vision.num_patches + 32  # image tokens + room for a prompt and an answer
        yield "text.max_position_embeddings", self.text.max_position_embeddings >= tokens, \
            f"must hold the {self.vision.num_patches} image tokens and the text (>= {tokens})"


# ----------------------------------------------------------------------------- data

class ShapesBatchSource:
    """Endless batches of freshly drawn scenes, tokenized by the processor (labels on the answer only).

    Its whole state is one numpy generator, saved in ``state_dict`` (as JSON text, which the engine's
    weights-only checkpoint loader accepts), so a resumed run draws exactly the scenes it would have.
    """

    def __init__(self, processor: PaliGemmaProcessor, cfg: "ShapesPaliGemmaConfig", seed: int):
        self.processor, self.cfg = processor, cfg
        self.rng = np.random.default_rng(seed)

    def examples(self, n: int) -> tuple[list[np.ndarray], list[str], list[str], list[str]]:
        """``n`` examples as (images (S, S, 3) uint8, prompts, answers, kinds). The kind is the
        question kind for vqa (one of QUESTION_KINDS: CLEVR's families) and "1 object", "2 objects"...
        for captions (the full left-to-right description, ``describe``)."""
        images, prompts, answers, kinds = [], [], [], []
        d, size = self.cfg.data, self.cfg.vision.image_size
        for _ in range(n):
            scene = sample_scene(self.rng, min_objects=d.min_objects, max_objects=d.max_objects)
            if self.cfg.task == "caption":
                prompts.append("caption en")
                answers.append(describe(scene))
                kinds.append(f"{len(scene.objects)} object" + "s" * (len(scene.objects) > 1))
            else:
                for _ in range(MAX_REDRAWS):  # none of the kinds fits this scene: draw another
                    if qas := make_qa(scene, self.rng, d.question_kinds):
                        break
                    scene = sample_scene(self.rng, min_objects=d.min_objects, max_objects=d.max_objects)
                else:
                    raise ConfigError(f"--data.question-kinds={','.join(d.question_kinds)}: no question of these "
                                      f"kinds fits {MAX_REDRAWS} scenes in a row; choose other kinds or objects")
                qa = qas[int(self.rng.integers(len(qas)))]
                prompts.append(f"answer en {qa.question}")
                answers.append(qa.answer)
                kinds.append(qa.kind)
            images.append(render_scene(scene, size))
        return images, prompts, answers, kinds

    def next_batch(self, n: int) -> dict[str, torch.Tensor]:
        images, prompts, answers, _ = self.examples(n)
        return self.processor(images, prompts, answers)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": json.dumps(self.rng.bit_generator.state)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = json.loads(state["rng"])


# ----------------------------------------------------------------------------- model and objective

def build_tokenizer(cfg: ShapesPaliGemmaConfig, folder: Path) -> PaliGemmaProcessor:
    """Train a tokenizer on this world's texts (every word becomes a single token) and write a
    processor folder for it; returns the processor."""
    d = cfg.data
    rng = np.random.default_rng(0)  # a fixed corpus: every rank and every resume gets the same tokenizer
    corpus = text_corpus(rng, 300, min_objects=1, max_objects=max(3, d.max_objects))
    corpus += ["caption en", "answer en"] * 50
    make_tiny_tokenizer(folder, d.vocab_size, corpus, image_size=cfg.vision.image_size,
                        num_image_tokens=cfg.vision.num_patches)
    return PaliGemmaProcessor.from_pretrained(folder)


def with_tokenizer(cfg: ShapesPaliGemmaConfig, processor: PaliGemmaProcessor) -> ShapesPaliGemmaConfig:
    """The config with the fields the tokenizer decides filled in (vocabulary size, special ids)."""
    text = replace(cfg.text, vocab_size=len(processor), pad_token_id=processor.pad_token_id,
                   bos_token_id=processor.bos_token_id, eos_token_id=processor.eos_token_id)
    return replace(cfg, text=text)


def model_config(cfg: ShapesPaliGemmaConfig, processor: PaliGemmaProcessor) -> PaliGemmaConfig:
    """The PaliGemma config of the recipe: its vision and text configs with the tokenizer's fields."""
    text = with_tokenizer(cfg, processor).text
    return PaliGemmaConfig(vision=cfg.vision, text=text, image_token_id=processor.image_token_id).validate()


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
    """Next-token cross-entropy on the answer: the logits at position t predict the token at t + 1
    (the last prefix token predicts the first answer token; the last answer token predicts <eos>).
    Labels are -100 off the answer. The model scores only those positions, a chunk of the
    vocabulary-sized logits at a time (``PaliGemma.forward(labels=...)``)."""
    out = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"],
                labels=batch["labels"])
    return out.loss, {"token_acc": out.token_acc}  # a tensor: the engine syncs only when it logs


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


def evaluate(model: PaliGemma, processor: PaliGemmaProcessor, cfg: ShapesPaliGemmaConfig, run_dir: Path,
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
    report = {"step": step, "task": cfg.task, "weights": "ema" if cfg.train.ema_decay > 0 else "trained",
              "n": ev.n, "accuracy": float(np.mean(right)),
              "majority_baseline": majority / ev.n, "by_kind": by_kind,
              "examples": [{"prompt": p, "answer": a, "truth": t} for p, a, t in
                           zip(prompts[:ev.grid], preds[:ev.grid], truths[:ev.grid])]}
    run_dir = Path(run_dir)
    write_report(run_dir, report)
    if ev.grid:
        plot_examples(images[:ev.grid], prompts[:ev.grid], preds[:ev.grid], truths[:ev.grid],
                      run_dir / "examples.png")
    flat = {"accuracy": report["accuracy"], "majority_baseline": report["majority_baseline"]}
    flat.update({f"accuracy/{k}": v["accuracy"] for k, v in by_kind.items()})
    return flat


# ----------------------------------------------------------------------------- entry point

def train(cfg: ShapesPaliGemmaConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Train, evaluate and export; returns the run folder (config.yaml, metrics, checkpoints, hf/,
    eval.json, examples.png, loss.png). ``resume`` continues from the last checkpoint exactly."""
    validate(cfg)
    # The tokenizer decides part of the model config: build it (in memory) before the run folder is touched.
    with tempfile.TemporaryDirectory(prefix="genlab-tok-") as tmp:
        processor = build_tokenizer(cfg, Path(tmp))
    cfg = with_tokenizer(cfg, processor)
    mcfg = model_config(cfg, processor)
    run = start_run(cfg, resume=resume, overwrite=overwrite)
    if run.finished:
        return run.dir
    model = PaliGemma(mcfg)
    init_weights(model, cfg.init_std)
    data = ShapesBatchSource(processor, cfg, seed=cfg.train.seed + 1000 * run.dist.rank)

    def eval_fn(step: int, m: nn.Module, final: bool) -> dict[str, float]:
        return evaluate(m, processor, cfg, run.dir, step)

    trainer = Trainer(model, suffix_loss, data, cfg.train, run, eval_fn=eval_fn)
    trainer.fit()
    if run.dist.is_main:
        hf_dir = run.dir / "hf"
        build_tokenizer(cfg, hf_dir)
        with trainer.sampling_weights() as m:
            save_paligemma(m, mcfg, hf_dir)
    return run.dir
