"""Flow matching on 2-D data: config, train, sample and evaluate (the glue the commands call).

    genlab flow train --config flow/toy2d-cpu          # OT-CFM 8gaussians -> moons, a few minutes on CPU
    genlab flow sample --run-dir runs/flow-toy2d --solver euler --steps 2
    genlab flow eval --run-dir runs/flow-toy2d
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Literal

import torch

from genlab.config import Check, load_config, non_negative, validate
from genlab.data.toy2d import TOY2D_NAMES, Toy2DSource
from genlab.flow.models.mlp import MLPConfig, VelocityMLP
from genlab.flow.objectives import flow_matching_loss
from genlab.flow.paths import make_path
from genlab.flow.solvers import FIXED_STEPPERS, known_methods
from genlab.train.checkpoint import load_weights
from genlab.train.engine import TrainConfig, Trainer
from genlab.train.run import read_run_config, start_run


@dataclass
class Toy2DData:
    source: str = "8gaussians"  # any of genlab.data.toy2d.TOY2D_NAMES
    target: str = "moons"

    def checks(self) -> Iterable[Check]:
        for name in ("source", "target"):
            yield name, getattr(self, name) in TOY2D_NAMES, f"unknown 2-D distribution; choose one of {', '.join(TOY2D_NAMES)}"


@dataclass
class FlowObjective:
    path: Literal["cond_ot", "cosine", "vp"] = "cond_ot"
    sigma_min: float = 0.0
    coupling: Literal["none", "exact", "sinkhorn"] = "exact"  # none = I-CFM, exact = OT-CFM
    time_sampler: Literal["uniform", "logit_normal"] = "uniform"

    def checks(self) -> Iterable[Check]:
        yield "sigma_min", 0 <= self.sigma_min < 1, "must be in [0, 1)"


@dataclass
class FlowEval:
    n_samples: int = 2000  # samples for W2 / MMD and the pictures
    nfes: tuple[int, ...] = (1, 2, 4, 8, 16, 100)  # Euler step counts evaluated
    adaptive: str = "dopri5"  # also evaluated; "" to skip
    nll_samples: int = 1000  # target samples whose NLL is computed (0 = skip)
    density_resolution: int = 100  # grid side of the density heat-map (0 = skip)

    def checks(self) -> Iterable[Check]:
        yield "n_samples", self.n_samples >= 2, "must be >= 2 (W2 and MMD compare sample sets)"
        yield "nfes", len(self.nfes) > 0 and all(n >= 1 for n in self.nfes), "each must be >= 1 (at least one)"
        yield "adaptive", self.adaptive in ("", *known_methods()), f"unknown ODE method; use \"\" or one of {known_methods()}"
        yield from non_negative("nll_samples", "density_resolution", cfg=self)
        yield "nll_samples", self.nll_samples <= self.n_samples, "must be <= --eval.n-samples"
        yield "density_resolution", self.density_resolution != 1, "must be 0 (off) or >= 2"


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
    return VelocityMLP.from_config(cfg.model, dim=2)


def make_loss_fn(cfg: FlowConfig):
    path = make_path(cfg.objective.path, **({"sigma_min": cfg.objective.sigma_min}
                                           if cfg.objective.path == "cond_ot" else {}))

    def loss_fn(model, batch):
        return flow_matching_loss(model, batch["x0"], batch["x1"], path, time_sampler=cfg.objective.time_sampler,
                                  coupling=cfg.objective.coupling)

    return loss_fn


def weights_used(cfg: FlowConfig, ema: bool = True) -> str:
    return "ema" if ema and cfg.train.ema_decay > 0 else "trained"


def train(cfg: FlowConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Train, checkpoint and evaluate; returns the run folder (config, metrics, checkpoints, PNGs)."""
    from genlab.flow.evaluation import evaluate_toy2d

    run = start_run(cfg, resume=resume, overwrite=overwrite)
    if run.finished:
        return run.dir
    model = build_model(cfg)
    data = Toy2DSource(cfg.data.source, cfg.data.target, seed=cfg.train.seed, rank=run.dist.rank)

    def eval_fn(step, ema_model, final):
        return evaluate_toy2d(ema_model, cfg, run.dir, step=step, final=final, weights=weights_used(cfg))

    Trainer(model, make_loss_fn(cfg), data, cfg.train, run, eval_fn=eval_fn).fit()
    return run.dir


