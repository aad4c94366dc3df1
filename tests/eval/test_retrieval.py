"""recall_at_k against recalls worked out by hand (owned captions, duplicate texts, ties), identity
and reversed matrices, and a brute-force stable sort; plot_similarity_grid writes a PNG."""

import numpy as np
import pytest
import torch
from PIL import Image

from genlab.eval.retrieval import plot_similarity_grid, recall_at_k

# Three images, six captions. Caption 3 has the same text as caption 0 but belongs to image 1: so
# image 0 owns the texts {"a red cube", "a red cube on the left"} and image 1 {"a blue ball",
# "a red cube"}. Correct pairs (image: captions): 0: {0, 1, 3}; 1: {0, 2, 3}; 2: {4, 5}.
TEXTS = ["a red cube", "a red cube on the left", "a blue ball", "a red cube", "a green cone",
         "a green cone near a ball"]
OWNER = np.array([0, 0, 1, 1, 2, 2])
SIM = np.array([
    # c0   c1   c2   c3   c4   c5
    [0.1, 0.2, 0.3, 0.9, 0.5, 0.4],  # image 0
    [0.2, 0.1, 0.3, 0.4, 0.8, 0.9],  # image 1
    [0.7, 0.6, 0.5, 0.4, 0.3, 0.2],  # image 2
])
KS = (1, 2, 3, 5)


def test_hand_made_matrix_with_duplicate_captions():
    # Image -> text, rank (0 = first) of the first correct caption in each row:
    #   image 0: c3 (0.9) first; c3 is image 1's, but its text is image 0's "a red cube" -> rank 0
    #   image 1: c5 0.9, c4 0.8, c3 0.4 (its own) -> rank 2
    #   image 2: c0 .7, c1 .6, c2 .5, c3 .4, c4 .3 (its own) -> rank 4
    # R@1 = 1/3, R@2 = 1/3, R@3 = 2/3, R@5 = 3/3.
    # Text -> image, rank of the first correct image in each column:
    #   c0 (images 0, 1 correct): image 2 .7, image 1 .2 -> rank 1
    #   c1 (image 0): image 2 .6, image 0 .2 -> rank 1
    #   c2 (image 1): image 2 .5, then a tie at .3: image 0 before image 1 (index order) -> rank 2
    #   c3 (images 0, 1 by its text): image 0 .9 -> rank 0
    #   c4 (image 2): image 1 .8, image 0 .5, image 2 .3 -> rank 2
    #   c5 (image 2): image 1 .9, image 0 .4, image 2 .2 -> rank 2
    # R@1 = 1/6, R@2 = 3/6, R@3 = R@5 = 6/6.
    got = recall_at_k(SIM, OWNER, TEXTS, ks=KS)
    want = {"i2t_r1": 1 / 3, "i2t_r2": 1 / 3, "i2t_r3": 2 / 3, "i2t_r5": 1.0,
            "t2i_r1": 1 / 6, "t2i_r2": 3 / 6, "t2i_r3": 1.0, "t2i_r5": 1.0, "n_images": 3, "n_texts": 6}
    assert got == pytest.approx(want)
    # torch tensors give the same
    assert recall_at_k(torch.tensor(SIM, dtype=torch.float32), torch.tensor(OWNER), TEXTS, ks=KS) == pytest.approx(want)


def test_without_duplicate_texts_only_ownership_counts():
    # Make every text unique: caption 3 now matches image 1 only.
    #   i2t: image 0: c3 .9, c4 .5, c5 .4, c2 .3, c1 .2 (own) -> rank 4; image 1 rank 2; image 2 rank 4
    #        -> R@1 = 0, R@3 = 1/3, R@5 = 1
    #   t2i: c0 (image 0): image 2, image 1, image 0 -> rank 2; c1 rank 1; c2 rank 2;
    #        c3 (image 1): image 0 .9, then image 1 and image 2 tie at .4, image 1 first -> rank 1;
    #        c4, c5 rank 2 -> R@1 = 0, R@2 = 2/6, R@3 = 1
    unique = [f"{t} #{j}" for j, t in enumerate(TEXTS)]
    got = recall_at_k(SIM, OWNER, unique, ks=(1, 2, 3, 5))
    assert got == pytest.approx({"i2t_r1": 0.0, "i2t_r2": 0.0, "i2t_r3": 1 / 3, "i2t_r5": 1.0,
                                 "t2i_r1": 0.0, "t2i_r2": 2 / 6, "t2i_r3": 1.0, "t2i_r5": 1.0,
                                 "n_images": 3, "n_texts": 6})


