"""genlab's Q-Former beside transformers' Blip2QFormerModel (training throughput of the query path), and
the quality of the whole BLIP-2 pipeline on the shapes world (Recall@K, CIDEr before / after).

    .venv/bin/python benchmarks/qformer.py --part throughput --threads 2 --out /tmp/qformer_throughput.json
    .venv/bin/python benchmarks/qformer.py --part throughput --quick            # tiny config (smoke)
    PYTHONPATH=src python3 benchmarks/qformer.py --part throughput --config blip2 --device cuda
    .venv/bin/python benchmarks/qformer.py --part quality --out /tmp/qformer_quality.json  # stages 0-2, ~30 min
    .venv/bin/python benchmarks/qformer.py --part throughput --profile 15        # + the top ops of each

``--part quality``: ``genlab vlm pretrain-siglip --config vlm/siglip-shapes`` (stage 0), ``genlab qformer
train --config qformer/shapes`` (stage 1) and ``genlab qformer train-lm --config qformer/shapes-smollm``
(stage 2, from stage 1 with ``--train.init-from``), in ``--runs``; prints minutes, Recall@K and the
caption / VQA figures before and after against the issue's targets.

``--part throughput``: one random genlab ``QFormer`` (every weight perturbed, LayerNorms and query tokens
included, so that a wrong key would show) and a transformers ``Blip2QFormerModel`` holding the same
weights (``qformer_state_for_hf``, loaded strictly), in one process. The step timed is what stage-1
training does to the image side: ``query_features(vision)`` in genlab, ``Blip2QFormerModel(
query_embeds=query tokens, encoder_hidden_states=vision)`` in transformers (its own copy of the query
tokens, a trainable parameter as in BLIP-2), a scalar loss (mean square of the last hidden states),
backward into every weight; the vision features are a frozen encoder's output (no gradient), as in
BLIP-2. Gradients are set to None before each step (as ``zero_grad`` does). Both models run in train
mode with dropout 0 (transformers' defaults would drop 10%; genlab has none).

Before timing, on fresh random inputs: max |difference| of the outputs and of the query tokens' gradient
(with the library's default attention, and the matrix-product FLOPs of one step counted by hand).
Timing: warm-up steps first, then ``--repeats`` rounds; in each round both implementations run one step,
in an order that flips every round, each on the next of three input sets (so no run reuses the
previous one's buffers); a CUDA step is bracketed by synchronisations. Medians.

Configs (hidden x layers, heads, MLP, cross-attention every k-th layer, queries; vision tokens x width;
batch): ``small`` (default, CPU-sized) 384 x 6, 12 heads, 1536, k=2, 32 queries; 64 x 128; B=8.
``blip2``: BLIP-2's Q-Former, 768 x 12, 12 heads, 3072, k=2, 32 queries, reading EVA ViT-g's
257 x 1408 features; B=8. ``tiny`` (``--quick``): 32 x 2, for the smoke test.
Printed: impl | median ms | samples/s | achieved GFLOP/s, and the speed ratio genlab / transformers
(transformers' median / genlab's: >= 1.0 means genlab is at least as fast), with the median of the
per-round ratios beside it (steadier when the machine's load drifts). On a shared CPU, use fewer
threads than idle cores: with more, OpenMP's threads wait on each other and a step can take 4x longer.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

# name: (hidden, layers, heads, MLP, cross-attention frequency, queries, vision tokens, vision width, batch)
CONFIGS = {
    "tiny": (32, 2, 4, 64, 2, 8, 10, 24, 2),
    "small": (384, 6, 12, 1536, 2, 32, 64, 128, 8),
    "blip2": (768, 12, 12, 3072, 2, 32, 257, 1408, 8),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def sizes(name: str, batch: int | None = None) -> dict[str, int]:
    D, n_layers, H, I, freq, Q, S, Dv, B = CONFIGS[name]
    return dict(hidden=D, layers=n_layers, heads=H, mlp=I, freq=freq, queries=Q, vision_tokens=S,
                vision_width=Dv, batch=batch or B)


def build_pair(s: dict[str, int], device: torch.device, dtype: torch.dtype, seed: int):
    """(genlab QFormer, transformers Blip2QFormerModel, transformers' query tokens) with identical
    weights, in train mode, on ``device`` in ``dtype``."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    from genlab.vlm.qformer import QFormer, QFormerConfig, qformer_state_for_hf

    common = dict(hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                  intermediate_size=s["mlp"], cross_attention_frequency=s["freq"],
                  encoder_hidden_size=s["vision_width"])
    torch.manual_seed(seed)
    ours = QFormer(QFormerConfig(**common, num_query_tokens=s["queries"]))
    with torch.no_grad():  # perturb everything (LayerNorm ones / zeros included): a swapped key would show
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    hf = Blip2QFormerModel(Blip2QFormerConfig(**common, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                              use_qformer_text_input=True))  # the text feed-forwards too, as genlab
    state = qformer_state_for_hf(ours)
    hf.load_state_dict({k[len("qformer."):]: v for k, v in state.items() if k.startswith("qformer.")}, strict=True)
    hf_query = torch.nn.Parameter(state["query_tokens"].clone().to(device, dtype))  # its own trainable copy
    return ours.to(device, dtype).train(), hf.to(device, dtype).train(), hf_query


class Step:
    """One training step of one implementation: grads to None, forward, loss, backward."""

    def __init__(self, name: str, params: list[torch.nn.Parameter], forward):
        self.name, self.params, self.forward = name, params, forward

    def __call__(self, vision: torch.Tensor) -> torch.Tensor:
        for p in self.params:
            p.grad = None
        out = self.forward(vision)  # (B, Q, D)
        out.float().square().mean().backward()
        return out


def make_steps(ours, hf, hf_query) -> list[Step]:
    def hf_forward(vision):
        return hf(query_embeds=hf_query.expand(vision.shape[0], -1, -1),
                  encoder_hidden_states=vision).last_hidden_state

    return [Step("genlab", list(ours.parameters()), ours.query_features),
            Step("transformers", [hf_query, *hf.parameters()], hf_forward)]


def vision_inputs(s: dict[str, int], n: int, device: torch.device, dtype: torch.dtype, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s["batch"], s["vision_tokens"], s["vision_width"], generator=g).to(device, dtype)
            for _ in range(n)]


