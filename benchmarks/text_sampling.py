"""genlab's MDLM samplers at every T, beside facebookresearch/flow_matching's discrete Euler solver.

    .venv/bin/python benchmarks/text_sampling.py --out /tmp/ts/text_sampling.json   # trains the pair (~12 min)
    .venv/bin/python benchmarks/text_sampling.py --run RUN --judge AR_RUN          # an existing MDLM + AR pair
    .venv/bin/python benchmarks/text_sampling.py --quick                           # smoke run, seconds
    .venv/bin/python benchmarks/text_sampling.py --run RUN --judge AR_RUN --pairs 3 --only-pairs  # peer timing

* The pair: the shakespeare-char MDLM (``text/shakespeare-char``) and its AR baseline
  (``text/shakespeare-ar``: same backbone, data, tokenizer and budget), trained here with genlab's
  recipe unless --run / --judge are given. --quick trains both tiny (20 steps, 32 tokens).
* Every genlab sampler (``genlab.text.samplers.SAMPLERS``, default options) at each T: N samples of
  the run's sequence length in one batch, from one seed: NFE (batched calls), NFE per sample (rows
  through the denoiser / N), wall seconds (the whole batch), gen-PPL under the AR judge with its
  1-sigma spread over the samples, and unigram entropy (nats) from ``genlab.text.bench``; the val
  text of the same length is the reference row. A row that would make more calls than the largest
  T (semi_ar: one T per block) is skipped. ReMDM's loop strategy gets rows at the T of
  ``--loop-steps`` (default 256).
* cached vs ancestral at the largest T (1000): the same seed must give the same tokens, and the
  speed ratio is printed.
* Training: val bits/char and training tokens/s (the median of the logged steps/s x batch x
  sequence length) of both runs, read from their run folders.
* The peer (installed for benchmarks only, CC-BY-NC, never imported by genlab):
  ``MixtureDiscreteProbPath`` + ``MixtureDiscreteEulerSolver`` driven by the same trained
  denoiser at NFE = T. The peer runs time s from 0 (noise) to 1 (data), with kappa(s) the data
  weight; genlab's schedule gives kappa(s) = alpha(1 - s). Its model must return probabilities
  over the vocabulary *including* the mask token (id V): the wrapper gives the denoiser's softmax
  (special tokens banned, as genlab's samplers do) with zero mass on the mask at masked
  positions, and a one-hot on the current token at decoded ones (SUBS carry-over: the solver's
  x_1 then equals x_t there, so a decoded token never moves). Its rates are genlab's ``dfm`` at
  eta = 0, so the two should agree in quality; the comparison is of speed and of the samplers.
* ``--pairs N``: paired, interleaved timing against the peer at each T of ``--pair-steps`` (default
  32 128): N rounds, each running ``--pair-samplers`` (default dfm and confidence) and the peer once
  on the same model, batch and seed, the order rotated every round; the median over the rounds of
  each round's peer / genlab seconds is reported (the table's seconds come from rows run minutes
  apart). ``--only-pairs`` skips the table.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from genlab.config import load_config
from genlab.text.bench import draw, format_table, judge_row, make_denoiser, reference_row
from genlab.text.objective import make_schedule
from genlab.text.recipes import TextConfig, load_trained, train
from genlab.text.samplers import SAMPLERS

STEPS = (8, 16, 32, 64, 100, 128, 256, 1000)
SEMI_AR_BLOCK = inspect.signature(SAMPLERS["semi_ar"]).parameters["block_size"].default  # its default blocks
VARIANTS = {"remdm loop": ("remdm", {"strategy": "loop"})}  # extra rows at --loop-steps
QUICK_STEPS = (4, 16)
TINY = dict(seq_len=32, hidden=32, depth=1, heads=2, steps=20, batch=4)


def train_pair(root: Path, quick: bool) -> tuple[Path, Path]:
    """Train the MDLM and its AR baseline with genlab's recipe (tiny with --quick)."""
    runs = []
    for preset in ("text/shakespeare-char", "text/shakespeare-ar"):
        cfg = load_config(TextConfig, preset)
        cfg = replace(cfg, run_dir=str(root / preset.split("/")[1]),
                      train=replace(cfg.train, progress=False), eval=replace(cfg.eval, num_samples=0))
        if quick:
            cfg = replace(cfg, data=replace(cfg.data, seq_len=TINY["seq_len"]),
                          model=replace(cfg.model, hidden=TINY["hidden"], depth=TINY["depth"], heads=TINY["heads"]),
                          eval=replace(cfg.eval, val_batches=1, batch_size=4, t_samples=1, num_samples=0),
                          train=replace(cfg.train, steps=TINY["steps"], batch_size=TINY["batch"], eval_every=0,
                                        checkpoint_every=0, log_every=10))
        runs.append(train(cfg, overwrite=True))
    return runs[0], runs[1]


