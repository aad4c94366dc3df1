"""The qformer part of ``genlab demo``: BLIP-2's stages on the shapes world at a demo's budget.

Stage 0 trains a small SigLIP tower (``genlab vlm pretrain-siglip``), stage 1 aligns a Q-Former with it
(Recall@K, similarity.png), stage 2 puts the Q-Former in front of SmolLM2 with LoRA (captions.png,
CIDEr before / after). Each stage is the embedded default with fewer steps (stage 1 without the
matching loss), about 3 minutes on a 2-core CPU: at this budget the Q-Former's retrieval is still
near chance and the captions are templates; the presets of docs/benchmarks.md train longer.

    from genlab.vlm.qformer_demo import demo
    demo(QFormerDemoConfig(), Path("runs/demo/qformer"))

Flags: ``genlab demo --qformer.qformer.train.steps 300 --qformer.no-captions``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from genlab.vlm.captioner import CaptionerConfig, train_lm
from genlab.vlm.qformer_train import QFormerTrainConfig, train as train_qformer
from genlab.vlm.siglip_pretrain import SiglipPretrainConfig, train as train_siglip

# One Q-Former shape for both stages (stage 2 loads stage 1's weights by name): CPU-sized.
DEMO_QFORMER = dict(num_query_tokens=16, num_layers=3)


def _siglip() -> SiglipPretrainConfig:
    cfg = SiglipPretrainConfig()
    return replace(cfg, train=replace(cfg.train, steps=120, checkpoint_every=60))


def _qformer() -> QFormerTrainConfig:
    cfg = QFormerTrainConfig()
    return replace(cfg, qformer=replace(cfg.qformer, **DEMO_QFORMER), itm=False,
                   eval=replace(cfg.eval, n_images=300),
                   train=replace(cfg.train, steps=60, batch_size=32, checkpoint_every=30, threads=1))


def _captioner() -> CaptionerConfig:
    cfg = CaptionerConfig()
    return replace(cfg, qformer=replace(cfg.qformer, **DEMO_QFORMER),
                   eval=replace(cfg.eval, n_images=16, n_questions=16, grid=8),
                   train=replace(cfg.train, steps=8, batch_size=16, warmup_steps=2, checkpoint_every=4, log_every=2,
                                 threads=1))


@dataclass
class QFormerDemoConfig:
    """Stage 0 (``--qformer.siglip.*``), stage 1 (``--qformer.qformer.*``) and stage 2
    (``--qformer.lm.*``, off with ``--qformer.no-captions``). The run folders and the vision /
    init_from links between the stages are set by the demo."""

    siglip: SiglipPretrainConfig = field(default_factory=_siglip)
    qformer: QFormerTrainConfig = field(default_factory=_qformer)
    lm: CaptionerConfig = field(default_factory=_captioner)
    captions: bool = True  # stage 2 (SmolLM2-135M with LoRA)


def _recall(run: Path) -> dict[str, Any]:
    report = json.loads((run / "eval.json").read_text())
    return {k: report[k] for k in report if k.startswith(("i2t", "t2i", "n_"))}


def demo(cfg: QFormerDemoConfig, out_dir: Path) -> dict[str, Any]:
    """The three stages in ``out_dir/{siglip,qformer,lm}`` (an earlier demo there is replaced)."""
    t0 = time.perf_counter()
    siglip = train_siglip(replace(cfg.siglip, run_dir=str(out_dir / "siglip")), overwrite=True)
    t1 = time.perf_counter()
    stage1 = train_qformer(replace(cfg.qformer, run_dir=str(out_dir / "qformer"), vision=str(siglip / "vision")),
                           overwrite=True)
    t2 = time.perf_counter()
    summary: dict[str, Any] = {
        "siglip": {"run_dir": str(siglip), "seconds": round(t1 - t0, 1), **_recall(siglip),
                   "vision": str(siglip / "vision")},
        "qformer": {"run_dir": str(stage1), "seconds": round(t2 - t1, 1), **_recall(stage1),
                    "pictures": {"similarity": str(stage1 / "similarity.png"), "loss": str(stage1 / "loss.png")}},
    }
    if cfg.captions:
        lm_cfg = replace(cfg.lm, run_dir=str(out_dir / "lm"), vision=str(siglip / "vision"),
                         train=replace(cfg.lm.train, init_from=str(stage1)))
        stage2 = train_lm(lm_cfg, overwrite=True)
        report = json.loads((stage2 / "eval.json").read_text())
        summary["lm"] = {"run_dir": str(stage2), "seconds": round(time.perf_counter() - t2, 1),
                         "before": report.get("before"), "after": report.get("after"),
                         "pictures": {"captions": str(stage2 / "captions.png"), "loss": str(stage2 / "loss.png")},
                         "captions_csv": str(stage2 / "captions.csv")}
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    return summary
