"""The VQ-VAE recipe: train the autoencoder whose latents latent flow matching learns.

    genlab flow vqvae                                         # sklearn's 8x8 digits -> 4x4x4 latents, CPU, ~1 min
    genlab flow vqvae --config flow/vqvae-digits --run-dir runs/vqvae-digits
    genlab flow train --config flow/digits --latent.vqvae runs/vqvae-digits

Loss = reconstruction MSE (images in [-1, 1]) + the quantiser's commitment (+ codebook) loss. The run
folder holds reconstructions.png (real images above their reconstructions), eval.json (test-split
reconstruction MSE, perplexity and codebook usage over the whole test set) and vqvae.json (the image
and latent shapes, so ``load_vqvae`` rebuilds the model without reading the data).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F

from genlab.config import Check, load_config, positive, validate
from genlab.data.images import ImageDataConfig, ImageDataset, ImageSet, load_images, to_model_range, to_uint8
from genlab.errors import RunFolderError
from genlab.flow.models.vqvae import VQVAE, VQVAEConfig, usage_stats
from genlab.io import atomic_write_json, read_json
from genlab.train.checkpoint import load_weights
from genlab.train.data import MapDataSource
from genlab.train.engine import TrainConfig, Trainer
from genlab.train.run import read_run_config, start_run, write_report

SHAPES_FILE = "vqvae.json"


@dataclass
class VQVAERunConfig:
    """A VQ-VAE on images. The embedded defaults train on digits in about a minute on one CPU thread."""

    run_dir: str = "runs/vqvae-digits"
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    model: VQVAEConfig = field(default_factory=VQVAEConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=800, batch_size=128, lr=2e-3, warmup_steps=50, grad_clip=1.0, checkpoint_every=400,
        log_every=50, threads=1,
    ))
    recon_every: int = 0  # rewrite reconstructions.png every N steps (0 = only at the end)
    recon_images: int = 32  # test images shown in reconstructions.png (above their reconstructions)
    eval_batch_size: int = 500

    def checks(self) -> Iterable[Check]:
        yield "recon_every", self.recon_every >= 0, "must be >= 0 (0 = only at the end)"
        yield from positive("recon_images", "eval_batch_size", cfg=self)
        # The codebook is its own average (--model.ema-decay); a weight EMA would average it again.
        yield ("train.ema_decay", self.train.ema_decay == 0,
               "must be 0 for a VQ-VAE (the codebook has --model.ema-decay)")


def make_loss_fn():
    def loss_fn(model, batch):
        x = batch["x1"]  # (B, C, H, W) in [-1, 1]
        recon, vq_loss, stats = model(x)
        mse = F.mse_loss(recon, x)
        return mse + vq_loss, {"recon_mse": mse.detach(), "vq_loss": vq_loss.detach(),
                               "perplexity": stats["perplexity"], "used_codes": stats["used_codes"],
                               "restarts": stats["restarts"]}

    return loss_fn


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def write_reconstructions(model: VQVAE, images: ImageSet, path: Path, n: int) -> Path:
    """reconstructions.png: the first ``n`` images (top rows) above their reconstructions."""
    from genlab.flow.plots import save_image_grid

    was = model.training
    model.eval()
    real = images.images[:n]  # (n, C, H, W) uint8
    recon = to_uint8(model.decode(model.encode(to_model_range(real).to(_device_of(model)))).float().cpu())
    model.train(was)
    nrow = min(8, len(real))
    rows = -(-len(real) // nrow)
    labels = ["real"] * rows + ["recon"] * rows
    pad = (-len(real)) % nrow  # blank tiles so the reconstructions start on a new row
    blank = torch.full((pad, *real.shape[1:]), 255, dtype=torch.uint8)
    return save_image_grid(torch.cat([real, blank, recon, blank]), path, nrow=nrow, row_labels=labels)


@torch.no_grad()
def evaluate(model: VQVAE, images: ImageSet, batch: int) -> dict:
    """Reconstruction MSE (in [-1, 1] units) and PSNR, code perplexity and usage over a whole set."""
    model.eval()
    device = _device_of(model)
    k = model.quantizer.num_codes
    counts = torch.zeros(k, dtype=torch.float64)
    sq, pixels = 0.0, 0
    for i in range(0, len(images), batch):
        x = to_model_range(images.images[i:i + batch]).to(device)  # (b, C, H, W)
        codes = model.codes(x)  # (b, h, w)
        recon = model.decode_codes(codes)
        sq += F.mse_loss(recon.float(), x, reduction="sum").item()
        pixels += x.numel()
        counts += torch.bincount(codes.flatten().cpu(), minlength=k).double()
    mse = sq / max(pixels, 1)
    usage = usage_stats(counts)
    return {"test_recon_mse": mse, "test_psnr_db": 10 * math.log10(4.0 / max(mse, 1e-12)),  # peak-to-peak 2
            "perplexity": usage["perplexity"].item(), "used_codes": usage["used_codes"].item(),
            "used_codes_count": int((counts > 0).sum()), "codebook_size": k}


def train(cfg: VQVAERunConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Train, checkpoint and evaluate a VQ-VAE; returns the run folder."""
    run = start_run(cfg, resume=resume, overwrite=overwrite)
    if run.finished:
        return run.dir
    train_set, test_set = load_images(cfg.data, "train"), load_images(cfg.data, "test")
    c, h, w = train_set.shape
    if h != w:
        raise ValueError(f"the VQ-VAE takes square images; {train_set.source} has {h}x{w}")
    model = VQVAE.from_config(cfg.model, channels=c, image_size=h)
    data = MapDataSource(ImageDataset(train_set), seed=cfg.train.seed, rank=run.dist.rank,
                         world_size=run.dist.world_size)

    def eval_fn(step, m, final):
        write_reconstructions(m, test_set, run.dir / "reconstructions.png", cfg.recon_images)
        report = {"step": step, **evaluate(m, test_set, cfg.eval_batch_size), "data": test_set.source,
                  "latent_shape": list(model.latent_shape), "mse_units": "images in [-1, 1]"}
        write_report(run.dir, report)
        return {k: v for k, v in report.items() if isinstance(v, (int, float))}

    def recon_callback(step, trainer):
        if cfg.recon_every and step % cfg.recon_every == 0 and step < cfg.train.steps and trainer.dist.is_main:
            with trainer.sampling_weights() as m:
                write_reconstructions(m, test_set, run.dir / "reconstructions.png", cfg.recon_images)

    trainer = Trainer(model, make_loss_fn(), data, cfg.train, run, eval_fn=eval_fn, callbacks=[recon_callback])
    if run.dist.is_main:  # after the Trainer committed the run folder (config.yaml; --overwrite cleared)
        atomic_write_json(run.dir / SHAPES_FILE, {"channels": c, "image_size": h,
                                                  "latent_shape": list(model.latent_shape)})
    trainer.fit()
    return run.dir


