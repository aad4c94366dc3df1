"""A procedural CLEVR-like world: CLEVR's objects drawn flat on a plain background, with scene graphs,
captions and CLEVR-style questions.

Nothing is downloaded: a scene is a few numbers drawn from a ``numpy.random.Generator``, and an
image is drawn from the scene with PIL at any resolution. The same scene always gives the same
image, captions and answers, so a seeded generator gives a reproducible, endless dataset.

    >>> rng = np.random.default_rng(0)
    >>> scene = sample_scene(rng, max_objects=2)
    >>> image = render_scene(scene, 32)            # uint8 (32, 32, 3)
    >>> describe(scene)                            # e.g. 'a small red rubber sphere and a large blue metal cube'
    >>> [(qa.question, qa.answer) for qa in make_qa(scene, rng)]
    >>> scene_graph(scene, image_size=64)           # the scene in CLEVR's scenes-JSON shape

The objects are CLEVR's: 8 colours, cube / sphere / cylinder (drawn as a square, a disc and an upright
cylinder with a lighter top face), large / small, rubber (flat colour) / metal (a white highlight at
the upper left). Conventions every user can rely on:

* coordinates are fractions of the image side, ``x`` to the right and ``y`` downwards (towards the
  viewer: a larger ``y`` is "in front");
* an object of half-extent ``r`` lies inside the box ``[x - r, x + r] x [y - r, y + r]``; the boxes
  of two objects never overlap (so neither do the objects), and their centres differ in ``x`` by at
  least ``MIN_X_GAP * scale``, so "left to right" is always well defined (captions list objects in
  that order);
* the pixel at an object's centre has exactly its colour's RGB value;
* object sizes shrink with the number of objects a scene may hold (``object_scale(max_objects)``),
  so that CLEVR's 10 objects fit in one image; all objects of one setting share one scale.

Scenes are placed by rejection: a crowded scene is started over, and after ``MAX_RESTARTS`` fresh
starts ``sample_scene`` gives up with a ConfigError (a ValueError) saying how many objects fit.
``max_objects_that_fit(sizes)`` / ``check_scene_capacity(max_objects, sizes)`` answer that up
front, so impossible settings fail before any work. Questions, programs and captions live in
``genlab.data.questions`` (they work on scene graphs, the built-in world's and real CLEVR's alike).

This module knows no model: it yields arrays and plain records (strings, dicts, dataclasses).
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

from genlab.data.questions import (ATTRIBUTES, MAX_COUNT, QA, QUESTION_KINDS, captions as graph_captions,
                                   make_questions, sample_questions, vocabulary)
from genlab.errors import ConfigError
from genlab.io import atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = ["BACKGROUND", "COLORS", "MATERIALS", "MAX_OBJECTS", "MIN_GAP", "MIN_X_GAP", "QA", "QUESTION_KINDS",
           "SHAPES", "SIZES", "ShapeObject", "ShapesScene", "captions", "check_scene_capacity", "describe",
           "make_qa", "max_objects_that_fit", "object_scale", "render_scene", "sample_questions", "sample_scene",
           "scene_graph", "text_corpus", "vocabulary", "write_scene_images"]

# CLEVR's colours (its metadata.json RGB values).
COLORS: dict[str, tuple[int, int, int]] = {
    "gray": (87, 87, 87), "red": (173, 35, 35), "blue": (42, 75, 215), "green": (29, 105, 20),
    "brown": (129, 74, 25), "purple": (129, 38, 192), "cyan": (41, 208, 208), "yellow": (255, 238, 51),
}
SHAPES: tuple[str, ...] = ATTRIBUTES["shape"]  # cube, sphere, cylinder
SIZES: dict[str, float] = {"large": 0.2, "small": 0.12}  # half-extent at scale 1, as a fraction of the side
MATERIALS: tuple[str, ...] = ATTRIBUTES["material"]  # rubber, metal
assert tuple(COLORS) == ATTRIBUTES["color"] and tuple(SIZES) == ATTRIBUTES["size"]
BACKGROUND: tuple[int, int, int] = (160, 160, 160)
MIN_X_GAP = 0.08  # centres at least MIN_X_GAP * scale apart horizontally
MIN_GAP = 0.03  # free space between two objects' boxes
MAX_OBJECTS = MAX_COUNT  # CLEVR's most objects in a scene (10)
CROWD = 2.5  # object_scale(n) = min(1, sqrt(CROWD / n)): up to 2 objects keep the full size
# A scene that cannot be completed is started over at most this many times before sample_scene gives
# up. Settings that max_objects_that_fit accepts succeed in >= 5% of starts, so they fail with
# probability below 0.95 ** 2000 (1e-45); an impossible setting fails in about a second.
MAX_RESTARTS = 2000
REL_EPS = 0.05  # world units: two objects closer than this along a direction are not related along it
WORLD = 6.0  # the image side in CLEVR's world units (3d_coords lie in [-3, 3])
CAMERA = (0.0, -10.0, 8.0)  # a camera in front of the scene, above the floor (for pixel_coords' depth)


def object_scale(max_objects: int) -> float:
    """The size factor of every object in scenes of up to ``max_objects`` objects: 1 up to 2 objects,
    then shrinking as 1 / sqrt(n), so the objects' area stays about the same (0.5 at 10)."""
    return min(1.0, math.sqrt(CROWD / max(1, max_objects)))


