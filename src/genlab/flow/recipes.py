"""Flow matching on 2-D data: config, train, sample and evaluate (the glue the commands call).

    genlab flow train --config flow/toy2d-cpu          # OT-CFM 8gaussians -> moons, a few minutes on CPU
    genlab flow sample --run-dir runs/flow-toy2d --solver euler --steps 2
    genlab flow eval --run-dir runs/flow-toy2d
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Iterable, Literal

import torch

from genlab.config import Check, ConfigError, flag, load_config, non_negative, seed_check, validate
from genlab.data.toy2d import TOY2D_NAMES, Toy2DSource
from genlab.flow.images import ImageFlowConfig, ImageObjective
from genlab.flow.images import train as train_images
from genlab.flow.models.mlp import MLPConfig, VelocityMLP
from genlab.flow.objectives import flow_matching_loss
from genlab.flow.pairing import OTPairedSource
from genlab.flow.paths import make_path
from genlab.flow.solvers import FIXED_STEPPERS, known_methods
from genlab.train.checkpoint import load_weights, run_of_checkpoint
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

    recipe: Literal["toy2d"] = "toy2d"  # `genlab flow train` also runs recipe "images" (flow/digits ...)
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


def make_loss_fn(cfg: FlowConfig, prepaired: bool = False):
    """The flow-matching loss of ``cfg``. prepaired: the batches come OT-paired by an ``OTPairedSource``
    (``train`` pairs in the data pipeline, off the step's critical path), so the loss pairs nothing."""
    path = make_path(cfg.objective.path, **({"sigma_min": cfg.objective.sigma_min}
                                           if cfg.objective.path == "cond_ot" else {}))
    coupling = "none" if prepaired else cfg.objective.coupling

    def loss_fn(model, batch):
        return flow_matching_loss(model, batch["x0"], batch["x1"], path, time_sampler=cfg.objective.time_sampler,
                                  coupling=coupling)

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
    paired = cfg.objective.coupling != "none"
    if paired:  # OT-CFM: batch k + 1 is paired in a background thread while step k trains
        data = OTPairedSource(data, cfg.objective.coupling, chunk=cfg.train.micro_batch_size)

    def eval_fn(step, ema_model, final):
        return evaluate_toy2d(ema_model, cfg, run.dir, step=step, final=final, weights=weights_used(cfg))

    try:
        Trainer(model, make_loss_fn(cfg, prepaired=paired), data, cfg.train, run, eval_fn=eval_fn).fit()
    finally:
        if paired:
            data.close()
    return run.dir


def _meanflow_demo() -> ImageFlowConfig:
    base = ImageFlowConfig()
    return replace(base, objective=ImageObjective(kind="meanflow", time_sampler="logit_normal", meanflow_cfg=2.0),
                   model=replace(base.model, time_scale=1.0), sampling=replace(base.sampling, num_steps=1),
                   eval=replace(base.eval, nfes=(1, 2, 4)),
                   train=replace(base.train, batch_size=64))  # its JVP step costs about two forwards


@dataclass
class FlowDemoConfig:
    """The flow part of ``genlab demo``: OT-CFM on 2-D data, a guided DiT on digits, and a one-step
    MeanFlow DiT on digits (``--flow.toy2d.train.steps N``, ``--flow.digits...``, ``--flow.meanflow...``)."""

    toy2d: FlowConfig = field(default_factory=FlowConfig)
    digits: ImageFlowConfig = field(default_factory=ImageFlowConfig)
    meanflow: ImageFlowConfig = field(default_factory=_meanflow_demo)


def demo(cfg: FlowDemoConfig, out: Path) -> dict:
    """Train the three embedded defaults into ``out``; their headline figures."""
    run = train(replace(cfg.toy2d, run_dir=str(out / "toy2d")), overwrite=True)
    report = json.loads((run / "eval.json").read_text())
    by = {f"{r['solver']}@{r['nfe']}": round(r["w2"], 4) for r in report["solvers"]}
    summary = {"toy2d": {"run_dir": str(run), "w2": by, "nll_bits_per_dim": report.get("nll_bits_per_dim"),
                         "straightness": report["straightness"], "weights": report["weights"]}}
    for name in ("digits", "meanflow"):
        run = train_images(replace(getattr(cfg, name), run_dir=str(out / name)), overwrite=True)
        report = json.loads((run / "eval.json").read_text())
        summary[name] = {"run_dir": str(run), "class_grid": str(run / "samples.png"),
                         "accuracy_by_cfg_scale": {r["cfg_scale"]: round(r["accuracy"], 4)
                                                   for r in report["by_cfg_scale"]},
                         "nfe_table": [{k: r[k] for k in ("solver", "steps", "forwards", "accuracy")}
                                       for r in report["nfe_table"]],
                         "classifier_fd": report["classifier_fd"] and round(report["classifier_fd"], 4),
                         "classifier_test_accuracy": report["classifier"]["test_accuracy"]}
    return summary


def load_trained(checkpoint: str | Path, ema: bool = True) -> tuple[VelocityMLP, FlowConfig]:
    """Rebuild the model of a run folder (or one of its checkpoint folders) from its config.yaml and
    load its latest (EMA) weights."""
    cfg = load_config(FlowConfig, str(read_run_config(run_of_checkpoint(checkpoint), "flow")))
    validate(cfg)
    model = build_model(cfg)
    load_weights(checkpoint, model, ema=ema)
    return model.eval(), cfg


def _alias(*names: str, help: str = ""):
    import tyro

    return tyro.conf.arg(aliases=names, help=help or None)


@dataclass
class SampleArgs:
    """``genlab flow sample``: one command for 2-D and image runs."""

    # a run folder (its latest checkpoint) or one checkpoint folder
    checkpoint: Annotated[str, _alias("--run-dir")] = ""
    # default: 2000 points (2-D) or 16 images
    num_samples: Annotated[int | None, _alias("--n")] = None
    # solver steps; default: the run's (2-D: 100; images: sampling.num_steps)
    num_steps: Annotated[int | None, _alias("--steps")] = None
    solver: str = ""  # euler | midpoint | heun | rk4 | dopri5 | any torchdiffeq method; "" = the run's (euler)
    cfg_scale: float | None = None  # images: guidance scale; default: the run's sampling.cfg_scale
    class_label: int | None = None  # images: every sample of this class (default: unconditional)
    class_grid: bool = False  # images: one row per class, labelled
    samples_per_class: int = 8  # images, with --class-grid
    seed: int = 0
    out: str = ""  # images: a folder (default <run>/samples); 2-D: a .pt file (default <run>/samples_<solver>_<steps>.pt)

    def checks(self) -> Iterable[Check]:
        yield "checkpoint", bool(self.checkpoint), "is required: a run folder or one of its checkpoint folders"
        yield "solver", self.solver in ("", *known_methods()), f"unknown ODE method; use one of {known_methods()}"
        yield "num_samples", self.num_samples is None or 2 <= self.num_samples <= 1_000_000, "must be in 2..1000000"
        yield "num_steps", self.num_steps is None or 1 <= self.num_steps <= 100_000, "must be in 1..100000"
        yield "samples_per_class", 1 <= self.samples_per_class <= 10_000, "must be in 1..10000"
        yield "cfg_scale", self.cfg_scale is None or (math.isfinite(self.cfg_scale) and self.cfg_scale >= 0), \
            "must be a number >= 0"
        yield "class_grid", not (self.class_grid and self.class_label is not None), "takes no --class-label"
        yield seed_check(cfg=self)
        out = Path(self.out) if self.out else None
        yield "out", out is None or out.parent.is_dir(), f"the folder {out.parent if out else ''} does not exist"
        yield "out", out is None or not out.is_file() or out.suffix == ".pt", "is a file; give a folder"


def _recipe_of(checkpoint: str) -> str:
    """``images`` or ``toy2d``: what the run's config.yaml says."""
    from genlab.config import load_yaml
    from genlab.train.checkpoint import run_of_checkpoint

    return str(load_yaml(read_run_config(run_of_checkpoint(checkpoint), "flow")).get("recipe", "toy2d"))


def sample(args: SampleArgs) -> dict:
    """Draw samples with any solver. Image runs: a PNG grid and samples.npz (see flow.images.sample);
    2-D runs: the points (.pt) and a PNG beside them; prints NFE and W2."""
    from genlab.data.toy2d import sample_toy2d
    from genlab.eval.distances import wasserstein2
    from genlab.flow.plots import plot_samples
    from genlab.flow.solvers import solve_ode
    from genlab.io import atomic_torch_save

    validate(args)
    if _recipe_of(args.checkpoint) == "images":
        from genlab.flow import images

        return images.sample(args)
    for name in ("cfg_scale", "class_label"):
        if getattr(args, name) is not None:
            raise ConfigError(f"{flag(name)}: a 2-D run has no classes or guidance")
    if args.class_grid:
        raise ConfigError("--class-grid: a 2-D run has no classes")
    if args.out and Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out}: is a folder; a 2-D run writes a file such as samples.pt")
    solver, steps, n = args.solver or "euler", args.num_steps or 100, args.num_samples or 2000
    model, cfg = load_trained(args.checkpoint)
    g = torch.Generator().manual_seed(args.seed)
    x0 = sample_toy2d(cfg.data.source, n, generator=g)
    res = solve_ode(model, x0, method=solver, steps=steps)
    name = f"samples_{solver}_{steps}" if solver in FIXED_STEPPERS else f"samples_{solver}"
    out = Path(args.out) if args.out else run_of_checkpoint(args.checkpoint) / f"{name}.pt"
    atomic_torch_save(res.x, out)
    target = sample_toy2d(cfg.data.target, n, generator=g)
    plot_samples(res.x, target, out.with_suffix(".png"), title=f"{solver}, NFE {res.nfe}")
    info = {"samples": str(out), "nfe": res.nfe, "w2": wasserstein2(res.x, target), "weights": weights_used(cfg)}
    print(json.dumps(info))
    return info


