"""``genlab vlm memory``: what full fine-tuning, LoRA and QLoRA cost in memory, measured.

    genlab vlm memory --model runs/vlm-shapes-caption/hf --modes full,lora,qlora

Each mode runs in a fresh Python process (``python -m genlab.vlm.memory --worker SPEC``), so no mode
sees another's freed-but-kept heap. A worker measures its resident set after the imports (the
baseline), loads the model (``hf_io.load_paligemma`` copies every tensor into owned memory: no
memory-mapped file pages stay resident), ``finetune.adapt``s it, builds torch AdamW on the trainable
parameters and runs ``steps`` steps of forward + backward + step on random inputs shaped like a
PaliGemma batch (image tokens, then ``seq_len`` text tokens carrying the labels). It reports the
weight bytes by dtype, the trainable parameters, the gradient and optimizer-state bytes and the peak.

Peak, on CPU: the kernel's resident-set high-water mark (``VmHWM`` in /proc/self/status, the number
``getrusage``'s ``ru_maxrss`` returns) minus the baseline. The kernel records the high-water mark
before it unmaps any page, so a transient that lives a few milliseconds (the logits of one backward
pass) is counted; a thread sampling /proc/self/statm would miss whatever rises and falls between two
samples. The mark is reset to the baseline through /proc/self/clear_refs where that is writable (so
the imports' own transients do not count); elsewhere the lifetime ``ru_maxrss`` is used. On CUDA:
``torch.cuda.max_memory_allocated`` (the allocator's live bytes; the baseline there is zero).
The peak covers loading and adapting as well as training (``load_peak_bytes`` / ``train_peak_bytes``
split it where the mark can be reset): a mode that needs the fp32 model alive while quantising it
pays for that too.

The parent writes memory.json, memory.md (ratios to full) and memory.png (stacked bars: weights,
gradients, optimizer state, the rest of the peak) into ``--out`` and prints the table.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from genlab.errors import GenlabError

MIB = 2**20


# glibc serves blocks under a threshold from its heap, which keeps freed memory resident (and raises the
# threshold to the largest block freed, up to 32 MiB, so a freed 4 MiB weight stays in the heap): the
# resident set then counts the allocator's cache, not what training holds. A fixed threshold makes every
# block of 128 KiB or more its own mapping, returned on free, so the peak is the memory in use.
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


class MemoryWorkerError(GenlabError):
    """A mode's measuring process failed (the message names the mode and the worker's last words)."""


@dataclass
class MemoryArgs:
    """Measure the memory of a training step of a PaliGemma in each fine-tuning mode (full, LoRA, QLoRA)."""

    model: str  # Hugging Face PaliGemma folder (config.json + safetensors), e.g. a genlab run's hf/ folder
    modes: tuple[str, ...] = ("full", "lora", "qlora")  # any of full, lora, qlora; a comma list works too
    batch_size: int = 4
    seq_len: int = 128  # text tokens after the image tokens (they carry the labels)
    steps: int = 3  # AdamW steps measured per mode
    r: int = 16  # LoRA rank (finetune.LoraSettings)
    alpha: int = 32  # LoRA alpha
    device: str = "auto"  # auto, cpu, cuda or cuda:N; auto = cuda when available
    out: str = ""  # folder for memory.json / .md / .png; "" = <run>/memory for a run's hf/ folder, else runs/vlm-memory
    threads: int = 0  # torch CPU threads in each worker; 0 = torch's default
    gradient_checkpointing: bool = False  # recompute the decoder layers' activations in the backward pass

    def mode_list(self) -> list[str]:
        """The modes asked for, in order, with comma lists split (``("full,lora",)`` -> full, lora)."""
        return [m.strip() for item in self.modes for m in str(item).split(",") if m.strip()]

    def out_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        model = Path(self.model)
        if model.name == "hf" and (model.parent / "config.yaml").is_file():  # a genlab run folder's model
            return model.parent / "memory"
        return Path("runs/vlm-memory")

    def checks(self) -> Iterable[tuple[str, bool, str]]:
        from genlab.config import folder_problem, non_negative, positive
        from genlab.train.distributed import device_problem
        from genlab.vlm.finetune import MODES

        modes = self.mode_list()
        unknown = [m for m in modes if m not in MODES]
        yield "modes", bool(modes) and not unknown, f"choose one or more of {','.join(MODES)}"
        yield "modes", len(set(modes)) == len(modes), "names a mode twice"
        yield from positive("batch_size", "seq_len", "steps", "r", "alpha", cfg=self)
        yield from non_negative("threads", cfg=self)
        yield "device", device_problem(self.device) is None, device_problem(self.device) or ""
        problem = folder_problem(self.out_dir())
        yield "out", problem is None, f"{self.out_dir()} {problem}"


# ----------------------------------------------------------------------------- measuring, in a worker

def _status_bytes(name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(name)


class PeakMeter:
    """Peak memory above a baseline taken at construction (see the module docstring for why the
    kernel's high-water mark, not a sampling thread)."""

    def __init__(self, device: Any):
        import torch

        self.cuda = device.type == "cuda"
        self.device = device
        gc.collect()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
            self.baseline = torch.cuda.memory_allocated(device)
            self.resettable = True
            return
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the kernel: the baseline is live memory
        except (OSError, AttributeError):
            pass
        self.resettable = self._reset()
        self.baseline = _status_bytes("VmRSS") if self.resettable else resource.getrusage(
            resource.RUSAGE_SELF).ru_maxrss * 1024

    def _reset(self) -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current resident set
            return True
        except OSError:
            return False

    def peak(self) -> int:
        """Bytes above the baseline at the highest point since the last ``restart`` (or construction)."""
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.baseline
        hwm = _status_bytes("VmHWM") if self.resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return hwm - self.baseline

    def restart(self) -> bool:
        """Start a new phase (the mark goes down to the current level); False where it cannot."""
        import torch

        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            return True
        return self.resettable and self._reset()


def random_batch(vocab: int, image_token_id: int, num_image_tokens: int, image_size: int, batch: int,
                 seq_len: int, device: Any, seed: int = 0) -> dict[str, Any]:
    """A PaliGemma training batch of random content: ``num_image_tokens`` image placeholders (prefix,
    token type 0), then ``seq_len`` text tokens (suffix, type 1) which are also the labels."""
    import torch

    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, vocab, (batch, seq_len), generator=g)  # (B, T), ids 0-2 are specials
    text[text == image_token_id] = 3
    ids = torch.cat([torch.full((batch, num_image_tokens), image_token_id), text], dim=1)  # (B, L)
    types = torch.cat([torch.zeros(batch, num_image_tokens, dtype=torch.long), torch.ones_like(text)], dim=1)
    labels = torch.where(types == 1, ids, torch.full_like(ids, -100))
    pixels = torch.randn(batch, 3, image_size, image_size, generator=g)  # (B, 3, S, S)
    out = dict(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=types, labels=labels,
               pixel_values=pixels)
    return {k: v.to(device) for k, v in out.items()}


