"""The judge classifier: digits accuracy, the run-folder cache, per-class accuracy and its plot."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import genlab.eval.classifier as clf
from genlab.data.images import ImageDataConfig, ImageSet, load_images
from genlab.eval.classifier import (ClassifierConfig, ImageClassifier, accuracy_by_class, cached_classifier,
                                    extract_features, predict, train_classifier)
from genlab.eval.plots import plot_accuracy_by_scale

torch.set_num_threads(1)


def digits(split):
    return load_images(ImageDataConfig(name="digits"), split)  # sklearn's digits, uint8 (N, 1, 8, 8)


def tiny(n=40, c=1, side=8, seed=0, source="tiny"):
    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, c, side, side), dtype=torch.uint8, generator=g),
                    torch.arange(n) % 3, ["a", "b", "c"], source)


FAST = ClassifierConfig(steps=3, batch_size=16, width=8, feature_dim=16)


def test_digits_classifier_reaches_95_percent():
    train, test = digits("train"), digits("test")
    model, acc = train_classifier(train, test, ClassifierConfig())
    assert acc >= 0.95
    # The returned accuracy is the accuracy of the returned model on the test set.
    assert acc == pytest.approx(accuracy_by_class(predict(model, test.images), test.labels, 10)[0])


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32)])
def test_shapes_of_logits_and_features(shape):
    model = ImageClassifier(shape[0], 10, width=8, feature_dim=24).eval()
    x = torch.rand(5, *shape) * 2 - 1
    assert model(x).shape == (5, 10)
    assert model.features(x).shape == (5, 24)
    u8 = torch.randint(0, 256, (7, *shape), dtype=torch.uint8)
    assert extract_features(model, u8, batch=3).shape == (7, 24)
    pred = predict(model, u8, batch=3)
    assert pred.dtype == torch.int64 and pred.shape == (7,)
    assert torch.equal(pred, model(u8.float() / 127.5 - 1).argmax(1))  # batching changes nothing


def test_augmentation_is_a_padded_crop_maybe_flipped():
    x = torch.randn(8, 3, 32, 32)
    y = clf._augment(x, torch.Generator().manual_seed(0))
    pad = torch.nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
    for i in range(8):
        crops = [pad[i, :, a:a + 32, b:b + 32] for a in range(9) for b in range(9)]
        assert any(torch.equal(y[i], c) or torch.equal(y[i], c.flip(2)) for c in crops)


def test_32x32_training_with_augmentation_runs():
    data = tiny(n=24, c=3, side=32)
    model, acc = train_classifier(data, data, replace(FAST, steps=2))
    assert 0.0 <= acc <= 1.0 and not model.training


def test_cached_classifier_trains_once_then_loads(tmp_path, monkeypatch):
    train, test = tiny(seed=0), tiny(n=12, seed=1)
    model, info = cached_classifier(tmp_path, train, test, FAST)
    assert info["trained"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classifier.json", "classifier.safetensors"]  # no .tmp

    def refuse(*a, **k):
        raise AssertionError("trained again although the cache matches")

    monkeypatch.setattr(clf, "train_classifier", refuse)
    again, info2 = cached_classifier(tmp_path, train, test, FAST)
    assert info2["trained"] is False
    assert info2["test_accuracy"] == info["test_accuracy"] and info2["fingerprint"] == info["fingerprint"]
    x = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    assert torch.equal(extract_features(again, x), extract_features(model, x))


@pytest.mark.parametrize("change", ["config", "train labels", "test source", "train images"])
def test_changed_fingerprint_retrains(tmp_path, monkeypatch, change):
    train, test = tiny(seed=0), tiny(n=12, seed=1)
    cached_classifier(tmp_path, train, test, FAST)
    cfg = FAST
    if change == "config":
        cfg = replace(FAST, seed=1)
    elif change == "train labels":
        train = ImageSet(train.images, train.labels.roll(1), train.classes, train.source)
    elif change == "test source":
        test = ImageSet(test.images, test.labels, test.classes, "another source")
    else:  # same source string and shape, other pixels: the content digest must notice
        train = ImageSet(255 - train.images, train.labels, train.classes, train.source)
    calls = []
    real = clf.train_classifier
    monkeypatch.setattr(clf, "train_classifier", lambda *a, **k: calls.append(1) or real(*a, **k))
    _, info = cached_classifier(tmp_path, train, test, cfg)
    assert info["trained"] is True and calls == [1]
    _, info = cached_classifier(tmp_path, train, test, cfg)  # and the new one is now the cache
    assert info["trained"] is False and calls == [1]


def test_weights_from_another_fingerprint_are_not_trusted(tmp_path):
    # A crash between the two writes: new weights beside the old report. Both must agree to load.
    train, test = tiny(seed=0), tiny(n=12, seed=1)
    cached_classifier(tmp_path, train, test, FAST)
    old_report = (tmp_path / "classifier.json").read_text()
    cached_classifier(tmp_path, train, test, replace(FAST, seed=5))
    (tmp_path / "classifier.json").write_text(old_report)
    _, info = cached_classifier(tmp_path, train, test, FAST)
    assert info["trained"] is True
    assert json.loads((tmp_path / "classifier.json").read_text())["fingerprint"]["config"]["seed"] == 0


def test_accuracy_by_class_by_hand():
    target = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    pred = torch.tensor([0, 0, 1, 1, 0, 2, 2, 2, 0, 3])
    overall, per_class = accuracy_by_class(pred, target, num_classes=5)
    assert overall == pytest.approx(7 / 10)
    assert per_class[:4] == pytest.approx([2 / 3, 1 / 2, 3 / 4, 1.0])
    assert math.isnan(per_class[4])  # class 4 has no sample
    with pytest.raises(ValueError):
        accuracy_by_class(pred[:3], target, 5)


def test_for_shape_presets():
    assert ClassifierConfig.for_shape((1, 8, 8)) == ClassifierConfig()
    big = ClassifierConfig.for_shape((3, 32, 32), seed=3)
    assert big.width == 64 and big.steps > ClassifierConfig().steps and big.seed == 3


def test_plot_accuracy_by_scale_writes_a_png(tmp_path):
    scales = [0.0, 1.0, 2.0, 3.0, 4.0]
    per_class = {s: [min(1.0, 0.1 + 0.2 * s + 0.01 * k) for k in range(10)] for s in scales}
    per_class[0.0][3] = float("nan")
    results = {s: float(np.nanmean(per_class[s])) for s in scales}
    path = plot_accuracy_by_scale(results, per_class, tmp_path / "sub" / "acc.png")
    assert path == tmp_path / "sub" / "acc.png" and [p.name for p in path.parent.iterdir()] == ["acc.png"]
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 100
