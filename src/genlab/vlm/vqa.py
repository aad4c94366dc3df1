"""VQA fine-tuning of a PaliGemma on a CLEVR-layout folder: full, LoRA or QLoRA (the glue the CLI calls).

    genlab vlm finetune --config vlm/vqa-lora --model runs/vlm-shapes-caption/hf --data.root data/shapes-clevr
    genlab vlm eval-vqa --model runs/vlm-vqa-lora --data.root data/shapes-clevr --split val

The prompt is ``answer en {question}``; the loss is on the answer only (prefix-LM, the processor's
labels). The shared engine trains (AdamW, warm-up + cosine, checkpoints with ``best/`` on the val
exact match, exact resume, val loss, DDP). Before training the base model answers the held-out
questions, after training the tuned one does; report.md sets the two side by side (exact match per
question family, ROUGE-1/2/L/Lsum). The run folder then holds ``hf/`` (adapters merged: a plain
PaliGemma folder that ``genlab vlm generate`` and transformers load), ``adapter/`` (peft's format;
lora / qlora), answers.csv, report.md / report.json, qa_grid.png and loss.png.

Without ``--data.root`` the recipe writes the embedded shapes world in the CLEVR v1.0 layout to a
temporary folder (seeded: a resumed run sees the same questions) and reads it back with the CLEVR
loader, so the embedded default runs offline with nothing to download.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from genlab.config import Check, non_negative, positive, validate
from genlab.errors import ConfigError
from genlab.train.data import MapDataSource
from genlab.train.engine import TrainConfig, Trainer
from genlab.io import atomic_write_json, read_json
from genlab.train.distributed import pick_device
from genlab.train.run import start_run, write_report as write_run_report
from genlab.vlm.finetune import (MODES, LoraSettings, Mode, QuantSettings, adapt, merged_model, parameter_report,
                                 save_adapter)
from genlab.vlm.hf_io import check_model_folder, load_paligemma, save_paligemma
from genlab.vlm.processor import PaliGemmaProcessor
from genlab.vlm.recipes import answer, suffix_loss

PROCESSOR_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "preprocessor_config.json", "processor_config.json")


@dataclass
class ClevrData:
    """Where the questions come from: a CLEVR v1.0-layout folder, or the embedded world."""

    root: str = ""  # CLEVR_v1.0 layout (real CLEVR or `genlab data clevr`); "" = the embedded world below
    train_split: str = "train"
    val_split: str = "val"
    max_train: int = 0  # training questions used (0 = all)
    max_val: int = 0  # held-out questions answered before / after (and the val loss); 0 = all
    num_workers: int = 0  # DataLoader processes decoding images
    # The embedded world (only when root is ""): scenes per split, questions per scene, objects per scene.
    world_train: int = 3000
    world_val: int = 300
    questions_per_image: int = 4
    min_objects: int = 1
    max_objects: int = 2  # as the caption base's world (shapes-caption: 1-2 objects)
    seed: int = 0

    def checks(self) -> Iterable[Check]:
        yield from non_negative("max_train", "max_val", "num_workers", "seed", cfg=self)
        yield from positive("world_train", "world_val", "questions_per_image", "min_objects", cfg=self)
        yield "max_objects", self.max_objects >= self.min_objects, "must be >= --data.min-objects"
        # the bounds write_clevr enforces, checked here so that the error names the flag
        yield "world_train", self.world_train <= 1_000_000, "must be <= 1000000"
        yield "world_val", self.world_val <= 1_000_000, "must be <= 1000000"
        yield "questions_per_image", self.questions_per_image <= 100, "must be <= 100"
        yield "root", not self.root or Path(self.root).is_dir(), (
            f"no such folder: give a CLEVR_v1.0-layout folder (images/, questions/; `genlab data clevr --out "
            f"{self.root}` writes one)")


@dataclass
class VQAEval:
    batch_size: int = 64
    max_new_tokens: int = 8  # CLEVR answers are one word
    grid: int = 16  # images in qa_grid.png
    before: bool = True  # also answer with the base model, for the before / after table

    def checks(self) -> Iterable[Check]:
        yield from positive("batch_size", "max_new_tokens", cfg=self)
        yield "grid", 0 <= self.grid <= 64, "must be in [0, 64]"


@dataclass
class VQAFinetuneConfig:
    """Fine-tune a PaliGemma HF folder on VQA. The embedded defaults are the CPU preset vlm/vqa-lora
    (LoRA + trained token embeddings on the tiny caption model, the embedded world); ``genlab demo``
    runs it with fewer steps."""

    run_dir: str = "runs/vlm-vqa-lora"
    model: str = ""  # a PaliGemma HF folder: a genlab run's hf/ (vlm train) or e.g. paligemma-3b-pt-224
    mode: Mode = "lora"
    train_vision: bool = False  # train the SigLIP tower fully (every mode); frozen by default
    train_projector: bool = False  # train the image -> text projector fully (every mode)
    gradient_checkpointing: bool = False  # recompute the decoder layers' activations in the backward pass
    data: ClevrData = field(default_factory=ClevrData)
    # r 64 on the tiny 128-wide decoder (near full rank) with lr 1e-3; a real checkpoint wants r 16 (docs/vqa.md)
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(r=64, alpha=128, dropout=0.0,
                                                                    train_embeddings=True))
    quant: QuantSettings = field(default_factory=QuantSettings)
    eval: VQAEval = field(default_factory=VQAEval)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=4000, batch_size=32, lr=1e-3, warmup_steps=100, weight_decay=0.0, checkpoint_every=1000,
        eval_every=2000, log_every=20, best_metric="exact_match", threads=1))

    def checks(self) -> Iterable[Check]:
        yield "mode", self.mode in MODES, f"choose from {list(MODES)}"
        yield "train", self.train.optimizer == "adamw" or self.mode == "full", \
            "--train.optimizer muon is for full fine-tuning; LoRA factors train with AdamW"


# ----------------------------------------------------------------------------- data

class VQADataset(Dataset):
    """(image uint8 (H, W, 3), prompt, answer) per question. Images are decoded when asked for, or
    once up front with ``preload`` (the small embedded world, whose folder is deleted after)."""

    def __init__(self, questions: list, preload: bool = False):
        from genlab.data.clevr import load_image

        self.questions, self.load_image = questions, load_image
        self.cache = {q.image: load_image(q.image) for q in questions} if preload else None

    def label(self, q) -> str:
        """How reports name a question's image: its path, or its file name in the embedded world
        (whose temporary folder is gone; the same seed writes it again)."""
        return q.image.name if self.cache is not None else str(q.image)

    def __len__(self) -> int:
        return len(self.questions)

    def image(self, i: int) -> np.ndarray:
        path = self.questions[i].image
        return self.cache[path] if self.cache is not None else self.load_image(path)

    def __getitem__(self, i: int) -> tuple[np.ndarray, str, str]:
        q = self.questions[i]
        return self.image(i), f"answer en {q.question}", q.answer


class Collate:
    """Tokenize a list of (image, prompt, answer) with the processor (labels on the answer only)."""

    def __init__(self, processor: PaliGemmaProcessor):
        self.processor = processor

    def __call__(self, items: list[tuple[np.ndarray, str, str]]) -> dict[str, torch.Tensor]:
        images, prompts, answers = zip(*items)
        return self.processor(list(images), list(prompts), list(answers))


def read_questions(root: Path, split: str, limit: int, need_answers: bool) -> list:
    """The questions of ``split`` (the first ``limit``; 0 = all). Training and scoring need answers: a
    split without them (CLEVR's test split) is refused by name unless ``need_answers`` is False."""
    from genlab.data.clevr import load_clevr

    data = load_clevr(root, split)
    if need_answers:
        data.require_answers()
    if not data.questions:
        raise ConfigError(f"{root}: split {split!r} has no questions")
    return data.questions[:limit] if limit else data.questions


def write_world(cfg: ClevrData, image_size: int, folder: Path) -> Path:
    """The embedded world in the CLEVR v1.0 layout under ``folder`` (train + val, seeded)."""
    from genlab.data.clevr import write_clevr

    write_clevr(folder, {cfg.train_split: cfg.world_train, cfg.val_split: cfg.world_val}, image_size=image_size,
                seed=cfg.seed, min_objects=cfg.min_objects, max_objects=cfg.max_objects,
                questions_per_image=cfg.questions_per_image)
    return folder


# ----------------------------------------------------------------------------- evaluation

def answer_questions(model: nn.Module, processor: PaliGemmaProcessor, data: VQADataset, ev: VQAEval) -> list[str]:
    images = [data.image(i) for i in range(len(data))]
    prompts = [f"answer en {q.question}" for q in data.questions]
    return answer(model, processor, images, prompts, ev.max_new_tokens, ev.batch_size)


def score(preds: list[str], questions: list) -> dict[str, Any]:
    """Exact match (overall and per question family) and ROUGE-1/2/L/Lsum of ``preds``."""
    from genlab.eval.rouge import rouge
    from genlab.eval.vqa import score_vqa

    refs = [q.answer for q in questions]
    out = score_vqa(preds, refs, [q.family for q in questions])
    scored = [(p, r) for p, r in zip(preds, refs) if r is not None]
    out["rouge"] = rouge([p for p, _ in scored], [r for _, r in scored]) if scored else None
    return out


def headline(s: dict[str, Any]) -> dict[str, float]:
    """The figures of a score for the metrics log (exact match overall and per family)."""
    out = {"exact_match": s["accuracy"] or 0.0}
    out.update({f"exact_match/{k}": v["accuracy"] or 0.0 for k, v in s["per_family"].items()})
    return out


def write_report(out_dir: Path, data: VQADataset, after: list[str], before: list[str] | None,
                 ev: VQAEval) -> dict[str, Any]:
    """answers.csv, report.md / report.json and qa_grid.png for the answers ``after`` (and ``before``)."""
    from genlab.eval.vqa_report import write_vqa_report

    qs = data.questions
    rows = [{"image": data.label(q), "question": q.question, "reference": q.answer, "prediction": p,
             "family": q.family, **({"before": before[i]} if before is not None else {})}
            for i, (q, p) in enumerate(zip(qs, after))]
    after_scores = score(after, qs)
    before_scores = score(before, qs) if before is not None else None
    images = [data.image(i) for i in range(min(ev.grid, len(qs)))]
    write_vqa_report(out_dir, before_scores, after_scores, rows, images)
    return {"before": before_scores, "after": after_scores}


# ----------------------------------------------------------------------------- entry point

def load_base(cfg: VQAFinetuneConfig) -> tuple[nn.Module, PaliGemmaProcessor, Any]:
    """The base model (fp32, on CPU) and its processor from ``cfg.model``."""
    folder = check_model_folder(cfg.model)
    processor = PaliGemmaProcessor.from_pretrained(folder)
    model, mcfg = load_paligemma(folder, torch.float32)
    return model, processor, mcfg


def copy_processor_files(src: Path, dst: Path) -> None:
    """The tokenizer / image settings of the base model, beside the exported weights."""
    from genlab.io import atomic_write_bytes

    for name in PROCESSOR_FILES:
        if (src / name).is_file():
            atomic_write_bytes(dst / name, (src / name).read_bytes())


def finetune(cfg: VQAFinetuneConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Fine-tune, score before / after, export; returns the run folder."""
    if not cfg.model:  # (not in checks(): genlab demo fills it in from its caption run)
        raise ConfigError("--model: give a PaliGemma HF folder (config.json, *.safetensors, tokenizer), e.g. "
                          "runs/vlm-shapes-caption/hf from `genlab vlm train`")
    validate(cfg)
    if cfg.train.threads:  # (the engine sets them too; the base model answers before it starts)
        torch.set_num_threads(cfg.train.threads)
    model, processor, mcfg = load_base(cfg)  # a bad model folder fails here, before the run folder is touched
    train_set, val_set = load_splits(cfg.data, processor.image_size)
    run = start_run(cfg, resume=resume, overwrite=overwrite)
    if run.finished:
        return run.dir
    collate = Collate(processor)
    device = pick_device(cfg.train.device)
    before_path = run.dir / "before.json"  # the base model's answers, kept for a resumed run's report
    before = None
    if cfg.eval.before and run.dist.is_main:
        if run.resume_from is not None and before_path.is_file():
            before = read_json(before_path)["answers"]
        elif run.resume_from is None:
            before = answer_questions(model.to(device), processor, val_set, cfg.eval)
    model.language_model.gradient_checkpointing = cfg.gradient_checkpointing
    trainable = adapt(model, cfg.mode, cfg.lora, cfg.quant, device, cfg.train_vision, cfg.train_projector)
    data = MapDataSource(train_set, seed=cfg.train.seed, rank=run.dist.rank, world_size=run.dist.world_size,
                         num_workers=cfg.data.num_workers, collate_fn=collate)
    val_batches = [collate([val_set[j] for j in range(i, min(i + cfg.eval.batch_size, len(val_set)))])
                   for i in range(0, len(val_set), cfg.eval.batch_size)]

    def eval_fn(step: int, m: nn.Module, final: bool) -> dict[str, float]:
        preds = answer_questions(m, processor, val_set, cfg.eval)
        if final:
            both = write_report(run.dir, val_set, preds, before, cfg.eval)
            write_run_report(run.dir, {"step": step, "mode": cfg.mode, "model": cfg.model, **both})
            s = both["after"]
        else:
            s = score(preds, val_set.questions)
        return headline(s)

    def on_save(step: int, trainer: Trainer) -> None:
        if cfg.mode != "full":
            save_adapter(trainer.model, run.dir / "adapter")

    trainer = Trainer(trainable, suffix_loss, data, cfg.train, run, eval_fn=eval_fn, val_data=val_batches,
                      on_save=on_save)  # (commits the run folder: config.yaml)
    if run.dist.is_main:
        if before is not None and run.resume_from is None:
            atomic_write_json(before_path, {"model": cfg.model, "answers": before})
        report = parameter_report(trainable)
        print(f"genlab: {cfg.mode}: {report['trainable_parameters']:,} of {report['parameters']:,} parameters "
              f"train", flush=True)
    trainer.fit()
    if run.dist.is_main:
        with trainer.sampling_weights() as m:
            plain = merged_model(m, cfg.mode)
        save_paligemma(plain, mcfg, run.dir / "hf")
        copy_processor_files(Path(cfg.model), run.dir / "hf")
    return run.dir


def load_splits(cfg: ClevrData, image_size: int) -> tuple[VQADataset, VQADataset]:
    """Training and held-out questions of ``cfg.root``, or of the embedded world written to a
    temporary folder (its images kept in memory)."""
    with tempfile.TemporaryDirectory(prefix="genlab-clevr-") as tmp:
        root = Path(cfg.root) if cfg.root else write_world(cfg, image_size, Path(tmp) / "world")
        preload = not cfg.root
        train = VQADataset(read_questions(root, cfg.train_split, cfg.max_train, True), preload)
        val = VQADataset(read_questions(root, cfg.val_split, cfg.max_val, True), preload)
    return train, val


# ----------------------------------------------------------------------------- genlab vlm eval-vqa

@dataclass
class EvalData:
    root: str = ""  # CLEVR_v1.0-layout folder; "" = the run's own data (a finetune run) or the embedded world
    max_questions: int = 0  # 0 = every question of the split


@dataclass
class EvalVQAArgs:
    """Answer the questions of a CLEVR-layout split greedily and score them: exact match per question
    family and ROUGE; writes answers.csv, report.md / report.json and qa_grid.png into ``--out``."""

    model: str  # a `vlm finetune` / `vlm train` run folder (its hf/) or a PaliGemma HF folder
    data: EvalData = field(default_factory=EvalData)
    split: str = "val"  # a split without answers (CLEVR's test) gives predictions only
    before: str = ""  # another model (e.g. the base) answering the same questions: a before / after table
    out: str = ""  # default: <run>/eval-vqa-<split> for a run, else runs/eval-vqa-<split>
    batch_size: int = 64
    max_new_tokens: int = 8
    grid: int = 16
    device: Literal["auto", "cpu", "cuda"] | str = "auto"
    threads: int = 0

    def checks(self) -> Iterable[Check]:
        yield from positive("batch_size", "max_new_tokens", cfg=self)
        yield from non_negative("grid", "threads", cfg=self)
        yield "data.root", not self.data.root or Path(self.data.root).is_dir(), "no such folder"


def model_folder(path: str, flag: str = "--model") -> tuple[Path, Path | None]:
    """(HF folder, run folder or None) for a run folder (its hf/) or an HF folder."""
    p = Path(path)
    if (p / "config.yaml").is_file() and (p / "hf").is_dir():
        return check_model_folder(p / "hf"), p
    if (p / "config.yaml").is_file():
        raise ConfigError(f"{flag}={path}: this run has no hf/ folder yet (it has not finished)")
    folder = check_model_folder(p)
    run = folder.parent if (folder.name == "hf" and (folder.parent / "config.yaml").is_file()) else None
    return folder, run


def eval_vqa_cmd(args: EvalVQAArgs) -> Path:
    """Score a model (and optionally ``--before``) on a split; returns the output folder."""
    from genlab.config import folder_problem, load_yaml

    validate(args)
    folder, run = model_folder(args.model)
    before_folder = model_folder(args.before, "--before")[0] if args.before else None
    out = Path(args.out) if args.out else (run / f"eval-vqa-{args.split}" if run else Path(f"runs/eval-vqa-{args.split}"))
    if folder_problem(out):
        raise ConfigError(f"--out={out}: {folder_problem(out)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    processor = PaliGemmaProcessor.from_pretrained(folder)
    data_cfg = ClevrData(root=args.data.root)
    if not args.data.root and run is not None and (run / "config.yaml").is_file():
        saved = load_yaml(run / "config.yaml").get("data") or {}
        data_cfg = ClevrData(**{k: v for k, v in saved.items() if k in ClevrData.__dataclass_fields__})
    with tempfile.TemporaryDirectory(prefix="genlab-clevr-") as tmp:
        root = Path(data_cfg.root) if data_cfg.root else write_world(data_cfg, processor.image_size, Path(tmp) / "w")
        questions = read_questions(root, args.split, args.data.max_questions, need_answers=False)
        data = VQADataset(questions, preload=not data_cfg.root)
    ev = VQAEval(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, grid=args.grid)
    device = pick_device(args.device)
    model = load_paligemma(folder, torch.float32, device)[0]
    after = answer_questions(model, processor, data, ev)
    before = None
    if before_folder is not None:
        del model
        base = load_paligemma(before_folder, torch.float32, device)[0]
        before = answer_questions(base, PaliGemmaProcessor.from_pretrained(before_folder), data, ev)
    out.mkdir(parents=True, exist_ok=True)
    scores = write_report(out, data, after, before, ev)["after"]
    if scores.get("n"):
        print(f"exact match {scores['accuracy']:.3f} on {scores['n']} questions; "
              f"ROUGE-1 F1 {scores['rouge']['rouge1']['f1']:.3f}")
    else:
        print(f"{len(questions)} answers (split {args.split!r} has no reference answers: predictions only)")
    print(out)
    return out