def peer_draw(model, cfg: TextConfig, tok, steps: int, n: int, length: int, seed: int):
    """(tokens (n, length), NFE, seconds) from flow_matching's MixtureDiscreteEulerSolver."""
    from flow_matching.path import MixtureDiscreteProbPath
    from flow_matching.path.scheduler import ConvexScheduler
    from flow_matching.path.scheduler.scheduler import SchedulerOutput
    from flow_matching.solver import MixtureDiscreteEulerSolver
    from flow_matching.utils import ModelWrapper

    schedule = make_schedule(cfg.objective.schedule, cfg.objective.schedule_eps)
    mask_id, device = cfg.model.vocab_size, next(model.parameters()).device
    denoiser = make_denoiser(model, tok)

    class GenlabKappa(ConvexScheduler):
        """kappa(s) = alpha(1 - s): the peer's time s = 1 - genlab's t."""

        def __call__(self, t):
            a, da = schedule.alpha(1 - t), schedule.d_alpha(1 - t)
            return SchedulerOutput(alpha_t=a, sigma_t=1 - a, d_alpha_t=-da, d_sigma_t=da)

        def kappa_inverse(self, kappa):
            raise NotImplementedError

    class Posterior(ModelWrapper):
        calls = 0

        def forward(self, x, t, **extras):  # x (B, L) in [0, V]; t (B,) peer time
            Posterior.calls += 1
            p = denoiser(x, 1 - t).float().softmax(-1)  # (B, L, V) real tokens
            p = F.pad(p, (0, 1))  # (B, L, V + 1): no mass on the mask token
            keep = F.one_hot(x, mask_id + 1).to(p.dtype)  # carry-over at decoded positions
            return torch.where((x != mask_id)[..., None], keep, p)

    wrapper = Posterior(model)
    solver = MixtureDiscreteEulerSolver(wrapper, MixtureDiscreteProbPath(GenlabKappa()), vocabulary_size=mask_id + 1)
    x_init = torch.full((n, length), mask_id, dtype=torch.long, device=device)
    torch.manual_seed(seed)  # the peer draws from the global stream
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = solver.sample(x_init, step_size=None, time_grid=torch.linspace(0.0, 1.0, steps + 1))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out.cpu(), Posterior.calls, time.perf_counter() - start


def paired_timing(model, cfg, tok, judge, steps: list[int], samplers: list[str], reps: int, n: int, length: int,
                  seed: int) -> list[dict]:
    """Per T: each sampler's and the peer's NFE, NFE per sample, gen-PPL, entropy and seconds of
    every round, and the median over the rounds of peer / sampler seconds (see --pairs)."""
    out = []
    for name in samplers:  # warm-up, untimed: the first calls of a process are slow
        draw(model, cfg, tok, name, 2, n, length, seed)
    peer_draw(model, cfg, tok, 2, n, length, seed)
    for T in steps:
        names = list(samplers) + ["peer"]
        got = {name: {"seconds": []} for name in names}
        for r in range(reps):
            for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order every round
                if name == "peer":
                    tokens, nfe, sec = peer_draw(model, cfg, tok, T, n, length, seed)
                    per_row = nfe
                else:
                    tokens, nfe, sec, per_row = draw(model, cfg, tok, name, T, n, length, seed)
                got[name].update({"nfe": nfe, "nfe_per_sample": per_row, **judge_row(tokens, judge)})
                got[name]["seconds"].append(sec)
            print(f"  pair round {r} T={T}: " + ", ".join(f"{k} {v['seconds'][-1]:.2f} s" for k, v in got.items()),
                  file=sys.stderr, flush=True)
        peer_s = got["peer"]["seconds"]
        for name in samplers:
            got[name]["peer_over_seconds"] = [p / g for p, g in zip(peer_s, got[name]["seconds"])]
            got[name]["median_peer_over_seconds"] = statistics.median(got[name]["peer_over_seconds"])
        out.append({"steps": T, "rows": got})
    return out


