"""The shapes world: determinism, pixels against the scene geometry, scene graphs, captions, and answers
checked by an independent reading of each question's text (and by hand on hand-made scenes)."""

import math
import re

import numpy as np
import pytest

from genlab.data.questions import ATTRIBUTES, FAMILIES, execute_program
from genlab.data.shapes import (
    BACKGROUND,
    COLORS,
    MAX_OBJECTS,
    MIN_X_GAP,
    QUESTION_KINDS,
    ShapeObject,
    ShapesScene,
    captions,
    describe,
    make_qa,
    render_scene,
    sample_questions,
    sample_scene,
    scene_graph,
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


@pytest.mark.parametrize("max_objects", [3, 10])
def test_scene_layout_rules(max_objects):
    counts = []
    for s in scenes(200, min_objects=1, max_objects=max_objects):
        objs = s.objects
        counts.append(len(objs))
        assert [o.x for o in objs] == sorted(o.x for o in objs)  # left to right
        for i, o in enumerate(objs):
            assert o.radius <= o.x <= 1 - o.radius and o.radius <= o.y <= 1 - o.radius  # inside the image
            for p in objs[i + 1:]:
                reach = o.radius + p.radius
                assert abs(o.x - p.x) >= reach or abs(o.y - p.y) >= reach  # boxes (and so shapes) apart
                assert abs(o.x - p.x) >= MIN_X_GAP * o.scale
    assert set(counts) == set(range(1, max_objects + 1))
    with pytest.raises(ValueError, match="choose from"):
        sample_scene(np.random.default_rng(0), colors=("pink",))


@pytest.mark.parametrize("shape, area", [("sphere", math.pi), ("cube", 4.0), ("cylinder", None)])
@pytest.mark.parametrize("size", ["large", "small"])
def test_rendered_object_has_its_colour_and_area(shape, area, size):
    """Pixels of the object's colour cover the shape's area (in units of r^2) inside its box."""
    side = 400  # large, so that the one-pixel rim PIL adds stays within 4% of the area
    obj = ShapeObject("purple", shape, size, "rubber", x=0.5, y=0.45)
    img = render_scene(ShapesScene((obj,)), side)
    assert img.shape == (side, side, 3) and img.dtype == np.uint8
    drawn = (img != BACKGROUND).any(-1)
    r = obj.radius * side
    if area is None:  # cylinder: body 1.6 r x 1.4 r, two half ellipses of 1.6 r x 0.6 r
        area = 1.6 * 1.4 + math.pi * 0.8 * 0.3
        assert (img == COLORS["purple"]).all(-1).sum() < drawn.sum()  # the lit top face is another colour
    else:
        assert (img[drawn] == COLORS["purple"]).all()  # rubber: flat colour
    assert drawn.sum() == pytest.approx(area * r * r, rel=0.04)
    ys, xs = np.nonzero(drawn)
    assert xs.min() >= obj.x * side - r - 1 and xs.max() <= obj.x * side + r + 1  # inside its box
    assert ys.min() >= obj.y * side - r - 1 and ys.max() <= obj.y * side + r + 1


def test_metal_has_a_highlight_and_rubber_none():
    rubber = render_scene(ShapesScene((ShapeObject("red", "sphere", "large", "rubber", 0.5, 0.5),)), 100)
    metal = render_scene(ShapesScene((ShapeObject("red", "sphere", "large", "metal", 0.5, 0.5),)), 100)
    assert ((rubber != BACKGROUND).any(-1) == (metal != BACKGROUND).any(-1)).all()  # the same outline
    differ = (rubber != metal).any(-1)
    assert 0 < differ.sum() < 0.15 * (rubber != BACKGROUND).any(-1).sum()
    ys, xs = np.nonzero(differ)
    assert xs.mean() < 50 and ys.mean() < 50  # at the upper left
    assert (metal[differ] > rubber[differ]).all()  # lighter


def test_pixels_follow_the_scene():
    """Every object's colour is at its centre; outside the objects' boxes only the background."""
    for s in scenes(100, seed=5, max_objects=10):
        img = render_scene(s, 64)
        boxes = np.zeros((64, 64), bool)
        for o in s.objects:
            assert tuple(img[int(o.y * 64), int(o.x * 64)]) == COLORS[o.color]
            lo, hi = int(math.floor((o.x - o.radius) * 64)), int(math.ceil((o.x + o.radius) * 64)) + 1
            top, bottom = int(math.floor((o.y - o.radius) * 64)), int(math.ceil((o.y + o.radius) * 64)) + 1
            boxes[max(top, 0):bottom, max(lo, 0):hi] = True
        assert (img[~boxes] == BACKGROUND).all()


def test_scene_graph_in_clevr_shape():
    a = ShapeObject("red", "cube", "large", "metal", 0.2, 0.3)
    b = ShapeObject("blue", "sphere", "small", "rubber", 0.5, 0.7)
    c = ShapeObject("green", "cylinder", "small", "rubber", 0.8, 0.305)
    g = scene_graph(ShapesScene((a, b, c)), image_size=100, image_index=7, split="val", image_filename="x.png")
    assert (g["split"], g["image_index"], g["image_filename"]) == ("val", 7, "x.png")
    assert g["objects"][0]["color"] == "red" and g["objects"][0]["material"] == "metal"
    assert g["objects"][1]["pixel_coords"][:2] == [50, 70] and g["objects"][1]["3d_coords"][:2] == [0.0, -1.2]
    assert set(g["objects"][0]) == {"color", "size", "shape", "material", "3d_coords", "pixel_coords", "rotation"}
    rel = g["relationships"]
    assert rel["left"] == [[], [0], [0, 1]] and rel["right"] == [[1, 2], [2], []]
    # b lies lower in the picture (nearer the viewer): in front of a and c; a and c are 0.005 apart: unrelated
    assert rel["front"] == [[1], [], [1]] and rel["behind"] == [[], [0, 2], []]


def test_captions_list_objects_left_to_right():
    s = ShapesScene((ShapeObject("red", "sphere", "small", "rubber", 0.2, 0.5),
                     ShapeObject("blue", "cube", "large", "metal", 0.5, 0.3),
                     ShapeObject("green", "cylinder", "small", "rubber", 0.8, 0.7)))
    assert describe(s) == "a small red rubber sphere, a large blue metal cube and a small green rubber cylinder"
    assert captions(s)[1:] == ["there are 3 objects: 1 cube, 1 sphere and 1 cylinder",
                               "the leftmost object is a small red rubber sphere and the rightmost object is a "
                               "small green rubber cylinder"]
    assert captions(ShapesScene(s.objects[2:])) == ["a small green rubber cylinder",
                                                    "there is 1 object: 1 cylinder"]


# ----------------------------------------------------------------------------- answers

PHRASE = r"((?:large|small) )?((?:" + "|".join(COLORS) + r") )?((?:rubber|metal) )?(cube|sphere|cylinder|object)"
REL = r"(left of|right of|in front of|behind)"
REL_KEY = {"left of": "left", "right of": "right", "in front of": "front", "behind": "behind"}


def matching(objs, m, start):
    """Indices of the objects fitting the phrase captured by groups start..start+3 of ``m``."""
    size, color, material, shape = (m[start + k] for k in range(4))
    want = {k: v.strip() for k, v in (("size", size), ("color", color), ("material", material),
                                      ("shape", None if shape == "object" else shape)) if v}
    return [i for i, o in enumerate(objs) if all(getattr(o, k) == v for k, v in want.items())]


def read_answer(scene: ShapesScene, question: str) -> str:
    """An independent reading of each template's text against the objects (no programs involved);
    the relations straight from the positions (left: smaller x; front: larger y, by more than 0.05/6)."""
    objs = scene.objects

    def related(i, rel):
        o, eps = objs[i], 0.05 / 6 + 1e-9
        d = {"left": lambda p: o.x - p.x, "right": lambda p: p.x - o.x, "front": lambda p: p.y - o.y,
             "behind": lambda p: o.y - p.y}[REL_KEY[rel]]
        return [j for j, p in enumerate(objs) if j != i and d(p) > eps]

    def the(ids):
        assert len(ids) == 1, (question, ids)  # "the ..." names exactly one object
        return objs[ids[0]]

    yn = lambda b: "yes" if b else "no"  # noqa: E731
    if m := re.fullmatch(f"are there any {PHRASE}s\\?", question):
        return yn(matching(objs, m, 1))
    if m := re.fullmatch(f"how many {PHRASE}s are there\\?", question):
        return str(len(matching(objs, m, 1)))
    if m := re.fullmatch(f"what (color|shape|size|material) is the {PHRASE}\\?", question):
        return getattr(the(matching(objs, m, 2)), m[1])
    if m := re.fullmatch(f"is the {PHRASE} the same (color|shape|size|material) as the {PHRASE}\\?", question):
        return yn(getattr(the(matching(objs, m, 1)), m[5]) == getattr(the(matching(objs, m, 6)), m[5]))
    if m := re.fullmatch(f"are there (more|fewer|as many) {PHRASE}s (than|as) {PHRASE}s\\?", question):
        a, b = len(matching(objs, m, 2)), len(matching(objs, m, 7))
        return yn({"more": a > b, "fewer": a < b, "as many": a == b}[m[1]])
    if m := re.fullmatch(f"what (color|shape|size|material) is the {PHRASE} {REL} the {PHRASE}\\?", question):
        anchor = the(matching(objs, m, 7))
        near = related(objs.index(anchor), m[6])
        return getattr(the([i for i in matching(objs, m, 2) if i in near]), m[1])
    if m := re.fullmatch(f"(are there any|how many) {PHRASE}s (are )?{REL} the {PHRASE}\\?", question):
        near = related(objs.index(the(matching(objs, m, 8))), m[7])
        hits = [i for i in matching(objs, m, 2) if i in near]
        return yn(hits) if m[1] == "are there any" else str(len(hits))
    raise AssertionError(f"unknown question {question!r}")


def test_answers_agree_with_the_scene():
    rng = np.random.default_rng(9)
    kinds, families, yes = {k: 0 for k in QUESTION_KINDS}, set(), {k: [] for k in QUESTION_KINDS}
    for s in scenes(800, seed=2, min_objects=1, max_objects=10):
        graph = scene_graph(s)
        for qa in sample_questions(graph, rng, 4):
            assert read_answer(s, qa.question) == qa.answer, (describe(s), qa.question, qa.answer)
            assert execute_program(graph, qa.program) == qa.answer
            assert FAMILIES[qa.family_index].kind == qa.kind and qa.program[-1]["function"] == \
                FAMILIES[qa.family_index].last
            kinds[qa.kind] += 1
            families.add(qa.family_index)
            if qa.answer in ("yes", "no"):
                yes[qa.kind].append(qa.answer == "yes")
            assert len(qa.answer.split()) == 1
    assert families == set(range(len(FAMILIES)))  # every template is used
    assert all(v > 300 for v in kinds.values()), kinds
    for kind in ("exist", "compare_attribute", "compare_integer", "spatial"):  # yes/no balanced
        assert 0.4 < np.mean(yes[kind]) < 0.6, (kind, np.mean(yes[kind]))


def test_hand_made_scene_answers():
    """Answers worked out by hand for one scene (left to right: a, b, c; b lowest = in front)."""
    a = ShapeObject("red", "cube", "large", "metal", 0.2, 0.3)
    b = ShapeObject("blue", "sphere", "small", "rubber", 0.5, 0.7)
    c = ShapeObject("red", "cylinder", "small", "rubber", 0.8, 0.2)
    graph = scene_graph(ShapesScene((a, b, c)))
    node = lambda f, i, v=None: {"function": f, "inputs": i, "value_inputs": [] if v is None else [v]}  # noqa: E731
    cases = [
        # how many red objects -> 2
        ([node("scene", []), node("filter_color", [0], "red"), node("count", [1])], "2"),
        # are there any metal spheres -> no
        ([node("scene", []), node("filter_material", [0], "metal"), node("filter_shape", [1], "sphere"),
          node("exist", [2])], "no"),
        # what shape is the object left of the blue sphere -> cube
        ([node("scene", []), node("filter_color", [0], "blue"), node("unique", [1]), node("relate", [2], "left"),
          node("unique", [3]), node("query_shape", [4])], "cube"),
        # what color is the cylinder behind the sphere -> red (a and c are both behind b: the cylinder is c)
        ([node("scene", []), node("filter_shape", [0], "sphere"), node("unique", [1]), node("relate", [2], "behind"),
          node("filter_shape", [3], "cylinder"), node("unique", [4]), node("query_color", [5])], "red"),
        # is the cube the same color as the cylinder -> yes
        ([node("scene", []), node("filter_shape", [0], "cube"), node("unique", [1]), node("query_color", [2]),
          node("filter_shape", [0], "cylinder"), node("unique", [4]), node("query_color", [5]),
          node("equal_color", [3, 6])], "yes"),
        # are there fewer small objects than red objects -> no (2 and 2); as many -> yes
        ([node("scene", []), node("filter_size", [0], "small"), node("count", [1]), node("filter_color", [0], "red"),
          node("count", [3]), node("less_than", [2, 4])], "no"),
        ([node("scene", []), node("filter_size", [0], "small"), node("count", [1]), node("filter_color", [0], "red"),
          node("count", [3]), node("equal_integer", [2, 4])], "yes"),
        # how many objects are right of the cube -> 2
        ([node("scene", []), node("filter_shape", [0], "cube"), node("unique", [1]), node("relate", [2], "right"),
          node("count", [3])], "2"),
    ]
    for program, want in cases:
        assert execute_program(graph, program) == want, program
    with pytest.raises(ValueError, match="unique of 2 objects"):
        execute_program(graph, [node("scene", []), node("filter_color", [0], "red"), node("unique", [1])])
    # the same scene, through the independent reading of the templates' text
    s = ShapesScene((a, b, c))
    assert read_answer(s, "what shape is the object left of the blue sphere?") == "cube"
    assert read_answer(s, "how many objects are in front of the large cube?") == "1"
    # a question the scene cannot answer unambiguously is not asked: twins have no unique description
    twins = ShapesScene((ShapeObject("red", "sphere", "small", "rubber", 0.2, 0.5),
                         ShapeObject("red", "sphere", "small", "rubber", 0.7, 0.5)))
    rng = np.random.default_rng(0)
    for _ in range(20):
        asked = {qa.kind for qa in make_qa(twins, rng)}
        assert "query_attribute" not in asked and "compare_attribute" not in asked and "spatial" not in asked
    assert [qa.kind for qa in make_qa(twins, rng, kinds=("count",))] == ["count"]
    with pytest.raises(ValueError, match="unknown question kinds"):
        make_qa(twins, rng, kinds=("color",))


def test_vocabulary_covers_every_text():
    words = set(vocabulary())
    assert {w for v in ATTRIBUTES.values() for w in v} | {str(i) for i in range(MAX_OBJECTS + 1)} <= words
    texts = text_corpus(np.random.default_rng(0), 200, min_objects=1, max_objects=10)
    used = {w for t in texts for w in re.sub(r"[?,:]", " ", t).split()}
    assert used == words  # every word is used, and no other


# ----------------------------------------------------------------------------- crowded scenes, images on disk

def test_crowded_settings_fail_instead_of_hanging():
    """More than CLEVR's 10 objects are refused up front; a scene that keeps getting stuck (here: one
    try per object) gives up after max_restarts fresh starts, saying why."""
    with pytest.raises(ValueError, match=r"at most 10 objects"):
        sample_scene(np.random.default_rng(0), min_objects=11, max_objects=11)
    with pytest.raises(ValueError, match=r"cannot place 10 objects of sizes \['large', 'small'\] without overlap: "
                                         r"20 fresh starts of the scene all got stuck. At most \d objects"):
        sample_scene(np.random.default_rng(0), min_objects=10, max_objects=10, max_tries=1, max_restarts=20)


def test_capacity_check_before_any_scene():
    from genlab.data.shapes import check_scene_capacity, max_objects_that_fit, object_scale

    assert max_objects_that_fit() == max_objects_that_fit(("small",)) == max_objects_that_fit(("large",)) == 10
    assert object_scale(2) == 1.0 and object_scale(10) == pytest.approx(0.5)
    check_scene_capacity(10)
    with pytest.raises(ValueError, match="at most 10"):
        check_scene_capacity(12)
    with pytest.raises(ValueError, match="choose from"):
        max_objects_that_fit(("huge",))


def test_ten_objects_are_drawn_without_many_restarts():
    got = scenes(30, seed=5, min_objects=10, max_objects=10, sizes=("large",), max_restarts=400)
    assert all(len(s.objects) == 10 for s in got)


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
    assert records[0]["objects"][0]["material"] == expected[0].objects[0].material
    assert sorted(os.listdir(tmp_path / "imgs")) == ["scene_000.png", "scene_001.png", "scene_002.png",
                                                     "scenes.json", "scenes.txt"]  # no temporary files left
    assert write_scene_images(tmp_path / "imgs", n=3, image_size=48, seed=2) == paths  # same call, same files


@pytest.mark.parametrize("kw, needle", [
    (dict(n=0), "n must be an integer >= 1"),
    (dict(image_size=0), "image_size must be an integer >= 1"),
    (dict(min_objects=3, max_objects=1), "need 1 <= min_objects <= max_objects"),
    (dict(max_objects=11), "at most 10 objects"),
])
def test_write_scene_images_refuses_bad_settings(tmp_path, kw, needle):
    from genlab.data.shapes import write_scene_images

    with pytest.raises(ValueError, match=needle):
        write_scene_images(tmp_path / "x", **kw)
    assert not (tmp_path / "x").exists()  # nothing written
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        write_scene_images(tmp_path / "file")
