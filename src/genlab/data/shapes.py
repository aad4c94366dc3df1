"""A procedural CLEVR-like world: flat coloured shapes on a plain background, with captions and Q/A.

Nothing is downloaded: a scene is a few numbers drawn from a ``numpy.random.Generator``, and an
image is drawn from the scene with PIL at any resolution. The same scene always gives the same
image, caption and answers, so a seeded generator gives a reproducible, endless dataset.

    >>> rng = np.random.default_rng(0)
    >>> scene = sample_scene(rng, max_objects=2)
    >>> image = render_scene(scene, 32)            # uint8 (32, 32, 3)
    >>> describe(scene)                            # e.g. 'a small red circle and a large blue square'
    >>> [(qa.question, qa.answer) for qa in make_qa(scene, rng)]

Conventions every user can rely on:

* coordinates are fractions of the image side, ``x`` to the right and ``y`` downwards;
* an object of half-extent ``r`` lies inside the box ``[x - r, x + r] x [y - r, y + r]``;
  the boxes of two objects never overlap (so neither do the objects), and their centres differ
  in ``x`` by at least ``MIN_X_GAP``, so "left to right" is always well defined (captions list
  objects in that order);
* colours are drawn flat (no anti-aliasing): a pixel inside an object has exactly its RGB value.

Scenes are placed by rejection: a crowded scene is started over, and after ``MAX_RESTARTS`` fresh
starts ``sample_scene`` gives up with a ConfigError (a ValueError) saying how many objects fit.
``max_objects_that_fit(sizes)`` / ``check_scene_capacity(max_objects, sizes)`` answer that up
front, so impossible settings fail before any work. ``write_scene_images`` writes PNGs and their
captions for trying a model by hand.

This module knows no model: it yields arrays and plain records (strings, dataclasses).
"""

from __future__ import annotations

import functools
import io
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from genlab.errors import ConfigError
from genlab.io import atomic_write_bytes, atomic_write_json, atomic_write_text

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 210, 30),
    "purple": (150, 60, 190),
    "cyan": (40, 210, 220),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 0.12, "large": 0.2}  # half-extent, as a fraction of the image side
BACKGROUND: tuple[int, int, int] = (128, 128, 128)
MIN_X_GAP = 0.08  # centres at least this far apart horizontally
MIN_GAP = 0.03  # free space between two objects' boxes
QUESTION_KINDS: tuple[str, ...] = ("count", "color", "shape", "size", "exists")
# A scene that cannot be completed is started over at most this many times before sample_scene gives
# up. Settings that max_objects_that_fit accepts succeed in >= 5% of starts, so they fail with
# probability below 0.95 ** 2000 (1e-45); an impossible setting fails in about a second.
MAX_RESTARTS = 2000


@dataclass(frozen=True)
class ShapeObject:
    """One object: what it is (colour, shape, size) and where its centre is (fractions of the side)."""

    color: str
    shape: str
    size: str
    x: float
    y: float

    @property
    def radius(self) -> float:
        return SIZES[self.size]

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape}"


@dataclass(frozen=True)
class ShapesScene:
    """A scene: its objects, sorted left to right, on a plain background."""

    objects: tuple[ShapeObject, ...]
    background: tuple[int, int, int] = BACKGROUND

    def count(self, **attrs: str) -> int:
        """How many objects have all the given attributes, e.g. ``count(shape="circle")``."""
        return sum(all(getattr(o, k) == v for k, v in attrs.items()) for o in self.objects)


@dataclass(frozen=True)
class QA:
    """A question about a scene, its one-word answer and its kind (one of QUESTION_KINDS)."""

    question: str
    answer: str
    kind: str


def sample_scene(rng: np.random.Generator, min_objects: int = 1, max_objects: int = 3,
                 colors: tuple[str, ...] = tuple(COLORS), shapes: tuple[str, ...] = SHAPES,
                 sizes: tuple[str, ...] = tuple(SIZES), max_tries: int = 200,
                 max_restarts: int = MAX_RESTARTS) -> ShapesScene:
    """A random scene of ``min_objects``..``max_objects`` objects (uniform count), each with a uniform
    colour, shape and size, placed uniformly where it fits without overlapping the others.
    Uses only ``rng``; the same generator state gives the same scene. A scene that gets crowded is
    started over (new objects); after ``max_restarts`` fresh starts it raises a ConfigError (a
    ValueError) saying how many objects of these sizes fit."""
    _check_choices(min_objects, max_objects, colors, shapes, sizes)
    n = int(rng.integers(min_objects, max_objects + 1))
    restarts = 0
    while (placed := _place(rng, n, colors, shapes, sizes, max_tries)) is None:
        restarts += 1  # crowded: start the scene over (the next attempt draws new objects)
        if restarts >= max_restarts:
            fit = max_objects_that_fit(tuple(sizes), max_tries=max_tries)
            raise ConfigError(
                f"cannot place {n} objects of sizes {list(sizes)} without overlap: {restarts} fresh starts of "
                f"the scene all got stuck. At most {fit} objects of these sizes fit reliably; ask for fewer "
                f"objects (max_objects <= {fit}) or smaller sizes")
    return ShapesScene(tuple(sorted(placed, key=lambda o: o.x)))


