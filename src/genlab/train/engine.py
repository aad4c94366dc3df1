"""The one training loop every genlab family uses.

A recipe hands the engine four things:

* ``model``: an ``nn.Module``;
* ``loss_fn(model, batch) -> (loss, metrics)``: the objective on one micro-batch;
* ``data``: a batch source with ``next_batch(n) -> dict of tensors`` and ``state_dict`` /
  ``load_state_dict`` (so a resumed run draws exactly the batches the interrupted one would have);
* optionally ``eval_fn(step, model) -> metrics``: sampling / evaluation, run on rank 0 with the
  EMA weights when EMA is on.

The engine does the rest, once, for everyone: AdamW or Muon (+AdamW), warmup + cosine schedule,
micro-batches with gradient accumulation, gradient clipping, bf16 autocast on CUDA, EMA through
``torch.optim.swa_utils.AveragedModel``, DDP under torchrun, JSONL + TensorBoard metrics, a progress
bar, and atomic checkpoints with exact resume (same weights, bit for bit, on CPU).
"""

from __future__ import annotations

import contextlib
import random
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Protocol

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from genlab.train import checkpoint as ckpt
from genlab.train.distributed import DistInfo, all_reduce_mean, barrier, init_distributed, pick_device
from genlab.train.logging import MetricsLogger, progress_bar


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping shared by every recipe."""

    steps: int = 1000
    batch_size: int = 256  # global batch (all ranks, all micro-batches) per optimizer step
    micro_batch_size: int = 0  # per-rank forward size; 0 = the whole per-rank batch at once
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    optimizer: Literal["adamw", "muon"] = "adamw"  # muon: Muon on hidden 2-D weights, AdamW on the rest
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    ema_decay: float = 0.999  # 0 disables EMA
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU
    checkpoint_every: int = 500  # 0 = only at the end
    keep_checkpoints: int = 2
    eval_every: int = 0  # 0 = only at the end
    log_every: int = 50
    seed: int = 0
    threads: int = 0  # torch CPU threads; 0 = leave torch's default
    device: str = "auto"
    progress: bool = True


class BatchSource(Protocol):
    def next_batch(self, n: int) -> dict[str, torch.Tensor]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, Any]]]
EvalFn = Callable[[int, nn.Module], dict[str, Any]]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


MUON_EXCLUDE = ("embed", "head", "pos_", "input_proj", "output_proj")


def build_optimizers(model: nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """AdamW on everything, or Muon on hidden 2-D weight matrices and AdamW on the rest.

    Muon orthogonalises the update of a matrix; it is meant for hidden layers, so embeddings, input /
    output projections (names matching MUON_EXCLUDE), biases and norms stay with AdamW.
    ``adjust_lr_fn='match_rms_adamw'`` lets both share one learning rate.
    """
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # The fused kernel does the whole AdamW update in one pass (2x faster step on CPU, fewer launches
    # on GPU); it needs floating-point parameters on a device that has it.
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for _, p in params)

    def adamw(ps):
        return torch.optim.AdamW(ps, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=fused)

    if cfg.optimizer == "adamw":
        return [adamw([p for _, p in params])]
    matrices = [p for n, p in params if p.ndim == 2 and not any(x in n for x in MUON_EXCLUDE)]
    ids = {id(p) for p in matrices}
    rest = [p for _, p in params if id(p) not in ids]
    if not matrices:
        raise ValueError("optimizer=muon but the model has no hidden 2-D weights; use adamw")
    opts: list[torch.optim.Optimizer] = [
        torch.optim.Muon(matrices, lr=cfg.lr, weight_decay=cfg.weight_decay, adjust_lr_fn="match_rms_adamw")
    ]
    if rest:
        opts.append(adamw(rest))
    return opts


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warmup, then cosine decay to lr * min_lr_ratio (or constant), from torch's schedulers."""
    from torch.optim import lr_scheduler as S

    decay_steps = max(1, cfg.steps - cfg.warmup_steps)
    if cfg.schedule == "cosine":
        main = S.CosineAnnealingLR(opt, T_max=decay_steps, eta_min=cfg.lr * cfg.min_lr_ratio)
    else:
        main = S.ConstantLR(opt, factor=1.0, total_iters=0)
    if cfg.warmup_steps <= 0:
        return main
    warm = S.LinearLR(opt, start_factor=1.0 / (cfg.warmup_steps + 1), end_factor=1.0, total_iters=cfg.warmup_steps)
    return S.SequentialLR(opt, [warm, main], milestones=[cfg.warmup_steps])


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def split_batch(batch: dict[str, Any], micro: int) -> list[dict[str, Any]]:
    """Split every tensor of a batch along dim 0 into chunks of ``micro`` rows."""
    n = next(v.shape[0] for v in batch.values() if torch.is_tensor(v))
    return [{k: v[i:i + micro] if torch.is_tensor(v) else v for k, v in batch.items()} for i in range(0, n, micro)]


