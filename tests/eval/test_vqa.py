"""CLEVR answer normalisation, exact match per family on hand-made lists, and the report files."""

import csv
import json

import numpy as np
import pytest
import torch

from genlab.eval.vqa import evaluate_vqa, exact_match, normalize_answer, score_vqa
from genlab.eval.vqa_report import write_answers_csv, write_vqa_report


@pytest.mark.parametrize("raw, norm", [
    ("Two.", "2"), ("YES", "yes"), ("no", "no"), ("No.", "no"), ("  a  Cube!! ", "cube"),
    ("ten", "10"), ("zero", "0"), ("3", "3"), ("a", "a"), ("none", "none"), ("cubes", "cubes"),
    ("the two", "2"), ("", ""), (None, ""), ("metal?", "metal"),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_exact_match():
    assert exact_match("Two.", "2") and exact_match("3", "three") and exact_match("YES", "yes")
    assert not exact_match("no", "0")       # "no" is a yes/no answer, never a count
    assert not exact_match("cubes", "cube")  # no stemming in exact match
    assert not exact_match("", "") and not exact_match(None, "yes")


def hand_list():
    # family, reference, prediction, right?
    return [
        ("count", "2", "two", True),
        ("count", "3", "4", False),
        ("count", "0", "Zero.", True),
        ("exist", "yes", "no", False),
        ("exist", "no", "No", True),
        ("query_color", None, "red", None),  # test split: no answer, skipped
    ]


def test_score_vqa_per_family_by_hand():
    fam, refs, preds, _ = zip(*hand_list())
    s = score_vqa(preds, refs, fam)
    assert s["n"] == 5 and s["correct"] == 3 and s["skipped"] == 1
    assert s["accuracy"] == pytest.approx(3 / 5)
    assert list(s["per_family"]) == ["count", "exist"]  # sorted; query_color had no scored row
    assert s["per_family"]["count"] == {"n": 3, "correct": 2, "accuracy": pytest.approx(2 / 3)}
    assert s["per_family"]["exist"] == {"n": 2, "correct": 1, "accuracy": pytest.approx(1 / 2)}


def test_score_vqa_edges():
    assert score_vqa(["a"], ["a"])["per_family"] == {}
    none = score_vqa(["a", "b"], [None, None], ["f", "g"])
    assert none == {"accuracy": None, "n": 0, "correct": 0, "skipped": 2, "per_family": {}}
    assert list(score_vqa(["x"] * 3, ["x"] * 3, ["b", None, "a"])["per_family"]) == ["a", "b", "unknown"]
    with pytest.raises(ValueError, match="lengths differ"):
        score_vqa(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="1 families"):
        score_vqa(["a", "b"], ["a", "b"], ["f"])


def test_evaluate_vqa_combines_exact_match_and_rouge():
    fam, refs, preds, _ = zip(*hand_list())
    e = evaluate_vqa(preds, refs, fam)
    assert e["exact_match"] == score_vqa(preds, refs, fam)
    # One-word ROUGE-1 is all or nothing per pair: only "No"/"no" match as strings ("two" vs "2" and
    # "Zero." vs "0" do not), so 1 of the 5 scored pairs.
    assert e["rouge"]["rouge1"]["f1"] == pytest.approx(1 / 5)
    assert evaluate_vqa(["a"], [None])["rouge"] is None


def _rows_and_results():
    fam, refs, preds, _ = zip(*hand_list())
    before = ["3", "4", "1", "no", "yes", "blue"]  # wrong on every scored row
    rows = [{"image": f"CLEVR_val_{i:06d}.png", "question": f"How many things, \"big\" ones, {i}?",
             "reference": r, "prediction": p, "family": f, "before": b}
            for i, (f, r, p, b) in enumerate(zip(fam, refs, preds, before))]
    return rows, evaluate_vqa(before, refs, fam), evaluate_vqa(preds, refs, fam)


def _colour_pixels(png, rgb):
    import matplotlib.image as mpimg

    a = mpimg.imread(png)[..., :3]  # floats in [0, 1]
    return int((np.abs(a - np.array(rgb)).max(axis=-1) < 0.2).sum())


def test_write_vqa_report(tmp_path):
    rows, before, after = _rows_and_results()
    # before: "3" vs "2" no, "4" vs "3" no, "1" vs "0" no, "no" vs "yes" no, "yes" vs "no" no -> 0/5.
    assert before["exact_match"]["accuracy"] == 0.0
    gray = np.full((24, 24, 3), 0.5, dtype=np.float32)
    images = [gray, (gray * 255).astype(np.uint8), torch.zeros(3, 24, 24) - 0.2, None, gray[..., 0], gray]
    paths = write_vqa_report(tmp_path / "eval", before, after, rows, images)
    out = tmp_path / "eval"
    assert {p.name for p in out.iterdir()} == {"answers.csv", "report.md", "report.json", "qa_grid.png"}
    assert paths["md"] == out / "report.md"

    md = (out / "report.md").read_text()
    assert "| metric | n | before | after |" in md
    assert "| exact match | 5 | 0.0000 | 0.6000 |" in md
    assert "| exact match: count | 3 | 0.0000 | 0.6667 |" in md
    assert "| exact match: exist | 2 | 0.0000 | 0.5000 |" in md
    assert "| rouge1 F1 | 5 | 0.0000 | 0.2000 |" in md  # after: only "No" == "no" as strings
    assert "1 without one skipped" in md and "qa_grid.png" in md

    rep = json.loads((out / "report.json").read_text())
    assert rep["after"]["exact_match"]["accuracy"] == pytest.approx(0.6)
    assert rep["after"]["exact_match"]["per_family"]["count"]["accuracy"] == pytest.approx(2 / 3)
    assert rep["before"]["rouge"]["rougeLsum"]["f1"] == 0.0
    by_metric = {r["metric"]: r for r in rep["table"]}
    assert by_metric["exact match: exist"]["after"] == pytest.approx(0.5)
    assert len(rep["table"]) == 1 + 2 + 4 * 3

    png = out / "qa_grid.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Right answers are drawn in green, wrong ones in red.
    assert _colour_pixels(png, (0.0, 0.5, 0.0)) > 0 and _colour_pixels(png, (1.0, 0.0, 0.0)) > 0


def test_report_takes_flat_score_vqa_dicts_too(tmp_path):
    rows, before, after = _rows_and_results()
    flat = lambda e: {**e["exact_match"], "rouge": e["rouge"]}  # noqa: E731
    write_vqa_report(tmp_path / "nested", before, after, rows)
    write_vqa_report(tmp_path / "flat", flat(before), flat(after), rows)
    assert (tmp_path / "flat" / "report.md").read_text() == (tmp_path / "nested" / "report.md").read_text()


def test_report_without_before_or_images(tmp_path):
    rows, _, after = _rows_and_results()
    for r in rows:
        del r["before"]
    write_vqa_report(tmp_path, None, after, rows)
    md = (tmp_path / "report.md").read_text()
    assert "| exact match | 5 | — | 0.6000 |" in md
    assert not (tmp_path / "qa_grid.png").exists() and "qa_grid" not in md
    assert json.loads((tmp_path / "report.json").read_text())["before"] is None
    assert not list(tmp_path.glob("*.tmp"))


def test_answers_csv_round_trips(tmp_path):
    rows, _, _ = _rows_and_results()
    rows[1]["question"] = 'Is the "large" cube, the red one,\nleft of it?'
    path = write_answers_csv(tmp_path / "answers.csv", rows)
    with open(path, newline="", encoding="utf-8") as f:
        back = list(csv.DictReader(f))
    assert list(back[0]) == ["image", "question", "reference", "prediction", "family", "before"]
    assert len(back) == len(rows)
    for r, b in zip(rows, back):
        for k in b:
            assert b[k] == ("" if r[k] is None else r[k])
    assert back[1]["question"] == 'Is the "large" cube, the red one,\nleft of it?'
    # Optional columns appear only when some row has them; a missing required key is refused.
    plain = [{"image": "a.png", "question": "q", "reference": "yes", "prediction": "no"}]
    with open(write_answers_csv(tmp_path / "plain.csv", plain), newline="") as f:
        assert next(csv.reader(f)) == ["image", "question", "reference", "prediction"]
    with pytest.raises(ValueError, match="row 0 has no prediction"):
        write_answers_csv(tmp_path / "bad.csv", [{"image": "a", "question": "q", "reference": "r"}])
