"""The shapes world: determinism, pixels against the scene geometry, captions and answers against the scene."""

import math
import re

import numpy as np
import pytest

from genlab.data.shapes import (
    BACKGROUND,
    COLORS,
    MIN_X_GAP,
    QUESTION_KINDS,
    SHAPES,
    SIZES,
    ShapeObject,
    ShapesScene,
    describe,
    make_qa,
    render_scene,
    sample_scene,
    text_corpus,
    vocabulary,
)


def scenes(n: int, seed: int = 0, **kw) -> list[ShapesScene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, **kw) for _ in range(n)]


def test_same_seed_same_scenes_images_and_questions():
    a, b = scenes(20, seed=3), scenes(20, seed=3)
    assert a == b
    assert all(np.array_equal(render_scene(x, 40), render_scene(y, 40)) for x, y in zip(a, b))
    qa = [make_qa(s, np.random.default_rng(1)) for s in a]
    assert qa == [make_qa(s, np.random.default_rng(1)) for s in b]
    assert a != scenes(20, seed=4)


def test_scene_layout_rules():
    counts = []
    for s in scenes(300, max_objects=3):
        objs = s.objects
        counts.append(len(objs))
        assert [o.x for o in objs] == sorted(o.x for o in objs)  # left to right
        for i, o in enumerate(objs):
            assert o.radius <= o.x <= 1 - o.radius and o.radius <= o.y <= 1 - o.radius  # inside the image
            for p in objs[i + 1:]:
                reach = o.radius + p.radius
                assert abs(o.x - p.x) >= reach or abs(o.y - p.y) >= reach  # boxes (and so shapes) apart
                assert abs(o.x - p.x) >= MIN_X_GAP
    assert set(counts) == {1, 2, 3}
    with pytest.raises(ValueError, match="choose from"):
        sample_scene(np.random.default_rng(0), colors=("pink",))


@pytest.mark.parametrize("shape, area", [("circle", math.pi), ("square", 4.0), ("triangle", 2.0)])
@pytest.mark.parametrize("size", list(SIZES))
def test_rendered_object_has_its_colour_and_area(shape, area, size):
    """Pixels of the object's exact colour cover the shape's area (in units of r^2), centred on it."""
    side = 400  # large, so that the one-pixel rim PIL adds stays within 3% of the area
    obj = ShapeObject("purple", shape, size, x=0.5, y=0.45)
    img = render_scene(ShapesScene((obj,)), side)
    assert img.shape == (side, side, 3) and img.dtype == np.uint8
    inside = (img == COLORS["purple"]).all(-1)
    r = obj.radius * side
    assert inside.sum() == pytest.approx(area * r * r, rel=0.04)
    ys, xs = np.nonzero(inside)
    assert xs.min() >= obj.x * side - r - 1 and xs.max() <= obj.x * side + r + 1  # inside its box
    assert (img[~inside] == BACKGROUND).all()  # flat colours: nothing else drawn


def test_pixels_follow_the_scene():
    """In random scenes, every object's colour is at its centre and no colour appears that the scene lacks."""
    for s in scenes(100, seed=5, max_objects=3):
        img = render_scene(s, 64)
        for o in s.objects:
            cy = int(o.y * 64 + (0.3 * o.radius * 64 if o.shape == "triangle" else 0))  # a triangle is wider below
            assert tuple(img[cy, int(o.x * 64)]) == COLORS[o.color]
        seen = {tuple(int(v) for v in c) for c in np.unique(img.reshape(-1, 3), axis=0)}
        assert seen == {BACKGROUND} | {COLORS[o.color] for o in s.objects}
        if len({o.color for o in s.objects}) == len(s.objects):  # nothing hides any part of an object
            for o in s.objects:
                alone = render_scene(ShapesScene((o,)), 64)
                assert (img == COLORS[o.color]).all(-1).sum() == (alone == COLORS[o.color]).all(-1).sum()