def step_flops(s: dict[str, int]) -> dict[str, int]:
    """Matrix-product FLOPs of one step (forward + backward), counted by hand.

    Forward: 2 * rows * in * out per linear; attention 2 * 2 * B * H * L * S * Dh (scores and the
    weighted sum). Backward: twice the forward (input and weight gradients), except the cross-attention
    key / value projections, whose input (the frozen vision features) needs no gradient: once.
    """
    D, I, Q, B, S, Dv = s["hidden"], s["mlp"], s["queries"], s["batch"], s["vision_tokens"], s["vision_width"]
    rows = B * Q
    n_cross = sum(1 for i in range(s["layers"]) if i % s["freq"] == 0)
    self_layer = 2 * rows * (4 * D * D + 2 * D * I)  # q, k, v, o and the two feed-forward products
    self_attn = 2 * 2 * B * Q * Q * D
    cross_q_o = 2 * rows * 2 * D * D
    cross_kv = 2 * B * S * 2 * Dv * D
    cross_attn = 2 * 2 * B * Q * S * D
    forward = s["layers"] * (self_layer + self_attn) + n_cross * (cross_q_o + cross_kv + cross_attn)
    backward = 2 * forward - n_cross * cross_kv
    return {"forward": forward, "backward": backward, "total": forward + backward}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def matmul_rate(s: dict[str, int], device: torch.device, dtype: torch.dtype, reps: int = 5) -> float:
    """GFLOP/s of the step's largest product shape (the feed-forward up-projection), forward only:
    about the most a step made of such products could reach here."""
    a = torch.randn(s["batch"] * s["queries"], s["hidden"], device=device, dtype=dtype)
    w = torch.randn(s["mlp"], s["hidden"], device=device, dtype=dtype)
    n = max(1, int(2e9 // (2 * a.shape[0] * w.shape[0] * a.shape[1]))) if device.type == "cpu" else 200
    n = min(n, 200)
    torch.nn.functional.linear(a, w)
    times = [timed(lambda: [torch.nn.functional.linear(a, w) for _ in range(n)], device) for _ in range(reps)]
    return 2 * a.shape[0] * w.shape[0] * a.shape[1] * n / statistics.median(times) / 1e9


def agreement(steps: list[Step], hf_query, ours, s, device, dtype, seed) -> dict[str, float]:
    """Max |difference| of outputs and of the query tokens' gradient on fresh inputs (default attention)."""
    (vision,) = vision_inputs(s, 1, device, dtype, seed + 100)
    outs = [st(vision).detach().float() for st in steps]
    grads = [ours.query_tokens.grad.float(), hf_query.grad.float()]
    return {"max_abs_out_diff": (outs[0] - outs[1]).abs().max().item(),
            "max_abs_out": outs[1].abs().max().item(),
            "rel_out_diff": (torch.linalg.vector_norm(outs[0] - outs[1]) / torch.linalg.vector_norm(outs[1])).item(),
            "max_abs_grad_diff": (grads[0] - grads[1]).abs().max().item(),
            "max_abs_grad": grads[1].abs().max().item()}


def profile(steps: list[Step], inputs: list, device: torch.device, rows: int) -> dict[str, str]:
    """torch.profiler's table of the top ``rows`` ops (by self time) over 3 steps of each implementation."""
    from torch.profiler import ProfilerActivity, profile as prof

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    tables = {}
    for st in steps:
        with prof(activities=acts) as p:
            for x in inputs:
                st(x)
            sync(device)
        tables[st.name] = p.key_averages().table(sort_by=key, row_limit=rows)
        print(f"--- {st.name}: top {rows} ops over {len(inputs)} steps\n{tables[st.name]}", flush=True)
    return tables


def throughput_part(args: argparse.Namespace) -> dict[str, Any]:
    """Time forward + backward of both query paths; the table and a JSON document."""
    import transformers

    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    config = "tiny" if args.quick else args.config
    repeats = 3 if args.quick else args.repeats
    warmup = 1 if args.quick else args.warmup
    s = sizes(config, args.batch_size)
    ours, hf, hf_query = build_pair(s, device, dtype, args.seed)
    steps = make_steps(ours, hf, hf_query)
    doc: dict[str, Any] = {
        "part": "throughput", "config": config, "sizes": s, "device": args.device, "dtype": args.dtype,
        "threads": args.threads, "repeats": repeats, "warmup": warmup, "torch": torch.__version__,
        "transformers": transformers.__version__, "attn_implementation": hf.config._attn_implementation,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "flops": step_flops(s), "load_before": os.getloadavg()[0]}
    doc["agreement"] = agreement(steps, hf_query, ours, s, device, dtype, args.seed)
    # parameters a step trains (those that got a gradient): the same on both sides
    doc["trained_parameters"] = {st.name: sum(p.numel() for p in st.params if p.grad is not None) for st in steps}
    a = doc["agreement"]
    print(f"agreement (fresh inputs): max |out diff| {a['max_abs_out_diff']:.3g} (max |out| {a['max_abs_out']:.3g}, "
          f"rel {a['rel_out_diff']:.2g}); max |query-token grad diff| {a['max_abs_grad_diff']:.3g} "
          f"(max |grad| {a['max_abs_grad']:.3g})", flush=True)

    inputs = vision_inputs(s, 3, device, dtype, args.seed)
    for _ in range(warmup):  # first calls allocate and pick kernels
        for st in steps:
            st(inputs[0])
    times: dict[str, list[float]] = {st.name: [] for st in steps}
    for rep in range(repeats):
        for st in (steps if rep % 2 == 0 else steps[::-1]):
            x = inputs[rep % len(inputs)]
            times[st.name].append(timed(lambda: st(x), device))
    doc["matmul_gflops"] = matmul_rate(s, device, dtype)
    doc["rows"] = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        doc["rows"][name] = {"median_ms": 1e3 * med, "min_ms": 1e3 * min(ts), "max_ms": 1e3 * max(ts),
                             "samples_per_s": s["batch"] / med, "gflops": doc["flops"]["total"] / med / 1e9,
                             "times_ms": [1e3 * t for t in ts]}
    g, t = doc["rows"]["genlab"]["median_ms"], doc["rows"]["transformers"]["median_ms"]
    doc["speed_ratio"] = t / g  # genlab speed / transformers speed
    # the same ratio within each round (the two steps ran back to back), then the median: steadier
    # than the ratio of medians when the machine's load drifts during the run
    doc["paired_speed_ratio"] = statistics.median(
        b / a for a, b in zip(times["genlab"], times["transformers"]))
    doc["load_after"] = os.getloadavg()[0]
    if args.profile:
        doc["profile"] = profile(steps, inputs, device, args.profile)
    print(format_table(doc))
    if args.out:
        from genlab.io import atomic_write_json

        atomic_write_json(args.out, doc)
    return doc


def format_table(doc: dict[str, Any]) -> str:
    s = doc["sizes"]
    lines = [f"Q-Former query path, forward + backward, config {doc['config']}: {s['hidden']} x {s['layers']} layers, "
             f"{s['heads']} heads, MLP {s['mlp']}, cross-attention every {s['freq']}, {s['queries']} queries; "
             f"vision {s['vision_tokens']} x {s['vision_width']}; batch {s['batch']}",
             f"device {doc['device_name']}, {doc['dtype']}, {doc['threads']} threads, medians of {doc['repeats']} "
             f"interleaved repeats; torch {doc['torch']}, transformers {doc['transformers']} "
             f"(attn {doc['attn_implementation']}); {doc['flops']['total'] / 1e9:.4g} GFLOP per step (matrix products)",
             "",
             "| impl | median ms | samples/s | GFLOP/s | min ms | max ms |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in doc["rows"].items():
        lines.append(f"| {name} | {r['median_ms']:.2f} | {r['samples_per_s']:.1f} | {r['gflops']:.1f} | "
                     f"{r['min_ms']:.2f} | {r['max_ms']:.2f} |")
    a = doc["agreement"]
    lines += ["",
              f"speed genlab / transformers: {doc['speed_ratio']:.3f}x (target >= 1.0: "
              f"{'met' if doc['speed_ratio'] >= 1.0 else 'not met'}); median of the per-round ratios "
              f"{doc['paired_speed_ratio']:.3f}x",
              f"max |out diff| {a['max_abs_out_diff']:.3g}, max |query-token grad diff| {a['max_abs_grad_diff']:.3g}",
              f"one product of the step's largest shape alone: {doc['matmul_gflops']:.1f} GFLOP/s "
              f"(a ceiling for a step made of such products)",
              f"1-minute load average: {doc['load_before']:.2f} before, {doc['load_after']:.2f} after "
              f"({os.cpu_count()} CPUs)"]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=sorted(PARTS), default="throughput", help="which measurement to run")
    p.add_argument("--quick", action="store_true", help="tiny config, 3 repeats: a smoke test")
    p.add_argument("--config", choices=sorted(CONFIGS), default="small")
    p.add_argument("--batch-size", type=int, default=None, help="override the config's batch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="throughput: also print torch.profiler's top ROWS ops of each implementation")
    p.add_argument("--out", type=Path, default=None, help="write every number to this JSON file")
    p.add_argument("--runs", default="runs/bench-qformer", help="quality: the stages' run folders go here")
    p.add_argument("--stages", nargs="+", default=[s[0] for s in STAGES], choices=[s[0] for s in STAGES],
                   help="quality: which stages to run (a later stage reads the earlier ones' folders)")
    return p.parse_args(argv)


# The two-stage run of the issue's figures: (name, family, command, preset, extra flags given the run folders)
STAGES = (
    ("siglip", "vlm", "pretrain-siglip", "vlm/siglip-shapes", lambda runs: []),
    ("qformer", "qformer", "train", "qformer/shapes", lambda runs: ["--vision", str(runs / "siglip" / "vision")]),
    ("lm", "qformer", "train-lm", "qformer/shapes-smollm",
     lambda runs: ["--vision", str(runs / "siglip" / "vision"), "--train.init-from", str(runs / "qformer")]),
)


def quality_part(args: argparse.Namespace) -> dict[str, Any]:
    """Stage 0, 1 and 2 with their presets, one after the other (each a fresh run in ``--runs``):
    minutes per stage, Recall@K of stages 0 and 1 on the held-out images, stage 2's captioning
    metrics and VQA exact match before / after; against the issue's targets."""
    import json

    from genlab.cli import main as genlab

    runs = Path(args.runs)
    doc: dict[str, Any] = {"part": "quality", "runs": str(runs), "stages": {}, "torch": torch.__version__}
    for name, family, command, preset, extra in STAGES:
        if name not in args.stages:
            continue
        flags = [family, command, "--config", preset, "--run-dir", str(runs / name), "--overwrite", *extra(runs)]
        print("genlab " + " ".join(flags), flush=True)
        t0 = time.perf_counter()
        if genlab(flags) != 0:
            raise SystemExit(f"stage {name} failed")
        report = json.loads((runs / name / "eval.json").read_text())
        doc["stages"][name] = {"minutes": (time.perf_counter() - t0) / 60, "command": "genlab " + " ".join(flags),
                               "eval": report}
    doc["minutes"] = sum(s["minutes"] for s in doc["stages"].values())
    print(format_quality(doc))
    if args.out:
        from genlab.io import atomic_write_json

        atomic_write_json(args.out, doc)
    return doc


def format_quality(doc: dict[str, Any]) -> str:
    lines = ["| stage | minutes | figures |", "|---|---:|---|"]
    for name, st in doc["stages"].items():
        r = st["eval"]
        if name in ("siglip", "qformer"):
            figs = ", ".join(f"{k} {r[k]:.3f}" for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"))
            figs += f" ({r['n_images']} images, {r['n_texts']} captions)"
        else:
            figs = "; ".join(f"{side}: " + ", ".join(f"{k} {v:.3f}" for k, v in (r.get(side) or {}).items()
                                                     if isinstance(v, (int, float)))
                             for side in ("before", "after"))
        lines.append(f"| {name} | {st['minutes']:.1f} | {figs} |")
    lines.append(f"total {doc['minutes']:.1f} minutes (target: stages 1 + 2 under 30)")
    if "qformer" in doc["stages"]:
        r = doc["stages"]["qformer"]["eval"]
        lines.append(f"stage 1 Recall@1 image->text {r['i2t_r1']:.3f} (target >= 0.5), Recall@5 {r['i2t_r5']:.3f} "
                     f"(target >= 0.8)")
    if "lm" in doc["stages"]:
        r = doc["stages"]["lm"]["eval"]
        before, after = (r.get("before") or {}).get("cider"), (r.get("after") or {}).get("cider")
        if before is not None and after is not None:
            ratio = after / before if before else float("inf")
            lines.append(f"stage 2 CIDEr {before:.3f} before, {after:.3f} after: {ratio:.2f}x (target >= 2x)")
    return "\n".join(lines)


PARTS = {"throughput": throughput_part, "quality": quality_part}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    return PARTS[args.part](args)


if __name__ == "__main__":
    main(sys.argv[1:])
