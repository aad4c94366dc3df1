"""CLEVR v1.0 on disk: write the shapes world in CLEVR's layout, and read that layout (real CLEVR too).

The layout (what CLEVR_v1.0.zip unpacks to, and what ``write_clevr`` / ``genlab data clevr`` write):

    ROOT/images/{split}/CLEVR_{split}_000000.png ...
    ROOT/questions/CLEVR_{split}_questions.json   {"info": {...}, "questions": [{"image_index", "image_filename",
                                                   "split", "question", "answer", "question_family_index",
                                                   "question_index", "program"}, ...]}
    ROOT/scenes/CLEVR_{split}_scenes.json         {"info": {...}, "scenes": [{"split", "image_index",
                                                   "image_filename", "objects", "relationships", "directions"}]}

Real CLEVR's test split has questions without "answer" / "program" and no scenes file: ``load_clevr``
serves it for prediction only (answers are None). A program is a list of ``{"function" (older files:
"type"), "inputs", "value_inputs"}`` nodes; ``execute_program(scene, program)`` computes its answer
from a scene graph. Fields the reader does not use are ignored.

    >>> write_clevr("data/shapes-clevr", {"train": 1000, "val": 100}, image_size=64)
    >>> split = load_clevr("data/shapes-clevr", "train")
    >>> q = split.questions[0]; load_image(q.image), q.question, q.answer, q.family
    >>> captions(split.scene(q.image_index))
"""

from __future__ import annotations

import io
import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from genlab.data.questions import QUESTION_KINDS, captions, category, check_kinds, execute_program, sample_questions
from genlab.data.shapes import (MAX_OBJECTS, SIZES, check_scene_capacity, object_scale, render_scene, sample_scene,
                                scene_graph)
from genlab.errors import ConfigError, FileFormatError
from genlab.io import atomic_write_bytes, atomic_write_text, fsync_dir

__all__ = ["ClevrQuestion", "ClevrSplit", "SPLITS", "captions", "execute_program", "load_clevr", "load_image",
           "write_clevr"]

SPLITS = ("train", "val", "test")
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
MIN_OBJECT_PIXELS = 2.0  # the smallest object's half-extent, in pixels, below which shapes cannot be told apart
LAYOUT = ("images/{split}/CLEVR_{split}_000000.png ..., questions/CLEVR_{split}_questions.json "
          "and (but for test) scenes/CLEVR_{split}_scenes.json")


def questions_path(root: Path, split: str) -> Path:
    return root / "questions" / f"CLEVR_{split}_questions.json"


def scenes_path(root: Path, split: str) -> Path:
    return root / "scenes" / f"CLEVR_{split}_scenes.json"


def image_name(split: str, index: int) -> str:
    return f"CLEVR_{split}_{index:06d}.png"


# ----------------------------------------------------------------------------- writing

def _int(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low or \
            (high is not None and value > high):
        raise ConfigError(f"{name} must be an integer in [{low}, {high if high is not None else 'inf'}], "
                          f"got {value!r}")
    return int(value)


def _check_write(out: Path, splits: dict, image_size: int, seed: int, min_objects: int, max_objects: int,
                 questions_per_image: int, kinds: Sequence[str], overwrite: bool) -> dict[str, int]:
    """Every argument of ``write_clevr``, checked before anything is written."""
    if not isinstance(splits, dict) or not splits:
        raise ConfigError(f"splits must map split names to image counts, e.g. {{'train': 100}}, got {splits!r}")
    counts = {}
    for name, n in splits.items():
        if name not in ("train", "val"):
            raise ConfigError(f"split {name!r}: the generator writes train and val splits (CLEVR's test split "
                              f"has no answers and is not generated)")
        counts[name] = _int(f"the {name} split's image count", n, 0, 1_000_000)
    if not any(counts.values()):
        raise ConfigError("every split has 0 images: ask for at least one image")
    _int("image_size", image_size, 16, 2048)
    _int("seed", seed, 0, 2**63 - 1)
    _int("min_objects", min_objects, 1, MAX_OBJECTS)
    _int("max_objects", max_objects, min_objects, MAX_OBJECTS)
    _int("questions_per_image", questions_per_image, 1, 100)
    check_kinds(kinds)
    check_scene_capacity(max_objects)
    smallest = min(SIZES.values()) * object_scale(max_objects) * image_size
    if smallest < MIN_OBJECT_PIXELS:
        raise ConfigError(f"image_size={image_size} is too small for {max_objects} objects: a small object would be "
                          f"{2 * smallest:.1f} pixels across; use a larger image_size or fewer objects")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file, not a folder: give a folder to write the CLEVR layout into")
    for up in out.parents:
        if up.exists():
            if not up.is_dir():
                raise ConfigError(f"{out}: {up} is a file, not a folder")
            break
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} is not empty: give an empty or new folder, or overwrite=True "
                          f"(--overwrite) to replace everything in it")
    return counts