@dataclass
class EvalArgs:
    # a run folder (its latest checkpoint) or one checkpoint folder
    checkpoint: Annotated[str, _alias("--run-dir")] = ""
    raw: bool = False  # evaluate the trained weights instead of their EMA
    fid_weights: str = ""  # images: a local Inception-v3 FID weights file (nothing is downloaded)

    def checks(self) -> Iterable[Check]:
        yield "checkpoint", bool(self.checkpoint), "is required: a run folder or one of its checkpoint folders"
        yield "fid_weights", not self.fid_weights or Path(self.fid_weights).is_file(), "no such file"


def evaluate_run(args: EvalArgs) -> dict:
    """The full evaluation of a trained run (eval.json and the pictures, rewritten); prints the report."""
    from genlab.flow.evaluation import evaluate_toy2d
    from genlab.train.checkpoint import checkpoint_step, latest_checkpoint

    validate(args)
    if _recipe_of(args.checkpoint) == "images":
        from genlab.flow import images

        return images.evaluate_run(args)
    if args.fid_weights:
        raise ConfigError("--fid-weights: a 2-D run has no images")
    run_dir = run_of_checkpoint(args.checkpoint)
    model, cfg = load_trained(args.checkpoint, ema=not args.raw)
    ckpt = Path(args.checkpoint)
    step = checkpoint_step(ckpt if (ckpt / "state.pt").is_file() else latest_checkpoint(run_dir))
    print(f"genlab: evaluating {run_dir} at step {step} ...", file=sys.stderr, flush=True)
    flat = evaluate_toy2d(model, cfg, run_dir, step=step, final=True,
                          weights=weights_used(cfg, ema=not args.raw), verbose=True)
    print(json.dumps(flat, indent=2))
    return flat
