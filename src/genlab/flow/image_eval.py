"""Sampling and offline evaluation of image flows: class grids, class accuracy per CFG scale, a
Frechet distance on a small classifier's features, the NFE table, and the real Inception FID when
the user has the weights on disk.

The classifier is trained on the real training set once per run (cached in ``<run>/classifier``);
the Frechet distance on its features is NOT the Inception FID (different features, other numbers).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

from genlab.data.images import load_images
from genlab.flow.guidance import CFGModel
from genlab.flow.solvers import solve_ode
from genlab.train.run import write_report


def _sample_model(model, x0: torch.Tensor, y: torch.Tensor, cfg, scale: float, steps: int, solver: str):
    """One batch: (x1, forwards per image). MeanFlow models jump with their average velocity
    (guidance is trained in); flow-matching models integrate the guided velocity."""
    if cfg.objective.kind == "meanflow":
        from genlab.flow.meanflow import meanflow_sample

        return meanflow_sample(model, x0, steps, y=y), steps
    guided = CFGModel(model, y, scale)
    res = solve_ode(guided, x0, method=solver, steps=steps)
    return res.x, res.nfe * guided.forwards_per_call


@torch.no_grad()
def generate(model, cfg, space, labels: torch.Tensor, scale: float | None = None, steps: int | None = None,
             solver: str | None = None, seed: int = 0, batch: int | None = None) -> tuple[torch.Tensor, int, float]:
    """uint8 images (N, C, H, W) of the classes ``labels`` (N,) (-1 = unconditional), the forwards per
    image and the seconds taken. The noise comes from a CPU generator seeded by ``seed``: the same
    images on any device."""
    scale = cfg.sampling.cfg_scale if scale is None else scale
    steps = steps or cfg.sampling.num_steps
    solver = solver or cfg.sampling.solver
    batch = batch or cfg.eval.batch_size
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(len(labels), *space.shape, generator=g)  # (N, *shape)
    # -1 = the null class: its guided velocity is v_u + s (v_u - v_u) = v_u, unconditional at any scale
    y_all = torch.where(labels < 0, torch.full_like(labels, model.null_class), labels)
    out, forwards, t0 = [], 0, time.perf_counter()
    for i in range(0, len(labels), batch):
        x, forwards = _sample_model(model, x0[i:i + batch].to(device), y_all[i:i + batch].to(device), cfg,
                                    scale, steps, solver)
        out.append(space.decode(x))
    return torch.cat(out), forwards, time.perf_counter() - t0


def class_grid_labels(num_classes: int, per_class: int) -> torch.Tensor:
    return torch.arange(num_classes).repeat_interleave(per_class)  # (K * per_class,): one row per class


def write_class_grid(model, cfg, space, classes: list[str], path: Path, per_class: int | None = None,
                     **kw) -> Path:
    from genlab.flow.plots import save_image_grid

    per_class = per_class or cfg.sampling.grid_per_class
    images, _, _ = generate(model, cfg, space, class_grid_labels(len(classes), per_class), **kw)
    return save_image_grid(images, path, nrow=per_class, row_labels=classes)


def evaluate_images(model, cfg, space, run_dir: str | Path, step: int, final: bool = True,
                    weights: str = "ema", verbose: bool = False) -> dict[str, Any]:
    """Periodic call: class accuracy at the sampling scale on a few samples. Final call: the report
    (eval.json): accuracy per CFG scale and per class, classifier-feature FD, the NFE table, the
    Inception FID row, and the pictures (samples.png class grid, accuracy.png)."""
    from genlab.eval.classifier import accuracy_by_class, cached_classifier, predict
    from genlab.eval.plots import plot_accuracy_by_scale
    from genlab.eval.fid import classifier_fd, inception_fid

    def say(what: str) -> None:
        if verbose:
            print(f"genlab: eval: {what}", file=sys.stderr, flush=True)

    run_dir, ev = Path(run_dir), cfg.eval
    device = next(model.parameters()).device
    train_set, test_set = load_images(cfg.data, "train"), load_images(cfg.data, "test")
    k = train_set.num_classes
    say("the judge: a small CNN on the real training set (cached in the run folder)")
    clf, clf_info = cached_classifier(run_dir / "classifier", train_set, test_set, ev.classifier, device=device)
    meanflow = cfg.objective.kind == "meanflow"

    def accuracy(images: torch.Tensor, labels: torch.Tensor) -> tuple[float, list[float]]:
        return accuracy_by_class(predict(clf, images), labels, k)

    def fd(real: torch.Tensor, fake: torch.Tensor) -> float | None:  # None: too few images for covariances
        return classifier_fd(clf, real, fake) if min(len(real), len(fake)) >= 2 else None

    if not final:
        labels = class_grid_labels(k, min(ev.samples_per_class, 20))
        images, _, _ = generate(model, cfg, space, labels, seed=step)
        return {"accuracy": accuracy(images, labels)[0]}

    report: dict[str, Any] = {"step": step, "weights": weights, "objective": cfg.objective.kind,
                              "space": "latent" if space.vqvae is not None else "pixels",
                              "classifier": clf_info, "by_cfg_scale": [], "nfe_table": []}
    labels = class_grid_labels(k, ev.samples_per_class)
    # accuracy per CFG scale (MeanFlow samples with its built-in guidance: one row at the run's steps)
    per_class: dict[float, list[float]] = {}
    for scale in ((cfg.objective.meanflow_cfg,) if meanflow else ev.cfg_scales):
        say(f"{len(labels)} samples at CFG scale {scale}")
        images, forwards, secs = generate(model, cfg, space, labels, scale=scale, seed=1)
        acc, by_class = accuracy(images, labels)
        per_class[float(scale)] = by_class
        report["by_cfg_scale"].append({"cfg_scale": scale, "accuracy": acc, "per_class": by_class,
                                       "steps": cfg.sampling.num_steps, "forwards": forwards, "seconds": secs})
    plot_accuracy_by_scale({s: r["accuracy"] for s, r in zip(per_class, report["by_cfg_scale"])}, per_class,
                           run_dir / "accuracy.png")
    # the NFE table at the sampling scale
    from genlab.flow.solvers import STAGES

    budget = max(ev.nfes, default=0)
    rows = ([("meanflow", n) for n in ev.nfes if n <= 4] if meanflow else
            [(s, n) for s in ev.solvers for n in ev.nfes if STAGES.get(s, 1) * n <= budget or n == min(ev.nfes)])
    for solver, n in rows:
        say(f"NFE table: {solver} with {n} steps")
        images, forwards, secs = generate(model, cfg, space, labels, steps=n, solver=None if meanflow else solver,
                                          seed=2)
        report["nfe_table"].append({"solver": solver, "steps": n, "forwards": forwards,
                                    "accuracy": accuracy(images, labels)[0],
                                    "classifier_fd": fd(test_set.images, images), "seconds": secs})
    # distances to the real test images, at the run's sampling settings
    n_fd = min(ev.fd_samples, len(test_set.labels))
    real = test_set.images[:n_fd]
    fake, _, _ = generate(model, cfg, space, test_set.labels[:n_fd], seed=3)
    report["classifier_fd"] = fd(real, fake)
    # a reference scale: two halves of the real test set (the judge saw the training images, so
    # train-vs-test features would be biased); its smaller samples make it a rough floor
    half = n_fd // 2
    report["classifier_fd_test_halves"] = fd(real[:half], real[half:2 * half])
    fid, why = inception_fid(real, fake, ev.fid_weights)
    report["inception_fid"] = fid if fid is not None else why
    grid_path = run_dir / "samples.png"
    write_class_grid(model, cfg, space, train_set.classes, grid_path, seed=0)
    report["pictures"] = ["samples.png", "accuracy.png", "loss.png"]
    write_report(run_dir, report)
    by_scale = {f"accuracy_cfg{r['cfg_scale']:g}": r["accuracy"] for r in report["by_cfg_scale"]}
    fd_metric = {} if report["classifier_fd"] is None else {"classifier_fd": report["classifier_fd"]}
    return {**by_scale, **fd_metric}