def test_caption_lists_objects_left_to_right():
    s = ShapesScene((ShapeObject("red", "circle", "small", 0.2, 0.5), ShapeObject("blue", "square", "large", 0.5, 0.3),
                     ShapeObject("green", "triangle", "small", 0.8, 0.7)))
    assert describe(s) == "a small red circle, a large blue square and a small green triangle"
    assert describe(ShapesScene(s.objects[:2])) == "a small red circle and a large blue square"
    assert describe(ShapesScene(s.objects[2:])) == "a small green triangle"


def check_answer(scene: ShapesScene, question: str, answer: str) -> bool:
    """An independent reading of each question template against the objects."""
    objs = scene.objects
    if question == "how many shapes are there?":
        return answer == str(len(objs))
    if m := re.fullmatch(r"what color is the (\w+)\?", question):
        match = [o for o in objs if o.shape == m[1]]
        return len(match) == 1 and match[0].color == answer
    if m := re.fullmatch(r"what shape is the (\w+) object\?", question):
        match = [o for o in objs if o.color == m[1]]
        return len(match) == 1 and match[0].shape == answer
    if m := re.fullmatch(r"what size is the (\w+) (\w+)\?", question):
        match = [o for o in objs if (o.color, o.shape) == (m[1], m[2])]
        return len(match) == 1 and match[0].size == answer
    if m := re.fullmatch(r"is there a (\w+)( object)?\?", question):
        present = any((o.color if m[2] else o.shape) == m[1] for o in objs)
        return answer == ("yes" if present else "no")
    raise AssertionError(f"unknown question {question!r}")


def test_answers_agree_with_the_scene():
    rng = np.random.default_rng(9)
    kinds, yes = {k: 0 for k in QUESTION_KINDS}, []
    for s in scenes(800, seed=2, max_objects=3):
        qas = make_qa(s, rng)
        assert qas[0].kind == "count"
        for qa in qas:
            assert check_answer(s, qa.question, qa.answer), (describe(s), qa)
            kinds[qa.kind] += 1
            if qa.kind == "exists":
                yes.append(qa.answer == "yes")
    assert all(v > 300 for v in kinds.values()), kinds  # every kind is asked often
    assert 0.4 < np.mean(yes) < 0.6  # yes/no balanced
    # a question the scene cannot answer unambiguously is not asked
    twins = ShapesScene((ShapeObject("red", "circle", "small", 0.2, 0.5),
                         ShapeObject("red", "circle", "large", 0.7, 0.5)))
    asked = {qa.kind for qa in make_qa(twins, rng)}
    assert asked == {"count", "exists"}
    assert [qa.kind for qa in make_qa(twins, rng, kinds=("count",))] == ["count"]


def test_vocabulary_covers_every_text():
    words = set(vocabulary())
    assert set(COLORS) | set(SHAPES) | set(SIZES) <= words
    texts = text_corpus(np.random.default_rng(0), 200)
    used = {w for t in texts for w in re.sub(r"[?,]", " ", t).split()}
    assert used <= words


# ----------------------------------------------------------------------------- crowded scenes (T13), images on disk

def test_crowded_settings_fail_instead_of_hanging():
    """T13: nine objects never fit; sample_scene gives up after max_restarts fresh starts, saying why."""
    from genlab.data.shapes import MAX_RESTARTS, max_objects_that_fit

    with pytest.raises(ValueError) as info:
        sample_scene(np.random.default_rng(0), min_objects=9, max_objects=9)
    fit = max_objects_that_fit()
    assert str(info.value) == (
        f"cannot place 9 objects of sizes ['small', 'large'] without overlap: {MAX_RESTARTS} fresh starts of the "
        f"scene all got stuck. At most {fit} objects of these sizes fit reliably; ask for fewer objects "
        f"(max_objects <= {fit}) or smaller sizes")
    with pytest.raises(ValueError, match=r"cannot place 5 objects of sizes \['large'\] without overlap: 20 fresh"):
        sample_scene(np.random.default_rng(0), min_objects=5, max_objects=5, sizes=("large",), max_restarts=20)


