"""Flow matching on 2-D data: config, train, sample and evaluate (the glue the CLI calls).

    genlab flow train --config flow/toy2d-cpu          # OT-CFM 8gaussians -> moons, a few minutes on CPU
    genlab flow sample --run-dir runs/flow-toy2d --solver euler --steps 2
    genlab flow eval --run-dir runs/flow-toy2d
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from genlab.config import save_yaml
from genlab.data.toy2d import Toy2DSource
from genlab.flow.models.mlp import VelocityMLP
from genlab.flow.objectives import flow_matching_loss
from genlab.flow.paths import make_path
from genlab.train.checkpoint import latest_checkpoint
from genlab.train.engine import TrainConfig, Trainer, seed_everything


@dataclass
class Toy2DData:
    source: str = "8gaussians"  # any of genlab.data.toy2d.TOY2D_NAMES
    target: str = "moons"


@dataclass
class MLPConfig:
    hidden: int = 256
    depth: int = 3
    time_embed_dim: int = 64


@dataclass
class FlowObjective:
    path: Literal["cond_ot", "cosine", "vp"] = "cond_ot"
    sigma_min: float = 0.0
    coupling: Literal["none", "exact", "sinkhorn"] = "exact"  # none = I-CFM, exact = OT-CFM
    time_sampler: Literal["uniform", "logit_normal"] = "uniform"


@dataclass
class FlowEval:
    n_samples: int = 2000  # samples for W2 / MMD and the pictures
    nfes: tuple[int, ...] = (1, 2, 4, 8, 16, 100)  # Euler step counts evaluated
    adaptive: str = "dopri5"  # also evaluated; "" to skip
    nll_samples: int = 1000  # target samples whose NLL is computed (0 = skip)
    density_resolution: int = 100  # grid side of the density heat-map (0 = skip)


@dataclass
class FlowConfig:
    """OT-CFM on 2-D toys. The embedded defaults are the CPU preset (under two minutes on one CPU thread)."""

    run_dir: str = "runs/flow-toy2d"
    data: Toy2DData = field(default_factory=Toy2DData)
    model: MLPConfig = field(default_factory=MLPConfig)
    objective: FlowObjective = field(default_factory=FlowObjective)
    eval: FlowEval = field(default_factory=FlowEval)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=8000, batch_size=256, lr=1e-3, warmup_steps=100, ema_decay=0.999, grad_clip=0.0,
        checkpoint_every=2000, log_every=50, threads=1,
    ))


def build_model(cfg: FlowConfig) -> VelocityMLP:
    return VelocityMLP(dim=2, hidden=cfg.model.hidden, depth=cfg.model.depth, time_embed_dim=cfg.model.time_embed_dim)


def make_loss_fn(cfg: FlowConfig):
    path = make_path(cfg.objective.path, **({"sigma_min": cfg.objective.sigma_min}
                                           if cfg.objective.path == "cond_ot" else {}))

    def loss_fn(model, batch):
        return flow_matching_loss(model, batch["x0"], batch["x1"], path, time_sampler=cfg.objective.time_sampler,
                                  coupling=cfg.objective.coupling)

    return loss_fn


def train(cfg: FlowConfig, resume: bool = False) -> Path:
    """Train, checkpoint and evaluate; returns the run folder (config, metrics, checkpoints, PNGs)."""
    from genlab.flow.evaluation import evaluate_toy2d

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", 0))
    if rank == 0:
        save_yaml(cfg, run_dir / "config.yaml")
    seed_everything(cfg.train.seed + rank)
    model = build_model(cfg)
    data = Toy2DSource(cfg.data.source, cfg.data.target, seed=cfg.train.seed, rank=rank)

    def eval_fn(step, ema_model):
        return evaluate_toy2d(ema_model, cfg, run_dir, step=step, final=step >= cfg.train.steps)

    Trainer(model, make_loss_fn(cfg), data, cfg.train, run_dir, eval_fn=eval_fn, resume=resume).fit()
    return run_dir


def load_trained(run_dir: str | Path, ema: bool = True) -> tuple[VelocityMLP, FlowConfig]:
    """Rebuild the model of a run folder from its config.yaml and load its latest (EMA) weights."""
    from safetensors.torch import load_file

    from genlab.config import load_config

    run_dir = Path(run_dir)
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: is {run_dir} a genlab flow run folder?")
    cfg = load_config(FlowConfig, str(cfg_file))
    path = latest_checkpoint(run_dir)
    if path is None:
        raise FileNotFoundError(f"{run_dir}/checkpoints has no checkpoint yet")
    model = build_model(cfg)
    weights = path / "ema.safetensors"
    if ema and weights.is_file():
        # AveragedModel keys are 'module.<name>' plus its 'n_averaged' counter.
        sd = {k.removeprefix("module."): v for k, v in load_file(str(weights)).items() if k != "n_averaged"}
    else:
        sd = load_file(str(path / "model.safetensors"))
    model.load_state_dict(sd)
    return model.eval(), cfg


@dataclass
class SampleArgs:
    run_dir: str  # a run folder written by `genlab flow train`
    solver: str = "euler"  # euler | midpoint | heun | rk4 | dopri5 | any torchdiffeq method
    steps: int = 100  # grid steps for fixed-step solvers
    n: int = 2000
    seed: int = 0
    out: str = ""  # .pt file for the samples; default <run_dir>/samples_<solver>_<steps>.pt


def sample(args: SampleArgs) -> dict:
    """Draw samples with any solver; write them (.pt) and a PNG beside them; return NFE and W2."""
    from genlab.data.toy2d import sample_toy2d
    from genlab.eval.distances import wasserstein2
    from genlab.flow.plots import plot_samples
    from genlab.flow.solvers import solve_ode

    model, cfg = load_trained(args.run_dir)
    g = torch.Generator().manual_seed(args.seed)
    x0 = sample_toy2d(cfg.data.source, args.n, generator=g)
    res = solve_ode(model, x0, method=args.solver, steps=args.steps)
    out = Path(args.out or Path(args.run_dir) / f"samples_{args.solver}_{args.steps}.pt")
    torch.save(res.x, out)
    target = sample_toy2d(cfg.data.target, args.n, generator=g)
    plot_samples(res.x, target, out.with_suffix(".png"), title=f"{args.solver}, NFE {res.nfe}")
    info = {"samples": str(out), "nfe": res.nfe, "w2": wasserstein2(res.x, target)}
    print(json.dumps(info))
    return info
