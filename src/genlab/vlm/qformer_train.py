"""Stage 1 of BLIP-2: align a Q-Former with a frozen vision tower (the glue ``genlab qformer train`` calls).

    genlab vlm pretrain-siglip --config vlm/siglip-shapes        # stage 0: the vision tower (vision/)
    genlab qformer train --config qformer/shapes                 # this stage: Recall@K, similarity.png
    genlab qformer eval --checkpoint runs/qformer-shapes         # retrieval again, on any caption data

The vision tower (a Hugging Face SigLIP or ViT folder, ``--vision``) is frozen; the Q-Former's text
side starts from a BERT-family folder (``--qformer.bert``, default the shipped all-MiniLM-L6-v2),
its query tokens and cross-attention fresh. Two of BLIP-2's three objectives train it:

* image-text contrastive (ITC): the similarity of an image and a caption is the largest cosine
  between the caption's [CLS] embedding and any of the image's query embeddings, divided by the
  learnable temperature ``temp`` (clamped to [0.001, 0.5], as LAVIS does); symmetric InfoNCE over
  the batch, every pair of the same image or the same caption text counting as a positive;
* image-text matching (ITM, ``--itm``): a binary head on the queries reading image and caption
  together, on the batch's true pairs and, for each image and each caption, one hard negative drawn
  in proportion to the softmax of the contrastive similarities (positives excluded). BLIP-2 gathers
  the batch across GPUs for both; genlab keeps each rank's batch (the contrastive pool is per rank).

The third, image-grounded text generation, is stage 2's job here (``genlab.vlm.captioner``).
Learning rates come in two parameter groups: ``--train.lr`` for what BERT initialised, x
``new_lr_scale`` for the query tokens and cross-attention. The run ends with eval.json (Recall@1/5/10
image->text and text->image on ``eval.n_images`` held-out images against all of their captions) and
similarity.png (rows captions, columns images, cosines in the cells).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable

import torch
from torch import Tensor, nn

from genlab.config import Check, ConfigError, validate
from genlab.data.captions import CaptionDataConfig, CaptionPairs, load_captions
from genlab.data.tokenizers import encode_padded
from genlab.errors import GenlabError
from genlab.nn.losses import contrastive_loss
from genlab.train.data import MapDataSource
from genlab.train.engine import TrainConfig, Trainer
from genlab.train.optim import freeze
from genlab.train.run import seed_everything, start_run, write_report
from genlab.vlm.alignment import (CaptionBatches, QFormerSettings, RetrievalEval, build_qformer, embed_split,
                                  pair_positives, retrieval_report, text_ids, tower_input)
from genlab.vlm.qformer import QFormer
from genlab.vlm.vision_io import VisionTower, load_vision_tower

TEMP_RANGE = (0.001, 0.5)


@dataclass
class QFormerTrainConfig:
    """Stage 1. The embedded defaults are BLIP-2's recipe at the CPU demo's size; configs/qformer/
    shapes.yaml is the preset of the figures in docs/benchmarks.md."""

    FAMILY: ClassVar[str] = "qformer"
    run_dir: str = "runs/qformer-shapes"
    vision: str = "runs/vlm-siglip-shapes/vision"  # a HF SigLIP or ViT folder; stage 0 writes RUN/vision
    qformer: QFormerSettings = field(default_factory=QFormerSettings)
    data: CaptionDataConfig = field(default_factory=CaptionDataConfig)
    itm: bool = True  # the image-text matching loss with hard negatives
    itm_weight: float = 1.0
    itm_pairs: int = 0  # matching on the batch's first k pairs (+ a hard negative each way); 0 = all (BLIP-2)
    new_lr_scale: float = 10.0  # query tokens + cross-attention learn at lr x this (BLIP-2: 1e-3 vs 1e-4)
    eval: RetrievalEval = field(default_factory=RetrievalEval)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=1000, batch_size=8, lr=1e-4, warmup_steps=50, weight_decay=0.05, checkpoint_every=500,
        log_every=20, best_metric="i2t_r1", threads=2,
    ))

    def checks(self) -> Iterable[Check]:
        yield "vision", bool(self.vision), "give a vision folder (a HF SigLIP or ViT folder or a pretrain-siglip run's vision/)"
        yield "itm_weight", self.itm_weight >= 0, "must be >= 0"
        yield "itm_pairs", self.itm_pairs >= 0, "must be >= 0 (0 = every pair of the batch)"
        yield "new_lr_scale", self.new_lr_scale > 0, "must be > 0"
        yield "train.batch_size", self.train.batch_size >= 2, "contrastive learning needs >= 2 pairs per batch"
        yield "train.micro_batch_size", self.train.micro_batch_size in (0, self.train.batch_size), \
            "must be 0: the contrastive loss compares every pair of the whole batch"


def load_frozen_tower(folder: str, flag: str = "--vision") -> VisionTower:
    """The frozen tower of ``folder``; a missing or wrong folder is one error naming ``flag``."""
    try:
        return freeze(load_vision_tower(folder))
    except FileNotFoundError as e:
        hint = (" (train it first: genlab vlm pretrain-siglip --config vlm/siglip-shapes)"
                if "vlm-siglip" in str(folder) else "")
        raise ConfigError(f"{flag}={folder}: {e}{hint}") from e
    except GenlabError as e:
        raise ConfigError(f"{flag}={folder}: {e}") from e


class QFormerAligner(nn.Module):
    """``vision`` (frozen SigLIP or ViT tower) + ``qformer`` (genlab's QFormer). Stage 2 names its parts the
    same, so ``--train.init-from`` a stage-1 run fills its ``qformer``."""

    def __init__(self, vision: VisionTower, qformer: QFormer):
        super().__init__()
        self.vision, self.qformer = vision, qformer

    @property
    def image_size(self) -> int:
        return self.vision.config.image_size

    def vision_features(self, pixels: Tensor) -> Tensor:
        """uint8 (B, 3, S, S) -> frozen features (B, N, Dv) (a ViT's N counts its [CLS] token too)."""
        with torch.no_grad():
            return self.vision(tower_input(self.vision, pixels))

    def image_embeds(self, pixels: Tensor) -> Tensor:
        """(B, Q, E) normalised query embeddings."""
        return self.qformer.image_embeds(self.vision_features(pixels))


def build_aligner(cfg: QFormerTrainConfig, init_text: bool = True):
    """(QFormerAligner, tokenizer, info) of a stage-1 config."""
    tower = load_frozen_tower(cfg.vision)
    qformer, tok, info = build_qformer(cfg.qformer, tower.config.hidden_size, init_text=init_text)
    info["vision"] = str(cfg.vision)
    return QFormerAligner(tower, qformer), tok, info


def new_parameters(qformer: QFormer) -> list[nn.Parameter]:
    """What BERT did not initialise and BLIP-2 trains faster: the query tokens and cross-attention."""
    cross = [p for n, p in qformer.named_parameters() if ".crossattention." in n]
    return [qformer.query_tokens, *cross]


def hard_negatives(sim: Tensor, positives: Tensor) -> tuple[Tensor, Tensor]:
    """For each row of ``sim`` (B, B) one column drawn with probability softmax(row) over the
    non-positive columns. Returns (rows that have a negative (R,), their negatives (R,))."""
    weights = torch.softmax(sim.detach().float(), dim=1).masked_fill(positives, 0.0)  # (B, B)
    rows = (weights.sum(1) > 0).nonzero().squeeze(1)
    if rows.numel() == 0:
        return rows, rows
    return rows, torch.multinomial(weights[rows], 1).squeeze(1)


def aligner_loss(model: QFormerAligner, batch: dict[str, Tensor], itm: bool, itm_weight: float, itm_pairs: int = 0):
    """ITC (+ ITM) on one batch: see the module docstring. ``itm_pairs`` = k > 0 limits matching to
    the first k pairs, each with one hard negative caption and one hard negative image drawn from the
    whole batch (3k joint passes instead of 3B: the matching passes cost most)."""
    q = model.qformer
    with torch.no_grad():
        q.temp.clamp_(*TEMP_RANGE)
    vision = model.vision_features(batch["pixels"])  # (B, N, Dv)
    ids, mask = batch["input_ids"], batch["attention_mask"]  # (B, L)
    img, txt = q.image_embeds(vision), q.text_embeds(ids, mask)  # (B, Q, E), (B, E)
    sim = q.similarity(img, txt)  # (B, B) cos / temp
    pos = pair_positives(batch["image_index"], batch["caption_id"])  # (B, B)
    itc = contrastive_loss(sim, pos)
    metrics: dict[str, Any] = {"itc": itc.detach(), "temp": q.temp.detach()}
    loss = itc
    if itm:
        k = min(itm_pairs or len(ids), len(ids))
        img_rows, neg_txt = hard_negatives(sim[:k], pos[:k])  # a wrong caption for (some of) images 0..k-1
        txt_rows, neg_img = hard_negatives(sim.T[:k], pos.T[:k])  # a wrong image for captions 0..k-1
        v = torch.cat([vision[:k], vision[img_rows], vision[neg_img]])  # (k + R1 + R2, N, Dv)
        t_ids = torch.cat([ids[:k], ids[neg_txt], ids[txt_rows]])
        t_mask = torch.cat([mask[:k], mask[neg_txt], mask[txt_rows]])
        labels = torch.cat([torch.ones(k), torch.zeros(len(img_rows) + len(txt_rows))]).long().to(ids.device)
        logits = q.itm_logits(v, t_ids, t_mask)  # (k + R1 + R2, 2)
        itm_loss = nn.functional.cross_entropy(logits, labels)
        metrics.update(itm=itm_loss.detach(), itm_acc=(logits.argmax(1) == labels).float().mean())
        loss = loss + itm_weight * itm_loss
    return loss, metrics


@torch.no_grad()
def retrieval(model: QFormerAligner, tok, data, ev: RetrievalEval, run_dir: Path | None) -> dict[str, float]:
    """Recall@K of the aligner on the first ``ev.n_images`` images of ``data`` (and similarity.png)."""
    device = next(model.qformer.parameters()).device

    def texts(batch: list[str]) -> Tensor:
        ids, mask = encode_padded(tok, batch)
        return model.qformer.text_embeds(ids.to(device), mask.to(device))

    img, txt, caps, owner, images = embed_split(lambda px: model.image_embeds(px.to(device)), texts, data,
                                                model.image_size, ev.n_images, ev.batch_size)
    sim = model.qformer.similarity(img, txt, scaled=False).cpu()  # (N_img, N_txt) cosines
    return retrieval_report(sim, caps, owner, images, run_dir, ev.grid)


def train(cfg: QFormerTrainConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Stage 1: train, evaluate (eval.json, similarity.png, loss.png); returns the run folder."""
    validate(cfg)
    seed_everything(cfg.train.seed)  # the fresh parts' initialisation is the seed's
    model, tok, info = build_aligner(cfg)  # every input read before the run folder is touched
    size = model.image_size
    train_set, val_set = load_captions(cfg.data, "train", size), load_captions(cfg.data, "val", size)
    run = start_run(cfg, resume=resume, overwrite=overwrite)
    if run.finished:
        return run.dir
    if run.dist.is_main:
        print(f"genlab: {val_set.source}; {train_set.describe()}", flush=True)  # (skipped counts the whole source)
        print(f"genlab: text encoder {info['text_encoder']} ({info['layers']} layers, {info['bert_parameters_loaded']} "
              f"tensors loaded), vision {info['vision']}", flush=True)
    pairs = CaptionPairs(train_set, size, augment=cfg.data.augment, seed=cfg.train.seed)
    data = MapDataSource(pairs, seed=cfg.train.seed, rank=run.dist.rank, world_size=run.dist.world_size,
                         collate_fn=CaptionBatches(text_ids(train_set), tok))
    groups = [{"name": "new", "params": new_parameters(model.qformer), "lr_scale": cfg.new_lr_scale}]

    def loss_fn(m: nn.Module, batch: dict[str, Tensor]):
        return aligner_loss(m, batch, cfg.itm, cfg.itm_weight, cfg.itm_pairs)

    def eval_fn(step: int, m: nn.Module, final: bool) -> dict[str, float]:
        report = retrieval(m, tok, val_set, cfg.eval, run.dir)
        write_report(run.dir, {"step": step, "data": val_set.source, **report})
        return {k: v for k, v in report.items() if k.startswith(("i2t", "t2i"))}

    Trainer(model, loss_fn, data, cfg.train, run, eval_fn=eval_fn, param_groups=groups).fit()
    return run.dir


def load_aligner_run(run_dir: str | Path, which: str = "latest"):
    """(cfg, aligner with the run's weights in eval mode, tokenizer) of a stage-1 run folder."""
    from genlab.config import load_config
    from genlab.train.checkpoint import load_weights
    from genlab.train.optim import set_train_mode
    from genlab.train.run import read_run_config

    cfg = load_config(QFormerTrainConfig, str(read_run_config(run_dir, "qformer")))
    model, tok, _ = build_aligner(cfg, init_text=False)  # every weight comes from the run
    load_weights(run_dir, model, which=which)
    set_train_mode(model, False)
    return cfg, model, tok