def test_capacity_check_before_any_scene():
    from genlab.data.shapes import check_scene_capacity, max_objects_that_fit

    assert max_objects_that_fit() == 5
    assert max_objects_that_fit(("small",)) == 6
    assert max_objects_that_fit(("large",)) == 3
    check_scene_capacity(5)
    with pytest.raises(ValueError, match=r"max_objects=9 objects of sizes \['small', 'large'\] do not fit .* most 5"):
        check_scene_capacity(9)
    with pytest.raises(ValueError, match="at most 3 fit reliably"):
        check_scene_capacity(4, ("large",))
    with pytest.raises(ValueError, match="choose from"):
        max_objects_that_fit(("huge",))


@pytest.mark.parametrize("sizes", [tuple(SIZES), ("small",), ("large",)])
def test_every_accepted_capacity_draws_its_scenes(sizes):
    """Up to max_objects_that_fit objects, crowded scenes come out (restarts stay far from the bound)."""
    from genlab.data.shapes import max_objects_that_fit

    n = max_objects_that_fit(sizes)
    got = scenes(30, seed=5, min_objects=n, max_objects=n, sizes=sizes, max_restarts=400)
    assert all(len(s.objects) == n for s in got)


def test_bounding_the_restarts_keeps_every_scene_the_same():
    """The bound only counts restarts: the same seeds give the same scenes as before (this digest was
    taken from the unbounded sampler)."""
    import hashlib

    h = hashlib.sha256()
    for kw in [dict(), dict(max_objects=1), dict(max_objects=2), dict(min_objects=3, max_objects=5),
               dict(max_objects=6, sizes=("small",)), dict(max_objects=3, sizes=("large",)),
               dict(max_objects=5, colors=("red",), shapes=("circle",))]:
        rng = np.random.default_rng(7)
        for _ in range(150):
            h.update(repr(sample_scene(rng, **kw)).encode())
        h.update(repr(rng.integers(1 << 30)).encode())
    assert h.hexdigest() == "c66c8a84c76e9dd5733063fd2cf6f3e7dc0debc5da51614281ec71fbac4fd04f"


def test_write_scene_images(tmp_path):
    import json
    import os

    from PIL import Image

    from genlab.data.shapes import write_scene_images

    paths = write_scene_images(tmp_path / "imgs", n=3, image_size=48, seed=2, min_objects=1, max_objects=2)
    assert [p.name for p in paths] == ["scene_000.png", "scene_001.png", "scene_002.png"]
    expected = scenes(3, seed=2, min_objects=1, max_objects=2)
    for path, scene in zip(paths, expected):
        np.testing.assert_array_equal(np.asarray(Image.open(path)), render_scene(scene, 48))
    lines = (tmp_path / "imgs" / "scenes.txt").read_text().splitlines()
    assert lines == [f"scene_{i:03d}.png | caption en | {describe(s)}" for i, s in enumerate(expected)]
    records = json.loads((tmp_path / "imgs" / "scenes.json").read_text())
    assert [r["caption"] for r in records] == [describe(s) for s in expected]
    assert records[0]["objects"][0]["color"] == expected[0].objects[0].color
    assert sorted(os.listdir(tmp_path / "imgs")) == ["scene_000.png", "scene_001.png", "scene_002.png",
                                                     "scenes.json", "scenes.txt"]  # no temporary files left
    assert write_scene_images(tmp_path / "imgs", n=3, image_size=48, seed=2) == paths  # same call, same files


@pytest.mark.parametrize("kw, needle", [
    (dict(n=0), "n must be an integer >= 1"),
    (dict(image_size=0), "image_size must be an integer >= 1"),
    (dict(min_objects=3, max_objects=1), "need 1 <= min_objects <= max_objects"),
    (dict(max_objects=9), "at most 5 fit reliably"),
])
def test_write_scene_images_refuses_bad_settings(tmp_path, kw, needle):
    from genlab.data.shapes import write_scene_images

    with pytest.raises(ValueError, match=needle):
        write_scene_images(tmp_path / "x", **kw)
    assert not (tmp_path / "x").exists()  # nothing written
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        write_scene_images(tmp_path / "file")