@dataclass(frozen=True)
class ShapeObject:
    """One object: what it is (colour, shape, size, material), where its centre is (fractions of the
    side) and its size factor (see ``object_scale``)."""

    color: str
    shape: str
    size: str
    material: str
    x: float
    y: float
    scale: float = 1.0

    @property
    def radius(self) -> float:
        return SIZES[self.size] * self.scale

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.material} {self.shape}"


@dataclass(frozen=True)
class ShapesScene:
    """A scene: its objects, sorted left to right, on a plain background."""

    objects: tuple[ShapeObject, ...]
    background: tuple[int, int, int] = BACKGROUND

    def count(self, **attrs: str) -> int:
        """How many objects have all the given attributes, e.g. ``count(shape="cube")``."""
        return sum(all(getattr(o, k) == v for k, v in attrs.items()) for o in self.objects)


def sample_scene(rng: np.random.Generator, min_objects: int = 1, max_objects: int = 3,
                 colors: tuple[str, ...] = tuple(COLORS), shapes: tuple[str, ...] = SHAPES,
                 sizes: tuple[str, ...] = tuple(SIZES), materials: tuple[str, ...] = MATERIALS,
                 max_tries: int = 200, max_restarts: int = MAX_RESTARTS) -> ShapesScene:
    """A random scene of ``min_objects``..``max_objects`` objects (uniform count), each with a uniform
    colour, shape, size and material, at ``object_scale(max_objects)``, placed uniformly where it fits
    without overlapping the others. Uses only ``rng``; the same generator state gives the same scene.
    A scene that gets crowded is started over (new objects); after ``max_restarts`` fresh starts it
    raises a ConfigError (a ValueError) saying how many objects of these sizes fit."""
    _check_choices(min_objects, max_objects, colors, shapes, sizes, materials)
    n, scale = int(rng.integers(min_objects, max_objects + 1)), object_scale(max_objects)
    restarts = 0
    while (placed := _place(rng, n, scale, colors, shapes, sizes, materials, max_tries)) is None:
        restarts += 1  # crowded: start the scene over (the next attempt draws new objects)
        if restarts >= max_restarts:
            fit = max_objects_that_fit(tuple(sizes), max_tries=max_tries)
            raise ConfigError(
                f"cannot place {n} objects of sizes {list(sizes)} without overlap: {restarts} fresh starts of "
                f"the scene all got stuck. At most {fit} objects of these sizes fit reliably; ask for fewer "
                f"objects (max_objects <= {fit}) or smaller sizes")
    return ShapesScene(tuple(sorted(placed, key=lambda o: o.x)))


def _check_choices(min_objects: int, max_objects: int, colors, shapes, sizes, materials=MATERIALS) -> None:
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    if max_objects > MAX_OBJECTS:
        raise ValueError(f"max_objects={max_objects}: at most {MAX_OBJECTS} objects (CLEVR's most)")
    for name, chosen, known in (("colors", colors, COLORS), ("shapes", shapes, SHAPES), ("sizes", sizes, SIZES),
                                ("materials", materials, MATERIALS)):
        if not chosen or any(c not in known for c in chosen):
            raise ValueError(f"{name}={chosen!r}: choose from {list(known)}")