def demo(cfg: FlowConfig, out: Path) -> dict:
    """The flow part of ``genlab demo``: train the embedded default into ``out``; the headline figures."""
    run = train(replace(cfg, run_dir=str(out)), overwrite=True)
    report = json.loads((run / "eval.json").read_text())
    by = {f"{r['solver']}@{r['nfe']}": round(r["w2"], 4) for r in report["solvers"]}
    return {"run_dir": str(run), "w2": by, "nll_bits_per_dim": report.get("nll_bits_per_dim"),
            "straightness": report["straightness"], "weights": report["weights"]}


def load_trained(run_dir: str | Path, ema: bool = True) -> tuple[VelocityMLP, FlowConfig]:
    """Rebuild the model of a run folder from its config.yaml and load its latest (EMA) weights."""
    cfg = load_config(FlowConfig, str(read_run_config(run_dir, "flow")))
    validate(cfg)
    model = build_model(cfg)
    load_weights(run_dir, model, ema=ema)
    return model.eval(), cfg


@dataclass
class SampleArgs:
    run_dir: str  # a run folder written by `genlab flow train`
    solver: str = "euler"  # euler | midpoint | heun | rk4 | dopri5 | any torchdiffeq method
    steps: int = 100  # grid steps for fixed-step solvers (adaptive solvers pick their own)
    n: int = 2000
    seed: int = 0
    out: str = ""  # .pt file for the samples; default <run_dir>/samples_<solver>[_<steps>].pt

    def checks(self) -> Iterable[Check]:
        yield "solver", self.solver in known_methods(), f"unknown ODE method; use one of {known_methods()}"
        yield "steps", self.steps >= 1, "must be >= 1"
        yield "n", self.n >= 2, "must be >= 2 (W2 against the target needs two points)"
        out = Path(self.out) if self.out else None
        yield "out", out is None or out.parent.is_dir(), f"the folder {out.parent if out else ''} does not exist"
        yield "out", out is None or not out.is_dir(), "is a folder; give a file name such as samples.pt"


def sample(args: SampleArgs) -> dict:
    """Draw samples with any solver; write them (.pt) and a PNG beside them; return NFE and W2."""
    from genlab.data.toy2d import sample_toy2d
    from genlab.eval.distances import wasserstein2
    from genlab.flow.plots import plot_samples
    from genlab.flow.solvers import solve_ode
    from genlab.io import atomic_torch_save

    validate(args)
    model, cfg = load_trained(args.run_dir)
    g = torch.Generator().manual_seed(args.seed)
    x0 = sample_toy2d(cfg.data.source, args.n, generator=g)
    res = solve_ode(model, x0, method=args.solver, steps=args.steps)
    name = f"samples_{args.solver}_{args.steps}" if args.solver in FIXED_STEPPERS else f"samples_{args.solver}"
    out = Path(args.out or Path(args.run_dir) / f"{name}.pt")
    atomic_torch_save(res.x, out)
    target = sample_toy2d(cfg.data.target, args.n, generator=g)
    plot_samples(res.x, target, out.with_suffix(".png"), title=f"{args.solver}, NFE {res.nfe}")
    info = {"samples": str(out), "nfe": res.nfe, "w2": wasserstein2(res.x, target), "weights": weights_used(cfg)}
    print(json.dumps(info))
    return info


@dataclass
class EvalArgs:
    run_dir: str  # a run folder written by `genlab flow train`
    raw: bool = False  # evaluate the trained weights instead of their EMA


def evaluate_run(args: EvalArgs) -> dict:
    """The full evaluation of a trained run (eval.json and the pictures, rewritten); prints the report."""
    from genlab.flow.evaluation import evaluate_toy2d
    from genlab.train.checkpoint import checkpoint_step, latest_checkpoint

    model, cfg = load_trained(args.run_dir, ema=not args.raw)
    step = checkpoint_step(latest_checkpoint(args.run_dir))
    print(f"genlab: evaluating {args.run_dir} at step {step} ...", file=sys.stderr, flush=True)
    flat = evaluate_toy2d(model, cfg, args.run_dir, step=step, final=True,
                          weights=weights_used(cfg, ema=not args.raw), verbose=True)
    print(json.dumps(flat, indent=2))
    return flat
