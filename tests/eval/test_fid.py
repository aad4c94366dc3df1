"""Frechet distance against closed forms and an eigen-decomposition W2; the offline Inception FID."""

import sys

import numpy as np
import pytest
import torch

from genlab.data.images import ImageSet
from genlab.eval import fid
from genlab.eval.classifier import ClassifierConfig, extract_features, train_classifier
from genlab.eval.fid import classifier_fd, feature_stats, frechet_distance, inception_fid

torch.set_num_threads(1)


def psd_sqrt(a):
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def w2_squared_gaussians(mu1, s1, mu2, s2):
    """Bures form, independent of sqrtm(S1 S2): ||dmu||^2 + tr S1 + tr S2 - 2 tr (S1^1/2 S2 S1^1/2)^1/2."""
    r = psd_sqrt(s1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(psd_sqrt(r @ s2 @ r)))


def random_spd(rng, d, rank=None):
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / d + (0 if rank else 0.1 * np.eye(d))


def test_diagonal_gaussians_match_the_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)  # = 7.25 + 4 + 1
    assert expected == pytest.approx(12.25)
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)


def test_full_covariances_match_the_bures_w2():
    rng = np.random.default_rng(0)
    for d in (2, 5, 32):
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        s1, s2 = random_spd(rng, d), random_spd(rng, d)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(w2_squared_gaussians(mu1, s1, mu2, s2), rel=1e-8)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-8)


def test_identical_statistics_give_zero_even_when_singular():
    rng = np.random.default_rng(1)
    mu = rng.normal(size=20)
    for cov in (random_spd(rng, 20), random_spd(rng, 20, rank=4), np.zeros((20, 20))):
        assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-6)


def test_rank_deficient_sample_covariances_stay_finite():
    # Fewer samples than dimensions (what a small class or a dead ReLU unit gives): the eps retry.
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(6, 40)), rng.normal(loc=0.5, size=(6, 40))
    d = frechet_distance(*feature_stats(a), *feature_stats(b))
    assert np.isfinite(d)
    assert d == pytest.approx(w2_squared_gaussians(*feature_stats(a), *feature_stats(b)), rel=1e-3)


def test_feature_stats_are_float64_mean_and_unbiased_cov():
    x = torch.tensor([[1.0, 2.0], [3.0, 0.0], [5.0, 4.0]])
    mu, cov = feature_stats(x)
    assert mu.dtype == np.float64 and mu.tolist() == [3.0, 2.0]
    np.testing.assert_allclose(cov, [[4.0, 2.0], [2.0, 4.0]])  # sum of outer products / (N - 1)
    with pytest.raises(ValueError):
        feature_stats(x[:1])


def test_classifier_fd_small_for_halves_of_one_set_large_for_noise():
    # 40 steps of training (~2 s) already give features where two halves of the digits sit ~40x
    # closer than digits and uniform noise (an untrained network manages only ~10x).
    from sklearn.datasets import load_digits
    d = load_digits()
    u8 = torch.from_numpy(np.round(d.images * 255 / 16).astype(np.uint8))[:, None]  # (1797, 1, 8, 8)
    perm = torch.randperm(len(u8), generator=torch.Generator().manual_seed(0))
    u8, labels = u8[perm], torch.from_numpy(d.target).long()[perm]
    data = ImageSet(u8[:1600], labels[:1600], [str(i) for i in range(10)], "digits")
    model, _ = train_classifier(data, data, ClassifierConfig(steps=40, batch_size=64))
    noise = torch.randint(0, 256, (800, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    halves = classifier_fd(model, u8[:800], u8[800:1600])
    to_noise = classifier_fd(model, u8[:800], noise)
    assert halves < 0.1 * to_noise
    # It is the Frechet distance of the feature statistics, nothing more.
    feats = extract_features(model, u8[:800]), extract_features(model, noise)
    assert to_noise == pytest.approx(frechet_distance(*feature_stats(feats[0]), *feature_stats(feats[1])))
    assert classifier_fd(model, u8[:800], u8[:800]) == pytest.approx(0.0, abs=1e-6)


def test_inception_fid_without_weights_says_why():
    x = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    for path in (None, ""):
        value, reason = inception_fid(x, x, path)
        assert value is None and reason == fid.NO_WEIGHTS and "--fid-weights" in reason


def test_inception_fid_with_a_missing_file_says_which(tmp_path):
    x = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    value, reason = inception_fid(x, x, str(tmp_path / "pt_inception.pth"))
    assert value is None and "pt_inception.pth" in reason and "does not exist" in reason


def test_inception_fid_without_torchmetrics_names_the_install_line(tmp_path, monkeypatch):
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"not read: the import check comes first")
    monkeypatch.setitem(sys.modules, "torchmetrics", None)  # import torchmetrics... -> ImportError
    monkeypatch.setitem(sys.modules, "torchmetrics.image", None)
    monkeypatch.setitem(sys.modules, "torchmetrics.image.fid", None)
    x = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    value, reason = inception_fid(x, x, weights)
    assert value is None and "not installed" in reason and "pip install" in reason and "torch-fidelity" in reason
