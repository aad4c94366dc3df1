"""VQA fine-tuning of PaliGemma with genlab beside the transformers + peft + bitsandbytes stack.

    .venv/bin/python benchmarks/vqa.py --part memory --out /tmp/vqa_memory.json   # ~300M config, CPU, 2 threads
    .venv/bin/python benchmarks/vqa.py --part memory --quick                      # tiny config, 1 step (smoke)
    .venv/bin/python benchmarks/vqa.py --part quality --out /tmp/vqa_quality.json  # the embedded default, CPU
    PYTHONPATH=src python3 benchmarks/vqa.py --part memory --device cuda

``--part memory``: one random PaliGemma-architecture model is written as a Hugging Face folder in a
temporary directory (default config: a 6-layer SigLIP of width 384 at 112 px, 49 image tokens, and an
18-layer Gemma of width 640 with PaliGemma's 257,216-token vocabulary, ~275M parameters, shaped like
the random 271.9M Gemma of the issue's peer figures). For each mode (full, LoRA, QLoRA) genlab's
worker (``genlab.vlm.memory``: ``hf_io.load_paligemma`` + ``finetune.adapt``, trained with the
recipe's ``suffix_loss``) and the peer's (``model(..., labels=...).loss``) run in fresh processes,
with the same inputs, the same steps and the same measuring code
(``genlab.vlm.memory.PeakMeter`` / ``train_and_measure``). The peer is
``PaliGemmaForConditionalGeneration.from_pretrained`` on the same folder (its defaults: safetensors
read through a memory map); LoRA is ``peft.get_peft_model`` with genlab's r / alpha / dropout / target
layers; QLoRA loads with ``BitsAndBytesConfig(load_in_4bit, nf4, double quant, compute dtype fp32 on
CPU / bf16 on CUDA)`` and the vision tower, projector and head kept out of quantisation, as genlab
does, so that both stacks quantise the same layers. No gradient checkpointing on either side.
Printed: mode | genlab peak MiB | peer peak MiB | genlab/peer | ratio to full (genlab) | (peer).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from genlab.vlm.memory import MIB, PeakMeter, random_batch, run_worker, train_and_measure, worker_setup

MODES = ("full", "lora", "qlora")
# (SigLIP layers, width, heads, MLP, image size, patch), (Gemma layers, width, heads, KV heads, head dim, MLP, vocab)
CONFIGS = {
    "tiny": ((2, 96, 4, 192, 32, 8), (2, 128, 4, 1, 32, 256, 320)),
    # ~275M: a SigLIP-S-like tower at 112 px (49 image tokens) and a Gemma-270M-like decoder with
    # PaliGemma's 257,216-token vocabulary (the embedding is 60% of the parameters, as in the issue's
    # peer figures for a random 271.9M Gemma)
    "300m": ((6, 384, 6, 1536, 112, 16), (18, 640, 4, 1, 256, 2048, 257216)),
}


def write_model(name: str, folder: Path) -> int:
    """A random genlab PaliGemma of config ``name`` saved as a Hugging Face folder; its parameter count."""
    import torch

    from genlab.vlm.gemma import GemmaConfig
    from genlab.vlm.hf_io import save_paligemma
    from genlab.vlm.paligemma import PaliGemma, PaliGemmaConfig
    from genlab.vlm.recipes import init_weights
    from genlab.vlm.siglip import SiglipConfig

    (vl, vd, vh, vi, size, patch), (tl, td, th, tkv, thd, ti, vocab) = CONFIGS[name]
    vision = SiglipConfig(hidden_size=vd, intermediate_size=vi, num_hidden_layers=vl, num_attention_heads=vh,
                          image_size=size, patch_size=patch)
    text = GemmaConfig(vocab_size=vocab, hidden_size=td, intermediate_size=ti, num_hidden_layers=tl,
                       num_attention_heads=th, num_key_value_heads=tkv, head_dim=thd, max_position_embeddings=512)
    cfg = PaliGemmaConfig(vision=vision, text=text, image_token_id=vocab - 1).validate()
    torch.manual_seed(0)
    model = PaliGemma(cfg)
    init_weights(model, 0.02)
    save_paligemma(model, cfg, folder)
    return sum(p.numel() for p in model.parameters())


def peer_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One mode with transformers + peft (+ bitsandbytes), measured like genlab's worker."""
    import torch
    import transformers as hf

    from genlab.vlm.finetune import target_pattern

    device, lora = worker_setup(spec)
    hf.PaliGemmaForConditionalGeneration, hf.BitsAndBytesConfig  # transformers' lazy imports: before the baseline
    meter = PeakMeter(device)
    kw: dict[str, Any] = {"dtype": torch.float32, "device_map": {"": str(device)}}
    if spec["mode"] == "qlora":
        kw["quantization_config"] = hf.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
            llm_int8_skip_modules=["model.vision_tower", "model.multi_modal_projector", "lm_head"])
    model = hf.PaliGemmaForConditionalGeneration.from_pretrained(spec["model"], **kw)
    if spec.get("gradient_checkpointing"):  # the decoder's layers, as genlab's option does
        model.model.language_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    for name, p in model.named_parameters():  # genlab's default: vision tower and projector frozen
        if "vision_tower" in name or "multi_modal_projector" in name:
            p.requires_grad_(False)
    if spec["mode"] != "full":
        import peft

        config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                                 target_modules=r"(?:.*\.)?" + target_pattern(lora.targets))
        model = peft.get_peft_model(model, config)
    cfg = model.config
    text, vision = cfg.text_config, cfg.vision_config
    batch = random_batch(text.vocab_size, cfg.image_token_index, (vision.image_size // vision.patch_size) ** 2,
                         vision.image_size, spec["batch_size"], spec["seq_len"], device)

    def loss(m, b):  # transformers' own shifted cross-entropy on the labels
        return m(input_ids=b["input_ids"], pixel_values=b["pixel_values"], attention_mask=b["attention_mask"],
                 token_type_ids=b["token_type_ids"], labels=b["labels"]).loss

    return train_and_measure(model, loss, batch, spec["steps"], meter,
                             {"impl": "peer", "mode": spec["mode"], "device": str(device)})


def memory_part(args: argparse.Namespace) -> dict[str, Any]:
    """genlab and the peer in every mode on one random model; the table and a JSON document."""
    config, steps = ("tiny", 1) if args.quick else (args.config, args.steps)
    with tempfile.TemporaryDirectory(prefix="genlab-vqa-memory-") as tmp:
        folder = Path(tmp) / "hf"
        n = write_model(config, folder)
        print(f"config {config}: {n / 1e6:.1f}M parameters; batch {args.batch_size}, {args.seq_len} text tokens, "
              f"{steps} AdamW steps, {args.threads} threads, device {args.device}", flush=True)
        spec = {"model": str(folder), "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": steps,
                "r": args.r, "alpha": args.alpha, "device": args.device, "threads": args.threads,
                "gradient_checkpointing": args.gradient_checkpointing}
        rows: dict[str, dict[str, Any]] = {}
        for mode in args.modes:
            for impl, module in (("genlab", "genlab.vlm.memory"), ("peer", None)):
                if impl not in args.impls:
                    continue
                s = {**spec, "mode": mode}
                rows[f"{impl}/{mode}"] = (run_worker(module, s, f"genlab {mode}") if module
                                          else run_script(s, f"peer {mode}"))
                r = rows[f"{impl}/{mode}"]
                print(f"  {impl:6s} {mode:5s} peak {r['peak_bytes'] / MIB:8.1f} MiB  trainable "
                      f"{r['trainable_parameters']:,}  step {r['step_seconds_median']:.2f} s", flush=True)
    doc = {"config": config, "parameters": n, "settings": {**spec, "modes": list(args.modes), "impls": args.impls},
           "rows": rows}
    print(format_table(doc))
    if args.out:
        from genlab.io import atomic_write_json

        atomic_write_json(args.out, doc)
    return doc


def run_script(spec: dict[str, Any], what: str) -> dict[str, Any]:
    """This script's peer worker in a fresh process (the same runner as genlab's workers)."""
    return run_worker(str(Path(__file__).resolve()), spec, what)


def format_table(doc: dict[str, Any]) -> str:
    rows = doc["rows"]
    lines = ["| mode | genlab peak MiB | peer peak MiB | genlab/peer | ratio to full (genlab) | ratio to full (peer) |",
             "|---|---:|---:|---:|---:|---:|"]
    full = {impl: rows.get(f"{impl}/full", {}).get("peak_bytes") for impl in ("genlab", "peer")}
    for mode in doc["settings"]["modes"]:
        g, p = (rows.get(f"{impl}/{mode}", {}).get("peak_bytes") for impl in ("genlab", "peer"))
        cell = lambda b: "-" if b is None else f"{b / MIB:.1f}"  # noqa: E731  (a stack not measured)
        ratio = lambda b, f: f"{b / f:.2f}x" if b and f else "-"  # noqa: E731
        lines.append(f"| {mode} | {cell(g)} | {cell(p)} | {f'{g / p:.2f}' if g and p else '-'} | "
                     f"{ratio(g, full['genlab'])} | {ratio(p, full['peer'])} |")
    return "\n".join(lines)


def quality_part(args: argparse.Namespace) -> dict[str, Any]:
    """The embedded default end to end: the caption base (``vlm/shapes-caption``, or ``--base``), then
    ``vlm finetune`` with the ``vlm/vqa-<mode>`` preset for each mode, each timed; exact match and ROUGE
    before / after from each run's report.json."""
    import subprocess
    import time

    runs = Path(args.runs)
    quick = ["--train.steps", "2", "--data.world-train", "8", "--data.world-val", "4", "--data.max-val", "8"] \
        if args.quick else []
    cli = [sys.executable, "-m", "genlab"]

    def genlab(*argv: str) -> float:
        t0 = time.perf_counter()
        subprocess.run([*cli, *argv, "--train.no-progress"], check=True)
        return time.perf_counter() - t0

    base = Path(args.base) if args.base else runs / "base"
    doc: dict[str, Any] = {"base": str(base), "rows": {}}
    if not args.base:
        doc["base_seconds"] = genlab("vlm", "train", "--config", "vlm/shapes-caption", "--run-dir", str(base),
                                     "--overwrite", *(["--train.steps", "2", "--eval.n", "4", "--eval.grid", "4"] if args.quick else []))
    for mode in args.modes:
        run = runs / mode
        seconds = genlab("vlm", "finetune", "--config", f"vlm/vqa-{mode}", "--model", str(base / "hf"),
                         "--run-dir", str(run), "--overwrite", *quick)
        report = json.loads((run / "report.json").read_text())
        doc["rows"][mode] = {"seconds": seconds, "before": report["before"], "after": report["after"]}
    print(format_quality(doc))
    if args.out:
        from genlab.io import atomic_write_json

        atomic_write_json(args.out, doc)
    return doc


def format_quality(doc: dict[str, Any]) -> str:
    lines = ["| mode | minutes | exact match before | after | after / before | ROUGE-L F1 after | per family after |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for mode, r in doc["rows"].items():
        b, a = r["before"]["accuracy"] if r["before"] else None, r["after"]["accuracy"]
        ratio = "-" if b is None else ("inf" if b == 0 else f"{a / b:.1f}x")
        fams = ", ".join(f"{k} {v['accuracy']:.2f}" for k, v in r["after"]["per_family"].items())
        rl = r["after"]["rouge"]["rougeL"]["f1"]
        lines.append(f"| {mode} | {r['seconds'] / 60:.1f} | {b if b is None else f'{b:.3f}'} | {a:.3f} | {ratio} | "
                     f"{rl:.3f} | {fams} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["memory", "quality"], default="memory", help="which measurement to run")
    p.add_argument("--quick", action="store_true", help="tiny config, 1 step: a smoke test")
    p.add_argument("--config", choices=sorted(CONFIGS), default="300m")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128, help="text tokens after the image tokens")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--impls", nargs="+", choices=["genlab", "peer"], default=["genlab", "peer"],
                   help="memory: which stacks to measure")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="memory: recompute the decoder layers' activations in the backward pass (both stacks)")
    p.add_argument("--out", type=Path, default=None, help="write every number to this JSON file")
    p.add_argument("--runs", default="runs/bench-vqa", help="quality: where the base and the fine-tunes go")
    p.add_argument("--base", default="", help="quality: an existing caption run to fine-tune (skips training one)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    parts = {"memory": memory_part, "quality": quality_part}
    return parts[args.part](args)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        from genlab.io import atomic_write_json

        spec = json.loads(sys.argv[2])
        atomic_write_json(spec["result"], peer_worker(spec))
    else:
        main()