def _check_choices(min_objects: int, max_objects: int, colors, shapes, sizes) -> None:
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    for name, chosen, known in (("colors", colors, COLORS), ("shapes", shapes, SHAPES), ("sizes", sizes, SIZES)):
        if not chosen or any(c not in known for c in chosen):
            raise ValueError(f"{name}={chosen!r}: choose from {list(known)}")


def _place(rng: np.random.Generator, n: int, colors, shapes, sizes, max_tries: int) -> list[ShapeObject] | None:
    """One attempt at ``n`` objects, placed one after another (each tries ``max_tries`` uniform
    positions); None when one of them finds no free place."""
    placed: list[ShapeObject] = []
    while len(placed) < n:
        color, shape, size = colors[rng.integers(len(colors))], shapes[rng.integers(len(shapes))], \
            sizes[rng.integers(len(sizes))]
        r = SIZES[size]
        for _ in range(max_tries):
            x, y = rng.uniform(r, 1 - r, size=2)
            if all(_fits(x, y, r, o) for o in placed):
                placed.append(ShapeObject(color, shape, size, float(x), float(y)))
                break
        else:
            return None
    return placed


@functools.lru_cache(maxsize=None)
def max_objects_that_fit(sizes: tuple[str, ...] = tuple(SIZES), *, max_tries: int = 200,
                         min_success: float = 0.05, trials: int = 400) -> int:
    """The largest number of objects of ``sizes`` that ``sample_scene`` places reliably: the largest
    n for which at least ``min_success`` of its attempts at n objects succeed (so a scene takes on
    average at most 1 / min_success starts). Estimated with ``trials`` attempts from a fixed private
    seed, so the answer is the same on every call (and cached); at the defaults it is 5 for small and
    large, 6 for small only and 3 for large only. Costs about half a second the first time."""
    _check_choices(1, 1, tuple(COLORS), SHAPES, sizes)
    rng = np.random.default_rng(20_251_201)  # private: the caller's generators are not touched
    need = math.ceil(min_success * trials)
    n = 1  # a single object always fits
    while True:
        ok = 0
        for t in range(trials):
            ok += _place(rng, n + 1, ("red",), ("circle",), sizes, max_tries) is not None
            if ok >= need or ok + trials - 1 - t < need:  # decided either way
                break
        if ok < need:
            return n
        n += 1


def check_scene_capacity(max_objects: int, sizes: tuple[str, ...] = tuple(SIZES), max_tries: int = 200) -> None:
    """Raise a ConfigError (a ValueError) when scenes of ``max_objects`` objects of ``sizes`` do not
    fit reliably (see ``max_objects_that_fit``), before any scene is drawn."""
    fit = max_objects_that_fit(tuple(sizes), max_tries=max_tries)
    if max_objects > fit:
        raise ConfigError(f"max_objects={max_objects} objects of sizes {list(sizes)} do not fit in one scene without "
                          f"overlap: at most {fit} fit reliably; use max_objects <= {fit} (or smaller sizes)")


def _fits(x: float, y: float, r: float, other: ShapeObject) -> bool:
    """Every shape lies in its box, so boxes apart by MIN_GAP (in x or in y) keep shapes apart."""
    reach = r + other.radius + MIN_GAP
    apart = abs(x - other.x) >= reach or abs(y - other.y) >= reach
    return apart and abs(x - other.x) >= MIN_X_GAP


def render_scene(scene: ShapesScene, size: int) -> np.ndarray:
    """The scene drawn at ``size`` x ``size`` pixels: uint8 array (size, size, 3)."""
    image = Image.new("RGB", (size, size), scene.background)
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        cx, cy, r = o.x * size, o.y * size, o.radius * size
        rgb = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
        elif o.shape == "square":  # fills its box
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=rgb)
        elif o.shape == "triangle":  # pointing up, its base on the bottom of the box
            draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=rgb)
        else:
            raise ValueError(f"unknown shape {o.shape!r}; known: {SHAPES}")
    return np.asarray(image)


