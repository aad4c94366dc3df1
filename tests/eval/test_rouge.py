"""ROUGE against values worked out by hand with the course's formula (overlaps over reference words)."""

import sys

import pytest

from genlab.errors import ConfigError
from genlab.eval.rouge import ROUGE_TYPES, rouge, split_sentences


def f1(p, r):
    return 2 * p * r / (p + r)


REF = "the cat is on the mat"          # 6 words, 5 bigrams
PRED = "the cat sat on the mat today"  # 7 words, 6 bigrams


def test_rouge1_by_hand():
    # Unigram overlap, counts clipped: the x2, cat, on, mat = 5 ("is" and "sat", "today" do not match).
    # Course formula = recall = 5 / |ref| = 5/6; precision = 5 / |pred| = 5/7.
    s = rouge([PRED], [REF])["rouge1"]
    assert s["recall"] == pytest.approx(5 / 6)
    assert s["precision"] == pytest.approx(5 / 7)
    assert s["f1"] == pytest.approx(10 / 13)  # 2 (5/6)(5/7) / (5/6 + 5/7)


def test_rouge2_by_hand():
    # ref bigrams: the-cat cat-is is-on on-the the-mat; pred adds cat-sat sat-on mat-today.
    # Shared: the-cat, on-the, the-mat = 3 -> recall 3/5, precision 3/6.
    s = rouge([PRED], [REF])["rouge2"]
    assert s["recall"] == pytest.approx(3 / 5)
    assert s["precision"] == pytest.approx(1 / 2)
    assert s["f1"] == pytest.approx(6 / 11)


def test_rougeL_from_a_hand_lcs():
    # LCS(ref, pred) = "the cat on the mat", length 5: recall 5/6, precision 5/7.
    s = rouge([PRED], [REF])["rougeL"]
    assert s["recall"] == pytest.approx(5 / 6)
    assert s["precision"] == pytest.approx(5 / 7)
    assert s["f1"] == pytest.approx(f1(5 / 7, 5 / 6))


def test_counts_are_clipped():
    # "the" four times in the prediction, once in the reference: only one match counts.
    s = rouge(["the the the the"], ["the cat"])["rouge1"]
    assert s["recall"] == pytest.approx(1 / 2)
    assert s["precision"] == pytest.approx(1 / 4)


def test_stemming_matches_plural_and_singular():
    # Porter stemming on both sides: "cubes" -> "cube". Without it recall would be 1/2.
    s = rouge(["red cubes"], ["red cube"])
    assert s["rouge1"]["recall"] == pytest.approx(1.0)
    assert s["rougeL"]["f1"] == pytest.approx(1.0)


def test_rougeLsum_on_two_sentences_by_hand():
    ref = "the cube is red. the ball is small."
    pred = "the ball is big. the cube is red."
    s = rouge([pred], [ref])
    # Summary level: ref sentence 1 is found whole in pred sentence 2 (4 tokens); ref sentence 2 vs
    # pred sentence 1: LCS "the ball is" (3), and pred sentence 2 adds only "the is", already in it.
    # Union hits 4 + 3 = 7 of 8 reference and 8 prediction tokens.
    assert s["rougeLsum"]["recall"] == pytest.approx(7 / 8)
    assert s["rougeLsum"]["precision"] == pytest.approx(7 / 8)
    # Without the sentence split, the swapped order halves it: the LCS of the 8-token sequences is 4
    # ("the cube is red", or "the is the is").
    assert s["rougeL"]["recall"] == pytest.approx(4 / 8)


def test_split_sentences_keeps_decimals_and_line_breaks():
    assert split_sentences("A cube. A ball! Is it 3.5? yes") == ["A cube.", "A ball!", "Is it 3.5?", "yes"]
    assert split_sentences("one\ntwo\n\n three") == ["one", "two", "three"]
    assert split_sentences("") == [] and split_sentences("  \n ") == []


def test_empty_prediction_scores_zero_and_averages_over_pairs():
    s = rouge(["", "a red cube"], ["a red cube", "a red cube"])
    assert set(s) == set(ROUGE_TYPES)
    for t in ROUGE_TYPES:
        assert set(s[t]) == {"precision", "recall", "f1"}
        assert s[t]["f1"] == pytest.approx(0.5)  # (0 + 1) / 2
    zero = rouge([""], ["yes"])
    assert all(v == 0.0 for t in ROUGE_TYPES for v in zero[t].values())


def test_none_references_are_skipped_and_bad_input_is_refused():
    assert rouge(["2", "x"], ["3", None])["rouge1"]["f1"] == 0.0  # "2" vs "3" only
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no pair"):
        rouge(["a"], [None])


def test_missing_package_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "rouge_score", None)  # makes `import rouge_score` fail
    with pytest.raises(ConfigError, match="pip install rouge-score"):
        rouge(["a"], ["a"])
