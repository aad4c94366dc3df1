"""genlab's DiT beside diffusers' DiTTransformer2DModel on class-conditional image flow matching.

    .venv/bin/python benchmarks/flow_images.py --part throughput                 # CPU, ~1-2 minutes
    .venv/bin/python benchmarks/flow_images.py --part throughput --quick         # smoke run, seconds
    .venv/bin/python benchmarks/flow_images.py --part quality --threads 1        # the digits figures, ~30 min
    python benchmarks/flow_images.py --part throughput --device cuda --dtype bf16   # DiT-B, GPU

Part "throughput": training steps per second of the two models at the same shape (width, depth,
heads, patch, input size, classes; diffusers with norm_type "ada_norm_zero", its DiT). A step is
the same for both: x_t = (1 - t) x0 + t x1 on one fixed batch, forward, MSE to x1 - x0, backward,
AdamW step, with 10% of the labels replaced by the null class (diffusers does that inside its
label embedding in train mode; genlab calls ``DiT.drop_labels``). diffusers' DiT takes integer-
scale timesteps, so it gets 1000 t, the scale genlab's DiT applies inside. Where the two differ by
construction: diffusers gives every block its own timestep MLP and class table (and recomputes the
condition for the output layer), genlab computes one condition per sample and shares it, so
diffusers has more parameters; per token the matmuls are the same.

Part "quality": the digits presets (pixel DiT with CFG, MeanFlow, the VQ-VAE latent DiT) trained
and evaluated with genlab's offline judge: class accuracy per CFG scale and the NFE table.

Both models are warmed up, then timed in pairs: each repeat times ``--steps`` steps of each model,
in an order that alternates from one repeat to the next (the machine may be shared and noisy).
Printed: the median steps/s of each, the ratio genlab / diffusers of the medians and the median
of the per-pair ratios, images/s, and the parameter counts. Model FLOPs per image and step
(forward + backward = 3 x forward) are counted analytically:
    6 * P_mm * N  +  12 * depth * N^2 * hidden,
where N = (image / patch)^2 tokens and P_mm = depth * (4 + 2 * mlp_ratio) * hidden^2 + 2 * C p^2
hidden are the weights every token goes through (q, k, v, out, the MLP, patch embedding and output
layer; per-sample conditioning MLPs are left out: they see one vector, not N tokens); the second
term is q k^T and attention x v. Model FLOPs utilisation = FLOPs/image * images/s / peak
(``--peak-tflops``, default 989: H100/H200 dense bf16), printed on CUDA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from genlab.flow.models.dit import DiT, DiTConfig

CPU_SHAPE = dict(hidden=384, depth=6, heads=6, patch=2, image_size=32, channels=3, classes=10, batch=16)
CUDA_SHAPE = dict(hidden=768, depth=12, heads=12, patch=2, image_size=32, channels=3, classes=10, batch=128)  # DiT-B
QUICK_SHAPE = dict(hidden=32, depth=2, heads=2, patch=2, image_size=8, channels=3, classes=4, batch=4)


@dataclass(frozen=True)
class Shape:
    hidden: int
    depth: int
    heads: int
    patch: int
    image_size: int
    channels: int
    classes: int
    batch: int
    mlp_ratio: float = 4.0


def model_flops_per_image(s: Shape) -> float:
    """Matmul FLOPs of one training step (forward + backward) per image; see the module docstring."""
    n = (s.image_size // s.patch) ** 2
    p_mm = s.depth * (4 + 2 * s.mlp_ratio) * s.hidden**2 + 2 * s.channels * s.patch**2 * s.hidden
    return 6 * p_mm * n + 12 * s.depth * n**2 * s.hidden


def build_genlab(s: Shape) -> torch.nn.Module:
    cfg = DiTConfig(hidden=s.hidden, depth=s.depth, heads=s.heads, patch=s.patch, mlp_ratio=s.mlp_ratio)
    return DiT.from_config(cfg, channels=s.channels, image_size=s.image_size, num_classes=s.classes)


def build_diffusers(s: Shape) -> torch.nn.Module:
    from diffusers import DiTTransformer2DModel  # installed for this benchmark only

    return DiTTransformer2DModel(
        num_attention_heads=s.heads, attention_head_dim=s.hidden // s.heads, in_channels=s.channels,
        out_channels=s.channels, num_layers=s.depth, sample_size=s.image_size, patch_size=s.patch,
        num_embeds_ada_norm=s.classes, norm_type="ada_norm_zero", activation_fn="gelu-approximate",
        attention_bias=True, dropout=0.0,
    )


def make_step(library: str, model: torch.nn.Module, batch: dict, autocast):
    """One training step as a closure: forward, MSE to the straight-line velocity, backward, AdamW."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    x_t, t, y, target = batch["x_t"], batch["t"], batch["y"], batch["target"]

    def step() -> None:
        with autocast():
            if library == "genlab":
                v = model(x_t, t, model.drop_labels(y, 0.1))
            else:  # integer-scale timesteps; label dropout happens inside, in train mode
                v = model(x_t, timestep=t * 1000.0, class_labels=y, return_dict=False)[0]
            loss = F.mse_loss(v.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(args) -> dict:
    """Time training steps of both models (paired, interleaved); print and return the figures."""
    shape = Shape(**{k: getattr(args, k) for k in CPU_SHAPE})
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    bf16 = args.dtype == "bf16"
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext

    g = torch.Generator().manual_seed(args.seed)
    B, C, H = shape.batch, shape.channels, shape.image_size
    x0, x1 = torch.randn(B, C, H, H, generator=g), torch.randn(B, C, H, H, generator=g)
    t = torch.rand(B, generator=g)
    tb = t[:, None, None, None]
    batch = {"x_t": (1 - tb) * x0 + tb * x1, "t": t, "target": x1 - x0,
             "y": torch.randint(0, shape.classes, (B,), generator=g)}
    batch = {k: v.to(device) for k, v in batch.items()}

    torch.manual_seed(args.seed)
    models = {"genlab": build_genlab(shape).to(device).train(), "diffusers": build_diffusers(shape).to(device).train()}
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    steps = {k: make_step(k, m, batch, autocast) for k, m in models.items()}

    for step in steps.values():
        for _ in range(args.warmup):
            step()
    _sync(device)

    rates: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(args.repeats):
        order = list(steps) if r % 2 == 0 else list(steps)[::-1]
        for name in order:
            _sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                steps[name]()
            _sync(device)
            rates[name].append(args.steps / (time.perf_counter() - start))

    med = {k: statistics.median(v) for k, v in rates.items()}
    pair_ratios = [a / b for a, b in zip(rates["genlab"], rates["diffusers"])]
    flops = model_flops_per_image(shape)
    results = {
        "settings": {**asdict(shape), "device": args.device, "dtype": args.dtype, "threads": args.threads,
                     "warmup": args.warmup, "repeats": args.repeats, "steps": args.steps, "seed": args.seed},
        "params": params,
        "steps_per_s": rates,
        "median_steps_per_s": med,
        "images_per_s": {k: v * B for k, v in med.items()},
        "ratio_of_medians": med["genlab"] / med["diffusers"],
        "median_pair_ratio": statistics.median(pair_ratios),
        "model_flops_per_image": flops,
        "achieved_tflops": {k: flops * v * B / 1e12 for k, v in med.items()},
    }
    if device.type == "cuda":
        results["mfu"] = {k: flops * v * B / (args.peak_tflops * 1e12) for k, v in med.items()}
    print(format_throughput(results, args.peak_tflops))
    return results


def format_throughput(res: dict, peak_tflops: float) -> str:
    s = res["settings"]
    lines = [
        f"throughput: hidden {s['hidden']}, depth {s['depth']}, heads {s['heads']}, patch {s['patch']}, "
        f"{s['channels']}x{s['image_size']}x{s['image_size']}, {s['classes']} classes, batch {s['batch']}, "
        f"{s['device']} {s['dtype']}" + (f", {s['threads']} threads" if s["device"] == "cpu" else ""),
        f"{s['warmup']} warm-up steps, {s['repeats']} paired repeats of {s['steps']} steps; "
        f"model FLOPs/image/step {res['model_flops_per_image'] / 1e9:.3f} G",
        f"{'model':<10} {'params':>12} {'steps/s':>9} {'images/s':>10} {'TFLOP/s':>9}"
        + ("    MFU" if "mfu" in res else ""),
    ]
    for k in ("genlab", "diffusers"):
        row = (f"{k:<10} {res['params'][k]:>12,} {res['median_steps_per_s'][k]:>9.3f} "
               f"{res['images_per_s'][k]:>10.1f} {res['achieved_tflops'][k]:>9.3f}")
        if "mfu" in res:
            row += f" {100 * res['mfu'][k]:>5.1f}%"
        lines.append(row)
    lines.append(f"genlab/diffusers steps/s: {res['ratio_of_medians']:.3f} (ratio of medians), "
                 f"{res['median_pair_ratio']:.3f} (median of paired ratios)")
    if "mfu" in res:
        lines.append(f"MFU against a peak of {peak_tflops:g} TFLOP/s")
    return "\n".join(lines)


def quality(args) -> dict:
    """The digits figures: train the flow/digits, flow/digits-meanflow and (after flow/vqvae-digits)
    flow/digits-latent presets into ``--runs``, evaluate each, print accuracy per CFG scale, the
    NFE table and the training minutes. Runs already finished there are read (their eval.json), not retrained."""
    from dataclasses import replace

    from genlab.config import load_config
    from genlab.flow.images import ImageFlowConfig
    from genlab.flow.images import train as train_images
    from genlab.flow.vqvae import VQVAERunConfig
    from genlab.flow.vqvae import train as train_vqvae

    runs = Path(args.runs)
    results: dict = {}

    def timed(fn, cfg) -> tuple[Path, float | None]:
        """Train (or finish) the run; the minutes when it trained here, None when it had finished."""
        done = (Path(cfg.run_dir) / "eval.json").is_file()
        t0 = time.perf_counter()
        run = fn(cfg, resume=(Path(cfg.run_dir) / "config.yaml").is_file())
        return run, None if done else time.perf_counter() - t0

    def tiny(cfg):
        if not args.quick:
            return cfg
        train = replace(cfg.train, steps=4, batch_size=8, progress=False)
        out = replace(cfg, train=train)
        if hasattr(out, "eval"):
            out = replace(out, eval=replace(out.eval, samples_per_class=2, nfes=(1,), fd_samples=10,
                                            classifier=replace(out.eval.classifier, steps=3)),
                          sampling=replace(out.sampling, num_steps=2, grid_every=0))
        return out

    vq_cfg = tiny(replace(load_config(VQVAERunConfig, "flow/vqvae-digits"), run_dir=str(runs / "vqvae-digits")))
    for name in ("digits", "digits-meanflow", "digits-latent"):
        cfg = tiny(replace(load_config(ImageFlowConfig, f"flow/{name}"), run_dir=str(runs / name)))
        cfg = replace(cfg, train=replace(cfg.train, threads=args.threads, progress=not args.quick))
        if cfg.latent.vqvae:
            vq_run, vq_secs = timed(train_vqvae, vq_cfg)
            results["vqvae_minutes"] = vq_secs and round(vq_secs / 60, 2)
            cfg = replace(cfg, latent=replace(cfg.latent, vqvae=str(vq_run)))
        run, secs = timed(train_images, cfg)
        report = json.loads((run / "eval.json").read_text())
        results[name] = {"minutes": secs and round(secs / 60, 2), "by_cfg_scale": report["by_cfg_scale"],
                         "nfe_table": report["nfe_table"], "classifier_fd": report["classifier_fd"],
                         "classifier_test_accuracy": report["classifier"]["test_accuracy"]}
    print(format_quality(results))
    return results


def format_quality(res: dict) -> str:
    lines = ["run              minutes  CFG scale: accuracy ...                classifier FD"]
    for name in ("digits", "digits-meanflow", "digits-latent"):
        r = res[name]
        accs = "  ".join(f"{x['cfg_scale']:g}: {x['accuracy']:.3f}" for x in r["by_cfg_scale"])
        minutes = "earlier" if r["minutes"] is None else f"{r['minutes']:.2f}"
        lines.append(f"{name:<16} {minutes:>7}  {accs:<40} {r['classifier_fd']:.3f}")
    lines.append("NFE table (forwards per image, class accuracy, classifier FD):")
    for name in ("digits", "digits-meanflow", "digits-latent"):
        for x in res[name]["nfe_table"]:
            lines.append(f"  {name:<16} {x['solver']:<9} steps {x['steps']:>3}  forwards {x['forwards']:>3}  "
                         f"accuracy {x['accuracy']:.3f}  FD {x['classifier_fd']:.3f}")
    return "\n".join(lines)


PARTS = {"throughput": throughput, "quality": quality}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=sorted(PARTS), default="throughput")
    for k in CPU_SHAPE:
        p.add_argument(f"--{k.replace('_', '-')}", type=int, default=None,
                       help=f"default {CPU_SHAPE[k]} on CPU, {CUDA_SHAPE[k]} on CUDA")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast, fp32 weights")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per model (default 2, CUDA 10)")
    p.add_argument("--repeats", type=int, default=5, help="paired timed repeats")
    p.add_argument("--steps", type=int, default=None, help="steps per timed repeat (default 2, CUDA 20)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="peak bf16 dense TFLOP/s, for MFU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="write the results as JSON here")
    p.add_argument("--quick", action="store_true", help="smoke test: a tiny model, a few steps")
    p.add_argument("--runs", default="runs/bench-flow-images", help="quality: where the preset runs go")
    a = p.parse_args(argv)
    cuda = a.device.startswith("cuda")
    preset = QUICK_SHAPE if a.quick else CUDA_SHAPE if cuda else CPU_SHAPE
    for k, v in preset.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.warmup is None:
        a.warmup = 1 if a.quick else 10 if cuda else 2
    if a.steps is None:
        a.steps = 2 if a.quick else 20 if cuda else 2
    if a.quick:
        a.repeats = min(a.repeats, 2)
    return a


def main(argv: list[str] | None = None) -> dict:
    """Run the chosen part, print its table, write JSON if --out is given; return the results."""
    args = parse_args(argv)
    results = PARTS[args.part](args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"part": args.part, **results}, indent=2))
    return results


if __name__ == "__main__":
    main()
