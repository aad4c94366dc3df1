"""genlab beside torchcfm on 2-D flow matching: 8gaussians -> moons, I-CFM and OT-CFM.

    .venv/bin/python benchmarks/flow_toy.py                 # defaults: 3000 steps, batch 256, 4 repeats
    .venv/bin/python benchmarks/flow_toy.py --quick         # smoke run, seconds
    .venv/bin/python benchmarks/flow_toy.py --icfm-study --seeds 10   # I-CFM only: W2@100 final + EMA, U test

Four trainings share everything but the library: the same VelocityMLP (same initial weights,
seeded identically), the same batches (genlab's Toy2DSource feeds both), Adam at a constant
learning rate (genlab's AdamW with weight_decay=0 is Adam), no gradient clipping, no EMA, fp32,
one CPU thread (torch.set_num_threads(1)).

* genlab trains through its real engine: `Trainer.fit()` with `flow.recipes.make_loss_fn`
  (coupling "none" = I-CFM, "exact" = OT-CFM). OT-CFM is paired as `flow.recipes.train` pairs it:
  in the data pipeline (`flow.pairing.OTPairedSource`, the next batch paired in a background
  thread while the step trains; the same permutations as pairing in the step). Its wall clock
  includes what the engine always does: per-step metric syncs, JSONL/TensorBoard logging every 50
  steps and the final checkpoint.
* torchcfm (installed only for this benchmark) trains with the plain loop of its examples:
  `ConditionalFlowMatcher(sigma=0)` / `ExactOptimalTransportConditionalFlowMatcher(sigma=0)`
  give (t, x_t, u_t) and we regress model(x_t, t) on u_t.

All four models are evaluated identically: genlab's `solve_ode` (Euler at several NFE, and
dopri5 with atol = rtol = 1e-5) from one fixed set of source samples, and genlab's exact W2
(POT) against one fixed set of fresh target samples. Repeat r uses seed + r for all four
methods; the table shows the median over repeats (methods are interleaved within a repeat, in
an order that reverses from one repeat to the next, because the machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from genlab.data.toy2d import Toy2DSource, sample_toy2d
from genlab.eval.distances import wasserstein2
from genlab.flow.pairing import OTPairedSource
from genlab.flow.recipes import FlowConfig, build_model, make_loss_fn
from genlab.flow.solvers import solve_ode
from genlab.train.engine import TrainConfig, Trainer, seed_everything

SOURCE, TARGET = "8gaussians", "moons"
EVAL_SEED = 1234  # fixed evaluation noise, independent of the training seed
OT_SPEEDUP_TARGET = 1.8  # genlab OT-CFM steps/s over torchcfm's (pairing off the step's critical path)


@dataclass(frozen=True)
class Settings:
    steps: int = 3000
    batch: int = 256
    lr: float = 1e-3
    seed: int = 0
    repeats: int = 4
    n_eval: int = 2000
    nfes: tuple[int, ...] = (1, 2, 4, 8, 16, 100)
    device: str = "cpu"


@dataclass(frozen=True)
class Method:
    name: str  # row label
    library: str  # "genlab" or "torchcfm"
    coupling: str  # "none" (I-CFM) or "exact" (OT-CFM)


METHODS = (
    Method("genlab I-CFM", "genlab", "none"),
    Method("torchcfm I-CFM", "torchcfm", "none"),
    Method("genlab OT-CFM", "genlab", "exact"),
    Method("torchcfm OT-CFM", "torchcfm", "exact"),
)


def _flow_config(s: Settings, coupling: str, seed: int, run_dir: str, ema_decay: float = 0.0) -> FlowConfig:
    cfg = FlowConfig(run_dir=run_dir)
    cfg.objective.coupling = coupling
    cfg.train = TrainConfig(
        steps=s.steps, batch_size=s.batch, lr=s.lr, weight_decay=0.0, warmup_steps=0, schedule="constant",
        grad_clip=0.0, ema_decay=ema_decay, precision="fp32", checkpoint_every=0, eval_every=0, seed=seed,
        threads=1, device=s.device, progress=False,
    )
    return cfg


Trained = tuple[nn.Module, float, "nn.Module | None"]  # (model, seconds of training, EMA model or None)


def train_genlab(s: Settings, coupling: str, seed: int, ema_decay: float = 0.0) -> Trained:
    """Train with genlab's engine; return (model, seconds spent in Trainer.fit, a copy holding the
    engine's EMA weights or None when ``ema_decay`` is 0)."""
    with tempfile.TemporaryDirectory(prefix="flow_toy_") as run_dir:
        cfg = _flow_config(s, coupling, seed, run_dir, ema_decay)
        seed_everything(seed)
        model = build_model(cfg)
        data = Toy2DSource(SOURCE, TARGET, seed=seed)
        paired = coupling != "none"  # as flow.recipes.train: OT pairing in the data pipeline
        if paired:
            data = OTPairedSource(data, coupling, chunk=cfg.train.micro_batch_size)
        try:
            trainer = Trainer(model, make_loss_fn(cfg, prepaired=paired), data, cfg.train, run_dir)
            start = time.perf_counter()
            model = trainer.fit()
            seconds = time.perf_counter() - start
        finally:
            if paired:
                data.close()
        ema_model = None
        if trainer.ema is not None:
            with trainer.sampling_weights() as averaged:
                ema_model = copy.deepcopy(averaged)
    return model, seconds, ema_model


