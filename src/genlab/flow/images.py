"""Flow matching on images: a class-conditional DiT with classifier-free guidance and EMA, trained in
pixel space or on a VQ-VAE's latents, with flow matching or MeanFlow (one- and few-step sampling).

    genlab flow train --config flow/digits                     # sklearn's 8x8 digits, CPU, minutes
    genlab flow train --config flow/cifar10 --data.root /path/to/cifar-10-batches-py
    genlab flow sample --checkpoint runs/flow-digits --class-grid --samples-per-class 8
    genlab flow eval --checkpoint runs/flow-digits             # accuracy per CFG scale, FD, NFE table

The path is the flow core's: x_t = (1 - t) noise + t data, target data - noise (t = 1 is data).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

import torch
from torch.utils.data import Dataset

from genlab.config import Check, ConfigError, non_negative, positive
from genlab.data.images import ImageDataConfig, ImageDataset, ImageSet, load_images, random_hflip, to_uint8
from genlab.eval.classifier import ClassifierConfig
from genlab.flow.models.dit import DiT, DiTConfig, drop_labels
from genlab.flow.objectives import flow_matching_loss, meanflow_loss, sample_time_pairs
from genlab.flow.paths import CondOTPath
from genlab.flow.solvers import known_methods
from genlab.io import atomic_write_json, read_json
from genlab.train.data import MapDataSource
from genlab.train.engine import TrainConfig, Trainer
from genlab.train.run import start_run


@dataclass
class ImageObjective:
    kind: Literal["flow_matching", "meanflow"] = "flow_matching"
    time_sampler: Literal["uniform", "logit_normal"] = "uniform"  # t of flow matching, (t, t_end) of MeanFlow
    equal_share: float = 0.75  # meanflow: share of (t, t_end) pairs with t == t_end (plain flow matching)
    meanflow_cfg: float = 1.0  # meanflow: guidance scale built into training (1 = none); sampling is then 1 forward
    meanflow_adaptive_p: float = 1.0  # meanflow: loss weight 1 / (err^2 + c)^p (MeanFlow's adaptive weighting; 0 = MSE)

    def checks(self) -> Iterable[Check]:
        yield "equal_share", 0 <= self.equal_share <= 1, "must be in [0, 1]"
        yield "meanflow_cfg", math.isfinite(self.meanflow_cfg) and self.meanflow_cfg >= 0, "must be >= 0"
        yield "meanflow_adaptive_p", 0 <= self.meanflow_adaptive_p <= 2, "must be in [0, 2]"


@dataclass
class LatentConfig:
    vqvae: str = ""  # a VQ-VAE run folder (genlab flow vqvae) whose latents the flow learns; "" = pixels
    quantize: bool = False  # learn the quantised latents (else the encoder's pre-quantisation output)

    def checks(self) -> Iterable[Check]:
        yield "vqvae", not self.vqvae or Path(self.vqvae).is_dir(), "no such VQ-VAE run folder"


@dataclass
class ImageSampling:
    """How training-time grids are drawn, and the defaults of ``genlab flow sample``."""

    num_steps: int = 50  # solver steps (MeanFlow: its steps, 1 = one forward)
    solver: str = "euler"  # euler | midpoint | heun | rk4 | dopri5 | any torchdiffeq method
    cfg_scale: float = 3.0  # v_u + s (v_c - v_u); 1 = conditional, 0 = unconditional
    grid_every: int = 1000  # a class grid PNG under samples/ every N steps (0 = only at the end)
    grid_per_class: int = 8

    def checks(self) -> Iterable[Check]:
        yield from positive("num_steps", "grid_per_class", cfg=self)
        yield from non_negative("grid_every", cfg=self)
        yield "solver", self.solver in known_methods(), f"unknown ODE method; use one of {known_methods()}"
        yield "cfg_scale", math.isfinite(self.cfg_scale) and self.cfg_scale >= 0, "must be >= 0"


@dataclass
class ImageEval:
    cfg_scales: tuple[float, ...] = (0.0, 1.0, 2.0, 3.0, 4.0)  # class accuracy of samples at each scale
    samples_per_class: int = 50  # per class and scale
    # solver steps of the NFE table, at sampling.cfg_scale; a solver's row is kept while its model calls
    # stay within the largest entry (Heun: 2 calls a step). MeanFlow runs: its own steps <= 4.
    nfes: tuple[int, ...] = (1, 2, 4, 8, 16, 50)
    solvers: tuple[str, ...] = ("euler", "heun")
    fd_samples: int = 500  # real test and generated images of the classifier-feature Frechet distance
    fid_weights: str = ""  # a local Inception-v3 FID weights file for the real FID ("" = not computed)
    batch_size: int = 1000  # images per sampling batch
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)

    def checks(self) -> Iterable[Check]:
        yield from positive("samples_per_class", "fd_samples", "batch_size", cfg=self)
        yield "cfg_scales", len(self.cfg_scales) > 0 and all(s >= 0 for s in self.cfg_scales), "each must be >= 0"
        yield "nfes", all(n >= 1 for n in self.nfes), "each must be >= 1"
        yield "solvers", all(s in known_methods() for s in self.solvers), f"use methods of {known_methods()}"
        yield "fid_weights", not self.fid_weights or Path(self.fid_weights).is_file(), "no such file"


@dataclass
class ImageFlowConfig:
    """A class-conditional DiT on images. The embedded defaults are the digits CPU demo (about two
    minutes here, with a light evaluation); the flow/digits preset trains longer and evaluates fully."""

    recipe: Literal["images"] = "images"  # picks this recipe behind `genlab flow train`
    run_dir: str = "runs/flow-digits"
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    model: DiTConfig = field(default_factory=lambda: DiTConfig(hidden=64, depth=4, heads=4, patch=2))
    objective: ImageObjective = field(default_factory=ImageObjective)
    latent: LatentConfig = field(default_factory=LatentConfig)
    sampling: ImageSampling = field(default_factory=lambda: ImageSampling(grid_every=400))
    eval: ImageEval = field(default_factory=lambda: ImageEval(
        cfg_scales=(0.0, 1.0, 3.0), samples_per_class=20, nfes=(1, 4, 16, 50), solvers=("euler",), fd_samples=200,
    ))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=1200, batch_size=128, lr=1e-3, warmup_steps=100, ema_decay=0.9999, grad_clip=1.0,
        checkpoint_every=400, log_every=50, threads=1,
    ))


# ---- what the model sees: pixels, or a VQ-VAE's latents -------------------------------------------------


class _Tensors(Dataset):
    """Rows of (x1, label) already in the model's range."""

    def __init__(self, x: torch.Tensor, labels: torch.Tensor):
        self.x, self.labels = x, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"x1": self.x[i], "label": self.labels[i]}


