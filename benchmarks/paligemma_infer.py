"""genlab's PaliGemma beside transformers' PaliGemmaForConditionalGeneration: inference speed.

    .venv/bin/python benchmarks/paligemma_infer.py                        # mid config, CPU, fp32, 2 threads
    .venv/bin/python benchmarks/paligemma_infer.py --config tiny --new-tokens 2 --batch-sizes 1
    PYTHONPATH=src python3 benchmarks/paligemma_infer.py --device cuda --dtype bfloat16 --batch-sizes 1 4 32
    .venv/bin/python benchmarks/paligemma_infer.py --compile             # genlab's decode step via torch.compile

One transformers model is built from a config (random weights, seeded), saved to a temporary
folder and read back by ``genlab.vlm.hf_io.load_paligemma``: both models hold the same weights.
Both get the same inputs: ``B`` copies of one fixed prompt (256 image tokens at 224 px, <bos>,
15 text tokens; no padding) with a different random image per row, and ``token_type_ids`` of
zeros, so both use the bidirectional prefix mask.

What is measured, per batch size (timings are medians over ``--repeats``; genlab and
transformers alternate within each repeat, in an order that flips every repeat):

* prefill: one forward over image + prompt into an empty KV cache, logits of the last position
  only (what generation needs).
* first token: inside a ``generate(N)`` call, the time from the call to the end of its first
  forward (set-up + prefill), marked by a forward hook on the model.
* decode, measured directly in the same calls: the time from that mark to the return of
  ``generate``, which covers the N - 1 decode forwards and the token choices; decode step ms is
  that over N - 1 and decode tok/s = B * (N - 1) / that. Greedy, EOS disabled (transformers:
  ``min_new_tokens=N``; genlab: ``eos_token_id=-1``), so both produce N tokens per row.
* peak memory of one generate(N) call above what was allocated before it: on CUDA
  ``torch.cuda.max_memory_allocated``; on CPU the process resident-set high-water mark
  (VmHWM, reset through /proc/self/clear_refs) minus the resident set before the call, after
  ``gc.collect()`` and glibc ``malloc_trim(0)``. Page-granular, includes allocator slack.
* on CPU, a floor: one decode step's matrix products alone, called one by one from Python (all
  weights read once; timed three times in every repeat). Reading the weights is most of a step,
  so transformers' step / floor is about the most any decoder using the same matrix kernels on
  the same weights can gain (a compiled step, free of the ~2 us of dispatch per product, can come
  in just under the floor).
* max |logit difference| of the full prefill logits (all prompt positions, batch 1), and whether
  the greedy tokens are identical.

On CUDA it also measures the memory bandwidth (a device-to-device copy, 2 * bytes / time) and
reports decode against the bandwidth bound: each decode step reads the language model's weights
(and LM head) once plus each row's KV cache; the vision tower runs only at prefill and is left out.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers as hf

from genlab.vlm.generation import generate
from genlab.vlm.hf_io import load_paligemma

TEXT_TOKENS = 15  # prompt text after <bos>
BOS, EOS, PAD = 2, 1, 0
# (SigLIP layers, width, heads, MLP, image size, patch), (Gemma layers, width, heads, KV heads, head dim, MLP, vocab)
CONFIGS = {
    "tiny": ((2, 64, 4, 128, 32, 8), (3, 64, 4, 1, 16, 128, 300)),
    "mid": ((6, 384, 6, 1536, 224, 14), (6, 512, 8, 1, 64, 2048, 32000)),
    # PaliGemma-3B-224's real shapes (SigLIP So400m + Gemma 2B), for GPU runs: 2.9 B parameters
    "3b": ((27, 1152, 16, 4304, 224, 14), (18, 2048, 8, 1, 256, 16384, 257216)),
}
SPEC_BANDWIDTH_GBS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0}  # HBM, vendor data sheets


def hf_config(name: str) -> hf.PaliGemmaConfig:
    (vl, vd, vh, vi, size, patch), (tl, td, th, tkv, thd, ti, vocab) = CONFIGS[name]
    vision = hf.SiglipVisionConfig(hidden_size=vd, intermediate_size=vi, num_hidden_layers=vl,
                                   num_attention_heads=vh, image_size=size, patch_size=patch, vision_use_head=False)
    text = hf.GemmaConfig(vocab_size=vocab, hidden_size=td, intermediate_size=ti, num_hidden_layers=tl,
                          num_attention_heads=th, num_key_value_heads=tkv, head_dim=thd,
                          bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=True)
    return hf.PaliGemmaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                              image_token_index=vocab - 1, projection_dim=td, hidden_size=td,
                              vocab_size=vocab, tie_word_embeddings=True)


def build_pair(name: str, dtype: torch.dtype, device: torch.device, seed: int):
    """(transformers model, genlab model) with identical weights, both in eval mode."""
    hf.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    with torch.device(device):
        ref = hf.PaliGemmaForConditionalGeneration._from_config(hf_config(name), dtype=dtype).eval()
    with tempfile.TemporaryDirectory() as folder:
        ref.save_pretrained(folder)
        model, _ = load_paligemma(folder, dtype=dtype, device=device)
    return ref, model


def make_inputs(cfg: hf.PaliGemmaConfig, batch: int, dtype: torch.dtype, device: torch.device) -> dict:
    """``batch`` copies of one fixed prompt, a different random image per row (seeded)."""
    g = torch.Generator().manual_seed(1234)
    size = cfg.vision_config.image_size
    n_image = (size // cfg.vision_config.patch_size) ** 2  # one token per SigLIP patch
    text = torch.randint(3, cfg.image_token_id, (TEXT_TOKENS,), generator=g)
    ids = torch.cat([torch.full((n_image,), cfg.image_token_id), torch.tensor([BOS]), text]).repeat(batch, 1)
    pixels = torch.randn(batch, 3, size, size, generator=g)
    return dict(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                token_type_ids=torch.zeros_like(ids).to(device), pixel_values=pixels.to(device, dtype))


class Runner:
    """The three calls we time, for one library: prefill, generate(n), full prompt logits."""

    def __init__(self, name: str, model, is_hf: bool, compile: bool = False):
        self.name, self.model, self.is_hf, self.compile = name, model, is_hf, compile

    @torch.inference_mode()
    def prefill(self, x: dict, max_new: int) -> torch.Tensor:
        if self.is_hf:
            return self.model(**x, use_cache=True, logits_to_keep=1).logits
        cache = self.model.new_cache(x["input_ids"].shape[0], x["input_ids"].shape[1] + max_new)
        return self.model(x["input_ids"], x["pixel_values"], x["attention_mask"], x["token_type_ids"],
                          cache=cache, num_logits_to_keep=1)

    @torch.inference_mode()
    def generate(self, x: dict, n: int) -> torch.Tensor:
        if self.is_hf:
            out = self.model.generate(**x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=PAD)
            return out[:, x["input_ids"].shape[1]:]
        return generate(self.model, x["input_ids"], x["attention_mask"], x["pixel_values"], max_new_tokens=n,
                        eos_token_id=-1, token_type_ids=x["token_type_ids"], compile=self.compile)

    @torch.inference_mode()
    def full_logits(self, x: dict) -> torch.Tensor:
        if self.is_hf:
            return self.model(**x).logits
        return self.model(x["input_ids"], x["pixel_values"], x["attention_mask"], x["token_type_ids"])


# ----------------------------------------------------------------------------- timing and memory
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_memory_mib(fn, device: torch.device) -> float:
    """Peak memory of ``fn()`` above what was in use before it, MiB (NaN where it cannot be read)."""
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so the baseline is live memory
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        before = _status_kib("VmRSS")
    except (OSError, AttributeError):  # not Linux / not glibc
        return math.nan
    fn()
    return (_status_kib("VmHWM") - before) / 1024


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 2 * 2**30, reps: int = 20) -> float:
    """Device memory bandwidth from a device-to-device copy: 2 * bytes (read + write) / time."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(times) / 1e9


