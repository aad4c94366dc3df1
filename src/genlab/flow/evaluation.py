"""Evaluation of a 2-D flow: W2 / MMD against the target at several NFEs, NLL, straightness, pictures."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from genlab.data.toy2d import has_log_prob, sample_toy2d, toy2d_log_prob
from genlab.eval.distances import mmd, wasserstein2
from genlab.eval.trajectories import normalized_path_energy, straightness
from genlab.flow import plots
from genlab.flow.likelihood import bits_per_dim, log_likelihood
from genlab.flow.solvers import solve_ode
from genlab.train.run import write_report


def evaluate_toy2d(model, cfg, run_dir: str | Path, step: int, final: bool = True, seed: int = 1234,
                   weights: str = "", verbose: bool = False) -> dict:
    """Periodic call: W2 at the largest NFE and a sample picture. Final call: the full report.

    Full report (run_dir/eval.json and PNGs): W2 and MMD at each Euler NFE in cfg.eval.nfes and with the
    adaptive solver, path straightness and normalized path energy of the finest Euler trajectory, NLL
    in bits/dim of target samples (when the source density is known), samples / trajectories / density /
    W2-vs-NFE pictures. ``weights`` (e.g. "ema") is recorded in the report; ``verbose`` prints each
    phase (the adaptive solves and the likelihoods take a while).
    """
    def say(what: str) -> None:
        if verbose:
            print(f"genlab: eval: {what}", file=sys.stderr, flush=True)

    run_dir = Path(run_dir)
    ev = cfg.eval
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)  # CPU generator: the same points whatever the device
    x0 = sample_toy2d(cfg.data.source, ev.n_samples, generator=g).to(device)  # (N, 2)
    target = sample_toy2d(cfg.data.target, ev.n_samples, generator=g).to(device)  # (N, 2)
    finest = max(ev.nfes)
    if not final:
        res = solve_ode(model, x0, method="euler", steps=finest)
        plots.plot_samples(res.x, target, run_dir / "samples.png", title=f"step {step}, Euler NFE {finest}")
        return {f"w2_euler_nfe{finest}": wasserstein2(res.x, target)}  # the final report's key, for best/

    report: dict[str, Any] = {"step": step, "weights": weights, "solvers": []}
    say(f"Euler at NFE {', '.join(map(str, sorted(ev.nfes)))} on {ev.n_samples} samples")
    for nfe in sorted(ev.nfes):
        res = solve_ode(model, x0, method="euler", steps=nfe, return_trajectory=nfe == finest)
        report["solvers"].append({"solver": "euler", "nfe": res.nfe, "w2": wasserstein2(res.x, target),
                                  "mmd": mmd(res.x, target)})
        if nfe == finest:
            traj, times, samples = res.trajectory, res.times, res.x
    if ev.adaptive:
        say(f"{ev.adaptive} (adaptive, atol=rtol=1e-5)")
        res = solve_ode(model, x0, method=ev.adaptive, atol=1e-5, rtol=1e-5)
        report["solvers"].append({"solver": ev.adaptive, "nfe": res.nfe, "w2": wasserstein2(res.x, target),
                                  "mmd": mmd(res.x, target)})
    report["straightness"] = float(straightness(traj, times))
    report["normalized_path_energy"] = float(normalized_path_energy(traj, times))
    report["w2_source_target"] = wasserstein2(x0, target)

    plots.plot_samples(samples, target, run_dir / "samples.png", title=f"Euler NFE {finest}")
    plots.plot_trajectories(traj, run_dir / "trajectories.png", n=min(1000, ev.n_samples),
                            title=f"{cfg.data.source} -> {cfg.data.target}")
    euler = [r for r in report["solvers"] if r["solver"] == "euler"]
    plots.plot_nfe_curve([r["nfe"] for r in euler], [r["w2"] for r in euler], run_dir / "w2_vs_nfe.png",
                         reference=report["w2_source_target"])

    if has_log_prob(cfg.data.source) and (ev.nll_samples or ev.density_resolution):
        src_lp = lambda x: toy2d_log_prob(cfg.data.source, x)  # noqa: E731
        if ev.nll_samples:
            say(f"NLL of {ev.nll_samples} target samples (dopri5, exact divergence)")
            lp = log_likelihood(model, target[: ev.nll_samples], src_lp, method="dopri5", atol=1e-5, rtol=1e-5)
            report["nll_bits_per_dim"] = float(bits_per_dim(lp, 2).mean())
        if ev.density_resolution:
            say(f"density on a {ev.density_resolution}x{ev.density_resolution} grid (dopri5)")
            lo, hi = target.min(0).values - 1.0, target.max(0).values + 1.0
            extent = (lo[0].item(), hi[0].item(), lo[1].item(), hi[1].item())
            grid_lp = lambda pts: log_likelihood(model, pts.to(device), src_lp, method="dopri5",  # noqa: E731
                                                 atol=1e-4, rtol=1e-4).cpu()  # grid points come on the CPU
            plots.plot_density(grid_lp,
                               extent, run_dir / "density.png", resolution=ev.density_resolution,
                               title="model density (CNF change of variables)")
    write_report(run_dir, report)
    flat = {f"w2_{r['solver']}_nfe{r['nfe']}": r["w2"] for r in report["solvers"]}
    flat.update({k: v for k, v in report.items() if isinstance(v, float)})
    return flat