def print_pairs(pairs: list[dict]) -> None:
    print("\npaired timing vs the peer (median over rounds of peer / genlab seconds; >1 = genlab faster):")
    print(f"{'T':>6}  {'sampler':<20}{'NFE':>6}{'NFE/seq':>9}{'gen-PPL':>9}{'entropy':>9}{'median s':>10}"
          f"{'peer/this':>11}  rounds")
    for block in pairs:
        for name, r in block["rows"].items():
            sec = statistics.median(r["seconds"])
            ratio = r.get("median_peer_over_seconds")
            per = ", ".join(f"{x:.2f}" for x in r.get("peer_over_seconds", []))
            print(f"{block['steps']:>6}  {name:<20}{r['nfe']:>6}{r['nfe_per_sample']:>9.1f}{r['gen_ppl']:>9.2f}"
                  f"{r['entropy']:>9.3f}{sec:>10.2f}{_fmt(ratio, '.2f'):>11}  {per}")


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def print_table(rows: list[dict]) -> None:
    print(format_table(rows))


def train_stats(run: Path) -> dict:
    """Val bits/char (eval.json) and training tokens/s (median logged steps/s x batch x seq_len)."""
    cfg = load_config(TextConfig, str(run / "config.yaml"))
    report = json.loads((run / "eval.json").read_text())
    rates = sorted(json.loads(line)["steps_per_s"] for line in (run / "metrics.jsonl").read_text().splitlines()
                   if '"steps_per_s"' in line)
    per_step = cfg.train.batch_size * cfg.data.seq_len
    return {"steps": report["step"], "bits_per_char": report["bits_per_char"], "batch_size": cfg.train.batch_size,
            "seq_len": cfg.data.seq_len, "tokens_per_s": rates[len(rates) // 2] * per_step if rates else math.nan}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="", help="an MDLM run folder (default: train one)")
    p.add_argument("--judge", default="", help="its AR baseline run folder (default: train one)")
    p.add_argument("--runs-dir", default="", help="train the pair into this folder and keep it (default: a temp dir)")
    p.add_argument("--steps", type=int, nargs="+", default=None, help=f"T values (default {STEPS})")
    p.add_argument("--num-samples", type=int, default=None, help="samples per row (default 16, quick 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (1 on a machine shared with other jobs)")
    p.add_argument("--time-reps", type=int, default=0,
                   help="extra interleaved ancestral / cached timings at the largest T (median reported); 0 = the table's pair")
    p.add_argument("--pairs", type=int, default=0, help="rounds of paired, interleaved timing vs the peer (0 = none)")
    p.add_argument("--pair-steps", type=int, nargs="+", default=[32, 128], help="T of the paired timing")
    p.add_argument("--pair-samplers", nargs="+", default=["dfm", "confidence"], help="genlab samplers timed vs the peer")
    p.add_argument("--only-pairs", action="store_true", help="skip the table: the paired timing only")
    p.add_argument("--loop-steps", type=int, nargs="*", default=[256], help="T of the remdm loop rows")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="", help="write the results as JSON here")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny pair, T in (4, 16), 4 samples")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    steps = tuple(a.steps or (QUICK_STEPS if a.quick else STEPS))
    n = a.num_samples or (4 if a.quick else 16)
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory(prefix="text_sampling_") as tmp:
        run, judge_run = (Path(a.run), Path(a.judge)) if a.run and a.judge else train_pair(Path(a.runs_dir or tmp), a.quick)
        model, cfg, tok = load_trained(run)
        judge, jcfg, jtok = load_trained(judge_run)
        assert jcfg.objective.kind == "ar" and jtok.get_vocab() == tok.get_vocab(), "judge must be the AR baseline"
        model.to(a.device)
        judge.to(a.device)
        length = cfg.data.seq_len
        if a.only_pairs:
            with torch.no_grad():
                peer_pairs = paired_timing(model, cfg, tok, judge, a.pair_steps, a.pair_samplers, max(a.pairs, 1), n,
                                      length, a.seed)
            print(f"shakespeare-char MDLM ({run}) judged by its AR baseline ({judge_run}); {n} samples x {length} "
                  f"tokens, {a.threads} threads, device {a.device}, torch {torch.__version__}; entropy in nats")
            print_pairs(peer_pairs)
            results = {"settings": {"num_samples": n, "length": length, "seed": a.seed, "threads": a.threads,
                                    "device": a.device, "torch": torch.__version__}, "pairs": peer_pairs}
            if a.out:
                Path(a.out).parent.mkdir(parents=True, exist_ok=True)
                Path(a.out).write_text(json.dumps(results, indent=2))
            return results
        training = {"mdlm": train_stats(run), "ar": train_stats(judge_run)}
        plan = [(name, name, {}, T) for name in SAMPLERS for T in steps
                if name != "semi_ar" or math.ceil(length / SEMI_AR_BLOCK) * T <= steps[-1]]
        plan += [(label, name, opts, T) for label, (name, opts) in VARIANTS.items() for T in (steps[-1:] if a.quick else a.loop_steps)]
        with torch.no_grad():
            reference = reference_row(cfg, tok, n, length, judge)
            rows, kept = [], {}
            for label, name, opts, T in plan:
                tokens, nfe, sec, per_row = draw(model, cfg, tok, name, T, n, length, a.seed, **opts)
                rows.append({"sampler": label, "steps": T, "nfe": nfe, "nfe_per_sample": per_row, "seconds": sec,
                             **judge_row(tokens, judge)})
                print(f"  {label} T={T}: NFE {nfe}, {sec:.1f} s", file=sys.stderr, flush=True)
                if name in ("ancestral", "cached") and T == steps[-1]:
                    kept[name] = tokens
            timed = []  # (ancestral, cached) seconds, interleaved, at the largest T
            for rep_ in range(a.time_reps):
                pair = [draw(model, cfg, tok, name, steps[-1], n, length, a.seed)[2] for name in ("ancestral", "cached")]
                print(f"  timing pair {rep_}: {pair[0]:.1f} / {pair[1]:.1f} s", file=sys.stderr, flush=True)
                timed.append(pair)
            for T in steps:
                tokens, nfe, sec = peer_draw(model, cfg, tok, T, n, length, a.seed)
                rows.append({"sampler": "peer flow_matching", "steps": T, "nfe": nfe, "nfe_per_sample": nfe,
                             "seconds": sec, **judge_row(tokens, judge)})
            peer_pairs = paired_timing(model, cfg, tok, judge, a.pair_steps, a.pair_samplers, a.pairs, n, length,
                                  a.seed) if a.pairs else []
    print(f"shakespeare-char MDLM ({run}) judged by its AR baseline ({judge_run}); {n} samples x {length} tokens, "
          f"{a.threads} threads, device {a.device}, torch {torch.__version__}; entropy in nats")
    print_table(rows + [reference])
    for kind, s in training.items():
        print(f"training {kind}: {s['steps']} steps, val {s['bits_per_char']:.3f} bits/char, "
              f"{s['tokens_per_s']:.0f} tokens/s ({s['batch_size']} x {s['seq_len']} tokens a step)")

    def row(name, T):
        return next(r for r in rows if r["sampler"] == name and r["steps"] == T)

    top = steps[-1]
    anc, cac = row("ancestral", top), row("cached", top)
    pairs = [[anc["seconds"], cac["seconds"]]] + timed  # lists: what the JSON file holds
    ratios_t = sorted(x / y for x, y in pairs)
    cached = {"steps": top, "identical_tokens": bool(torch.equal(kept["ancestral"], kept["cached"])),
              "speedup": ratios_t[len(ratios_t) // 2], "timings": pairs, "nfe_ancestral": anc["nfe"], "nfe_cached": cac["nfe"],
              "nfe_per_sample_cached": cac["nfe_per_sample"]}
    print(f"\ncached vs ancestral at T={top}: identical tokens {cached['identical_tokens']}, "
          f"NFE {cac['nfe']} vs {anc['nfe']} (per sample {cac['nfe_per_sample']:.1f}), "
          f"ancestral/cached seconds {cached['speedup']:.2f}x (median of {len(pairs)} pairs: "
          + ", ".join(f"{x:.1f}/{y:.1f}" for x, y in pairs) + ")")
    # some sampler at >= 10x fewer calls within 10% of ancestral-at-top gen-PPL and 5% of its entropy
    cheap = [r for r in rows if r["sampler"] != "peer flow_matching" and r["nfe"] * 10 <= anc["nfe"]
             and r["gen_ppl"] <= 1.1 * anc["gen_ppl"] and abs(r["entropy"] / anc["entropy"] - 1) <= 0.05]
    best_cheap = min(cheap, key=lambda r: r["nfe"]) if cheap else None
    print(f"fewest calls within 10% gen-PPL / 5% entropy of ancestral T={top} ({anc['gen_ppl']:.2f} "
          f"+-{100 * math.expm1(anc['gen_ppl_se']):.1f}%, {anc['entropy']:.3f}): "
          + (f"{best_cheap['sampler']} T={best_cheap['steps']} NFE {best_cheap['nfe']} ({anc['nfe'] / best_cheap['nfe']:.0f}x "
             f"fewer; gen-PPL {best_cheap['gen_ppl']:.2f} +-{100 * math.expm1(best_cheap['gen_ppl_se']):.1f}%, "
             f"entropy {best_cheap['entropy']:.3f})" if best_cheap else "none"))
    print("\npeer / genlab at equal T (>1 = genlab lower, i.e. better gen-PPL / faster):")
    print(f"{'T':>6}{'PPL peer/dfm':>14}{'s peer/dfm':>12}{'best genlab (NFE<=T)':>24}{'PPL peer/best':>15}"
          f"{'s peer/best':>13}")
    ratios = []
    for T in steps:
        peer, dfm = row("peer flow_matching", T), row("dfm", T)
        pool = [r for r in rows if r["sampler"] != "peer flow_matching" and r["nfe"] <= peer["nfe"]]
        best = min(pool, key=lambda r: r["gen_ppl"])
        ratios.append({"steps": T, "ppl_peer_over_dfm": peer["gen_ppl"] / dfm["gen_ppl"],
                       "seconds_peer_over_dfm": peer["seconds"] / dfm["seconds"], "best": best["sampler"],
                       "best_steps": best["steps"], "ppl_peer_over_best": peer["gen_ppl"] / best["gen_ppl"],
                       "seconds_peer_over_best": peer["seconds"] / best["seconds"]})
        r = ratios[-1]
        print(f"{T:>6}{r['ppl_peer_over_dfm']:>14.3f}{r['seconds_peer_over_dfm']:>12.2f}"
              f"{best['sampler'] + ' T=' + _fmt(best['steps'], 'd'):>24}{r['ppl_peer_over_best']:>15.3f}"
              f"{r['seconds_peer_over_best']:>13.2f}")
    if peer_pairs:
        print_pairs(peer_pairs)
    import flow_matching

    results = {"settings": {"steps": list(steps), "num_samples": n, "length": length, "seed": a.seed,
                            "threads": a.threads, "device": a.device, "quick": a.quick, "torch": torch.__version__,
                            "flow_matching": getattr(flow_matching, "__version__", "1.0.10")},
               "rows": rows, "reference": reference, "cached_vs_ancestral": cached, "training": training,
               "cheap_match": best_cheap, "peer_ratios": ratios, "pairs": peer_pairs}
    assert all(math.isfinite(r["gen_ppl"]) and math.isfinite(r["entropy"]) for r in rows)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