def _place(rng: np.random.Generator, n: int, scale: float, colors, shapes, sizes, materials,
           max_tries: int) -> list[ShapeObject] | None:
    """One attempt at ``n`` objects, placed one after another (each tries ``max_tries`` uniform
    positions); None when one of them finds no free place."""
    placed: list[ShapeObject] = []
    while len(placed) < n:
        color, shape = colors[rng.integers(len(colors))], shapes[rng.integers(len(shapes))]
        size, material = sizes[rng.integers(len(sizes))], materials[rng.integers(len(materials))]
        r = SIZES[size] * scale
        for _ in range(max_tries):
            x, y = rng.uniform(r, 1 - r, size=2)
            if all(_fits(x, y, r, scale, o) for o in placed):
                placed.append(ShapeObject(color, shape, size, material, float(x), float(y), scale))
                break
        else:
            return None
    return placed


def _fits(x: float, y: float, r: float, scale: float, other: ShapeObject) -> bool:
    """Every shape lies in its box, so boxes apart by MIN_GAP (in x or in y) keep shapes apart."""
    reach = r + other.radius + MIN_GAP
    apart = abs(x - other.x) >= reach or abs(y - other.y) >= reach
    return apart and abs(x - other.x) >= MIN_X_GAP * scale


@functools.lru_cache(maxsize=None)
def max_objects_that_fit(sizes: tuple[str, ...] = tuple(SIZES), *, max_tries: int = 200,
                         min_success: float = 0.05, trials: int = 400) -> int:
    """The largest number n <= MAX_OBJECTS of objects of ``sizes`` that ``sample_scene`` places
    reliably at ``object_scale(n)``: at least ``min_success`` of its attempts at n objects succeed (so a
    scene takes on average at most 1 / min_success starts). Estimated with ``trials`` attempts from a
    fixed private seed, so the answer is the same on every call (and cached); at the defaults it is
    MAX_OBJECTS (10) for every choice of sizes. Costs up to a second the first time."""
    _check_choices(1, 1, tuple(COLORS), SHAPES, sizes)
    rng = np.random.default_rng(20_251_201)  # private: the caller's generators are not touched
    need = math.ceil(min_success * trials)
    n = 1  # a single object always fits
    while n < MAX_OBJECTS:
        ok = 0
        for t in range(trials):
            ok += _place(rng, n + 1, object_scale(n + 1), ("red",), ("cube",), sizes, ("rubber",),
                         max_tries) is not None
            if ok >= need or ok + trials - 1 - t < need:  # decided either way
                break
        if ok < need:
            return n
        n += 1
    return n


def check_scene_capacity(max_objects: int, sizes: tuple[str, ...] = tuple(SIZES), max_tries: int = 200) -> None:
    """Raise a ConfigError (a ValueError) when scenes of ``max_objects`` objects of ``sizes`` do not
    fit reliably (see ``max_objects_that_fit``), before any scene is drawn."""
    fit = max_objects_that_fit(tuple(sizes), max_tries=max_tries)
    if max_objects > fit:
        raise ConfigError(f"max_objects={max_objects} objects of sizes {list(sizes)} do not fit in one scene without "
                          f"overlap: at most {fit} fit reliably; use max_objects <= {fit} (or smaller sizes)")


# ----------------------------------------------------------------------------- pictures

def _tint(rgb: tuple[int, int, int], amount: float) -> tuple[int, int, int]:
    """``rgb`` mixed with white (amount 0..1)."""
    return tuple(int(round(c + (255 - c) * amount)) for c in rgb)  # type: ignore[return-value]


def render_scene(scene: ShapesScene, size: int) -> np.ndarray:
    """The scene drawn at ``size`` x ``size`` pixels: uint8 array (size, size, 3)."""
    image = Image.new("RGB", (size, size), scene.background)
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        cx, cy, r = o.x * size, o.y * size, o.radius * size
        rgb = COLORS[o.color]
        if o.shape == "sphere":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
        elif o.shape == "cube":  # fills its box
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=rgb)
        elif o.shape == "cylinder":  # upright: a body between two elliptic caps, the top one lit
            w, e = 0.8 * r, 0.3 * r
            draw.ellipse([cx - w, cy + r - 2 * e, cx + w, cy + r], fill=rgb)
            draw.rectangle([cx - w, cy - r + e, cx + w, cy + r - e], fill=rgb)
            draw.ellipse([cx - w, cy - r, cx + w, cy - r + 2 * e], fill=_tint(rgb, 0.35))
        else:
            raise ValueError(f"unknown shape {o.shape!r}; known: {SHAPES}")
        if o.material == "metal":  # a highlight at the upper left, clear of the centre
            h, hx, hy = 0.25 * r, cx - 0.4 * r, cy - 0.3 * r
            draw.ellipse([hx - h, hy - h, hx + h, hy + h], fill=_tint(rgb, 0.7))
        elif o.material != "rubber":
            raise ValueError(f"unknown material {o.material!r}; known: {MATERIALS}")
    return np.asarray(image)