def warm_up(device: Any, libraries: Iterable[str] = ()) -> None:
    """What a baseline should already hold: the ``libraries`` a mode imports (peft pulls in much of
    transformers, ~100 MiB) and the lazily initialised kernels, thread pools and JIT caches of a first
    forward / backward / AdamW step, paid here on a toy layer so that the peak counts the model alone."""
    import importlib
    import logging

    import torch
    import torch.nn.functional as F

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)  # no Hub kernel: fine
    for name in libraries:
        importlib.import_module(name)
    conv, emb = torch.nn.Conv2d(3, 64, 4, stride=4).to(device), torch.nn.Embedding(16, 64).to(device)
    norm, lin = torch.nn.LayerNorm(64).to(device), torch.nn.Linear(64, 64).to(device)
    opt = torch.optim.AdamW([*conv.parameters(), *emb.parameters(), *norm.parameters(), *lin.parameters()])
    img = conv(torch.randn(2, 3, 16, 16, device=device)).flatten(2).transpose(1, 2)  # (2, 16, 64)
    h = norm(torch.cat([img, emb(torch.zeros(2, 4, dtype=torch.long, device=device))], 1)).view(2, 20, 4, 16)
    h = F.scaled_dot_product_attention(*(h.transpose(1, 2),) * 3).transpose(1, 2).reshape(2, 20, 64)
    logits = lin(F.gelu(h, approximate="tanh")).reshape(-1, 64)
    F.cross_entropy(logits, torch.zeros(40, dtype=torch.long, device=device)).backward()
    opt.step()
    del conv, emb, norm, lin, opt, img, h, logits