class Space:
    """Pixels, or the latents of a VQ-VAE scaled to unit variance; ``decode`` maps model samples to
    uint8 images either way."""

    def __init__(self, cfg: ImageFlowConfig, run_dir: Path, train_set: ImageSet, reuse_stats: bool = True):
        self.vqvae = None
        self.shape = train_set.shape  # (C, H, W) of what the model generates
        if cfg.latent.vqvae:
            from genlab.flow.vqvae import encode_dataset, load_vqvae

            self.vqvae, _ = load_vqvae(cfg.latent.vqvae)
            stats = run_dir / "latent_stats.json"
            if reuse_stats and stats.is_file():  # fixed once per run: a resumed run and `flow sample` scale alike
                s = read_json(stats)
                self.mean, self.std = s["mean"], s["std"]
            else:
                z = encode_dataset(self.vqvae, train_set, quantize=cfg.latent.quantize, batch=512)
                self.mean, self.std = z.mean().item(), z.std().item()
            self.shape = tuple(self.vqvae.latent_shape)

    def save(self, run_dir: Path) -> None:
        if self.vqvae is not None:
            atomic_write_json(run_dir / "latent_stats.json", {"mean": self.mean, "std": self.std})

    def dataset(self, cfg: ImageFlowConfig, images: ImageSet) -> Dataset:
        if self.vqvae is None:
            return ImageDataset(images)
        from genlab.flow.vqvae import encode_dataset

        z = encode_dataset(self.vqvae, images, quantize=cfg.latent.quantize, batch=512)
        return _Tensors((z - self.mean) / self.std, images.labels)

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, *shape) model samples -> (B, C, H, W) uint8 images."""
        if self.vqvae is not None:
            vq = self.vqvae.to(x.device)
            x = vq.decode(x * self.std + self.mean)
        return to_uint8(x.float().cpu())


def build_model(cfg: ImageFlowConfig, shape: tuple[int, int, int], num_classes: int) -> DiT:
    c, h, w = shape
    if h != w:
        raise ValueError(f"the DiT takes square inputs; these are {h}x{w}")
    if h % cfg.model.patch:
        raise ConfigError(f"--model.patch={cfg.model.patch}: must divide the {'latent' if cfg.latent.vqvae else 'image'} "
                          f"side {h}")
    model_cfg = cfg.model
    if cfg.objective.kind == "meanflow" and not model_cfg.interval_input:
        from dataclasses import replace

        model_cfg = replace(model_cfg, interval_input=True)  # MeanFlow's second time input
    return DiT.from_config(model_cfg, channels=c, image_size=h, num_classes=num_classes)


def make_loss_fn(cfg: ImageFlowConfig, pixels: bool, null_class: int):
    path, obj = CondOTPath(), cfg.objective

    def loss_fn(model, batch):
        x1 = batch["x1"]  # (B, C, H, W)
        if pixels and cfg.data.hflip:
            x1 = random_hflip(x1)
        y = drop_labels(batch["label"], cfg.model.class_dropout, null_class)  # CFG learns v_u on the null class
        x0 = torch.randn_like(x1)
        if obj.kind == "meanflow":
            t, t_end = sample_time_pairs(x1.shape[0], equal_share=obj.equal_share, kind=obj.time_sampler,
                                         device=x1.device)
            return meanflow_loss(model, x0, x1, t, t_end, y=y, cfg_scale=obj.meanflow_cfg,
                                 adaptive_p=obj.meanflow_adaptive_p)
        return flow_matching_loss(model, x0, x1, path, time_sampler=obj.time_sampler, y=y)

    return loss_fn


def train(cfg: ImageFlowConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Train, write class grids and checkpoints, evaluate; returns the run folder."""
    from genlab.flow.image_eval import evaluate_images, write_class_grid

    run = start_run(cfg, resume=resume, overwrite=overwrite)
    if run.finished:
        return run.dir
    train_set = load_images(cfg.data, "train")
    space = Space(cfg, run.dir, train_set, reuse_stats=resume)  # a fresh run never reads an old run's file
    model = build_model(cfg, space.shape, train_set.num_classes)
    data = MapDataSource(space.dataset(cfg, train_set), seed=cfg.train.seed, rank=run.dist.rank,
                         world_size=run.dist.world_size)

    def grids(step: int, trainer: Trainer) -> None:
        every = cfg.sampling.grid_every
        if trainer.dist.is_main and every and step % every == 0 and step < cfg.train.steps:
            with trainer.sampling_weights() as m:
                write_class_grid(m, cfg, space, train_set.classes, run.dir / "samples" / f"grid_{step:08d}.png")

    def eval_fn(step, ema_model, final):
        return evaluate_images(ema_model, cfg, space, run.dir, step=step, final=final)

    loss_fn = make_loss_fn(cfg, pixels=space.vqvae is None, null_class=model.null_class)
    trainer = Trainer(model, loss_fn, data, cfg.train, run,
                      eval_fn=eval_fn, callbacks=[grids])
    if run.dist.is_main:
        space.save(run.dir)  # after the Trainer committed the run folder (an --overwrite clears it)
    trainer.fit()
    return run.dir


