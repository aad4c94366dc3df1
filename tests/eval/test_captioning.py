"""Caption metrics: CIDEr-D by hand and against a small independent re-implementation, BLEU-4 by
hand and with a variable number of references, ROUGE-L by hand, and the input checks."""

import math
from collections import Counter

import pytest
from sacrebleu.metrics import BLEU

from genlab.eval.captioning import bleu4, caption_metrics, cider, normalize_caption, rouge_l


def test_normalize_caption():
    assert normalize_caption("  A man's Left-hand,   CUBE!! ") == "a mans left hand cube"
    assert normalize_caption("a red cube") == "a red cube"
    assert normalize_caption("...") == ""


# ---- CIDEr-D ---------------------------------------------------------------------------------------

def test_cider_by_hand_on_a_two_image_corpus():
    # Image A: refs "a red cube", "red cube"; prediction "red red cube" (a repeated word: clipping).
    # Image B: ref  "a blue ball";            prediction "blue ball"   (one word short: length penalty).
    #
    # idf(g) = log(N) - log(max(1, df(g))), N = 2 images, df = number of images whose refs hold g.
    # "a" is in both images' refs -> idf 0. Every other n-gram is in one image's refs (df 1) or in
    # none ("red red", "red red cube": df 0, max(1, 0) = 1): idf L = log 2. So every n-gram vector
    # entry is tf * L except "a" = 0.
    #
    # Image A, prediction g = {red: 2L, cube: L | red red: L, red cube: L | red red cube: L}
    #   |g1| = sqrt(5) L, |g2| = sqrt(2) L, |g3| = L, no 4-grams (norm 0 -> that n scores 0).
    #   ref 1 "a red cube": {a: 0, red: L, cube: L | a red: L, red cube: L | a red cube: L}
    #     n=1: clipped dot = min(2L, L) L + L L = 2L^2 -> 2L^2 / (sqrt5 L sqrt2 L) = 2 / sqrt(10)
    #     n=2: only "red cube" is shared -> L^2 / (sqrt2 L sqrt2 L) = 1/2
    #     n=3: "red red cube" != "a red cube" -> 0;  n=4: 0
    #     length = 3 words both -> penalty e^0 = 1
    #   ref 2 "red cube": {red: L, cube: L | red cube: L}; no trigram
    #     n=1: 2L^2 / (sqrt5 L sqrt2 L) = 2 / sqrt(10);  n=2: L^2 / (sqrt2 L * L) = 1 / sqrt(2)
    #     n=3, 4: 0;  length 3 vs 2 -> penalty p = exp(-1^2 / (2 * 6^2)) = exp(-1/72)
    #   CIDEr_A = 10 * mean over n (= sum / 4) of the sum over refs, divided by 2 refs:
    #           = 10 / 8 * (2/sqrt10 * (1 + p) + 1/2 + p / sqrt2)
    # Image B, prediction {blue: L, ball: L | blue ball: L}; ref {a: 0, blue: L, ball: L | a blue: L,
    #   blue ball: L | a blue ball: L}
    #     n=1: 2L^2 / (sqrt2 L sqrt2 L) = 1;  n=2: L^2 / (L sqrt2 L) = 1 / sqrt2;  n=3, 4: 0
    #     length 2 vs 3 -> p
    #   CIDEr_B = 10 / 4 * (1 + 1/sqrt2) * p
    # Corpus CIDEr = (CIDEr_A + CIDEr_B) / 2 = 3.63791...
    p = math.exp(-1 / 72)
    a = 10 / 8 * (2 / math.sqrt(10) * (1 + p) + 0.5 + p / math.sqrt(2))
    b = 10 / 4 * (1 + 1 / math.sqrt(2)) * p
    got = cider(["Red red cube.", "blue ball"], [["a red cube", "red cube"], ["A blue ball"]])
    assert got == pytest.approx((a + b) / 2, rel=1e-12)
    assert got == pytest.approx(3.6379144574683, rel=1e-12)