def write_clevr(out: str | Path, splits: dict[str, int] | None = None, image_size: int = 64, seed: int = 0,
                min_objects: int = 3, max_objects: int = 10, questions_per_image: int = 5,
                kinds: Sequence[str] = QUESTION_KINDS, overwrite: bool = False) -> dict[str, dict[str, int]]:
    """Write shapes-world scenes in the CLEVR v1.0 layout under ``out`` (see the module docstring):
    ``splits`` maps "train" / "val" to an image count (default 100 / 20); each image holds
    ``min_objects``..``max_objects`` objects (CLEVR: 3..10) and gets up to ``questions_per_image``
    different questions of ``kinds``. Image i of a split depends on (seed, split, i) only, so a
    smaller dataset is a prefix of a larger one. Every argument is checked before anything is
    written; the folder is built beside ``out`` and moved into place at the end (a folder that is
    not empty is refused unless ``overwrite``, which replaces it). Returns {split: {"images": n,
    "questions": m}}."""
    out = Path(out)
    splits = {"train": 100, "val": 20} if splits is None else splits
    counts = _check_write(out, splits, image_size, seed, min_objects, max_objects, questions_per_image, kinds,
                          overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        summary = {split: _write_split(tmp, split, n, image_size, seed, min_objects, max_objects,
                                       questions_per_image, kinds) for split, n in counts.items() if n}
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{tmp.name}"
            out.rename(old)
        tmp.rename(out)
        fsync_dir(out.parent)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _write_split(root: Path, split: str, n: int, image_size: int, seed: int, min_objects: int, max_objects: int,
                 questions_per_image: int, kinds: Sequence[str]) -> dict[str, int]:
    (root / "images" / split).mkdir(parents=True)
    (root / "questions").mkdir(exist_ok=True)
    (root / "scenes").mkdir(exist_ok=True)
    info = {"split": split, "version": "1.0", "generator": "genlab.data.clevr (the procedural shapes world)",
            "seed": seed, "image_size": image_size, "min_objects": min_objects, "max_objects": max_objects,
            "license": "generated data: no restrictions"}
    scenes, questions = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, _SPLIT_IDS[split], i])
        scene = sample_scene(rng, min_objects=min_objects, max_objects=max_objects)
        name = image_name(split, i)
        buf = io.BytesIO()
        Image.fromarray(render_scene(scene, image_size)).save(buf, format="PNG")
        atomic_write_bytes(root / "images" / split / name, buf.getvalue())
        graph = scene_graph(scene, image_size, image_index=i, split=split, image_filename=name)
        scenes.append(graph)
        for qa in sample_questions(graph, rng, questions_per_image, kinds):
            questions.append({"image_index": i, "image_filename": name, "split": split, "question": qa.question,
                              "answer": qa.answer, "question_family_index": qa.family_index,
                              "question_index": len(questions), "program": list(qa.program)})
    atomic_write_text(questions_path(root, split), json.dumps({"info": info, "questions": questions}))
    atomic_write_text(scenes_path(root, split), json.dumps({"info": info, "scenes": scenes}))
    return {"images": n, "questions": len(questions)}