# ---- sampling and evaluating a trained run (`genlab flow sample` / `flow eval` on an image run) ----------


def load_trained(checkpoint: str | Path, ema: bool = True):
    """(model with the EMA weights, config, space, class names) of an image run folder or one of its
    checkpoint folders."""
    from genlab.config import load_config, validate
    from genlab.train.checkpoint import load_weights, run_of_checkpoint
    from genlab.train.run import read_run_config

    run_dir = run_of_checkpoint(checkpoint)
    cfg = load_config(ImageFlowConfig, str(read_run_config(run_dir, "flow")))
    validate(cfg)
    train_set = load_images(cfg.data, "train")
    space = Space(cfg, run_dir, train_set)
    model = build_model(cfg, space.shape, train_set.num_classes)
    load_weights(checkpoint, model, ema=ema)
    return model.eval(), cfg, space, train_set.classes


def sample(args) -> dict:
    """`genlab flow sample` on an image run: a PNG grid and samples.npz (images uint8 (N, C, H, W),
    labels int64 (N,), -1 = unconditional) into ``--out`` (default: the run's samples/)."""
    import io
    import json

    import numpy as np

    from genlab.flow.image_eval import class_grid_labels, generate
    from genlab.flow.plots import save_image_grid
    from genlab.io import atomic_write_bytes
    from genlab.train.checkpoint import run_of_checkpoint

    model, cfg, space, classes = load_trained(args.checkpoint)
    k = len(classes)
    if args.class_label is not None and not 0 <= args.class_label < k:
        raise ValueError(f"--class-label {args.class_label}: this run has classes 0..{k - 1}")
    if args.class_grid:
        labels = class_grid_labels(k, args.samples_per_class)
    else:
        n = args.num_samples or 16
        labels = torch.full((n,), -1 if args.class_label is None else args.class_label, dtype=torch.long)
    images, forwards, secs = generate(model, cfg, space, labels, scale=args.cfg_scale, steps=args.num_steps or None,
                                      solver=args.solver or None, seed=args.seed)
    out = Path(args.out) if args.out else run_of_checkpoint(args.checkpoint) / "samples"
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, images=images.numpy().astype(np.uint8), labels=labels.numpy().astype(np.int64))
    atomic_write_bytes(out / "samples.npz", buf.getvalue())
    if args.class_grid:
        grid = save_image_grid(images, out / "class_grid.png", nrow=args.samples_per_class, row_labels=classes)
    else:
        grid = save_image_grid(images, out / "samples.png", nrow=min(len(labels), 8))
    scale = cfg.sampling.cfg_scale if args.cfg_scale is None else args.cfg_scale
    info = {"samples": str(out / "samples.npz"), "grid": str(grid), "num_samples": len(labels),
            "solver": "meanflow" if cfg.objective.kind == "meanflow" else (args.solver or cfg.sampling.solver),
            "steps": args.num_steps or cfg.sampling.num_steps, "cfg_scale": scale,
            "forwards_per_image": forwards, "seconds": round(secs, 3)}
    print(json.dumps(info))
    return info


def evaluate_run(args) -> dict:
    import json
    import sys

    from genlab.flow.image_eval import evaluate_images
    from genlab.train.checkpoint import checkpoint_step, latest_checkpoint, run_of_checkpoint

    model, cfg, space, _ = load_trained(args.checkpoint, ema=not args.raw)
    if args.fid_weights:
        cfg.eval.fid_weights = args.fid_weights
    run_dir = run_of_checkpoint(args.checkpoint)
    ckpt = Path(args.checkpoint)
    step = checkpoint_step(ckpt if (ckpt / "state.pt").is_file() else latest_checkpoint(run_dir))
    print(f"genlab: evaluating {run_dir} at step {step} ...", file=sys.stderr, flush=True)
    flat = evaluate_images(model, cfg, space, run_dir, step=step, final=True,
                           weights="trained" if args.raw or cfg.train.ema_decay == 0 else "ema", verbose=True)
    print(json.dumps(flat, indent=2))
    return flat