def _engine_like_ema(model: nn.Module, decay: float) -> AveragedModel:
    """torch's AveragedModel with genlab's EMA rule: starts at the initial weights, and update k
    (k = 0, 1, ...) uses the decay min(decay, (1 + k) / (10 + k))."""
    def avg(averaged: torch.Tensor, current: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        k = int(n) - 1  # n counts the initial copy too
        d = min(decay, (1 + k) / (10 + k))
        return torch.lerp(averaged, current, 1 - d)  # as genlab's EMA.update

    ema = AveragedModel(model, avg_fn=avg)
    ema.update_parameters(model)  # n = 0: copies the initial weights, as genlab's EMA starts
    return ema


def train_torchcfm(s: Settings, coupling: str, seed: int, ema_decay: float = 0.0) -> Trained:
    """Train with torchcfm's matcher in the plain loop of its examples; return (model, seconds, EMA
    model or None); the EMA (``ema_decay`` > 0) follows genlab's rule, see ``_engine_like_ema``."""
    from torchcfm.conditional_flow_matching import (
        ConditionalFlowMatcher,
        ExactOptimalTransportConditionalFlowMatcher,
    )

    matcher = ExactOptimalTransportConditionalFlowMatcher(sigma=0.0) if coupling == "exact" \
        else ConditionalFlowMatcher(sigma=0.0)
    cfg = _flow_config(s, coupling, seed, run_dir="unused")
    seed_everything(seed)  # torch (t, noise) and numpy (torchcfm's pair sampling) RNGs
    device = torch.device(s.device)
    model = build_model(cfg).to(device)  # same architecture and initial weights as genlab's run
    data = Toy2DSource(SOURCE, TARGET, seed=seed)  # same batches as genlab's run
    opt = torch.optim.Adam(model.parameters(), lr=s.lr)
    ema = _engine_like_ema(model, ema_decay) if ema_decay > 0 else None
    model.train()
    start = time.perf_counter()
    for _ in range(s.steps):
        batch = data.next_batch(s.batch)
        x0, x1 = batch["x0"].to(device), batch["x1"].to(device)  # (B, 2) each
        opt.zero_grad()
        t, xt, ut = matcher.sample_location_and_conditional_flow(x0, x1)
        loss = torch.mean((model(xt, t) - ut) ** 2)
        loss.backward()
        opt.step()
        if ema is not None:
            ema.update_parameters(model)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return model.eval(), seconds, ema.module.eval() if ema is not None else None


@torch.no_grad()
def evaluate(model: nn.Module, s: Settings) -> dict[str, float]:
    """W2 to fresh target samples after Euler at each NFE and after dopri5 (plus its NFE)."""
    g = torch.Generator().manual_seed(EVAL_SEED)
    x0 = sample_toy2d(SOURCE, s.n_eval, generator=g)  # (N, 2) the same for every model
    target = sample_toy2d(TARGET, s.n_eval, generator=g)  # (N, 2)
    device = next(model.parameters()).device
    model.eval()
    out: dict[str, float] = {}
    for nfe in s.nfes:
        res = solve_ode(model, x0.to(device), method="euler", steps=nfe)
        out[f"euler_{nfe}"] = wasserstein2(res.x, target)
    res = solve_ode(model, x0.to(device), method="dopri5", atol=1e-5, rtol=1e-5)
    out["dopri5"] = wasserstein2(res.x, target)
    out["dopri5_nfe"] = float(res.nfe)
    return out


STUDY_NFE = 100  # the I-CFM study's Euler steps
STUDY_EMA = 0.999  # the flow recipe's EMA decay


@torch.no_grad()
def w2_euler(model: nn.Module, s: Settings, nfe: int) -> float:
    """W2 after `nfe` Euler steps, from the same evaluation points as `evaluate`."""
    g = torch.Generator().manual_seed(EVAL_SEED)
    x0 = sample_toy2d(SOURCE, s.n_eval, generator=g)
    target = sample_toy2d(TARGET, s.n_eval, generator=g)
    model.eval()
    return wasserstein2(solve_ode(model, x0.to(next(model.parameters()).device), method="euler", steps=nfe).x, target)


def _summary(values: list[float]) -> dict[str, float]:
    q1, med, q3 = np.percentile(values, [25, 50, 75])
    return {"median": float(med), "q1": float(q1), "q3": float(q3), "iqr": float(q3 - q1),
            "min": float(min(values)), "max": float(max(values))}


def icfm_study(s: Settings, seeds: int) -> dict:
    """I-CFM, genlab vs torchcfm, over `seeds` seeds: W2 at STUDY_NFE Euler steps of the final
    iterate and of the EMA weights (decay STUDY_EMA, genlab's rule for both), each seed training both
    libraries from the same initial weights and batches (the library order alternates). Mann-Whitney U
    (two-sided) compares the two sets of seeds; the Wilcoxon signed-rank test uses the pairing by seed."""
    from scipy.stats import mannwhitneyu, wilcoxon

    torch.set_num_threads(1)
    from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (see run)

    trainers = {"genlab": train_genlab, "torchcfm": train_torchcfm}
    w2: dict[str, dict[str, list[float]]] = {lib: {"final": [], "ema": []} for lib in trainers}
    start = time.perf_counter()
    for r in range(seeds):
        seed = s.seed + r
        for lib in (("genlab", "torchcfm") if r % 2 == 0 else ("torchcfm", "genlab")):
            model, _, ema_model = trainers[lib](s, "none", seed, ema_decay=STUDY_EMA)
            w2[lib]["final"].append(w2_euler(model, s, STUDY_NFE))
            w2[lib]["ema"].append(w2_euler(ema_model, s, STUDY_NFE))
        print(f"[seed {seed}] W2@{STUDY_NFE} final genlab {w2['genlab']['final'][-1]:.3f} torchcfm "
              f"{w2['torchcfm']['final'][-1]:.3f}; EMA genlab {w2['genlab']['ema'][-1]:.3f} torchcfm "
              f"{w2['torchcfm']['ema'][-1]:.3f}", file=sys.stderr, flush=True)
    tests = {}
    for weights in ("final", "ema"):
        a, b = w2["genlab"][weights], w2["torchcfm"][weights]
        tests[weights] = {"mann_whitney_u": float(mannwhitneyu(a, b, alternative="two-sided").statistic),
                          "mann_whitney_p": float(mannwhitneyu(a, b, alternative="two-sided").pvalue),
                          "wilcoxon_p": float(wilcoxon(a, b).pvalue) if len(a) > 1 and a != b else 1.0,
                          "genlab_lower_in": sum(x < y for x, y in zip(a, b))}
    import torchcfm

    return {"settings": {**s.__dict__, "nfes": list(s.nfes), "seeds": seeds, "nfe": STUDY_NFE, "ema_decay": STUDY_EMA,
                         "source": SOURCE, "target": TARGET, "torch": torch.__version__,
                         "torchcfm": torchcfm.__version__, "wall_s": time.perf_counter() - start},
            "w2": w2, "summary": {lib: {k: _summary(v) for k, v in by.items()} for lib, by in w2.items()},
            "tests": tests}


def format_study(results: dict) -> str:
    s = results["settings"]
    last = s["seed"] + s["seeds"] - 1
    lines = [f"I-CFM study, {s['source']} -> {s['target']}: {s['seeds']} seeds ({s['seed']}..{last}), "
             f"{s['steps']} steps, batch {s['batch']}, Adam lr {s['lr']:g} constant; W2 after {s['nfe']} Euler steps "
             f"on {s['n_eval']} samples; EMA decay {s['ema_decay']} (genlab's warm-up rule for both); "
             f"torch {s['torch']}, torchcfm {s['torchcfm']}; {s['wall_s']:.0f} s",
             f"{'weights':8s} {'library':9s} {'median':>8s} {'q1':>8s} {'q3':>8s} {'IQR':>8s} {'min':>8s} {'max':>8s}"]
    for weights in ("final", "ema"):
        for lib in ("genlab", "torchcfm"):
            m = results["summary"][lib][weights]
            stats = ("median", "q1", "q3", "iqr", "min", "max")
            lines.append(f"{weights:8s} {lib:9s} " + " ".join(f"{m[k]:8.4f}" for k in stats))
    for weights, t in results["tests"].items():
        lines.append(f"{weights:8s} Mann-Whitney U = {t['mann_whitney_u']:.1f}, "
                     f"p = {t['mann_whitney_p']:.3f} (two-sided); "
                     f"Wilcoxon signed-rank (paired by seed) p = {t['wilcoxon_p']:.3f}; genlab lower in "
                     f"{t['genlab_lower_in']}/{s['seeds']} seeds")
    return "\n".join(lines)


def run(s: Settings) -> dict:
    """Train and evaluate every method `s.repeats` times; return per-repeat and median results."""
    torch.set_num_threads(1)
    # The engine's logger opens a TensorBoard writer; import it now so the one-time module import
    # is not billed to the first genlab run's training time.
    from torch.utils.tensorboard import SummaryWriter  # noqa: F401

    trainers = {"genlab": train_genlab, "torchcfm": train_torchcfm}
    runs: dict[str, list[dict]] = {m.name: [] for m in METHODS}
    for r in range(s.repeats):
        seed = s.seed + r
        order = METHODS if r % 2 == 0 else METHODS[::-1]  # genlab first, then torchcfm first, in turn
        for m in order:
            model, seconds, _ = trainers[m.library](s, m.coupling, seed)
            record = {"seed": seed, "train_s": seconds, "steps_per_s": s.steps / seconds, **evaluate(model, s)}
            runs[m.name].append(record)
            print(f"[repeat {r + 1}/{s.repeats}] {m.name:16s} {record['steps_per_s']:7.1f} steps/s  "
                  f"W2@2 {record['euler_2']:.3f}", file=sys.stderr, flush=True)
    keys = list(runs[METHODS[0].name][0])
    medians = {name: {k: statistics.median(rec[k] for rec in recs) for k in keys if k != "seed"}
               for name, recs in runs.items()}
    for name, recs in runs.items():  # noise only ever slows a run down, so the best repeat is also telling
        medians[name]["steps_per_s_best"] = max(rec["steps_per_s"] for rec in recs)

    def ratio(kind: str, key: str) -> float:
        return medians[f"genlab {kind}"][key] / medians[f"torchcfm {kind}"][key]

    ratios = {f"{kind}_{key}": ratio(kind, key) for kind in ("OT-CFM", "I-CFM") for key in ("euler_2", "steps_per_s")}
    targets = {
        "ot_cfm_w2_at_2_no_worse": medians["genlab OT-CFM"]["euler_2"] <= medians["torchcfm OT-CFM"]["euler_2"],
        "ot_cfm_throughput_at_least": medians["genlab OT-CFM"]["steps_per_s"] >= medians["torchcfm OT-CFM"]["steps_per_s"],
        "ot_cfm_throughput_speedup": ratios["OT-CFM_steps_per_s"] >= OT_SPEEDUP_TARGET,
    }
    import torchcfm

    return {
        "settings": {**s.__dict__, "nfes": list(s.nfes), "source": SOURCE, "target": TARGET, "threads": 1,
                     "torch": torch.__version__, "torchcfm": torchcfm.__version__},
        "median": medians, "runs": runs, "ratios_genlab_over_torchcfm": ratios, "targets_met": targets,
    }


def format_table(results: dict) -> str:
    """The results as a fixed-width text table plus ratio lines."""
    s = results["settings"]
    cols = [f"W2@{n}" for n in s["nfes"]] + ["W2@dopri5", "dopri5 NFE", "steps/s", "best st/s"]
    lines = [f"{s['source']} -> {s['target']}: {s['steps']} steps, batch {s['batch']}, Adam lr {s['lr']:g}, "
             f"{s['threads']} CPU thread, device {s['device']}; W2 (exact, POT) on {s['n_eval']} samples; "
             f"torch {s['torch']}, torchcfm {s['torchcfm']}",
             f"{'method':16s} " + " ".join(f"{c:>10s}" for c in cols)]
    for name, m in results["median"].items():
        vals = [f"{m[f'euler_{n}']:10.4f}" for n in s["nfes"]]
        vals += [f"{m['dopri5']:10.4f}", f"{m['dopri5_nfe']:10.0f}", f"{m['steps_per_s']:10.1f}",
                 f"{m['steps_per_s_best']:10.1f}"]
        lines.append(f"{name:16s} " + " ".join(vals))
    r = results["ratios_genlab_over_torchcfm"]
    lines.append(f"(median of {s['repeats']} repeats; best st/s = fastest repeat)")
    lines.append("")
    for kind in ("OT-CFM", "I-CFM"):
        lines.append(f"{kind:7s} genlab/torchcfm: W2@2 ratio {r[f'{kind}_euler_2']:.3f} (<= 1 is better), "
                     f"steps/s ratio {r[f'{kind}_steps_per_s']:.3f} (>= 1 is better)")
    t = results["targets_met"]
    lines.append(f"targets: OT-CFM W2@2 no worse than torchcfm: {'yes' if t['ot_cfm_w2_at_2_no_worse'] else 'NO'}; "
                 f"OT-CFM steps/s at least torchcfm's: {'yes' if t['ot_cfm_throughput_at_least'] else 'NO'}, "
                 f"at least {OT_SPEEDUP_TARGET:g}x: {'yes' if t['ot_cfm_throughput_speedup'] else 'NO'}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> tuple[Settings, str]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=Settings.steps)
    p.add_argument("--batch", type=int, default=Settings.batch)
    p.add_argument("--lr", type=float, default=Settings.lr)
    p.add_argument("--seed", type=int, default=Settings.seed)
    p.add_argument("--repeats", type=int, default=Settings.repeats, help="trainings per method; medians are shown")
    p.add_argument("--n-eval", type=int, default=Settings.n_eval, help="samples for W2")
    p.add_argument("--device", default=Settings.device)
    p.add_argument("--out", default="", help="write the results as JSON here")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny steps, batch and evaluation")
    p.add_argument("--icfm-study", action="store_true",
                   help=f"instead of the table: I-CFM genlab vs torchcfm over --seeds seeds, W2@{STUDY_NFE} of the "
                        "final and the EMA weights, Mann-Whitney U test")
    p.add_argument("--seeds", type=int, default=10, help="seeds of --icfm-study")
    a = p.parse_args(argv)
    s = Settings(steps=a.steps, batch=a.batch, lr=a.lr, seed=a.seed, repeats=a.repeats, n_eval=a.n_eval,
                 device=a.device)
    if a.quick:
        s = replace(s, steps=20, batch=64, repeats=1, n_eval=200)
    return s, a.out, (a.seeds if a.icfm_study else 0)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark (or the I-CFM study), print the table, write JSON if --out is given; return the results."""
    s, out, study_seeds = parse_args(argv)
    if study_seeds:
        results = icfm_study(s, study_seeds)
        print(format_study(results))
    else:
        results = run(s)
        print(format_table(results))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
