"""The one training loop every genlab family uses.

A recipe hands the engine:

* ``model``: an ``nn.Module`` (parts frozen with ``optim.freeze`` stay frozen and in eval mode);
* ``loss_fn(model, batch) -> (loss, metrics)``: the objective on one micro-batch;
* ``data``: a batch source (``train.data``) that resumes exactly;
* optionally ``val_data`` (an iterable of batches: the same ``loss_fn`` under no_grad on every rank,
  averaged over ranks, logged as ``val``), ``eval_fn(step, model, final) -> metrics`` (rank 0, with
  the EMA weights when EMA is on), ``param_groups`` (lr scale, weight decay, name), ``muon_rule``
  and ``on_save(step, trainer)`` (e.g. export adapters beside each checkpoint).

The engine does the rest, once, for everyone: AdamW or Muon (+AdamW), warm-up + cosine schedule per
parameter group, micro-batches with gradient accumulation, gradient clipping, bf16 autocast on CUDA,
EMA of the trainable weights (with warm-up), DDP under torchrun, optional ``torch.compile``, JSONL +
TensorBoard metrics and ``loss.png``, a progress bar, ``best/`` beside ``latest``, ``init_from``, and
atomic checkpoints of the trainable state with exact resume (same weights, bit for bit, on CPU).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from genlab.config import Check, non_negative, positive, seed_check
from genlab.errors import CheckpointMismatchError
from genlab.train import checkpoint as ckpt
from genlab.train.data import BatchSource
from genlab.train.distributed import DistInfo, all_reduce_mean, barrier, device_problem, init_distributed, pick_device
from genlab.train.logging import MetricsLogger, progress_bar
from genlab.train.optim import (EMA, build_optimizers, build_param_groups, build_scheduler, group_lrs,
                                set_schedule_step, set_train_mode)
from genlab.train.plots import plot_run_loss
from genlab.train.run import Run, seed_everything  # noqa: F401  (seed_everything: re-exported)


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping shared by every recipe."""

    steps: int = 1000
    batch_size: int = 256  # global batch (all ranks, all micro-batches) per optimizer step
    micro_batch_size: int = 0  # per-rank forward size; 0 = the whole per-rank batch at once
    lr: float = 2e-4
    weight_decay: float = 0.0  # on weight matrices only (never norms, biases, embeddings)
    betas: tuple[float, float] = (0.9, 0.999)
    optimizer: Literal["adamw", "muon"] = "adamw"  # muon: Muon on hidden 2-D weights, AdamW on the rest
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    ema_decay: float = 0.0  # 0 disables EMA; the decay warms up as min(decay, (1 + k) / (10 + k))
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU
    checkpoint_every: int = 500  # 0 = only at the end
    keep_checkpoints: int = 2
    eval_every: int = 0  # 0 = only at the end (evaluation and validation)
    log_every: int = 50
    best_metric: str = ""  # keep checkpoints/best for the best value of this eval metric ("" = off)
    best_mode: Literal["max", "min"] = "max"
    init_from: str = ""  # a run or checkpoint folder whose weights initialise the model (weights only)
    compile: bool = False  # torch.compile the model for training
    seed: int = 0
    threads: int = 0  # torch CPU threads; 0 = leave torch's default
    device: str = "auto"
    progress: bool = True

    def checks(self) -> Iterable[Check]:
        yield from positive("steps", "batch_size", "log_every", "keep_checkpoints", cfg=self)
        yield from non_negative("micro_batch_size", "warmup_steps", "checkpoint_every", "eval_every", "threads",
                                "seed", cfg=self)
        yield seed_check(cfg=self)
        yield "micro_batch_size", self.micro_batch_size <= self.batch_size, "must be <= --train.batch-size"
        yield "lr", math.isfinite(self.lr) and self.lr > 0, "must be a number > 0"
        yield "weight_decay", math.isfinite(self.weight_decay) and self.weight_decay >= 0, "must be >= 0"
        yield "betas", all(0 <= b < 1 for b in self.betas), "each must be in [0, 1)"
        yield "min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "must be in [0, 1]"
        yield "grad_clip", math.isfinite(self.grad_clip) and self.grad_clip >= 0, "must be >= 0 (0 = off)"
        yield "ema_decay", 0 <= self.ema_decay < 1, "must be in [0, 1) (0 = off)"
        yield "device", device_problem(self.device) is None, device_problem(self.device) or ""
        yield "init_from", not self.init_from or Path(self.init_from).exists(), "no such run or checkpoint folder"


LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, Any]]]
EvalFn = Callable[[int, nn.Module, bool], dict[str, Any]]


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def split_batch(batch: dict[str, Any], micro: int) -> list[dict[str, Any]]:
    """Split every tensor of a batch along dim 0 into chunks of ``micro`` rows."""
    n = next(v.shape[0] for v in batch.values() if torch.is_tensor(v))
    return [{k: v[i:i + micro] if torch.is_tensor(v) else v for k, v in batch.items()} for i in range(0, n, micro)]


def batch_rows(batch: dict[str, Any]) -> int:
    return next(v.shape[0] for v in batch.values() if torch.is_tensor(v))


class Trainer:
    """Trains ``model`` with ``loss_fn`` on ``data``; see the module docstring.

    ``run_dir`` is a folder, or the ``train.run.Run`` that ``start_run`` returned: the engine then
    commits it (last checks, then config.yaml) once the model is set up, and resumes from the
    checkpoint it found. Otherwise ``resume`` is False (a fresh run), True (the newest complete
    checkpoint of ``run_dir``) or a checkpoint folder.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: BatchSource,
        cfg: TrainConfig,
        run_dir: "str | Path | Run",
        eval_fn: EvalFn | None = None,
        resume: bool | Path = False,
        val_data: Iterable[dict[str, torch.Tensor]] | None = None,
        param_groups: list[dict] | None = None,
        muon_rule: Callable[[str, nn.Parameter], bool] | None = None,
        on_save: Callable[[int, "Trainer"], None] | None = None,
        callbacks: list[Callable[[int, "Trainer"], None]] | None = None,
    ):
        self.cfg = cfg
        run = run_dir if isinstance(run_dir, Run) else None
        if run is not None:
            run_dir, resume = run.dir, run.resume_from or False
        self.run_dir = Path(run_dir)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.device = pick_device(cfg.device)
        self.dist: DistInfo = init_distributed(self.device)
        self.rank_batch = cfg.batch_size // self.dist.world_size
        self.micro = cfg.micro_batch_size or self.rank_batch
        self.model = model.to(self.device)
        if cfg.init_from and resume is False:
            f = ckpt.load_weights(cfg.init_from, self.model, ema=True, partial=True)
            if self.dist.is_main:
                print(f"genlab: initialised from {f}", flush=True)
        self.loss_fn, self.data, self.eval_fn, self.val_data = loss_fn, data, eval_fn, val_data
        self.on_save, self.callbacks = on_save, callbacks or []
        groups = build_param_groups(self.model, cfg.weight_decay, param_groups)
        self.params = [p for g in groups for _, p in g["params"]]
        if run is not None:  # the model and its frozen parts are known: check the resume, write config.yaml
            run.commit(self.model, ema=cfg.ema_decay > 0)
        self.ema = EMA(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.optimizers = build_optimizers(groups, cfg, muon_rule)
        self.schedulers = [build_scheduler(o, cfg) for o in self.optimizers]
        self.ddp = DDP(self.model) if self.dist.enabled else None
        self.net = self.ddp or self.model  # what the loss is computed with
        if cfg.compile:
            self.net = torch.compile(self.net)
        self.autocast_dtype = self._autocast_dtype()
        self.step = 0
        self.best: float | None = None
        if resume is not False:
            self._resume(ckpt.latest_checkpoint(self.run_dir) if resume is True else Path(resume))

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

    @contextlib.contextmanager
    def sampling_weights(self):
        """The model with the weights to sample with (the EMA averages when EMA is on) inside the block,
        in eval mode; the trained weights and the train/eval modes are restored afterwards."""
        was_training = self.model.training
        set_train_mode(self.model, False)
        if self.ema is not None:
            self.ema.swap(self.model)
        try:
            yield self.model
        finally:
            if self.ema is not None:
                self.ema.swap(self.model)
            set_train_mode(self.model, was_training)

    # -- checkpoints ----------------------------------------------------------------------------------------
    def save(self) -> Path:
        train_state = {
            "optimizers": [o.state_dict() for o in self.optimizers],
            "total_steps": self.cfg.steps,
            "best": self.best,
        }
        rank_state = {"rng": ckpt.rng_state(), "data": self.data.state_dict()}
        path = ckpt.save_checkpoint(
            self.run_dir, self.step, ckpt.trainable_state(self.model), train_state, rank_state,
            ema_state=self.ema.state_dict() if self.ema is not None else None,
            rank=self.dist.rank, world_size=self.dist.world_size, keep=self.cfg.keep_checkpoints, barrier=barrier,
        )
        if self.on_save is not None and self.dist.is_main:
            self.on_save(self.step, self)
        return path

    def _resume(self, path: Path) -> None:
        train_state, rank_state = ckpt.load_checkpoint(path, self.model, set(ckpt.trainable_state(self.model)),
                                                       self.ema, rank=self.dist.rank, map_location=self.device)
        fresh = [[g["base_lr"] for g in o.param_groups] for o in self.optimizers]  # this config's base lrs
        try:
            for o, s in zip(self.optimizers, train_state["optimizers"], strict=True):
                o.load_state_dict(s)
        except (ValueError, KeyError) as e:
            raise CheckpointMismatchError(f"{path / 'state.pt'}: its optimizer state does not fit this model's "
                                          f"parameter groups ({e})") from e
        self.step = int(train_state["step"])
        self.best = train_state.get("best")
        if self.ema is not None:
            self.ema.updates = self.step
        # The lr is a closed form of the step under the schedule of *this* config, so an extended (or
        # shortened) run follows the new schedule from here, each group from its own base lr.
        for o, sch, bases in zip(self.optimizers, self.schedulers, fresh):
            for g, base in zip(o.param_groups, bases):  # the saved state carries the old run's lrs
                g["initial_lr"] = g["base_lr"] = base
            set_schedule_step(sch, self.step)
        self.data.load_state_dict(rank_state["data"])
        ckpt.set_rng_state(rank_state["rng"])

    # -- the loop -------------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, torch.Tensor]:
        """One optimizer step over ``batch_size`` samples: micro-batches, accumulation, clip, step, EMA.

        Returns detached 0-dim tensors (averaged over micro-batches); nothing here waits for the GPU,
        the caller converts to floats only when it logs.
        """
        batch = _to_device(self.data.next_batch(self.rank_batch), self.device)
        chunks = split_batch(batch, self.micro)
        totals: dict[str, torch.Tensor] = {}
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            # Under DDP, gradients are all-reduced only on the last micro-batch.
            sync = contextlib.nullcontext() if (last or self.ddp is None) else self.ddp.no_sync()
            with sync:
                with self._autocast():
                    loss, metrics = self.loss_fn(self.net, chunk)
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
            self.ema.update(self.model)
        self.step += 1
        return totals

    def _logs_at(self, step: int) -> bool:
        return step % self.cfg.log_every == 0 or step == self.cfg.steps

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """``loss_fn`` over every batch of ``val_data`` on every rank (the sampling weights, eval mode),
        weighted by rows and averaged over ranks."""
        if self.val_data is None:
            return {}
        sums: dict[str, torch.Tensor] = {}
        rows = torch.zeros((), device=self.device)
        with self.sampling_weights() as m:
            for batch in self.val_data:
                batch = _to_device(batch, self.device)
                with self._autocast():
                    loss, metrics = self.loss_fn(m, batch)
                n = batch_rows(batch)
                for k, v in {"loss": loss, **metrics}.items():
                    v = torch.as_tensor(v, device=self.device).detach().float() * n
                    sums[k] = sums[k] + v if k in sums else v
                rows += n
        rows = all_reduce_mean(rows)
        return {k: (all_reduce_mean(v) / rows.clamp_min(1)).item() for k, v in sums.items()}

    def evaluate(self, final: bool = False) -> dict[str, Any]:
        """``eval_fn`` on rank 0 with the sampling weights (other ranks wait); eval_fn decides about
        no_grad (likelihoods need gradients)."""
        out: dict[str, Any] = {}
        if self.eval_fn is not None and self.dist.is_main:
            rng = ckpt.rng_state()  # evaluating (sampling, a judge's init) never moves training's random streams
            with self.sampling_weights() as m:
                out = self.eval_fn(self.step, m, final) or {}
            ckpt.set_rng_state(rng)
        barrier()
        return out

    def _eval_and_log(self, logger: MetricsLogger, final: bool) -> None:
        val = self.validate()
        logger.log(self.step, val, split="val")
        metrics = self.evaluate(final)
        logger.log(self.step, metrics, split="eval")
        if self.dist.is_main:
            plot_run_loss(self.run_dir, self.run_dir / "loss.png")
            self._track_best({**metrics, **{f"val_{k}": v for k, v in val.items()}})

    def _track_best(self, metrics: dict[str, Any]) -> None:
        name = self.cfg.best_metric
        if not name:
            return
        if name not in metrics:
            print(f"genlab: warning: --train.best-metric={name}: the evaluation reports no such metric "
                  f"(it reports: {', '.join(sorted(metrics)) or 'nothing'}); no best checkpoint", flush=True)
            return
        value = float(metrics[name])
        better = self.best is None or (value > self.best if self.cfg.best_mode == "max" else value < self.best)
        if better and math.isfinite(value):
            self.best = value
            ckpt.save_best(self.run_dir, self.step, name, value, ckpt.trainable_state(self.model),
                           self.ema.state_dict() if self.ema is not None else None)

    def fit(self) -> nn.Module:
        """Train to ``cfg.steps`` (continuing from a resumed step), evaluate, then save the final
        checkpoint (after the final evaluation, so ``best/`` can follow it); return the model with
        the trained weights."""
        cfg = self.cfg
        main = self.dist.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        logger = MetricsLogger(self.run_dir, enabled=main, resume_step=self.step if self.step else None)
        bar = progress_bar(cfg.steps, self.step, enabled=main and cfg.progress)
        set_train_mode(self.model, True)
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
                    record.update(group_lrs(self.optimizers), steps_per_s=window_steps / max(dt, 1e-9))
                    logger.log(self.step, record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}")
                    window_t, window_steps = time.perf_counter(), 0
                if self.step < cfg.steps:
                    if cfg.eval_every and self.step % cfg.eval_every == 0:
                        self._eval_and_log(logger, final=False)
                    if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                        self.save()
                for cb in self.callbacks:
                    cb(self.step, self)
            bar.close()
            if main and (self.eval_fn is not None or self.val_data is not None):
                print(f"genlab: final evaluation at step {self.step} ...", flush=True)
            t0 = time.perf_counter()
            self._eval_and_log(logger, final=True)
            if main and (self.eval_fn is not None or self.val_data is not None):
                print(f"genlab: final evaluation done in {time.perf_counter() - t0:.1f} s", flush=True)
            self.save()
        finally:
            bar.close()
            logger.close()
        return self.model
