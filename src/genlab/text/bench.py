"""Judges of sample quality, offline, and the speed / quality table of every sampler.

    genlab text bench --checkpoint runs/text-shakespeare-char --judge runs/text-shakespeare-ar
    genlab text bench --checkpoint RUN --judge AR_RUN --samplers ancestral cached --steps 16 64 --num-samples 32

* ``generative_perplexity``: exp of the mean next-token NLL (nats) of the samples under an
  autoregressive judge: the AR baseline trained on the same data and tokenizer stands in, offline,
  for the GPT-2 large judge of the MDLM papers. Lower is better, but a model that repeats one
  token also scores low: read it beside the entropy.
* ``unigram_entropy``: the entropy, in nats, of each sample's own token histogram, averaged over
  the samples (repetition drives it down; the reference row shows what real text of the same
  length has).
* ``bench``: for every sampler and number of steps T, N samples of the run's sequence length: NFE
  (batched calls) and NFE per sample (rows through the denoiser / N: less than NFE for
  ``cached``, which calls on the rows that change only), wall seconds, gen-PPL under the judge with
  its spread (``gen_ppl_se``: the standard error over the samples of the mean NLL, so the 1-sigma
  band is gen_ppl * exp(+-se)), entropy; and the same judges on held-out real text (val chunks of the
  same length) as the reference row. Writes ``bench.json`` and
  ``bench_frontier.png`` (gen-PPL against NFE, one line per sampler).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor

from genlab.config import Check, load_config, seed_check, validate
from genlab.data import text as textdata
from genlab.data.tokenizers import SPECIAL_TOKENS, load_tokenizer_file
from genlab.errors import ConfigError, GenlabError
from genlab.io import atomic_write_json
from genlab.text.objective import ar_inputs, make_schedule
from genlab.text.recipes import MAX_SAMPLER_STEPS, MAX_SAMPLES, TextConfig, build_data, load_trained, run_folder
from genlab.train.distributed import device_problem
from genlab.train.run import read_run_config

DEFAULT_SAMPLERS = ("ancestral", "cached", "first_hitting", "confidence", "dfm")
DEFAULT_STEPS = (8, 16, 32, 64, 128)


# ----------------------------------------------------------------------------- the judges
@torch.no_grad()
def sample_nll(ar_model, tokens: Tensor, bos_id: int | None = None, batch_size: int = 64) -> Tensor:
    """(N,) float64: the mean next-token NLL in nats of each row of ``tokens`` (N, L) under the causal
    ``ar_model`` (``ar_model(x) -> logits (B, L, V)``), every token predicted (``bos_id``, by default
    the model's mask id as in training, starts each row)."""
    bos = ar_model.mask_id if bos_id is None else bos_id
    device = next(ar_model.parameters()).device
    out = []
    for i in range(0, len(tokens), batch_size):
        x = tokens[i:i + batch_size].to(device)  # (B, L)
        logp = ar_model(ar_inputs(x, bos)).double().log_softmax(-1)  # (B, L, V), float64: exact for tests
        out.append(-logp.gather(-1, x[..., None])[..., 0].mean(1).cpu())
    return torch.cat(out)


def generative_perplexity(ar_model, tokens: Tensor, bos_id: int | None = None, batch_size: int = 64) -> float:
    """exp(mean next-token NLL in nats) of ``tokens`` (N, L) under the causal ``ar_model``; every token
    weighs the same (the rows have one length)."""
    return math.exp(float(sample_nll(ar_model, tokens, bos_id, batch_size).mean()))


def unigram_entropy(tokens: Tensor) -> float:
    """Entropy in nats of each row's token histogram (N, L) -> mean over rows (0 for a constant row,
    log V for a row holding each of V tokens equally often)."""
    out = []
    for row in tokens.cpu():
        p = torch.bincount(row).double()
        p = p[p > 0] / row.numel()
        out.append(float(-(p * p.log()).sum()))
    return sum(out) / len(out)


# ----------------------------------------------------------------------------- drawing samples
def make_denoiser(model, tok):
    """The run's model as a sampler's denoiser: the tokenizer's special tokens (never in the training
    text) are never drawn, as in ``genlab text sample``."""
    device = next(model.parameters()).device
    banned = torch.tensor([i for i in map(tok.token_to_id, SPECIAL_TOKENS) if i is not None], device=device)

    def denoiser(x, t=None):
        return model(x, t).index_fill(-1, banned, -math.inf)  # (B, L, V)

    return denoiser


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def draw(model, cfg: TextConfig, tok, sampler: str, steps: int, n: int, length: int, seed: int = 0,
         **options) -> tuple[Tensor, int, float, float]:
    """(tokens (n, length) on the CPU, NFE, wall seconds of the whole batch, NFE per sample) of one
    sampler."""
    from genlab.text.samplers import sample_tokens

    device = next(model.parameters()).device
    x_init = torch.full((n, length), cfg.model.vocab_size, dtype=torch.long, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    schedule = make_schedule(cfg.objective.schedule, cfg.objective.schedule_eps)
    _sync(device)
    start = time.perf_counter()
    out = sample_tokens(make_denoiser(model, tok), x_init, mask_id=cfg.model.vocab_size, schedule=schedule,
                        steps=steps, sampler=sampler, generator=g, **options)
    _sync(device)
    return out.tokens.cpu(), int(out.nfe), time.perf_counter() - start, out.nfe_per_row


def judge_row(tokens: Tensor, judge=None) -> dict[str, Any]:
    """The quality columns of one row: gen-PPL and its spread ``gen_ppl_se`` (the standard error over
    the samples of the mean NLL; None for one sample or without a judge) and entropy in nats."""
    if judge is None:
        return {"gen_ppl": None, "gen_ppl_se": None, "entropy": unigram_entropy(tokens)}
    nll = sample_nll(judge, tokens)
    se = float(nll.std() / math.sqrt(len(nll))) if len(nll) > 1 else None
    return {"gen_ppl": math.exp(float(nll.mean())), "gen_ppl_se": se, "entropy": unigram_entropy(tokens)}


def sampler_table(model, cfg: TextConfig, tok, samplers: Sequence[str], steps: Sequence[int], n: int,
                  length: int, seed: int = 0, judge=None) -> list[dict[str, Any]]:
    """One row per (sampler, T): sampler, steps, nfe, nfe_per_sample, seconds (whole batch), gen_ppl,
    gen_ppl_se, entropy."""
    rows = []
    for name in samplers:
        for T in steps:
            tokens, nfe, seconds, per_row = draw(model, cfg, tok, name, T, n, length, seed)
            rows.append({"sampler": name, "steps": T, "nfe": nfe, "nfe_per_sample": per_row,
                         "seconds": seconds, **judge_row(tokens, judge)})
    return rows


# ----------------------------------------------------------------------------- the command
def _sampler_names() -> tuple[str, ...]:
    from genlab.text.samplers import SAMPLERS

    return tuple(SAMPLERS)


@dataclass
class BenchArgs:
    checkpoint: str  # an MDLM run folder written by `genlab text train` (or one of its checkpoint folders)
    judge: str = ""  # an AR baseline run on the same tokenizer (text/shakespeare-ar); "" = entropy only
    samplers: tuple[str, ...] = DEFAULT_SAMPLERS
    steps: tuple[int, ...] = DEFAULT_STEPS  # T for each sampler
    num_samples: int = 16  # N samples per row (one batch)
    length: int = 0  # tokens per sample; 0 = the run's --data.seq-len
    seed: int = 0
    device: str = "auto"  # auto = cuda when present, else cpu
    raw: bool = False  # the trained weights instead of their EMA (both runs)
    out: str = ""  # folder for bench.json and bench_frontier.png; "" = the run folder

    def checks(self) -> Iterable[Check]:
        names = _sampler_names()
        yield "samplers", len(self.samplers) > 0, "give at least one sampler"
        bad = [s for s in self.samplers if s not in names]
        yield "samplers", not bad, f"unknown sampler {', '.join(bad)}; choose from {', '.join(names)}"
        yield "steps", len(self.steps) > 0 and all(T >= 1 for T in self.steps), "each must be >= 1 (at least one)"
        yield "steps", all(T <= MAX_SAMPLER_STEPS for T in self.steps), f"each must be <= {MAX_SAMPLER_STEPS}"
        yield "num_samples", self.num_samples >= 1, "must be >= 1"
        yield "num_samples", self.num_samples <= MAX_SAMPLES, f"must be <= {MAX_SAMPLES}"
        yield seed_check(cfg=self)
        yield "length", self.length >= 0, "must be >= 0 (0 = the run's --data.seq-len)"
        yield "device", self.device != "mps" and device_problem(self.device) is None, \
            (device_problem(self.device) or "").replace(" or mps", "") or "choose auto, cpu, cuda or cuda:N"
        yield "checkpoint", Path(self.checkpoint).is_dir(), "no such run folder"
        yield "judge", not self.judge or Path(self.judge).is_dir(), "no such run folder"
        problem = _out_problem(Path(self.out)) if self.out else None
        yield "out", problem is None, problem or ""


def _out_problem(out: Path) -> str | None:
    """Why --out cannot be the report folder, or None: it may be made, but only inside a folder
    that exists (a mistyped path is an error, not a new tree of folders)."""
    if out.exists():
        return None if out.is_dir() else "is a file; give a folder"
    if out.parent.exists() and not out.parent.is_dir():
        return f"{out.parent} is a file, not a folder"
    return None if out.parent.is_dir() else f"the folder {out.parent} does not exist (make it first)"


def _read_cfg(path: str, flag: str) -> TextConfig:
    """The text config of a run folder, or a one-line ConfigError naming ``flag``."""
    try:
        cfg = load_config(TextConfig, str(read_run_config(run_folder(path), "text")))
    except GenlabError as e:
        raise ConfigError(f"{flag}={path}: {e}") from None
    return cfg


def check_pair(args: BenchArgs) -> tuple[TextConfig, TextConfig | None, int]:
    """Read both configs and check they fit together before any weight is loaded: (run cfg, judge cfg,
    sample length)."""
    cfg = _read_cfg(args.checkpoint, "--checkpoint")
    if cfg.objective.kind != "mdlm":
        raise ConfigError(f"--checkpoint={args.checkpoint}: is an {cfg.objective.kind} run; the samplers need an "
                          f"MDLM run (give the AR run as --judge)")
    length = args.length or cfg.data.seq_len
    if length > cfg.model.max_len:
        raise ConfigError(f"--length={length}: must be <= the run's --model.max-len {cfg.model.max_len}")
    if not args.judge:
        return cfg, None, length
    jcfg = _read_cfg(args.judge, "--judge")
    if jcfg.objective.kind != "ar":
        raise ConfigError(f"--judge={args.judge}: is an {jcfg.objective.kind} run, not an AR baseline (its "
                          f"objective kind must be ar; train one with --config text/shakespeare-ar)")
    a = load_tokenizer_file(run_folder(args.checkpoint) / "tokenizer.json").get_vocab()
    b = load_tokenizer_file(run_folder(args.judge) / "tokenizer.json").get_vocab()
    if a != b:
        raise ConfigError(f"--judge={args.judge}: its tokenizer ({len(b)} tokens) differs from --checkpoint's "
                          f"({len(a)} tokens); train the judge on the same corpus and --tokenizer.kind")
    if length > jcfg.model.max_len:
        raise ConfigError(f"--length={length}: must be <= the judge's --model.max-len {jcfg.model.max_len}")
    return cfg, jcfg, length


def reference_row(cfg: TextConfig, tok, n: int, length: int, judge=None) -> dict[str, Any]:
    """The judges on ``n`` evenly spaced val chunks of ``length`` tokens of the run's own corpus."""
    built = build_data(cfg)
    if built.tokenizer.get_vocab() != tok.get_vocab():
        raise ConfigError("the run's corpus now gives a different tokenizer than its tokenizer.json "
                          "(was --data.path changed?)")
    chunks = textdata.fixed_chunks(built.val_ids, length, n)
    return {"sampler": "reference (val text)", "steps": None, "nfe": None, "nfe_per_sample": None,
            "seconds": None, "n": len(chunks), **judge_row(chunks, judge)}


def plot_frontier(rows: list[dict], reference: dict, path: Path) -> None:
    """gen-PPL (entropy without a judge) against NFE, one line per sampler; the val text dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "gen_ppl" if rows and rows[0]["gen_ppl"] is not None else "entropy"
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["sampler"] for r in rows):
        pts = sorted((r["nfe"], r[key]) for r in rows if r["sampler"] == name)
        ax.plot(*zip(*pts), marker="o", label=name)
    ax.axhline(reference[key], color="k", ls="--", lw=1, label="val text")
    ax.set_xscale("log")
    ax.set_xlabel("NFE (denoiser calls)")
    ax.set_ylabel("gen. perplexity (AR judge)" if key == "gen_ppl" else "unigram entropy (nats)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def format_table(rows: list[dict]) -> str:
    """The rows as text: sampler, T, NFE, NFE per sample, seconds, gen-PPL +- its 1-sigma spread in
    percent, entropy."""
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = [f"{'sampler':<22}{'T':>6}{'NFE':>7}{'NFE/seq':>9}{'seconds':>10}{'gen-PPL':>10}{'+-%':>6}{'entropy':>9}"]
    for r in rows:
        se = r.get("gen_ppl_se")
        lines.append(f"{r['sampler']:<22}{f(r['steps'], 'd'):>6}{f(r['nfe'], 'd'):>7}"
                     f"{f(r.get('nfe_per_sample'), '.1f'):>9}{f(r['seconds'], '.3f'):>10}{f(r['gen_ppl'], '.2f'):>10}"
                     f"{f(None if se is None else 100 * math.expm1(se), '.1f'):>6}{f(r['entropy'], '.3f'):>9}")
    return "\n".join(lines)


def bench(args: BenchArgs) -> dict:
    """The speed / quality table of the samplers of an MDLM run; prints it, writes bench.json and
    bench_frontier.png into --out (default: the run folder)."""
    validate(args)
    _, jcfg, length = check_pair(args)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model, cfg, tok = load_trained(args.checkpoint, ema=not args.raw)
    model.to(device)
    judge = load_trained(args.judge, ema=not args.raw)[0].to(device) if jcfg is not None else None
    reference = reference_row(cfg, tok, args.num_samples, length, judge)
    rows = sampler_table(model, cfg, tok, args.samplers, args.steps, args.num_samples, length, args.seed, judge)
    out = Path(args.out) if args.out else run_folder(args.checkpoint)
    out.mkdir(exist_ok=True)  # its parent was checked: a mistyped path is an error, not a tree of folders
    report = {"checkpoint": str(args.checkpoint), "judge": args.judge or None, "num_samples": args.num_samples,
              "length": length, "seed": args.seed, "device": device,
              "units": {"seconds": "wall time of the whole batch", "entropy": "nats",
                        "gen_ppl": "exp(mean next-token NLL in nats) under the judge"},
              "rows": rows, "reference": reference}
    atomic_write_json(out / "bench.json", report)
    plot_frontier(rows, reference, out / "bench_frontier.png")
    print(format_table(rows + [reference]))
    if judge is None:
        print("(no --judge: gen-PPL not measured; entropy only)")
    print(f"genlab: wrote {out / 'bench.json'} and {out / 'bench_frontier.png'}")
    return report