def train_and_measure(model: Any, loss_fn: Callable[[Any, dict], Any], batch: dict, steps: int,
                      meter: PeakMeter, info: dict[str, Any]) -> dict[str, Any]:
    """``steps`` AdamW steps of ``loss_fn(model, batch)`` (each stack's own next-token cross-entropy on
    ``batch["labels"]``); returns ``info`` with the trainable parameters, weight bytes by dtype,
    gradient and optimizer-state bytes, peaks, step times."""
    import torch

    from genlab.vlm.finetune import parameter_report

    load_peak = meter.peak()
    split = meter.restart()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        if meter.cuda:
            torch.cuda.synchronize(meter.device)
        times.append(time.perf_counter() - t0)
    train_peak = meter.peak()
    report = parameter_report(model)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if torch.is_tensor(t) and t.dim() > 0)  # exp_avg, exp_avg_sq (the 0-d step counters aside)
    return {**info, "trainable_parameters": report["trainable_parameters"], "parameters": report["parameters"],
            "weight_bytes": report["weight_bytes"], "gradient_bytes": grads, "optimizer_state_bytes": state,
            "peak_bytes": max(load_peak, train_peak) if split else train_peak,
            "load_peak_bytes": load_peak, "train_peak_bytes": train_peak if split else None,
            "peak_kind": "cuda_max_allocated" if meter.cuda else ("VmHWM" if meter.resettable else "ru_maxrss"),
            "baseline_bytes": meter.baseline, "malloc_env": {k: os.environ.get(k) for k in WORKER_ENV},
            "step_seconds_median": statistics.median(times),
            "loss": float(loss.detach())}


def worker_setup(spec: dict[str, Any]) -> tuple[Any, Any]:
    """What every worker (genlab's and the benchmark's peer) does before its baseline: threads, device,
    the LoRA settings of the spec, and the warm-up that pulls in the libraries of its mode."""
    import torch

    from genlab.train.distributed import pick_device
    from genlab.vlm.finetune import LoraSettings

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = pick_device(spec["device"])
    warm_up(device, libraries=("peft", "bitsandbytes") if spec["mode"] != "full" else ())
    return device, LoraSettings(r=spec["r"], alpha=spec["alpha"])


