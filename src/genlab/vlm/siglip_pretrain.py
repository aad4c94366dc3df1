"""Stage 0 of the BLIP-2 pipeline: a SigLIP vision tower trained against FROZEN sentence features.

    genlab vlm pretrain-siglip --config vlm/siglip-shapes          # a few minutes on CPU
    genlab qformer train --config qformer/shapes --vision runs/vlm-siglip-shapes/vision

The text side never trains: every distinct caption of the train and val splits is encoded once by a
pretrained BERT-family sentence encoder (default the shipped all-MiniLM-L6-v2: the mean-pooled last
hidden states, as sentence-transformers computes them before its normalisation), each feature is
standardised with the training captions' mean and deviation, and the (T, 384) table is kept as a
non-persistent buffer, so checkpoints hold only what trains. The ``DualEncoder``
learns the tower, a linear image head on its mean-pooled patch features, a linear text head on the
frozen features, and the temperature (and, for SigLIP, the bias):

    logits = exp(logit_scale) * cos(image_head(mean(tower(x))), text_head(table[caption])) + logit_bias

with the pairwise sigmoid loss of SigLIP (``loss=sigmoid``) or CLIP's softmax InfoNCE
(``loss=softmax``, no bias). In-batch positives are pairs of the same image or the same caption
text (``alignment.pair_positives``). At the end (and every ``train.eval_every`` steps) the run folder
gets eval.json (Recall@1/5/10 both ways on ``eval.n_images`` held-out images against all of their
captions), similarity.png and loss.png; the tower is exported as a Hugging Face SigLIP vision
folder, ``vision/``, which ``vision_io.load_vision_tower`` (and transformers) read.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genlab.config import Check, positive, validate
from genlab.data.captions import CaptionDataConfig, CaptionPairs, load_captions
from genlab.data.tokenizers import encode_padded
from genlab.nn.losses import contrastive_loss, sigmoid_loss
from genlab.train.data import MapDataSource
from genlab.train.distributed import pick_device
from genlab.train.engine import TrainConfig, Trainer
from genlab.train.run import start_run, write_report
from genlab.vlm.alignment import (CaptionBatches, QFormerSettings, RetrievalEval, build_qformer, embed_split,
                                  image_tensor, pair_positives, retrieval_report, text_folder, text_ids)
from genlab.vlm.recipes import init_weights
from genlab.vlm.siglip import SiglipConfig, SiglipVisionTower
from genlab.vlm.vision_io import save_vision_tower


def small_tower() -> SiglipConfig:
    """SigLIP 4 layers x 128 (MLP 256, 4 heads) at 32 px / patch 8: 16 patch features (patch 4's 64
    cost 4x the time per step on CPU)."""
    return SiglipConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                        image_size=32, patch_size=8)


@dataclass
class SiglipPretrainConfig:
    """A SigLIP vision tower trained on image-caption pairs against a frozen text encoder. The embedded
    defaults are the CPU preset (configs/vlm/siglip-shapes.yaml); ``vision`` is the tower's own config."""

    run_dir: str = "runs/vlm-siglip-shapes"
    data: CaptionDataConfig = field(default_factory=CaptionDataConfig)
    vision: SiglipConfig = field(default_factory=small_tower)
    text: str = ""  # BERT-family folder whose mean-pooled sentence features stay frozen; "" = shipped MiniLM
    max_text_tokens: int = 40  # captions are cut to this many tokens ([CLS] and [SEP] included)
    text_batch_size: int = 256  # captions per forward when the frozen features are computed (once)
    embed_dim: int = 128  # width of the shared image-text embedding
    # CLIP's softmax InfoNCE, or SigLIP's pairwise sigmoid. softmax is the default: at batch 128 and a few
    # hundred steps it retrieves far better (measured in configs/vlm/siglip-shapes.yaml).
    loss: Literal["sigmoid", "softmax"] = "softmax"
    init_logit_scale: float = math.log(10.0)  # log temperature (SigLIP: log 10; CLIP: log(1 / 0.07))
    init_logit_bias: float = -10.0  # SigLIP's bias (sigmoid only): starts every pair near "no match"
    init_std: float = 0.02  # normal init of the tower's and heads' linear / embedding weights
    logit_lr_scale: float = 1.0  # learning rate of the temperature and bias, as a multiple of train.lr
    eval: RetrievalEval = field(default_factory=RetrievalEval)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=2500, batch_size=128, lr=2e-3, weight_decay=0.05, warmup_steps=50, checkpoint_every=500,
        eval_every=0, log_every=20, best_metric="i2t_r1", threads=1))

    def checks(self) -> Iterable[Check]:
        yield from positive("max_text_tokens", "text_batch_size", "embed_dim", cfg=self)
        yield "max_text_tokens", self.max_text_tokens >= 3, "must be >= 3 ([CLS], a word, [SEP])"
        yield "loss", self.loss in ("sigmoid", "softmax"), "choose sigmoid or softmax"
        yield "init_logit_scale", math.isfinite(self.init_logit_scale) and abs(self.init_logit_scale) < 10, \
            "must be a finite log temperature in (-10, 10)"
        yield "init_logit_bias", math.isfinite(self.init_logit_bias), "must be a finite number"
        yield "init_std", math.isfinite(self.init_std) and self.init_std > 0, "must be > 0"
        yield "logit_lr_scale", math.isfinite(self.logit_lr_scale) and self.logit_lr_scale >= 0, \
            "must be >= 0 (0 = a fixed temperature and bias)"
        yield "train.batch_size", self.train.batch_size >= 2, "contrastive training needs >= 2 pairs a batch"


