"""The qformer family's commands and demo hook (read by ``genlab.cli`` and ``genlab.demo``): BLIP-2's
stage 1 (``train``) and stage 2 (``train-lm``) and what they are used with. Stage 0, the vision tower,
is ``genlab vlm pretrain-siglip``. The recipes live in ``genlab.vlm`` (their configs name this family)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Literal

from genlab.commands import Command, Demo
from genlab.data.captions import CaptionDataConfig


@dataclass
class EvalArgs:
    """Score a `qformer train` run (Recall@1/5/10 both ways, similarity.png) or a `qformer train-lm` run
    (BLIP-2 captions: BLEU-4, ROUGE-L, CIDEr, captions.csv / captions.png, VQA exact match) on caption
    data. Without --data.* flags the run's own held-out split is used."""

    checkpoint: str  # a run folder of `genlab qformer train` or `genlab qformer train-lm`
    data: CaptionDataConfig = field(default_factory=CaptionDataConfig)
    split: Literal["train", "val"] = "val"
    which: Literal["latest", "best"] = "latest"  # which checkpoint of the run
    n_images: int = 1000  # images evaluated (the first of the split)
    out: str = ""  # folder for the report and pictures; default RUN/eval-<split>
    device: str = "auto"
    threads: int = 0

    def checks(self) -> Iterable:
        from genlab.config import non_negative, positive

        yield from positive("n_images", cfg=self)
        yield from non_negative("threads", cfg=self)


def eval_cmd(args: EvalArgs) -> dict:
    """Evaluate the run; prints the headline figures and returns the report."""
    import json
    from pathlib import Path

    import torch

    from genlab.config import folder_problem, load_yaml, validate
    from genlab.errors import ConfigError
    from genlab.train.distributed import device_problem, pick_device
    from genlab.train.run import read_run_config, write_report

    validate(args)
    if device_problem(args.device):
        raise ConfigError(f"--device {args.device}: {device_problem(args.device)}")
    run = Path(args.checkpoint)
    saved = load_yaml(read_run_config(run, "qformer"))
    out = Path(args.out) if args.out else run / f"eval-{args.split}"
    if folder_problem(out):
        raise ConfigError(f"--out={out}: {folder_problem(out)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    data = args.data if args.data != CaptionDataConfig() else None
    if "lm" in saved:  # a stage-2 run
        from genlab.vlm.captioner_eval import evaluate_run

        report = evaluate_run(run, data, out, split=args.split, n_images=args.n_images, which=args.which,
                              device=args.device)
    else:
        from genlab.data.captions import load_captions
        from genlab.vlm.alignment import RetrievalEval
        from genlab.vlm.qformer_train import load_aligner_run, retrieval

        cfg, model, tok = load_aligner_run(run, args.which)
        model.to(pick_device(args.device))
        split = load_captions(data or cfg.data, args.split, model.image_size)
        print(f"genlab: {split.describe()}", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        ev = RetrievalEval(n_images=args.n_images, batch_size=cfg.eval.batch_size, grid=cfg.eval.grid)
        report = {"run": str(run), "checkpoint": args.which, "data": split.describe(),
                  **retrieval(model, tok, split, ev, out)}
        write_report(out, report)
    print(json.dumps({k: v for k, v in report.items() if not isinstance(v, (list, dict))}, indent=1))
    print(f"report and pictures in {out}")
    return report


COMMANDS = {
    "train": Command("genlab.vlm.qformer_train:train", "genlab.vlm.qformer_train:QFormerTrainConfig",
                     "BLIP-2 stage 1: align a Q-Former with a frozen vision tower (ITC + ITM), Recall@K",
                     train=True,
                     description="Train a BLIP-2 Q-Former (text side from a BERT-family folder, default the "
                                 "shipped MiniLM) against a frozen SigLIP or ViT folder: contrastive + matching.",
                     hint="(stage 2: genlab qformer train-lm --config qformer/shapes-smollm "
                          "--train.init-from {run_dir})"),
    "train-lm": Command("genlab.vlm.captioner:train_lm", "genlab.vlm.captioner:CaptionerConfig",
                        "BLIP-2 stage 2: Q-Former -> MLP -> a causal LM with LoRA (default SmolLM2-135M)",
                        train=True,
                        description="Train the Q-Former, a 2-layer MLP adapter and LoRA on a causal LM to caption "
                                    "images and answer questions (BLEU-4, ROUGE-L, CIDEr, VQA exact match).",
                        hint="(try: genlab qformer caption --checkpoint {run_dir} --images DIR --out captions.csv)"),
    "caption": Command("genlab.vlm.captioner_eval:caption_cmd", "genlab.vlm.captioner_eval:CaptionArgs",
                       "caption a folder of images with a `qformer train-lm` run (a CSV)"),
    "eval": Command("genlab.vlm.qformer_cli:eval_cmd", "genlab.vlm.qformer_cli:EvalArgs",
                    "retrieval (stage 1) or captioning + VQA (stage 2) metrics of a run, with pictures"),
}
DEMO = Demo("genlab.vlm.qformer_demo:demo", "genlab.vlm.qformer_demo:QFormerDemoConfig")