def test_image_texts_adds_captions_that_were_not_embedded():
    # Image 2 also has the caption "a blue ball" (not embedded as its own), so c2 is correct for it:
    #   i2t image 2: c0, c1, c2 -> rank 2 (was 4); t2i c2: image 2 (.5) first -> rank 0 (was 2).
    extra = [[], [], ["a blue ball", "a caption nobody embedded"]]
    got = recall_at_k(SIM, OWNER, TEXTS, image_texts=extra, ks=(1, 3))
    assert got["i2t_r1"] == pytest.approx(1 / 3) and got["i2t_r3"] == pytest.approx(3 / 3)
    assert got["t2i_r1"] == pytest.approx(2 / 6)  # c2 and c3


def test_identity_scores_one_and_reversed_scores_zero():
    n = 20
    ones = recall_at_k(torch.eye(n), torch.arange(n), [f"caption {i}" for i in range(n)])
    assert ones == {"i2t_r1": 1.0, "i2t_r5": 1.0, "i2t_r10": 1.0, "t2i_r1": 1.0, "t2i_r5": 1.0,
                    "t2i_r10": 1.0, "n_images": n, "n_texts": n}
    # Each image scores its own caption lowest (-1, all others 0): rank n - 1 = 19 >= 10 both ways.
    zeros = recall_at_k(-np.eye(n), np.arange(n), [f"caption {i}" for i in range(n)])
    assert all(zeros[k] == 0.0 for k in ones if k.startswith(("i2t", "t2i")))
    # A constant matrix: ties in index order, so image i finds caption i at rank i (R@5 = 5 / n).
    flat = recall_at_k(np.zeros((n, n)), np.arange(n), [str(i) for i in range(n)])
    assert flat["i2t_r1"] == 1 / n and flat["i2t_r5"] == 5 / n and flat["t2i_r10"] == 10 / n


def _brute_force(sim, owner, texts, k):
    """Sort every row and column with a stable sort and look for a correct item in the top k."""
    n_img, n_txt = sim.shape
    owned = [{texts[j] for j in range(n_txt) if owner[j] == i} for i in range(n_img)]
    ok = np.array([[texts[j] in owned[i] for j in range(n_txt)] for i in range(n_img)])
    i2t = np.mean([ok[i, np.argsort(-sim[i], kind="stable")[:k]].any() for i in range(n_img)])
    t2i = np.mean([ok[np.argsort(-sim[:, j], kind="stable")[:k], j].any() for j in range(n_txt)])
    return i2t, t2i


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_a_brute_force_stable_sort_with_ties_and_infinities(seed):
    rng = np.random.default_rng(seed)
    n_img, n_txt = 15, 40
    owner = np.concatenate([np.arange(n_img), rng.integers(0, n_img, n_txt - n_img)])
    texts = [f"t{v}" for v in rng.integers(0, 25, n_txt)]  # many repeated texts
    sim = np.round(rng.standard_normal((n_img, n_txt)), 1)  # rounding makes many ties
    sim[rng.random(sim.shape) < 0.05] = -np.inf
    for k in (1, 3, 10):
        got = recall_at_k(sim, owner, texts, ks=(k,))
        i2t, t2i = _brute_force(sim, owner, texts, k)
        assert got[f"i2t_r{k}"] == pytest.approx(i2t) and got[f"t2i_r{k}"] == pytest.approx(t2i)


def test_all_correct_scores_minus_infinity_still_rank_by_index():
    # Image 0's only caption (c1) scores -inf like c2; c0 scores 0: stable order c0, c1, c2 -> rank 1.
    sim = np.array([[0.0, -np.inf, -np.inf], [1.0, 0.0, 0.0]])
    got = recall_at_k(sim, np.array([1, 0, 1]), ["x", "y", "z"], ks=(1, 2))
    assert got["i2t_r1"] == 0.5 and got["i2t_r2"] == 1.0


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="captions"):
        recall_at_k(SIM, OWNER[:5], TEXTS)
    with pytest.raises(ValueError, match="no caption"):
        recall_at_k(np.zeros((4, 6)), OWNER, TEXTS)
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(np.full((3, 6), np.nan), OWNER, TEXTS)


def test_plot_similarity_grid_writes_a_png(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)
    captions = [f"a small {c} cube to the left of a large sphere" for c in "abcdefghij"]
    sim = torch.rand(10, 10) * 2 - 1
    path = plot_similarity_grid(sim, captions, images, tmp_path / "sub" / "similarity.png",
                                max_rows=4, max_cols=6)
    assert path == tmp_path / "sub" / "similarity.png"
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1]  # 6 columns x 4 rows: wider than tall
    assert not list(path.parent.glob("*.tmp*"))  # nothing half-written left behind
    with pytest.raises(ValueError, match="captions"):
        plot_similarity_grid(sim, captions[:2], images, tmp_path / "x.png")
