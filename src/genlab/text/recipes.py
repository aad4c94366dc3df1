"""Masked diffusion language models (MDLM) and their autoregressive baseline: config, train, sample,
evaluate (the glue the commands call).

    genlab text train --config text/shakespeare-char      # MDLM, character level, CPU, minutes
    genlab text train --config text/shakespeare-ar        # the causal baseline: same backbone and data
    genlab text sample --checkpoint runs/text-shakespeare-char --steps 128 --prefix "ROMEO:"
    genlab text eval --checkpoint runs/text-shakespeare-char
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Literal

import numpy as np
import torch

from genlab.config import Check, load_config, positive, seed_check, validate
from genlab.data import text as textdata
from genlab.data.tokenizers import load_tokenizer_file, save_tokenizer, train_bpe_tokenizer, train_char_tokenizer
from genlab.errors import ConfigError
from genlab.text.generation import generate
from genlab.text.models import TextTransformer, TextTransformerConfig
from genlab.text.objective import SCHEDULES, ar_loss, ar_nll, ar_inputs, bits, make_schedule, mdlm_loss
from genlab.train.checkpoint import checkpoint_step, latest_checkpoint, load_weights
from genlab.train.engine import TrainConfig, Trainer
from genlab.train.run import read_run_config, start_run, write_report


# Upper bounds that catch a typo (an extra digit) before it becomes an allocation failure or a loop of hours.
MAX_SAMPLER_STEPS = 100_000
MAX_SAMPLES = 10_000  # samples drawn in one batch
MAX_T_SAMPLES = 1_000
MAX_BPE_VOCAB = 1_000_000


@dataclass
class TextData:
    source: Literal["shakespeare", "text8", "folder"] = "shakespeare"
    path: str = ""  # text8: the file; folder: a folder of .txt files; shakespeare: "" = the installed package
    edition: Literal["modern", "folio", "both"] = "modern"  # shakespeare only
    seq_len: int = 128  # tokens per training sequence
    val_fraction: float = 0.1  # of the documents (text8: of the characters, at the end)
    split_seed: int = 0  # which documents go to val (fixed, independent of --train.seed)

    def checks(self) -> Iterable[Check]:
        yield "seq_len", self.seq_len >= 2, "must be >= 2"
        yield "val_fraction", 0 < self.val_fraction < 1, "must be in (0, 1)"


@dataclass
class TextTokenizer:
    kind: Literal["char", "bpe"] = "char"
    vocab_size: int = 2048  # bpe only: tokens in all (specials + 256 bytes + merges)

    def checks(self) -> Iterable[Check]:
        yield "vocab_size", self.kind != "bpe" or self.vocab_size >= 261, "must be >= 261 (5 specials + 256 bytes)"
        yield "vocab_size", self.vocab_size <= MAX_BPE_VOCAB, f"must be <= {MAX_BPE_VOCAB}"


@dataclass
class TextObjective:
    kind: Literal["mdlm", "ar"] = "mdlm"  # ar needs --model.causal
    schedule: Literal["loglinear", "cosine"] = "loglinear"
    schedule_eps: float = 1e-3  # alpha(1) = eps
    antithetic: bool = True  # low-discrepancy times (u + i / B) mod 1
    eps_t: float = 1e-3  # times are clamped to [eps_t, 1]

    def checks(self) -> Iterable[Check]:
        yield "schedule", self.schedule in SCHEDULES, f"choose one of {', '.join(SCHEDULES)}"
        yield "schedule_eps", 0 <= self.schedule_eps < 1, "must be in [0, 1)"
        yield "eps_t", 0 < self.eps_t < 1, "must be in (0, 1)"


@dataclass
class TextEval:
    val_batches: int = 4  # fixed val batches (of --eval.batch-size chunks) for the engine's val loss
    batch_size: int = 32
    t_samples: int = 4  # draws of (t, x_t) per val chunk for the reported NELBO (mdlm)
    num_samples: int = 2  # samples written into eval.json at the end (0 = none)
    sampler: str = "ancestral"
    steps: int = 64  # sampler steps for those samples

    def checks(self) -> Iterable[Check]:
        yield from positive("val_batches", "batch_size", "t_samples", "steps", cfg=self)
        yield "num_samples", self.num_samples >= 0, "must be >= 0"
        yield from _caps(self)
        names = _sampler_names()
        yield "sampler", not names or self.sampler in names, f"unknown sampler; choose one of {', '.join(names)}"


def _caps(cfg) -> Iterable[Check]:
    """The upper bounds of the fields of ``cfg`` that have one (steps, num_samples, t_samples)."""
    for name, cap in (("steps", MAX_SAMPLER_STEPS), ("num_samples", MAX_SAMPLES), ("t_samples", MAX_T_SAMPLES)):
        if hasattr(cfg, name):
            yield name, getattr(cfg, name) <= cap, f"must be <= {cap}"


@dataclass
class TextConfig:
    """MDLM on the modern-spelling Shakespeare, character level; the embedded default trains on one or
    two CPU threads in about two minutes."""

    run_dir: str = "runs/text-shakespeare-char"
    data: TextData = field(default_factory=TextData)
    tokenizer: TextTokenizer = field(default_factory=TextTokenizer)
    model: TextTransformerConfig = field(default_factory=lambda: TextTransformerConfig(
        hidden=128, depth=4, heads=4, max_len=1024))
    objective: TextObjective = field(default_factory=TextObjective)
    eval: TextEval = field(default_factory=TextEval)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=400, batch_size=32, lr=2e-3, warmup_steps=40, grad_clip=1.0, ema_decay=0.0,
        checkpoint_every=200, log_every=20, threads=2))

    def checks(self) -> Iterable[Check]:
        yield "model.causal", self.model.causal == (self.objective.kind == "ar"), \
            "must be on exactly when --objective.kind ar (the AR baseline is the causal backbone)"
        yield "data.seq_len", self.data.seq_len <= self.model.max_len, "must be <= --model.max-len"


# ----------------------------------------------------------------------------- data and tokenizer
@dataclass
class BuiltData:
    """What the recipe builds before the run folder is touched."""

    tokenizer: Any
    train_ids: np.ndarray
    val_ids: np.ndarray
    val_chars: int  # characters behind val_ids (for bits per character with BPE)
    corpus: dict


def build_tokenizer(cfg: TextConfig, corpus: textdata.Corpus):
    """char: every character of the corpus (both splits: an alphabet, not statistics); bpe: trained
    on the train documents only."""
    if cfg.tokenizer.kind == "char":
        return train_char_tokenizer(corpus.train + corpus.val)
    return train_bpe_tokenizer(corpus.train, cfg.tokenizer.vocab_size)


def build_data(cfg: TextConfig) -> BuiltData:
    """Corpus -> tokenizer -> token streams of both splits; every data error is raised here."""
    d = cfg.data
    corpus = textdata.load_corpus(d.source, d.path, d.edition, d.val_fraction, d.split_seed)
    tok = build_tokenizer(cfg, corpus)
    train_ids = textdata.encode_text(tok, corpus.stream("train"), cfg.tokenizer.kind)
    val_text = corpus.stream("val")
    val_ids = textdata.encode_text(tok, val_text, cfg.tokenizer.kind)
    textdata.check_length(len(train_ids), d.seq_len, "train", corpus.where)
    textdata.check_length(len(val_ids), d.seq_len, "val", corpus.where)
    info = textdata.describe(corpus) | {"train_tokens": len(train_ids), "val_tokens": len(val_ids)}
    return BuiltData(tok, train_ids, val_ids, len(val_text), info)


def with_vocab(cfg: TextConfig, tok) -> TextConfig:
    """The config with --model.vocab-size filled in from the tokenizer (a given value must agree)."""
    v = tok.get_vocab_size(with_added_tokens=True)
    if cfg.model.vocab_size not in (0, v):
        raise ConfigError(f"--model.vocab-size={cfg.model.vocab_size}: the tokenizer has {v} tokens; "
                          f"leave it 0 (filled in from the tokenizer)")
    return replace(cfg, model=replace(cfg.model, vocab_size=v))


def val_chunks(cfg: TextConfig, val_ids: np.ndarray) -> torch.Tensor:
    return textdata.fixed_chunks(val_ids, cfg.data.seq_len, cfg.eval.val_batches * cfg.eval.batch_size)


# ----------------------------------------------------------------------------- objective and evaluation
def make_loss_fn(cfg: TextConfig):
    schedule = make_schedule(cfg.objective.schedule, cfg.objective.schedule_eps)
    mask_id = cfg.model.vocab_size
    o = cfg.objective

    def loss_fn(model, batch):
        x0 = batch["input_ids"]  # (B, L)
        if o.kind == "ar":
            return ar_loss(model, x0, mask_id)
        # Validation (eval mode) draws its times and masks from a fixed seed: the val curve is not noisier
        # than it must be, and the global random stream (saved in checkpoints) is left as training has it.
        g = None if model.training else torch.Generator().manual_seed(0)
        return mdlm_loss(model, x0, schedule, mask_id, antithetic=o.antithetic, eps_t=o.eps_t, generator=g)

    return loss_fn


@torch.no_grad()
def val_nelbo(model: TextTransformer, cfg: TextConfig, chunks: torch.Tensor, seed: int = 0) -> float:
    """Nats per token on ``chunks`` (N, L): the exact NLL for the AR model; for MDLM the NELBO averaged
    over ``--eval.t-samples`` antithetic draws of (t, x_t) per chunk, from a fixed seed."""
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    schedule = make_schedule(cfg.objective.schedule, cfg.objective.schedule_eps)
    mask_id, total, n = cfg.model.vocab_size, 0.0, 0
    for i in range(0, len(chunks), cfg.eval.batch_size):
        x0 = chunks[i:i + cfg.eval.batch_size].to(device)
        if cfg.objective.kind == "ar":
            total += ar_nll(model(ar_inputs(x0, mask_id)), x0).sum().item()
            n += len(x0)
            continue
        for _ in range(cfg.eval.t_samples):
            loss, _ = mdlm_loss(model, x0, schedule, mask_id, cfg.objective.antithetic, cfg.objective.eps_t, g)
            total += loss.item() * len(x0)
            n += len(x0)
    return total / n


def figures(nats_per_token: float, cfg: TextConfig, chars_per_token: float) -> dict[str, float]:
    """NELBO in nats per token, bits per token and bits per character (for BPE an upper bound from the
    val split's characters per token)."""
    out = {"nelbo": nats_per_token, "bits_per_token": bits(nats_per_token)}
    out["bits_per_char"] = out["bits_per_token"] / chars_per_token if cfg.tokenizer.kind == "bpe" else out["bits_per_token"]
    if cfg.tokenizer.kind == "bpe":
        out["perplexity_per_token"] = math.exp(nats_per_token)
    return out


# ----------------------------------------------------------------------------- train
def check_saved_tokenizer(run_dir: Path, tok) -> None:
    """A resumed run keeps the tokenizer its checkpoints were trained with: its tokenizer.json must read
    back (a damaged file is a one-line FileFormatError naming it, never silently rebuilt) and give the
    vocabulary the corpus gives now. A missing one is written again from the corpus."""
    path = run_dir / "tokenizer.json"
    if not path.exists():
        return
    saved = load_tokenizer_file(path)
    if saved.get_vocab() != tok.get_vocab():
        raise ConfigError(f"{path}: its {len(saved.get_vocab())} tokens differ from the {len(tok.get_vocab())} the "
                          f"corpus gives now (was --data.* or --tokenizer.* changed?); resume with the run's settings")


def train(cfg: TextConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Train, checkpoint, evaluate; returns the run folder (config.yaml, tokenizer.json, metrics,
    checkpoints, loss.png, eval.json with val NELBO, bits per character and a few samples)."""
    validate(cfg)
    built = build_data(cfg)  # the corpus and tokenizer decide --model.vocab-size: before the folder is touched
    cfg = with_vocab(cfg, built.tokenizer)
    if resume:
        check_saved_tokenizer(Path(cfg.run_dir), built.tokenizer)
    run = start_run(cfg, resume=resume, overwrite=overwrite)
    if run.finished:
        return run.dir
    model = TextTransformer(cfg.model)
    data = textdata.WindowSource(built.train_ids, cfg.data.seq_len, seed=cfg.train.seed + 1000 * run.dist.rank)
    chunks = val_chunks(cfg, built.val_ids)
    chars_per_token = built.val_chars / max(len(built.val_ids), 1)

    def eval_fn(step: int, m: TextTransformer, final: bool) -> dict[str, Any]:
        flat = figures(val_nelbo(m, cfg, chunks), cfg, chars_per_token)
        if final:
            report: dict[str, Any] = {"step": step, **flat, "objective": cfg.objective.kind,
                                      "tokenizer": cfg.tokenizer.kind, "corpus": built.corpus,
                                      "val_chunks": len(chunks)}
            if cfg.eval.num_samples:
                report["samples"] = generate(m, cfg, built.tokenizer, cfg.eval.num_samples, cfg.data.seq_len,
                                             cfg.eval.sampler, cfg.eval.steps, seed=cfg.train.seed)
            write_report(run.dir, report)
        return flat

    trainer = Trainer(model, make_loss_fn(cfg), data, cfg.train, run, eval_fn=eval_fn,
                      val_data=textdata.batches(chunks, cfg.eval.batch_size))  # commits: config.yaml
    if run.dist.is_main:
        save_tokenizer(built.tokenizer, run.dir)  # tokenizer.json beside config.yaml (sample / eval read it)
    trainer.fit()
    return run.dir


def demo(cfg: TextConfig, out: Path) -> dict:
    """The text part of ``genlab demo``: train the embedded default into ``out``; headline figures."""
    run = train(replace(cfg, run_dir=str(out)), overwrite=True)
    report = json.loads((run / "eval.json").read_text())
    out_figs = {"run_dir": str(run), "bits_per_char": report["bits_per_char"], "nelbo": report["nelbo"],
                "samples": [s["text"] for s in report.get("samples", [])]}
    from genlab.text.bench import sampler_table  # two samplers at small T (a few seconds)

    model, rcfg, tok = load_trained(run)
    rows = sampler_table(model, rcfg, tok, ("ancestral", "cached"), (16, 64), n=4, length=rcfg.data.seq_len,
                         seed=rcfg.train.seed)
    out_figs["sampler_table"] = {"rows": rows, "note": "entropy in nats of each sample's token histogram; no "
                                 "gen-PPL: the demo trains no AR judge (genlab text bench --judge AR_RUN)"}
    return out_figs


# ----------------------------------------------------------------------------- reading a run
def run_folder(checkpoint: str | Path) -> Path:
    """The run folder of ``checkpoint``: the folder itself, or the run above a checkpoint folder."""
    p = Path(checkpoint)
    if not (p / "config.yaml").is_file() and p.parent.name == "checkpoints":
        return p.parent.parent
    return p


def load_trained(checkpoint: str | Path, ema: bool = True, which: str = "latest"):
    """(model in eval mode, config, tokenizer) of a run folder (or one of its checkpoint folders)."""
    run = run_folder(checkpoint)
    cfg = load_config(TextConfig, str(read_run_config(run, "text")))
    validate(cfg)
    tok = load_tokenizer_file(run / "tokenizer.json")
    if tok.get_vocab_size(with_added_tokens=True) != cfg.model.vocab_size:
        raise ConfigError(f"{run / 'tokenizer.json'} has {tok.get_vocab_size(with_added_tokens=True)} tokens but the "
                          f"run's model has {cfg.model.vocab_size}")
    model = TextTransformer(cfg.model)
    load_weights(checkpoint if Path(checkpoint) != run else run, model, ema=ema, which=which)
    return model.eval(), cfg, tok


def _sampler_names() -> tuple[str, ...]:
    try:
        from genlab.text.samplers import SAMPLERS
    except ImportError:
        return ()
    return tuple(SAMPLERS)


@dataclass
class SampleArgs:
    checkpoint: str  # a run folder written by `genlab text train` (or one of its checkpoint folders)
    sampler: str = "ancestral"  # any of genlab.text.samplers.SAMPLERS (an AR run samples left to right)
    steps: int = 128
    num_samples: int = 4
    length: int = 0  # tokens per sample; 0 = the run's --data.seq-len
    prefix: str = ""  # text every sample starts with
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    raw: bool = False  # the trained weights instead of their EMA
    out: str = ""  # a .jsonl file: one {"text", "sampler", "steps", "nfe", "seconds"} per sample

    def checks(self) -> Iterable[Check]:
        names = _sampler_names()
        yield "sampler", bool(names), "genlab.text.samplers is not installed in this checkout"
        yield "sampler", self.sampler in names, f"unknown sampler; choose one of {', '.join(names)}"
        yield from positive("steps", "num_samples", cfg=self)
        yield "length", self.length >= 0, "must be >= 0 (0 = the run's --data.seq-len)"
        yield "temperature", math.isfinite(self.temperature) and self.temperature > 0, "must be a number > 0"
        yield from _caps(self)
        yield seed_check(cfg=self)
        yield "top_p", 0 < self.top_p <= 1, "must be in (0, 1]"
        yield "checkpoint", Path(self.checkpoint).is_dir(), "no such run folder"
        out = Path(self.out) if self.out else None
        yield "out", out is None or out.parent.is_dir(), f"the folder {out.parent if out else ''} does not exist"
        yield "out", out is None or not out.is_dir(), "is a folder; give a file name such as samples.jsonl"


def sample(args: SampleArgs) -> list[dict]:
    """Print samples of a trained run; with --out also write them as JSON lines (atomically)."""
    from genlab.io import atomic_write_text

    validate(args)
    model, cfg, tok = load_trained(args.checkpoint, ema=not args.raw)
    length = args.length or cfg.data.seq_len
    if length > cfg.model.max_len:
        raise ConfigError(f"--length={length}: must be <= the run's --model.max-len {cfg.model.max_len}")
    records = generate(model, cfg, tok, args.num_samples, length, args.sampler, args.steps, args.prefix,
                       args.seed, args.temperature, args.top_p)
    for r in records:
        print(f"--- {r['sampler']} steps={r['steps']} nfe={r['nfe']} ({r['seconds']:.2f} s)\n{r['text']}")
    if args.out:
        atomic_write_text(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        print(f"genlab: wrote {len(records)} samples to {args.out}", file=sys.stderr)
    return records


@dataclass
class EvalArgs:
    checkpoint: str  # a run folder written by `genlab text train` (or one of its checkpoint folders)
    t_samples: int = 0  # draws of (t, x_t) per val chunk; 0 = the run's --eval.t-samples
    raw: bool = False  # the trained weights instead of their EMA

    def checks(self) -> Iterable[Check]:
        yield "checkpoint", Path(self.checkpoint).is_dir(), "no such run folder"
        yield "t_samples", self.t_samples >= 0, "must be >= 0"
        yield from _caps(self)


def evaluate_run(args: EvalArgs) -> dict:
    """Val NELBO (nats per token), bits per token and per character of a trained run; prints JSON."""
    validate(args)
    model, cfg, tok = load_trained(args.checkpoint, ema=not args.raw)
    if args.t_samples:
        cfg = replace(cfg, eval=replace(cfg.eval, t_samples=args.t_samples))
    built = build_data(cfg)
    if built.tokenizer.get_vocab() != tok.get_vocab():
        raise ConfigError(f"the corpus of {args.checkpoint} now gives a different tokenizer than its tokenizer.json "
                          f"(was --data.path changed?)")
    step = checkpoint_step(latest_checkpoint(run_folder(args.checkpoint)))
    chunks = val_chunks(cfg, built.val_ids)
    flat = {"step": step, **figures(val_nelbo(model, cfg, chunks), cfg, built.val_chars / len(built.val_ids)),
            "val_chunks": len(chunks)}
    print(json.dumps(flat, indent=2))
    return flat