def _cider_d(preds: list[str], refs: list[list[str]], n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D from the paper's definition (Vedantam et al. 2015, sec. 4 and CIDEr-D), written
    independently of pycocoevalcap. The length is the word count; coco-caption counts bigrams
    (words - 1), which gives the same difference for non-empty captions."""
    def grams(s: str) -> list[Counter]:
        w = s.split()
        return [Counter(tuple(w[i:i + k]) for i in range(len(w) - k + 1)) for k in range(1, n + 1)]

    ref_grams = [[grams(r) for r in rs] for rs in refs]
    df = Counter(g for rgs in ref_grams for g in {g for rg in rgs for c in rg for g in c})
    log_n = math.log(len(refs))

    def vec(c: Counter) -> dict:
        return {g: tf * (log_n - math.log(max(1.0, df[g]))) for g, tf in c.items()}

    total = 0.0
    for p, rgs, rs in zip(preds, ref_grams, refs):
        hg, score = grams(p), 0.0
        for rg, r in zip(rgs, rs):
            penalty = math.exp(-((len(p.split()) - len(r.split())) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                h, g = vec(hg[k]), vec(rg[k])
                nh, ng = math.sqrt(sum(v * v for v in h.values())), math.sqrt(sum(v * v for v in g.values()))
                if nh > 0 and ng > 0:
                    score += penalty * sum(min(v, g.get(t, 0.0)) * g.get(t, 0.0) for t, v in h.items()) / (nh * ng)
        total += 10 * score / n / len(rs)
    return total / len(preds)


def test_cider_matches_an_independent_implementation():
    preds = ["a red cube left of a blue ball", "two green cones", "a small cube", "a big blue ball on the right",
             "a red cube", "three yellow spheres in a row near a cube"]
    refs = [["a red cube to the left of a blue ball", "red cube and blue ball"],
            ["two green cones", "a pair of green cones", "green cones"],
            ["a tiny purple cube"],
            ["a large blue sphere on the right", "a big blue ball", "blue ball right", "one ball"],
            ["a red cube", "a red block"],
            ["yellow spheres in a row", "three yellow balls next to a cube"]]
    assert cider(preds, refs) == pytest.approx(_cider_d(preds, refs), rel=1e-10)


def test_cider_of_one_image_is_zero():
    # One document: every reference n-gram has idf log(1) - log(1) = 0.
    assert cider(["a red cube"], [["a red cube"]]) == 0.0


# ---- BLEU-4 ----------------------------------------------------------------------------------------

def test_bleu4_of_identical_strings_is_100():
    assert bleu4(["a red cube left of a blue ball", "two green cones near a big yellow sphere"],
                 [["a red cube left of a blue ball"], ["two green cones near a big yellow sphere", "x y"]]) == \
        pytest.approx(100.0)


def test_bleu4_by_hand():
    # pred (10 words): a small red cube is beside a big blue ball
    # ref  (11 words): a small red cube is next to a big blue ball
    # clipped matches: 1-grams 9/10 (all but "beside"), 2-grams 7/9 (not "is beside", "beside a"),
    # 3-grams 5/8, 4-grams 3/7 ("a small red cube", "small red cube is", "a big blue ball").
    # Brevity penalty exp(1 - 11/10). BLEU = 100 * BP * (9/10 * 7/9 * 5/8 * 3/7) ** (1/4) = 59.5417
    want = 100 * math.exp(-0.1) * (0.9 * 7 / 9 * 5 / 8 * 3 / 7) ** 0.25
    got = bleu4(["a small red cube is beside a big blue ball"], [["A small red cube is next to a big blue ball."]])
    assert got == pytest.approx(want, rel=1e-9) and got == pytest.approx(59.5416505912, rel=1e-9)


def test_bleu4_with_a_variable_number_of_references():
    preds = ["a small red cube is beside a big blue ball", "a green cone"]
    refs = [["a small red cube is next to a big blue ball", "a red cube and a blue ball"],
            ["a green cone on the far left of the scene"]]
    got = bleu4(preds, refs)
    # A missing reference must count as absent: repeating the one reference changes nothing ...
    assert got == pytest.approx(bleu4(preds, [refs[0], refs[1] * 2]), rel=1e-12)
    # ... whereas padding with "" would add a zero-length reference, which is the closest length
    # to the 3-word prediction (|3 - 0| < |3 - 10|) and removes its brevity penalty.
    empty_padded = BLEU().corpus_score(preds, [[refs[0][0], refs[1][0]], [refs[0][1], ""]]).score
    assert empty_padded > got + 1.0


# ---- ROUGE-L ---------------------------------------------------------------------------------------

def test_rouge_l_by_hand_takes_the_best_reference():
    # "a red cube" vs "a red cube on the left": LCS 3, P = 3/3, R = 3/6, F1 = 2/3; vs "the blue ball": 0.
    # "blue balls" vs "the blue ball": stemming balls -> ball, LCS 2, P = 1, R = 2/3, F1 = 0.8.
    got = rouge_l(["a red cube", "blue balls"], [["a red cube on the left", "the blue ball"], ["the blue ball"]])
    assert got == pytest.approx((2 / 3 + 0.8) / 2)


def test_caption_metrics_and_input_checks():
    m = caption_metrics(["a red cube", "blue balls"], [["a red cube on the left", "the blue ball"], ["the blue ball"]])
    assert set(m) == {"bleu4", "cider", "rouge_l", "n"} and m["n"] == 2
    assert m["rouge_l"] == pytest.approx((2 / 3 + 0.8) / 2)
    with pytest.raises(ValueError, match="2 predictions but 1"):
        bleu4(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="prediction 1 .* no"):
        cider(["a cube", "a ball"], [["a cube"], []])
    with pytest.raises(ValueError, match="no"):
        rouge_l(["a cube"], [[None, "", "?!"]])  # nothing left after normalisation
    with pytest.raises(ValueError, match="list of reference strings"):
        caption_metrics(["a cube"], ["a cube"])
    with pytest.raises(ValueError, match="no predictions"):
        bleu4([], [])