# ----------------------------------------------------------------------------- the frozen text side

@torch.no_grad()
def sentence_table(folder: Path, texts: list[str], max_text_tokens: int, batch_size: int,
                   vision_width: int, device: torch.device | str = "cpu") -> tuple[Tensor, dict]:
    """(T, D_text) float32 mean-pooled sentence features of ``texts`` (on the CPU) from the BERT-family
    ``folder``, computed on ``device`` (a Q-Former is built only for its text path, which holds exactly
    the folder's BERT, then dropped), and a few facts for the report."""
    qformer, tok, info = build_qformer(QFormerSettings(bert=str(folder), max_text_tokens=max_text_tokens),
                                       encoder_hidden_size=vision_width)
    qformer.to(device).eval()
    # Batches of similar length waste little on padding: encode in order of length, then put back.
    order = sorted(range(len(texts)), key=lambda i: len(tok.encode(texts[i]).ids))
    table = torch.empty(len(texts), qformer.config.hidden_size)  # (T, D_text)
    for i in range(0, len(texts), batch_size):
        rows = order[i:i + batch_size]
        ids, mask = encode_padded(tok, [texts[j] for j in rows])  # (b, L)
        table[rows] = qformer.encode_sentences(ids.to(device), mask.to(device)).float().cpu()  # (b, D_text)
    return table, info


# ----------------------------------------------------------------------------- model and objective

class DualEncoder(nn.Module):
    """The trainable SigLIP tower and heads over a frozen table of sentence features.

    ``image_embeds(pixels)``: L2-normalised (B, E) from pixels in [-1, 1]; ``text_embeds(ids)``:
    L2-normalised (B, E) for rows of the table; ``logits(img, txt)``: (B_img, B_txt)."""

    def __init__(self, vision: SiglipConfig, table: Tensor, embed_dim: int, loss: str = "sigmoid",
                 init_logit_scale: float = math.log(10.0), init_logit_bias: float = -10.0):
        super().__init__()
        self.vision = SiglipVisionTower(vision)
        self.image_head = nn.Linear(vision.hidden_size, embed_dim)
        self.text_head = nn.Linear(table.shape[1], embed_dim)
        self.register_buffer("text_table", table, persistent=False)  # (T, D_text): frozen, rebuilt, never saved
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        # CLIP's softmax is invariant to a shared bias: it stays 0 and never trains.
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias) if loss == "sigmoid" else 0.0),
                                       requires_grad=loss == "sigmoid")

    def image_embeds(self, pixel_values: Tensor) -> Tensor:
        h = self.vision(pixel_values).mean(dim=1)  # (B, N, D) -> (B, D): mean over patches
        return F.normalize(self.image_head(h), dim=-1)  # (B, E)

    def text_embeds(self, caption_id: Tensor) -> Tensor:
        return F.normalize(self.text_head(self.text_table[caption_id]), dim=-1)  # (B, E)

    def logits(self, image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
        scale = self.logit_scale.exp().clamp(max=100.0)  # CLIP's cap on the temperature
        return scale * image_embeds @ text_embeds.T + self.logit_bias  # (B_img, B_txt)


def make_loss(kind: str):
    """``loss_fn(model, batch) -> (loss, metrics)`` for the engine: the sigmoid or softmax loss of the
    batch's (B, B) logits with same-image / same-text pairs as positives."""
    criterion = sigmoid_loss if kind == "sigmoid" else contrastive_loss

    def loss_fn(model: DualEncoder, batch: dict[str, Tensor]) -> tuple[Tensor, dict]:
        img = model.image_embeds(image_tensor(batch["pixels"]))  # (B, E)
        txt = model.text_embeds(batch["caption_id"])  # (B, E)
        logits = model.logits(img, txt)  # (B, B)
        pos = pair_positives(batch["image_index"], batch["caption_id"])  # (B, B) bool
        with torch.no_grad():  # in-batch image->text top-1: the best caption of each image is a positive
            acc = pos.gather(1, logits.argmax(1, keepdim=True)).float().mean()
        return criterion(logits, pos), {"batch_i2t_acc": acc, "temperature": model.logit_scale.detach().exp(),
                                        "bias": model.logit_bias.detach()}

    return loss_fn


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: DualEncoder, val, ids: dict[str, int], cfg: SiglipPretrainConfig, run_dir: Path | None,
             step: int, facts: dict) -> dict[str, float]:
    """Recall@1/5/10 both ways of cosine similarity on the first ``eval.n_images`` images of ``val``
    against all of their captions; writes eval.json and similarity.png to ``run_dir`` (when given)
    and returns the recalls."""
    device = model.logit_scale.device
    ev = cfg.eval

    def encode_images(pixels: Tensor) -> Tensor:
        return model.image_embeds(image_tensor(pixels.to(device))).float().cpu()

    def encode_texts(texts: list[str]) -> Tensor:
        return model.text_embeds(torch.tensor([ids[t] for t in texts], device=device)).float().cpu()

    img, txt, texts, owner, images = embed_split(encode_images, encode_texts, val, cfg.vision.image_size,
                                                 ev.n_images, ev.batch_size)
    recalls = retrieval_report(img @ txt.T, texts, owner, images, run_dir, ev.grid)  # (N_img, N_txt) cosines
    if run_dir is not None:
        write_report(run_dir, {"step": step, "loss": cfg.loss, "weights": "ema" if cfg.train.ema_decay else "trained",
                               "source": val.source, **facts, **recalls,
                               "temperature": float(model.logit_scale.exp()), "bias": float(model.logit_bias)})
    return {k: v for k, v in recalls.items() if k.startswith(("i2t", "t2i"))}