def describe(scene: ShapesScene) -> str:
    """The caption: every object as "a <size> <color> <shape>", left to right,
    e.g. "a small red circle, a large blue square and a small green triangle"."""
    phrases = [o.phrase for o in scene.objects]
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def make_qa(scene: ShapesScene, rng: np.random.Generator, kinds: tuple[str, ...] = QUESTION_KINDS) -> list[QA]:
    """One question of each kind in ``kinds`` that the scene can answer unambiguously:

    * count  -- "how many shapes are there?" -> "2" (a digit);
    * color  -- "what color is the circle?" (a shape present exactly once) -> "red";
    * shape  -- "what shape is the red object?" (a colour present exactly once) -> "circle";
    * size   -- "what size is the red circle?" (a colour + shape present once) -> "small" | "large";
    * exists -- "is there a triangle?" or "is there a green object?" -> "yes" | "no", each half the time
      when the scene allows both.
    Subjects are drawn with ``rng``; kinds the scene cannot ask (e.g. no unique shape) are left out.
    """
    unknown = set(kinds) - set(QUESTION_KINDS)
    if unknown:
        raise ValueError(f"unknown question kinds {sorted(unknown)}; known: {QUESTION_KINDS}")
    objs = scene.objects
    out: list[QA] = []
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    for kind in kinds:
        if kind == "count":
            out.append(QA("how many shapes are there?", str(len(objs)), kind))
        elif kind == "color":
            unique = [o for o in objs if scene.count(shape=o.shape) == 1]
            if unique:
                o = pick(unique)
                out.append(QA(f"what color is the {o.shape}?", o.color, kind))
        elif kind == "shape":
            unique = [o for o in objs if scene.count(color=o.color) == 1]
            if unique:
                o = pick(unique)
                out.append(QA(f"what shape is the {o.color} object?", o.shape, kind))
        elif kind == "size":
            unique = [o for o in objs if scene.count(color=o.color, shape=o.shape) == 1]
            if unique:
                o = pick(unique)
                out.append(QA(f"what size is the {o.color} {o.shape}?", o.size, kind))
        elif kind == "exists":
            attr, values = ("shape", SHAPES) if rng.random() < 0.5 else ("color", tuple(COLORS))
            present = [v for v in values if scene.count(**{attr: v})]
            absent = [v for v in values if v not in present]
            want_yes = bool(rng.random() < 0.5) if absent else True
            value = pick(present if want_yes else absent)
            noun = value if attr == "shape" else f"{value} object"
            out.append(QA(f"is there a {noun}?", "yes" if want_yes else "no", kind))
    return out


def vocabulary() -> list[str]:
    """Every word a caption, question or answer of this world can contain (sorted)."""
    words = {"a", "and", *COLORS, *SHAPES, *SIZES, "yes", "no", *(str(i) for i in range(10))}
    for text in ("how many shapes are there?", "what color is the", "what shape is the object?",
                 "what size is the", "is there a"):
        words.update(text.replace("?", "").split())
    return sorted(words)


def text_corpus(rng: np.random.Generator, n_scenes: int = 500, **scene_kw) -> list[str]:
    """Captions, questions and answers of ``n_scenes`` random scenes: a corpus for training a
    tokenizer that knows this world's words (every word of ``vocabulary()`` appears in it)."""
    texts = [" ".join(vocabulary())]
    for _ in range(n_scenes):
        scene = sample_scene(rng, **scene_kw)
        texts.append(describe(scene))
        for qa in make_qa(scene, rng):
            texts += [qa.question, qa.answer]
    return texts


def write_scene_images(out_dir: str | os.PathLike, n: int = 4, image_size: int = 64, seed: int = 0,
                       min_objects: int = 1, max_objects: int = 2) -> list[Path]:
    """Draw ``n`` random scenes (``np.random.default_rng(seed)``) and write them as
    ``out_dir/scene_000.png`` ... (``image_size`` pixels square), plus their captions in
    ``scenes.txt`` (one ``scene_000.png | caption en | <caption>`` line each, the format
    ``genlab vlm generate`` prints, so the two can be compared line by line) and ``scenes.json``
    (image, caption and objects of each). Every file is written atomically. Returns the PNG paths.
    Files of an earlier call with a larger ``n`` are left as they are (scenes.txt lists this call's)."""
    for name, value in (("n", n), ("image_size", image_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    _check_choices(min_objects, max_objects, tuple(COLORS), SHAPES, tuple(SIZES))
    check_scene_capacity(max_objects)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file, not a folder: give a folder to write the scene images into")
    from genlab.config import folder_problem

    if folder_problem(out):
        raise ConfigError(f"{out}: {folder_problem(out)}")
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width = max(3, len(str(n - 1)))
    paths, lines, records = [], [], []
    for i in range(n):
        scene = sample_scene(rng, min_objects=min_objects, max_objects=max_objects)
        buf = io.BytesIO()
        Image.fromarray(render_scene(scene, image_size)).save(buf, format="PNG")
        path = out / f"scene_{i:0{width}d}.png"
        atomic_write_bytes(path, buf.getvalue())
        caption = describe(scene)
        paths.append(path)
        lines.append(f"{path.name} | caption en | {caption}\n")
        records.append({"image": path.name, "caption": caption, "objects": [asdict(o) for o in scene.objects]})
    atomic_write_text(out / "scenes.txt", "".join(lines))
    atomic_write_json(out / "scenes.json", records)
    return paths
