"""The data family's commands (read by ``genlab.cli``; it has no demo hook: it writes datasets, it trains nothing).

    genlab data clevr --out data/shapes-clevr --train 20000 --val 2000 --image-size 64
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from genlab.commands import Command


@dataclass
class ClevrArgs:
    """Write the procedural shapes world in the CLEVR v1.0 layout (images/, questions/, scenes/), offline.

    Each image holds --min-objects..--max-objects of CLEVR's objects (8 colours, cube / sphere /
    cylinder, large / small, rubber / metal) and gets up to --questions-per-image questions with
    CLEVR programs and answers computed from its scene graph."""

    out: str  # the folder to write (CLEVR_v1.0's layout); it must be new or empty unless --overwrite
    train: int = 1000  # images in the train split
    val: int = 100  # images in the val split
    image_size: int = 64  # pixels a side (small for CPU models; 224 or 448 for a real PaliGemma)
    seed: int = 0
    min_objects: int = 3
    max_objects: int = 10
    questions_per_image: int = 5
    overwrite: bool = False  # replace everything in a folder that is not empty

    def checks(self) -> Iterable:
        from genlab.config import folder_problem, non_negative, positive, seed_check
        from genlab.data.shapes import MAX_OBJECTS

        yield from non_negative("train", "val", cfg=self)
        yield "train", self.train + self.val >= 1, "--train and --val are both 0: ask for at least one image"
        yield "train", self.train <= 1_000_000, "must be <= 1000000"
        yield "val", self.val <= 1_000_000, "must be <= 1000000"
        yield "image_size", 16 <= self.image_size <= 2048, "must be in [16, 2048] (pixels a side)"
        yield from positive("min_objects", "questions_per_image", cfg=self)
        yield "max_objects", self.min_objects <= self.max_objects <= MAX_OBJECTS, \
            f"must be in [--min-objects, {MAX_OBJECTS}] (CLEVR's scenes hold up to {MAX_OBJECTS} objects)"
        yield "questions_per_image", self.questions_per_image <= 100, "must be <= 100"
        yield seed_check(cfg=self)
        yield "out", folder_problem(self.out) is None, folder_problem(self.out) or ""


def clevr_cmd(args: ClevrArgs) -> dict:
    from genlab.config import validate
    from genlab.data.clevr import write_clevr

    validate(args)
    summary = write_clevr(args.out, {"train": args.train, "val": args.val}, image_size=args.image_size,
                          seed=args.seed, min_objects=args.min_objects, max_objects=args.max_objects,
                          questions_per_image=args.questions_per_image, overwrite=args.overwrite)
    print(f"wrote {args.out} (CLEVR v1.0 layout, {args.image_size}x{args.image_size} images)")
    for split, n in summary.items():
        print(f"  {split}: {n['images']} images, {n['questions']} questions "
              f"(images/{split}/, questions/CLEVR_{split}_questions.json, scenes/CLEVR_{split}_scenes.json)")
    return summary


COMMANDS = {
    "clevr": Command("genlab.data.cli:clevr_cmd", "genlab.data.cli:ClevrArgs",
                     "write the shapes world as a CLEVR v1.0 folder (images, questions, scenes)"),
}