# ----------------------------------------------------------------------------- entry point

def build(cfg: SiglipPretrainConfig):
    """(model, train set, val set, caption ids, facts): the data, the frozen text table and the
    freshly initialised DualEncoder (no run folder involved)."""
    folder = text_folder(cfg.text, flag="--text")
    size = cfg.vision.image_size
    train_set, val_set = load_captions(cfg.data, "train", size), load_captions(cfg.data, "val", size)
    ids = text_ids(train_set)
    for text in text_ids(val_set):  # val texts too: evaluation looks them up in the same table
        ids.setdefault(text, len(ids))
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    t0 = time.perf_counter()
    table, info = sentence_table(folder, list(ids), cfg.max_text_tokens, cfg.text_batch_size,
                                 cfg.vision.hidden_size, pick_device(cfg.train.device))
    # Sentences of one small world share a large common component: centre and scale each feature by the
    # training captions' statistics, so the linear text head starts from what tells captions apart.
    train_rows = table[:len(text_ids(train_set))]  # (T_train, D_text): the train texts come first in ``ids``
    scale = train_rows.std(0).clamp_min(1e-6) if len(train_rows) > 1 else torch.ones(table.shape[1])
    table = (table - train_rows.mean(0)) / scale
    facts = {**info, "distinct_texts": len(ids), "text_feature_dim": table.shape[1],
             "text_encode_seconds": round(time.perf_counter() - t0, 2)}
    model = DualEncoder(cfg.vision, table, cfg.embed_dim, cfg.loss, cfg.init_logit_scale, cfg.init_logit_bias)
    init_weights(model, cfg.init_std)
    return model, train_set, val_set, ids, facts


def train(cfg: SiglipPretrainConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Train, evaluate and export; returns the run folder (config.yaml, metrics, checkpoints, eval.json,
    similarity.png, loss.png, vision/). ``resume`` continues from the last checkpoint exactly (the
    frozen text table is recomputed: the same folder gives the same features)."""
    validate(cfg)
    text_folder(cfg.text, flag="--text")  # a missing text encoder is an error before the run folder is touched
    run = start_run(cfg, resume=resume, overwrite=overwrite)
    if run.finished:
        return run.dir
    model, train_set, val_set, ids, facts = build(cfg)
    if run.dist.is_main:
        print(f"genlab: {facts['distinct_texts']} distinct captions encoded by {facts['text_encoder']} in "
              f"{facts['text_encode_seconds']} s (frozen)", flush=True)
    pairs = CaptionPairs(train_set, cfg.vision.image_size, augment=cfg.data.augment, seed=cfg.train.seed)
    data = MapDataSource(pairs, seed=cfg.train.seed, rank=run.dist.rank, world_size=run.dist.world_size,
                         collate_fn=CaptionBatches(ids))

    def eval_fn(step: int, m: nn.Module, final: bool) -> dict[str, float]:
        return evaluate(m, val_set, ids, cfg, run.dir, step, facts)

    scalars = {"name": "logits", "params": [model.logit_scale, model.logit_bias], "lr_scale": cfg.logit_lr_scale,
               "weight_decay": 0.0}
    trainer = Trainer(model, make_loss(cfg.loss), data, cfg.train, run, eval_fn=eval_fn, param_groups=[scalars])
    trainer.fit()
    if run.dist.is_main:
        with trainer.sampling_weights() as m:
            save_vision_tower(m.vision, run.dir / "vision")
    return run.dir