# ----------------------------------------------------------------------------- reading

@dataclass(frozen=True)
class ClevrQuestion:
    """One question record. ``answer`` and ``program`` are None in CLEVR's test split; ``family`` is
    CLEVR's category of the program's last function (exist, count, query_attribute,
    compare_attribute, compare_integer), None without a program."""

    image: Path
    image_index: int
    question: str
    answer: str | None
    family: str | None
    family_index: int | None
    question_index: int
    program: tuple[dict, ...] | None


@dataclass
class ClevrSplit:
    """The questions of one split, and its scene graphs when the split has a scenes file."""

    root: Path
    split: str
    questions: list[ClevrQuestion]
    scenes: dict[int, dict] | None  # image_index -> scene record

    @property
    def has_answers(self) -> bool:
        return all(q.answer is not None for q in self.questions)

    def require_answers(self) -> None:
        """Raise a ConfigError when some question has no answer (CLEVR's test split: prediction only)."""
        if not self.has_answers:
            raise ConfigError(f"{questions_path(self.root, self.split)}: the {self.split} split has questions without "
                              f"answers (as CLEVR's test split): it serves prediction only; train or score on "
                              f"train / val")

    def scene(self, image_index: int) -> dict:
        if self.scenes is None:
            raise ConfigError(f"{scenes_path(self.root, self.split)}: no scenes file for the {self.split} split "
                              f"(CLEVR's test split has none)")
        if image_index not in self.scenes:
            raise FileFormatError(f"{scenes_path(self.root, self.split)}: no scene for image_index {image_index}")
        return self.scenes[image_index]

    @property
    def images(self) -> list[Path]:
        """Every image the questions refer to, in image_index order."""
        return [p for _, p in sorted({(q.image_index, q.image) for q in self.questions})]


def _find_root(root: Path) -> Path:
    """``root`` itself, or its CLEVR_v1.0 subfolder (where the zip unpacks)."""
    if not (root / "questions").is_dir() and (root / "CLEVR_v1.0" / "questions").is_dir():
        return root / "CLEVR_v1.0"
    return root