class Trainer:
    """Trains ``model`` with ``loss_fn`` on ``data``; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: BatchSource,
        cfg: TrainConfig,
        run_dir: str | Path,
        eval_fn: EvalFn | None = None,
        resume: bool = False,
        callbacks: list[Callable[[int, "Trainer"], None]] | None = None,
    ):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.device = pick_device(cfg.device)
        self.dist: DistInfo = init_distributed(self.device)
        if cfg.batch_size % self.dist.world_size:
            raise ValueError(f"train.batch_size={cfg.batch_size} is not divisible by world size {self.dist.world_size}")
        if cfg.log_every < 1 or cfg.steps < 0:
            raise ValueError(f"train.log_every must be >= 1 (got {cfg.log_every}) and train.steps >= 0")
        self.rank_batch = cfg.batch_size // self.dist.world_size
        self.micro = cfg.micro_batch_size or self.rank_batch
        if self.rank_batch % self.micro:
            raise ValueError(
                f"per-rank batch {self.rank_batch} is not divisible by train.micro_batch_size={self.micro}"
            )
        self.model = model.to(self.device)
        self.loss_fn, self.data, self.eval_fn = loss_fn, data, eval_fn
        self.callbacks = callbacks or []
        self.ema = (
            AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
            if cfg.ema_decay > 0 else None
        )
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizers = build_optimizers(self.model, cfg)
        self.schedulers = [build_scheduler(o, cfg) for o in self.optimizers]
        self.ddp = DDP(self.model) if self.dist.enabled else None
        self.autocast_dtype = self._autocast_dtype()
        self.step = 0
        if resume:
            self._resume()
        elif self.dist.is_main:
            self._clear_previous_run()

    # -- set-up helpers -------------------------------------------------------------------------------------
    def _autocast_dtype(self) -> torch.dtype | None:
        p = self.cfg.precision
        if p == "fp32":
            return None
        if p == "bf16":
            return torch.bfloat16
        # auto: bf16 only where it is fast (CUDA); on CPU bf16 is many times slower than float32.
        if self.device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @property
    def sampling_model(self) -> nn.Module:
        """The weights to sample with: the EMA copy when EMA is on."""
        return self.ema.module if self.ema is not None else self.model

    # -- checkpoints ----------------------------------------------------------------------------------------
    def save(self) -> Path:
        train_state = {
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
            "total_steps": self.cfg.steps,
        }
        rank_state = {"rng": ckpt.rng_state(), "data": self.data.state_dict()}
        return ckpt.save_checkpoint(
            self.run_dir, self.step, self.model, train_state, rank_state, ema=self.ema,
            rank=self.dist.rank, world_size=self.dist.world_size, keep=self.cfg.keep_checkpoints, barrier=barrier,
        )

    def _clear_previous_run(self) -> None:
        """A fresh (not resumed) run starts clean: an older run's checkpoints and metrics in the same folder
        would otherwise mix with this one's (and be pruned against it)."""
        old = [self.run_dir / n for n in ("checkpoints", "metrics.jsonl", "tensorboard")]
        old = [p for p in old if p.exists()]
        if old:
            print(f"genlab: starting a fresh run in {self.run_dir}: removing the previous run's "
                  f"{', '.join(p.name for p in old)} (use --resume to continue it instead)", flush=True)
        for p in old:
            shutil.rmtree(p) if p.is_dir() else p.unlink()

    def _resume(self) -> None:
        path = ckpt.latest_checkpoint(self.run_dir)
        if path is None:
            return  # nothing saved yet: start from scratch
        train_state, rank_state = ckpt.load_checkpoint(path, self.model, self.ema, rank=self.dist.rank,
                                                       map_location=self.device)
        for o, s in zip(self.optimizers, train_state["optimizers"]):
            o.load_state_dict(s)
        self.step = int(train_state["step"])
        if train_state.get("total_steps") == self.cfg.steps:
            for sch, s in zip(self.schedulers, train_state["schedulers"]):
                sch.load_state_dict(s)
        else:
            # The run is being extended (or shortened): follow the schedule planned for the new length,
            # replayed up to the current step, rather than the old one (whose cosine would rise again).
            for o in self.optimizers:
                for g in o.param_groups:
                    g["lr"] = self.cfg.lr
                    g.pop("initial_lr", None)
            self.schedulers = [build_scheduler(o, self.cfg) for o in self.optimizers]
            with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
                warnings.simplefilter("ignore")
                for sch in self.schedulers:
                    for _ in range(self.step):
                        sch.step()
        self.data.load_state_dict(rank_state["data"])
        ckpt.set_rng_state(rank_state["rng"])

    # -- the loop -------------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, torch.Tensor]:
        """One optimizer step over ``batch_size`` samples: micro-batches, accumulation, clip, step, EMA.

        Returns detached 0-dim tensors (averaged over micro-batches); nothing here waits for the GPU,
        the caller converts to floats only when it logs.
        """
        net = self.ddp or self.model
        batch = _to_device(self.data.next_batch(self.rank_batch), self.device)
        chunks = split_batch(batch, self.micro)
        totals: dict[str, torch.Tensor] = {}
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            # Under DDP, gradients are all-reduced only on the last micro-batch.
            sync = contextlib.nullcontext() if (last or self.ddp is None) else self.ddp.no_sync()
            with sync:
                with self._autocast():
                    loss, metrics = self.loss_fn(net, chunk)
                (loss / len(chunks)).backward()
            for k, v in {"loss": loss, **metrics}.items():
                v = torch.as_tensor(v).detach().float() / len(chunks)
                totals[k] = totals[k] + v if k in totals else v
        if self.cfg.grad_clip > 0:
            totals["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip).detach()
        elif self._logs_at(self.step + 1):  # no clipping: the norm is only needed for the log
            grads = [p.grad for p in self.params if p.grad is not None]
            totals["grad_norm"] = torch.nn.utils.get_total_norm(grads).detach()
        for o in self.optimizers:
            o.step()
            o.zero_grad(set_to_none=True)
        for s in self.schedulers:
            s.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.step += 1
        return totals

    def _logs_at(self, step: int) -> bool:
        return step % self.cfg.log_every == 0 or step == self.cfg.steps

    def evaluate(self) -> dict[str, Any]:
        """Run eval_fn on rank 0 with the sampling weights; other ranks wait."""
        out: dict[str, Any] = {}
        if self.eval_fn is not None and self.dist.is_main:
            m = self.sampling_model
            was_training = m.training
            m.eval()
            out = self.eval_fn(self.step, m) or {}  # eval_fn decides about no_grad (likelihoods need grads)
            m.train(was_training)
        barrier()
        return out

    def fit(self) -> nn.Module:
        """Train to ``cfg.steps`` (continuing from a resumed step); return the sampling model."""
        cfg = self.cfg
        main = self.dist.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        logger = MetricsLogger(self.run_dir, enabled=main, resume_step=self.step if self.step else None)
        bar = progress_bar(cfg.steps, self.step, enabled=main and cfg.progress)
        self.model.train()
        window_t, window_steps = time.perf_counter(), 0
        try:
            while self.step < cfg.steps:
                metrics = self.train_step()
                window_steps += 1
                bar.update(1)
                if self._logs_at(self.step):
                    # The only host-device sync of the loop: floats for the log, once per log_every steps.
                    metrics["loss"] = all_reduce_mean(metrics["loss"])
                    record = {k: v.item() for k, v in metrics.items()}
                    dt = time.perf_counter() - window_t
                    record.update(lr=self.optimizers[0].param_groups[0]["lr"], steps_per_s=window_steps / max(dt, 1e-9))
                    logger.log(self.step, record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}")
                    window_t, window_steps = time.perf_counter(), 0
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    logger.log(self.step, self.evaluate(), split="eval")
                if (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or self.step == cfg.steps:
                    self.save()
                for cb in self.callbacks:
                    cb(self.step, self)
            logger.log(self.step, self.evaluate(), split="eval")
        finally:
            bar.close()
            logger.close()
        return self.sampling_model