def genlab_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One mode, measured (call in a fresh process: the baseline is this process's memory now)."""
    from genlab.vlm.finetune import QuantSettings, adapt
    from genlab.vlm.hf_io import load_paligemma
    from genlab.vlm.recipes import suffix_loss

    device, lora = worker_setup(spec)
    meter = PeakMeter(device)
    model, cfg = load_paligemma(spec["model"], device=device)
    model.language_model.gradient_checkpointing = spec.get("gradient_checkpointing", False)
    model = adapt(model, spec["mode"], lora, QuantSettings(), device)
    batch = random_batch(cfg.text.vocab_size, cfg.image_token_id, cfg.num_image_tokens, cfg.vision.image_size,
                         spec["batch_size"], spec["seq_len"], device)

    def loss(m, b):  # what `genlab vlm finetune` trains with
        return suffix_loss(m, b)[0]

    return train_and_measure(model, loss, batch, spec["steps"], meter,
                             {"impl": "genlab", "mode": spec["mode"], "device": str(device)})


# ----------------------------------------------------------------------------- the parent

def run_worker(target: str, spec: dict[str, Any], what: str) -> dict[str, Any]:
    """Run ``python -m target --worker SPEC`` (``python target ...`` for a .py path) in a fresh process
    and return its JSON result. A failure is one MemoryWorkerError line naming ``what`` (the worker's
    stderr in full with GENLAB_DEBUG=1)."""
    src = str(Path(__file__).resolve().parents[2])  # the folder holding the genlab package
    env = {**os.environ, **WORKER_ENV,
           "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)}
    with tempfile.TemporaryDirectory(prefix="genlab-memory-") as tmp:
        out = Path(tmp) / "result.json"
        proc = subprocess.run([sys.executable, *([target] if target.endswith(".py") else ["-m", target]), "--worker", json.dumps({**spec, "result": str(out)})],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0 or not out.is_file():
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            last = lines[-1] if lines else f"exit status {proc.returncode}, no message"
            detail = ("\n" + proc.stderr) if os.environ.get("GENLAB_DEBUG") else ""
            raise MemoryWorkerError(f"vlm memory: the {what} run failed (exit status {proc.returncode}): "
                                    f"{last}{detail}")
        return json.loads(out.read_text())


def worker_spec(args: MemoryArgs, mode: str) -> dict[str, Any]:
    return {"model": str(args.model), "mode": mode, "batch_size": args.batch_size, "seq_len": args.seq_len,
            "steps": args.steps, "r": args.r, "alpha": args.alpha, "device": args.device, "threads": args.threads,
            "gradient_checkpointing": args.gradient_checkpointing}


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table, one row per mode, with the peak's ratio to full fine-tuning's (if measured)."""
    full = next((r["peak_bytes"] for r in rows if r["mode"] == "full"), None)
    lines = ["| mode | weights MiB (by dtype) | trainable params | grads MiB | optimizer MiB | peak MiB | "
             "peak / full | step s |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        dtypes = ", ".join(f"{k} {v / MIB:.1f}" for k, v in sorted(r["weight_bytes"].items()))
        ratio = f"{r['peak_bytes'] / full:.2f}x" if full else "-"
        lines.append(f"| {r['mode']} | {dtypes} | {r['trainable_parameters']:,} | {r['gradient_bytes'] / MIB:.1f} | "
                     f"{r['optimizer_state_bytes'] / MIB:.1f} | {r['peak_bytes'] / MIB:.1f} | {ratio} | "
                     f"{r['step_seconds_median']:.3f} |")
    return "\n".join(lines) + "\n"


def plot_png(rows: list[dict[str, Any]], title: str) -> bytes:
    """A stacked bar per mode (MiB): weights, gradients, optimizer state and the rest of the peak
    (activations, transients, allocator slack); the bar's top is the measured peak."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(rows), 4))
    bottom = [0.0] * len(rows)
    parts = [("weights", lambda r: sum(r["weight_bytes"].values())), ("gradients", lambda r: r["gradient_bytes"]),
             ("optimizer state", lambda r: r["optimizer_state_bytes"])]
    names = [r["mode"] for r in rows]
    for label, get in parts:
        vals = [get(r) / MIB for r in rows]
        ax.bar(names, vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals)]
    rest = [max(r["peak_bytes"] / MIB - b, 0.0) for r, b in zip(rows, bottom)]
    ax.bar(names, rest, bottom=bottom, label="rest of peak", color="lightgray")
    for i, r in enumerate(rows):
        ax.text(i, max(bottom[i] + rest[i], r["peak_bytes"] / MIB), f"{r['peak_bytes'] / MIB:.0f}",
                ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("MiB")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def memory_cmd(args: MemoryArgs) -> dict[str, Any]:
    """Validate every flag and the model folder, then measure each mode in its own process; write
    memory.json / memory.md / memory.png atomically into the out folder, print the table and return
    the JSON document. A failing mode is one GenlabError line naming it."""
    from genlab.config import validate
    from genlab.errors import ConfigError
    from genlab.io import atomic_write_bytes, atomic_write_json, atomic_write_text
    from genlab.vlm.hf_io import read_config

    validate(args)
    cfg = read_config(args.model)  # a missing or broken folder fails here, before any worker starts
    length = cfg.num_image_tokens + args.seq_len
    if length > cfg.text.max_position_embeddings:
        raise ConfigError(f"--seq-len={args.seq_len}: {cfg.num_image_tokens} image tokens + {args.seq_len} text "
                          f"tokens exceed the model's {cfg.text.max_position_embeddings} positions")
    rows = [run_worker("genlab.vlm.memory", worker_spec(args, m), f"{m} mode") for m in args.mode_list()]
    doc = {"model": str(args.model), "settings": asdict(args) | {"modes": args.mode_list()}, "rows": rows}
    out = args.out_dir()
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(rows)
    atomic_write_json(out / "memory.json", doc)
    atomic_write_text(out / "memory.md", table)
    title = (f"peak memory of a training step ({rows[0]['device']}, batch {args.batch_size}, "
             f"{cfg.num_image_tokens}+{args.seq_len} tokens)")
    atomic_write_bytes(out / "memory.png", plot_png(rows, title))
    print(table, end="")
    print(f"written: {out / 'memory.json'}, memory.md, memory.png")
    return doc


def _main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "--worker":
        print("usage: python -m genlab.vlm.memory --worker SPEC_JSON (run by `genlab vlm memory`)", file=sys.stderr)
        return 2
    spec = json.loads(argv[1])
    from genlab.io import atomic_write_json

    try:
        atomic_write_json(spec["result"], genlab_worker(spec))
    except Exception as e:  # the parent shows the last stderr line: make it the one that explains
        if os.environ.get("GENLAB_DEBUG"):
            raise
        print(f"{type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