# ----------------------------------------------------------------------------- scene graphs, captions, questions

DIRECTIONS = {"left": (-1.0, 0.0, 0.0), "right": (1.0, 0.0, 0.0), "front": (0.0, -1.0, 0.0),
              "behind": (0.0, 1.0, 0.0), "above": (0.0, 0.0, 1.0), "below": (0.0, 0.0, -1.0)}


def scene_graph(scene: ShapesScene, image_size: int = 64, image_index: int = 0, split: str = "train",
                image_filename: str = "") -> dict:
    """The scene in CLEVR's scenes-JSON shape. ``3d_coords`` are in CLEVR-like world units (the floor
    spans [-3, 3]; x to the right, y away from the viewer, z up to the object's centre);
    ``pixel_coords`` are [x, y, depth] in pixels of an ``image_size`` image; ``rotation`` is 0 (objects
    are drawn upright and square to the image). ``relationships[d][i]`` lists the objects that lie in
    direction ``d`` (left / right / front / behind) of object ``i``: those whose world coordinates
    differ from object i's by more than REL_EPS along ``directions[d]``, as CLEVR computes them."""
    objects, coords = [], []
    for o in scene.objects:
        c = (round((o.x - 0.5) * WORLD, 4), round((0.5 - o.y) * WORLD, 4), round(o.radius * WORLD, 4))
        coords.append(c)
        objects.append({"color": o.color, "size": o.size, "shape": o.shape, "material": o.material,
                        "3d_coords": list(c), "rotation": 0.0,
                        "pixel_coords": [int(round(o.x * image_size)), int(round(o.y * image_size)),
                                         round(math.dist(c, CAMERA), 4)]})
    relationships = {}
    for name in ("left", "right", "front", "behind"):
        d = DIRECTIONS[name]
        relationships[name] = [[j for j, cj in enumerate(coords)
                                if j != i and sum((a - b) * v for a, b, v in zip(cj, ci, d)) > REL_EPS]
                               for i, ci in enumerate(coords)]
    return {"split": split, "image_index": image_index, "image_filename": image_filename, "objects": objects,
            "relationships": relationships, "directions": {k: list(v) for k, v in DIRECTIONS.items()}}


def captions(scene: ShapesScene) -> list[str]:
    """The scene's captions (``genlab.data.questions.captions``); the first lists every object."""
    return graph_captions(scene_graph(scene))


def describe(scene: ShapesScene) -> str:
    """The caption: every object as "a <size> <color> <material> <shape>", left to right, e.g.
    "a small red rubber sphere, a large blue metal cube and a small green rubber cylinder"."""
    return captions(scene)[0]


def make_qa(scene: ShapesScene, rng: np.random.Generator, kinds: tuple[str, ...] = QUESTION_KINDS) -> list[QA]:
    """One question of each kind in ``kinds`` that the scene can ask unambiguously (see
    ``genlab.data.questions``), with its answer, CLEVR program and family index."""
    return make_questions(scene_graph(scene), rng, kinds)


def text_corpus(rng: np.random.Generator, n_scenes: int = 500, **scene_kw) -> list[str]:
    """Captions, questions and answers of ``n_scenes`` random scenes: a corpus for training a
    tokenizer that knows this world's words: every word of ``vocabulary()`` appears in it alone (as an
    answer does) and after a space (as inside a sentence), ten times each, so that a BPE tokenizer
    trained on it learns both spellings of every word as one token."""
    texts = [" " + " ".join(vocabulary())] * 10 + vocabulary() * 10  # " 0 1 10 ...": "0" too after a space
    for _ in range(n_scenes):
        scene = sample_scene(rng, **scene_kw)
        graph = scene_graph(scene)
        texts += graph_captions(graph)
        for qa in make_questions(graph, rng):
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