def decode_bytes(model, batch: int, context: float) -> tuple[int, int]:
    """(weight bytes, KV-cache bytes) one decode step must read: the language model with its
    (tied) LM head, and every row's cached keys and values at ``context`` tokens."""
    lm = model.language_model  # the embedding lookup reads B rows only; the head reads its whole matrix
    head = lm.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    weights = sum(p.numel() * p.element_size() for n, p in lm.named_parameters() if not n.startswith("embed_tokens"))
    weights += head.numel() * head.element_size()
    t, el = model.config.text, model.language_model.embed_tokens.weight.element_size()
    kv = int(2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * el * context * batch)
    return weights, kv


def graph_step_ms(model, x: dict, device: torch.device, replays: int = 50) -> float:
    """GPU time of one genlab decode step replayed from a CUDA graph, i.e. without Python and launch
    overhead. Every replay redoes the same step (same cache slot): a timing probe, not generation."""
    B, P = x["input_ids"].shape
    with torch.inference_mode():
        cache = model.new_cache(B, P + 4)
        model(x["input_ids"], x["pixel_values"], x["attention_mask"], x["token_type_ids"], cache=cache,
              num_logits_to_keep=1)
        token = torch.full((B, 1), 5, dtype=torch.long, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graph asks
            for _ in range(2):
                model(token, cache=cache)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(token, cache=cache)
        graph.replay()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(replays):
            graph.replay()
        sync(device)
    return 1e3 * (time.perf_counter() - t0) / replays


def matmul_floor(model, batch: int):
    """CPU: (step, bytes) where ``step()`` runs one decode step's matrix products alone: every weight
    matrix of the language model and the (tied) LM head applied once to a (batch, in) input. A decode
    step that runs these same kernels cannot be much faster than ``step``."""
    lm = model.language_model
    mats = [m.weight for m in lm.modules() if isinstance(m, torch.nn.Linear)]
    mats.append(lm.embed_tokens.weight if model.lm_head is None else model.lm_head.weight)
    inputs = [torch.randn(batch, w.shape[1], dtype=w.dtype) for w in mats]

    @torch.inference_mode()
    def step():
        for h, w in zip(inputs, mats):
            F.linear(h, w)

    return step, sum(w.numel() * w.element_size() for w in mats)


# ----------------------------------------------------------------------------- the benchmark
def timed_generate(r: Runner, x: dict, n: int, device: torch.device) -> tuple[float, float]:
    """(seconds to the first logits, seconds after them) of one generate call. A forward hook marks
    the end of the first forward (the prefill); the rest is the N - 1 decode steps and token picks."""
    marks = []

    def mark(*_):
        if not marks:
            sync(device)
            marks.append(time.perf_counter())

    hook = r.model.register_forward_hook(mark)
    try:
        sync(device)
        t0 = time.perf_counter()
        r.generate(x, n)
        sync(device)
        t1 = time.perf_counter()
    finally:
        hook.remove()
    return marks[0] - t0, t1 - marks[0]


def bench_batch(runners: list[Runner], x: dict, n: int, repeats: int, device: torch.device,
                floor=None) -> dict:
    """Timings (medians), memory and token agreement for one batch size; ``floor`` (optional) is
    timed three times in each repeat too, so that it sees the same machine load."""
    warmup = {}
    for r in runners:  # warm-up: first calls allocate, pick kernels, fill caches (and compile)
        r.prefill(x, n)
        warmup[r.name] = timed(lambda: r.generate(x, n), device)
    times = {r.name: {"prefill": [], "first": [], "decode": []} for r in runners}
    floor_times = []
    for rep in range(repeats):
        if floor is not None:
            floor_times += [timed(floor, device) for _ in range(3)]
        for r in (runners if rep % 2 == 0 else runners[::-1]):
            times[r.name]["prefill"].append(timed(lambda: r.prefill(x, n), device))
            first, decode = timed_generate(r, x, n, device)
            times[r.name]["first"].append(first)
            times[r.name]["decode"].append(decode)
    B = x["input_ids"].shape[0]
    out, tokens = {}, {}
    for r in runners:
        med = {k: statistics.median(v) for k, v in times[r.name].items()}
        tokens[r.name] = r.generate(x, n)
        out[r.name] = {"prefill_ms": 1e3 * med["prefill"], "first_token_ms": 1e3 * med["first"],
                       "decode_tok_s": B * (n - 1) / med["decode"] if n > 1 else math.nan,
                       "decode_step_ms": 1e3 * med["decode"] / (n - 1) if n > 1 else math.nan,
                       "peak_mib": peak_memory_mib(lambda: r.generate(x, n), device)}
    a, b = (tokens[r.name] for r in runners)
    out["tokens_identical"] = bool(a.shape == b.shape and torch.equal(a, b))
    out["tokens_shape"] = list(a.shape)
    out["warmup_generate_s"] = warmup
    if floor_times:
        out["matmul_floor_ms"] = 1e3 * statistics.median(floor_times)
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="mid")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--graph-probe", action="store_true",
                   help="CUDA only: also time one genlab decode step replayed from a CUDA graph")
    p.add_argument("--compile", action="store_true", help="genlab decodes with generate(..., compile=True)")
    p.add_argument("--out", type=Path, default=None, help="write all numbers to this JSON file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    ref, model = build_pair(args.config, dtype, device, args.seed)
    runners = [Runner("genlab", model, False, args.compile), Runner("transformers", ref, True)]
    result = {"config": args.config, "device": args.device, "dtype": args.dtype, "threads": args.threads,
              "compile": args.compile,
              "new_tokens": args.new_tokens, "repeats": args.repeats, "torch": torch.__version__,
              "transformers": hf.__version__, "attn_implementation": ref.config._attn_implementation,
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    result["load_before"] = os.getloadavg()[0]  # the machine may be shared: say how busy it was
    x1 = make_inputs(ref.config, 1, dtype, device)
    result["prompt_tokens"] = x1["input_ids"].shape[1]
    with torch.inference_mode():
        want, got = runners[1].full_logits(x1).float(), runners[0].full_logits(x1).float()
    result["max_abs_logit_diff"] = (got - want).abs().max().item()
    result["max_abs_logit"] = want.abs().max().item()
    del want, got
    if device.type == "cuda":
        result["bandwidth_gbs"] = copy_bandwidth_gbs(device)
        result["spec_bandwidth_gbs"] = next((v for k, v in SPEC_BANDWIDTH_GBS.items()
                                             if k in result["device_name"]), math.nan)
    result["batches"] = {}
    for B in args.batch_sizes:
        x = x1 if B == 1 else make_inputs(ref.config, B, dtype, device)
        floor, floor_bytes = matmul_floor(model, B) if device.type == "cpu" else (None, 0)
        res = bench_batch(runners, x, args.new_tokens, args.repeats, device, floor)
        if device.type == "cuda":  # mean context length over the N - 1 decode steps
            context = result["prompt_tokens"] + args.new_tokens / 2
            weights, kv = decode_bytes(model, B, context)
            res["decode_weight_bytes"], res["decode_kv_bytes"] = weights, kv
            res["bound_tok_s"] = B * result["bandwidth_gbs"] * 1e9 / (weights + kv)
            for name in ("genlab", "transformers"):
                res[name]["bound_fraction"] = res[name]["decode_tok_s"] / res["bound_tok_s"]
            if args.graph_probe:
                try:
                    res["graph_step_ms"] = graph_step_ms(model, x, device)
                except Exception as e:  # a probe: report why it failed, keep the benchmark's numbers
                    res["graph_step_error"] = f"{type(e).__name__}: {e}"
        else:
            res["matmul_bytes"] = floor_bytes
        result["batches"][B] = res
    result["load_after"] = os.getloadavg()[0]
    print(format_table(result))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_table(res: dict) -> str:
    (vl, vd, *_), (tl, td, th, tkv, *_rest) = CONFIGS[res["config"]]
    mem = "CUDA max_memory_allocated" if res["device"] == "cuda" else "RSS high-water-mark delta"
    lines = [f"PaliGemma inference, config {res['config']}: SigLIP {vl} x {vd}, Gemma {tl} x {td} "
             f"({th} heads / {tkv} KV), vocab {CONFIGS[res['config']][1][-1]}; prompt {res['prompt_tokens']} tokens",
             f"device {res['device_name']}, {res['dtype']}, threads {res['threads']}, "
             f"{res['new_tokens']} new tokens, medians of {res['repeats']} repeats; torch {res['torch']}, "
             f"transformers {res['transformers']} (attn {res['attn_implementation']})"
             + (", genlab decode step torch.compile'd" if res.get("compile") else ""),
             f"{'':32s}{'genlab':>12s}{'transformers':>14s}{'genlab/tf':>11s}"]
    rows = [("prefill ms", "prefill_ms"), ("first token ms", "first_token_ms"),
            ("decode step ms", "decode_step_ms"), ("decode tok/s", "decode_tok_s"),
            (f"peak MiB ({mem.split()[0]})", "peak_mib")]
    if res["device"] == "cuda":
        rows.append(("decode / bandwidth bound", "bound_fraction"))
    for B, b in res["batches"].items():
        for label, key in rows:
            g, t = b["genlab"][key], b["transformers"][key]
            lines.append(f"batch {B:<3d} {label:<22s}{g:12.4g}{t:14.4g}{g / t if t else math.nan:11.3f}")
        lines.append(f"batch {B:<3d} greedy tokens identical: {b['tokens_identical']} {tuple(b['tokens_shape'])}")
        lines.append(f"batch {B:<3d} first generate call (warm-up, includes any compile) s: "
                     + ", ".join(f"{k} {v:.2f}" for k, v in b["warmup_generate_s"].items()))
    lines.append(f"max |logit diff| (batch 1, all prompt positions): {res['max_abs_logit_diff']:.3g} "
                 f"(max |logit| {res['max_abs_logit']:.3g})")
    lines.append(f"peak memory: {mem} during one generate call, above what was in use before it")
    for B, b in res["batches"].items():
        if "matmul_floor_ms" in b:
            tf = b["transformers"]["decode_step_ms"]
            lines.append(f"CPU floor at batch {B}: the decode step's matrix products alone take "
                         f"{b['matmul_floor_ms']:.2f} ms ({b['matmul_bytes'] / 1e6:.1f} MB of weights, "
                         f"{b['matmul_bytes'] / b['matmul_floor_ms'] / 1e6:.1f} GB/s); with transformers' step at "
                         f"{tf:.2f} ms, transformers' step / floor = {tf / b['matmul_floor_ms']:.2f}")
    lines.append(f"1-minute load average: {res['load_before']:.2f} before, {res['load_after']:.2f} after "
                 f"({os.cpu_count()} CPUs)")
    if res["device"] == "cuda":
        lines.append(f"bandwidth: measured {res['bandwidth_gbs']:.0f} GB/s (device-to-device copy, "
                     f"2 * bytes / time), data sheet {res['spec_bandwidth_gbs']:.0f} GB/s")
        for B, b in res["batches"].items():
            lines.append(f"bound at batch {B}: (weights {b['decode_weight_bytes'] / 1e6:.1f} MB + KV "
                         f"{b['decode_kv_bytes'] / 1e6:.2f} MB) per step -> {b['bound_tok_s']:.4g} tok/s")
            if "graph_step_ms" in b:
                tok_s = B * 1e3 / b["graph_step_ms"]
                lines.append(f"  genlab decode step replayed from a CUDA graph: {b['graph_step_ms']:.3f} ms -> "
                             f"{tok_s:.4g} tok/s = {tok_s / b['bound_tok_s']:.3f} of the bound")
            elif "graph_step_error" in b:
                lines.append(f"  CUDA-graph probe failed: {b['graph_step_error']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
