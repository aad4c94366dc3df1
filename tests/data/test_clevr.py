"""The CLEVR v1.0 layout: what write_clevr writes, load_clevr reading it back and a hand-written folder in
the real format (RGBA 480x320 PNGs, a test split without answers), and every damaged input."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from genlab.data.clevr import captions, execute_program, load_clevr, load_image, write_clevr
from genlab.data.questions import FAMILIES
from genlab.errors import ConfigError, FileFormatError


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("w") / "clevr"
    summary = write_clevr(root, {"train": 12, "val": 4}, image_size=48, seed=3, questions_per_image=4)
    return root, summary


def test_writes_the_clevr_layout(written):
    root, summary = written
    assert sorted(os.listdir(root)) == ["images", "questions", "scenes"]
    assert sorted(os.listdir(root / "images" / "train")) == [f"CLEVR_train_{i:06d}.png" for i in range(12)]
    assert sorted(os.listdir(root / "questions")) == ["CLEVR_train_questions.json", "CLEVR_val_questions.json"]
    assert sorted(os.listdir(root / "scenes")) == ["CLEVR_train_scenes.json", "CLEVR_val_scenes.json"]
    assert not [p for p in root.parent.iterdir() if p.name != "clevr"]  # no temporary folder left
    q = json.loads((root / "questions" / "CLEVR_train_questions.json").read_text())
    assert set(q) == {"info", "questions"} and len(q["questions"]) == summary["train"]["questions"]
    assert summary["train"]["images"] == 12 and 40 <= summary["train"]["questions"] <= 48
    rec = q["questions"][0]
    assert set(rec) == {"image_index", "image_filename", "split", "question", "answer", "question_family_index",
                        "question_index", "program"}
    assert [r["question_index"] for r in q["questions"]] == list(range(len(q["questions"])))
    assert set(rec["program"][0]) == {"function", "inputs", "value_inputs"}
    s = json.loads((root / "scenes" / "CLEVR_train_scenes.json").read_text())
    assert [x["image_index"] for x in s["scenes"]] == list(range(12))
    assert all(3 <= len(x["objects"]) <= 10 for x in s["scenes"])
    with Image.open(root / "images" / "train" / "CLEVR_train_000000.png") as im:
        assert im.size == (48, 48)


def test_answers_agree_with_the_written_scene_graphs(written):
    """Each written answer is what its written program gives on its written scene graph; the objects of
    every written scene do not overlap (their boxes, from pixel coords and sizes, are apart)."""
    root, _ = written
    from genlab.data.shapes import SIZES, object_scale

    for split in ("train", "val"):
        data = load_clevr(root, split)
        assert data.has_answers
        for q in data.questions:
            scene = data.scene(q.image_index)
            assert execute_program(scene, q.program) == q.answer
            last = q.program[-1]["function"]
            want = ("query_attribute" if last.startswith("query_") else "compare_integer"
                    if last in ("equal_integer", "less_than", "greater_than") else "compare_attribute"
                    if last.startswith("equal_") else last)
            assert q.family == want and want in ("exist", "count", "query_attribute", "compare_attribute",
                                                 "compare_integer")
            assert FAMILIES[q.family_index].last == q.program[-1]["function"]
        for scene in data.scenes.values():
            objs = scene["objects"]
            for i, a in enumerate(objs):
                for b in objs[i + 1:]:
                    reach = (SIZES[a["size"]] + SIZES[b["size"]]) * object_scale(10) * 48
                    dx, dy = abs(a["pixel_coords"][0] - b["pixel_coords"][0]), abs(a["pixel_coords"][1] -
                                                                                   b["pixel_coords"][1])
                    assert dx >= reach - 1 or dy >= reach - 1  # (pixel coords are rounded)
                    assert dx >= 1  # left to right well defined


def test_same_seed_same_bytes_and_prefixes(tmp_path, written):
    root, _ = written
    again = tmp_path / "again"
    write_clevr(again, {"train": 5}, image_size=48, seed=3, questions_per_image=4)
    a = load_clevr(root, "train")
    b = load_clevr(again, "train")
    assert [(q.question, q.answer) for q in b.questions] == [(q.question, q.answer) for q in a.questions
                                                            if q.image_index < 5]
    for i in range(5):
        name = f"CLEVR_train_{i:06d}.png"
        assert (root / "images/train" / name).read_bytes() == (again / "images/train" / name).read_bytes()
    other = tmp_path / "other"
    write_clevr(other, {"train": 5}, image_size=48, seed=4)
    assert (other / "images/train/CLEVR_train_000000.png").read_bytes() != \
        (root / "images/train/CLEVR_train_000000.png").read_bytes()


def test_load_image_reads_what_was_drawn(written):
    root, _ = written
    from genlab.data.shapes import render_scene, sample_scene

    img = load_image(root / "images" / "train" / "CLEVR_train_000000.png")
    rng = np.random.default_rng([3, 0, 0])
    np.testing.assert_array_equal(img, render_scene(sample_scene(rng, min_objects=3, max_objects=10), 48))


def test_captions_from_scene_graphs(written):
    root, _ = written
    data = load_clevr(root, "val")
    scene = data.scene(0)
    caps = captions(scene)
    objs = sorted(scene["objects"], key=lambda o: o["pixel_coords"][0])
    assert caps[0].startswith(f"a {objs[0]['size']} {objs[0]['color']} {objs[0]['material']} {objs[0]['shape']}")
    assert caps[1].startswith(f"there are {len(objs)} objects: ")


# ----------------------------------------------------------------------------- a folder in the real format

def real_folder(root):
    """A tiny CLEVR_v1.0 folder as the zip has it: RGBA 480x320 PNGs, extra fields, old-style "type" programs,
    a test split without answers, programs or scenes file."""
    base = root / "CLEVR_v1.0"
    for split in ("val", "test"):
        (base / "images" / split).mkdir(parents=True)
        rgba = np.zeros((320, 480, 4), np.uint8)
        rgba[..., :3] = (10, 200, 30)
        rgba[..., 3] = 255
        rgba[0, 0, 3] = 0  # a transparent corner: composited over white
        rgba[0, 1] = (0, 0, 0, 128)  # half-transparent black over white: mid grey
        Image.fromarray(rgba, "RGBA").save(base / "images" / split / f"CLEVR_{split}_000000.png")
    (base / "questions").mkdir()
    (base / "scenes").mkdir()
    scene = {"split": "val", "image_index": 0, "image_filename": "CLEVR_val_000000.png", "directions": {},
             "objects": [{"color": "brown", "size": "large", "shape": "cylinder", "material": "metal",
                          "3d_coords": [2.1, 1.0, 0.7], "pixel_coords": [300, 150, 11.2], "rotation": 120.5},
                         {"color": "gray", "size": "small", "shape": "sphere", "material": "rubber",
                          "3d_coords": [-1.0, 0.5, 0.35], "pixel_coords": [120, 170, 12.0], "rotation": 10.0}],
             "relationships": {"left": [[1], []], "right": [[], [0]], "front": [[1], []], "behind": [[], [0]]}}
    (base / "scenes" / "CLEVR_val_scenes.json").write_text(json.dumps({"info": {"split": "val"}, "scenes": [scene]}))
    program = [{"type": "scene", "inputs": [], "value_inputs": [], "_output": [0, 1]},
               {"type": "filter_shape", "inputs": [0], "value_inputs": ["sphere"]},
               {"type": "unique", "inputs": [1], "value_inputs": []},
               {"type": "relate", "inputs": [2], "value_inputs": ["right"]},
               {"type": "unique", "inputs": [3], "value_inputs": []},
               {"type": "query_color", "inputs": [4], "value_inputs": []}]
    val = {"info": {"split": "val", "version": "1.0"}, "questions": [
        {"image_index": 0, "image_filename": "CLEVR_val_000000.png", "split": "val", "question_index": 0,
         "question": "What color is the thing right of the sphere?", "answer": "brown", "question_family_index": 45,
         "program": program, "extra": "ignored"},
        {"image_index": 0, "image_filename": "CLEVR_val_000000.png", "split": "val", "question_index": 1,
         "question": "How many things are there?", "answer": "2", "question_family_index": 3,
         "program": [{"function": "scene", "inputs": [], "value_inputs": []},
                     {"function": "count", "inputs": [0], "value_inputs": []}]}]}
    (base / "questions" / "CLEVR_val_questions.json").write_text(json.dumps(val))
    test = {"info": {"split": "test"}, "questions": [
        {"image_index": 0, "image_filename": "CLEVR_test_000000.png", "split": "test", "question_index": 0,
         "question": "Is there a cube?"}]}
    (base / "questions" / "CLEVR_test_questions.json").write_text(json.dumps(test))
    return base


def test_reads_a_folder_in_the_real_format(tmp_path):
    base = real_folder(tmp_path)
    val = load_clevr(tmp_path, "val")  # the folder holding CLEVR_v1.0/ works too
    assert val.root == base and len(val.questions) == 2 and val.has_answers
    q = val.questions[0]
    assert (q.question, q.answer, q.family, q.family_index) == ("What color is the thing right of the sphere?",
                                                               "brown", "query_attribute", 45)
    assert val.questions[1].family == "count"
    assert execute_program(val.scene(0), q.program) == "brown"
    assert captions(val.scene(0))[0] == "a small gray rubber sphere and a large brown metal cylinder"
    img = load_image(q.image)
    assert img.shape == (320, 480, 3) and img.dtype == np.uint8
    assert tuple(img[5, 5]) == (10, 200, 30) and tuple(img[0, 0]) == (255, 255, 255)
    assert tuple(img[0, 1]) == (127, 127, 127)  # 255 * (1 - 128/255), rounded
    assert tuple(load_image(q.image, background=(0, 0, 0))[0, 0]) == (0, 0, 0)

    test = load_clevr(base, "test")
    assert test.scenes is None and not test.has_answers
    assert test.questions[0].answer is None and test.questions[0].family is None
    with pytest.raises(ConfigError, match="prediction only"):
        test.require_answers()
    with pytest.raises(ConfigError, match="CLEVR_test_scenes.json: no scenes file"):
        test.scene(0)


def test_load_image_converts_palette_and_grey(tmp_path):
    Image.fromarray(np.full((4, 6), 77, np.uint8), "L").save(tmp_path / "g.png")
    assert (load_image(tmp_path / "g.png") == 77).all() and load_image(tmp_path / "g.png").shape == (4, 6, 3)
    pal = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    pal.putpalette([200, 10, 10, 0, 0, 250] + [0] * 762)
    pal.info["transparency"] = 1
    pal.save(tmp_path / "p.png", transparency=1)
    assert load_image(tmp_path / "p.png").tolist() == [[[200, 10, 10], [255, 255, 255]]]
    Image.fromarray(np.full((2, 2), 65535, np.uint16)).save(tmp_path / "w16.png")
    assert (load_image(tmp_path / "w16.png") == 255).all()


# ----------------------------------------------------------------------------- errors

def test_missing_and_damaged_files_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=f"{tmp_path / 'nope'}: no such folder"):
        load_clevr(tmp_path / "nope", "val")
    base = real_folder(tmp_path)
    with pytest.raises(ConfigError, match="has no split 'train' \\(it has test, val\\)"):
        load_clevr(base, "train")
    qfile = base / "questions" / "CLEVR_val_questions.json"
    good = qfile.read_text()
    qfile.write_text(good[:50])
    with pytest.raises(FileFormatError, match=f"{qfile}: not valid JSON"):
        load_clevr(base, "val")
    qfile.write_text(json.dumps({"info": {}}))
    with pytest.raises(FileFormatError, match=f'{qfile}: expected a JSON object with a "questions" list'):
        load_clevr(base, "val")
    data = json.loads(good)
    del data["questions"][1]["question"]
    qfile.write_text(json.dumps(data))
    with pytest.raises(FileFormatError, match=f'{qfile}: question 1 has no "question"'):
        load_clevr(base, "val")
    data = json.loads(good)
    data["questions"][1]["image_filename"] = "CLEVR_val_000009.png"
    qfile.write_text(json.dumps(data))
    with pytest.raises(FileFormatError, match="question 1 refers to the image .*CLEVR_val_000009.png, which does not"):
        load_clevr(base, "val")
    qfile.unlink()
    with pytest.raises(ConfigError, match=f"{qfile}: no such file"):
        load_clevr(base, "val")
    qfile.write_text(good)
    sfile = base / "scenes" / "CLEVR_val_scenes.json"
    sfile.write_text(json.dumps({"info": {}, "scenes": [{"image_index": 0, "objects": [{"color": "red"}]}]}))
    with pytest.raises(FileFormatError, match=f"{sfile}: scene 0 has an object without"):
        load_clevr(base, "val")
    img = base / "images" / "val" / "CLEVR_val_000000.png"
    img.write_bytes(img.read_bytes()[:100])
    with pytest.raises(FileFormatError, match=f"{img}: cannot read it as an image"):
        load_image(img)
    with pytest.raises(ConfigError, match="no such image file"):
        load_image(base / "nothing.png")


@pytest.mark.parametrize("kw, needle", [
    (dict(splits={"train": 0}), "every split has 0 images"),
    (dict(splits={"test": 3}), "writes train and val"),
    (dict(splits={"train": -1}), "image count must be an integer"),
    (dict(image_size=8), "image_size must be an integer in \\[16"),
    (dict(min_objects=5, max_objects=4), "max_objects must be an integer in \\[5, 10\\]"),
    (dict(max_objects=11), "max_objects must be an integer in \\[3, 10\\]"),
    (dict(questions_per_image=0), "questions_per_image"),
    (dict(image_size=16, max_objects=10), "too small for 10 objects"),
    (dict(kinds=("colour",)), "unknown question kinds"),
])
def test_bad_arguments_write_nothing(tmp_path, kw, needle):
    with pytest.raises(ValueError, match=needle):
        write_clevr(tmp_path / "x", **{"splits": {"train": 2}, **kw})
    assert not (tmp_path / "x").exists()


def test_refuses_a_folder_that_is_not_empty_unless_overwrite(tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not empty"):
        write_clevr(out, {"train": 2}, image_size=32, max_objects=3)
    assert os.listdir(out) == ["keep.txt"]
    write_clevr(out, {"train": 2}, image_size=32, max_objects=3, overwrite=True)
    assert sorted(os.listdir(out)) == ["images", "questions", "scenes"]
    assert sorted(os.listdir(tmp_path)) == ["c"]  # nothing left beside it
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match="is a file"):
        write_clevr(tmp_path / "f", {"train": 2})


def test_cli_writes_and_reports(tmp_path, capsys):
    from genlab.cli import main

    out = tmp_path / "d"
    assert main(["data", "clevr", "--out", str(out), "--train", "3", "--val", "1", "--image-size", "32",
                 "--max-objects", "4", "--questions-per-image", "2"]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out}" in text and "train: 3 images, " in text and "val: 1 images" in text
    assert len(load_clevr(out, "val").questions) <= 2
    assert main(["data", "clevr", "--out", str(out), "--train", "3"]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert main(["data", "clevr", "--out", str(out), "--train", "3", "--max-objects", "12"]) == 2
    assert "--max-objects=12" in capsys.readouterr().err