def load_vqvae(run_dir: str | Path) -> tuple[VQVAE, VQVAERunConfig]:
    """The VQ-VAE of a ``genlab flow vqvae`` run folder (latest weights) in eval mode, and its config."""
    cfg = load_config(VQVAERunConfig, str(read_run_config(run_dir, "flow")))
    validate(cfg)
    shapes_file = Path(run_dir) / SHAPES_FILE
    if not shapes_file.is_file():
        raise RunFolderError(f"{run_dir} is not a VQ-VAE run folder: it has no {SHAPES_FILE} "
                             f"(train one with `genlab flow vqvae --run-dir {run_dir}`)")
    shapes = read_json(shapes_file)
    model = VQVAE.from_config(cfg.model, channels=int(shapes["channels"]), image_size=int(shapes["image_size"]))
    load_weights(run_dir, model, ema=False)
    return model.eval(), cfg


@torch.no_grad()
def encode_dataset(vqvae: VQVAE, imageset: ImageSet, quantize: bool = False, batch: int = 512) -> torch.Tensor:
    """Latents (N, D, h, w) float32 on the CPU of every image of ``imageset``, in its order: the
    encoder output, snapped to the codebook when ``quantize``."""
    was = vqvae.training
    vqvae.eval()
    device = _device_of(vqvae)
    out = [vqvae.encode(to_model_range(imageset.images[i:i + batch]).to(device), quantize=quantize).float().cpu()
           for i in range(0, len(imageset), batch)]
    vqvae.train(was)
    return torch.cat(out) if out else torch.zeros(0, *vqvae.latent_shape)