def _read_json(path: Path, key: str) -> list:
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; a CLEVR v1.0 folder holds {LAYOUT} (unpack CLEVR_v1.0.zip there, "
                          f"or write one with `genlab data clevr --out DIR`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FileFormatError(f"{path}: not valid JSON ({e}); expected {{\"info\": ..., \"{key}\": [...]}}") from e
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise FileFormatError(f"{path}: expected a JSON object with a \"{key}\" list (CLEVR v1.0's format)")
    return data[key]


def _record_problem(record: Any, needs: dict[str, type]) -> str | None:
    if not isinstance(record, dict):
        return "is not a JSON object"
    for key, tp in needs.items():
        if key not in record:
            return f"has no \"{key}\""
        if not isinstance(record[key], tp) or (tp is int and isinstance(record[key], bool)):
            return f"has a \"{key}\" that is not a {tp.__name__}"
    return None


def _program(path: Path, k: int, program: Any) -> tuple[dict, ...]:
    if not isinstance(program, list) or not program or not all(
            isinstance(n, dict) and isinstance(n.get("function", n.get("type")), str) for n in program):
        raise FileFormatError(f"{path}: question {k}'s \"program\" is not a list of {{\"function\", \"inputs\", "
                              f"\"value_inputs\"}} nodes")
    return tuple(program)


def load_clevr(root: str | Path, split: str, check_images: bool = True) -> ClevrSplit:
    """The questions (and scenes, where the file exists) of ``split`` in the CLEVR v1.0 folder ``root``
    (or ``root/CLEVR_v1.0``). Every problem is one ConfigError / FileFormatError naming the file: a
    missing folder or questions file, a file that is not JSON or lacks CLEVR's keys, a question
    without "question" / "image_index" / "image_filename", a question whose image is missing (when
    ``check_images``)."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{root}: no such folder; expected a CLEVR v1.0 folder holding {LAYOUT} (unpack "
                          f"CLEVR_v1.0.zip there, or write one with `genlab data clevr --out {root}`)")
    root = _find_root(root)
    if not re.fullmatch(r"[A-Za-z0-9_]+", split or ""):
        raise ConfigError(f"split {split!r}: give a split name such as {', '.join(SPLITS)}")
    qpath = questions_path(root, split)
    if not qpath.is_file() and not (root / "images" / split).is_dir():
        present = sorted(p.name for p in (root / "images").iterdir() if p.is_dir()) if (root / "images").is_dir() else []
        raise ConfigError(f"{qpath}: no such file, and no images/{split}/ folder: {root} has no split '{split}'"
                          + (f" (it has {', '.join(present)})" if present else f"; it should hold {LAYOUT}"))
    records = _read_json(qpath, "questions")
    questions, checked = [], {}
    for k, r in enumerate(records):
        problem = _record_problem(r, {"question": str, "image_index": int, "image_filename": str})
        if problem:
            raise FileFormatError(f"{qpath}: question {k} {problem} (CLEVR v1.0 question records hold image_index, "
                                  f"image_filename, question, and but for test answer and program)")
        image = root / "images" / split / r["image_filename"]
        if check_images:
            if image not in checked:
                checked[image] = image.is_file()
            if not checked[image]:
                raise FileFormatError(f"{qpath}: question {k} refers to the image {image}, which does not exist")
        answer = r.get("answer")
        program = _program(qpath, k, r["program"]) if r.get("program") is not None else None
        family_index = r.get("question_family_index")
        questions.append(ClevrQuestion(image=image, image_index=r["image_index"], question=r["question"],
                                       answer=None if answer is None else str(answer),
                                       family=category(program) if program else None,
                                       family_index=family_index if isinstance(family_index, int) else None,
                                       question_index=r.get("question_index", k), program=program))
    scenes = None
    spath = scenes_path(root, split)
    if spath.is_file():
        scenes = {}
        for k, s in enumerate(_read_json(spath, "scenes")):
            problem = _record_problem(s, {"image_index": int, "objects": list})
            if problem is None and not all(isinstance(o, dict) and {"color", "size", "shape", "material",
                                                                    "pixel_coords"} <= o.keys() for o in s["objects"]):
                problem = "has an object without color / size / shape / material / pixel_coords"
            if problem is None and s.get("relationships") is not None and not isinstance(s["relationships"], dict):
                problem = "has \"relationships\" that are not a JSON object"
            if problem:
                raise FileFormatError(f"{spath}: scene {k} {problem} (CLEVR v1.0 scene records hold image_index, "
                                      f"objects and relationships)")
            scenes[s["image_index"]] = s
    return ClevrSplit(root=root, split=split, questions=questions, scenes=scenes)


def load_image(path: str | Path, background: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """An image file as uint8 (H, W, 3): transparency (RGBA, LA, palette with a transparent colour)
    is composited over ``background`` (white by default), greyscale and palette images become RGB,
    16-bit greyscale is scaled to 8 bits. A missing or unreadable file is one error naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such image file")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                grey = np.asarray(im, dtype=np.float64)
                grey = np.clip(np.round(grey / (257.0 if grey.max() > 255 else 1.0)), 0, 255).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=-1)
            if im.mode == "P" and "transparency" in im.info or im.mode in ("LA", "PA", "La"):
                im = im.convert("RGBA")
            if im.mode == "RGBA":
                rgba = np.asarray(im).astype(np.uint32)
                a = rgba[..., 3:4]
                bg = np.asarray(background, dtype=np.uint32)
                return ((rgba[..., :3] * a + bg * (255 - a) + 127) // 255).astype(np.uint8)
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise FileFormatError(f"{path}: cannot read it as an image ({e})") from e
