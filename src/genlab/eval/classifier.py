"""A small CNN classifier trained on the real images, used to judge generated ones.

Conditional image generators are scored here with two numbers that need no download: the accuracy
of this classifier on samples drawn for class k (does guidance produce the class it was asked for?)
and a Frechet distance on its penultimate features (``genlab.eval.fid.classifier_fd``, which is
*not* Inception FID). The classifier is trained once per run folder and cached there
(``classifier.safetensors`` + ``classifier.json``), keyed by a fingerprint of the data and config.

Images come in as uint8 ``(N, C, H, W)`` (the ``genlab.data.images.ImageSet`` layout) and the model
takes floats in [-1, 1], the range the generators work in.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from genlab.data.images import to_model_range
from genlab.io import atomic_write_json, read_json, read_safetensors, save_safetensors

if TYPE_CHECKING:  # any object with images, labels, source and num_classes will do
    from genlab.data.images import ImageSet

WEIGHTS, REPORT = "classifier.safetensors", "classifier.json"
_FORMAT = 1  # bump when the architecture or the fingerprint changes, so old caches retrain


@dataclass
class ClassifierConfig:
    """How the judge is trained. The defaults fit sklearn's 8x8 digits: about 98.5% test accuracy
    (genlab's 1438 / 359 split) in 300 steps, a few seconds on one CPU thread. ``for_shape`` gives the
    32x32 (CIFAR-10) preset."""

    steps: int = 300
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 5e-4
    width: int = 16          # channels of the first stage; the next two have 2x and 4x
    feature_dim: int = 128   # size of the feature layer used for the Frechet distance
    seed: int = 0

    @classmethod
    def for_shape(cls, shape: tuple[int, int, int], **overrides) -> "ClassifierConfig":
        """Defaults for an image size: the digits defaults up to 16x16, and for 32x32 RGB a wider net
        and longer schedule (width 64, 5000 steps of 256 with crop+flip, a few minutes on one GPU,
        far too slow for a CPU; an estimate of about 90% CIFAR-10 test accuracy, not yet measured)."""
        base = cls() if shape[-1] <= 16 else cls(steps=5000, batch_size=256, lr=2e-3, width=64)
        for k, v in overrides.items():
            setattr(base, k, v)
        return base


def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    # GroupNorm rather than BatchNorm: the same function in train and eval mode, at any batch size.
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
                         nn.GroupNorm(math.gcd(8, c_out), c_out), nn.ReLU(inplace=True))


class ImageClassifier(nn.Module):
    """Three conv stages (width w, 2w, 4w; the last two halve the resolution), global average pool,
    a ReLU feature layer, then a linear head. 8x8 -> 8, 4, 2; 32x32 -> 32, 16, 8."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 16, feature_dim: int = 128):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            _block(in_channels, w, 1), _block(w, w, 1),
            _block(w, 2 * w, 2), _block(2 * w, 2 * w, 1),
            _block(2 * w, 4 * w, 2), _block(4 * w, 4 * w, 1),
        )
        self.feature = nn.Linear(4 * w, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, feature_dim), the layer the Frechet distance is taken on."""
        h = self.body(x).mean(dim=(2, 3))  # (B, 4w): global average pool, so any H, W works
        return F.relu(self.feature(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, num_classes) logits


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Per-image random crop of the 4-pixel reflect-padded image, and horizontal flip; for 32x32
    natural images only (a flipped or shifted 8x8 digit is a different digit, or off the grid)."""
    B, _, H, W = x.shape
    pad = F.pad(x, (4, 4, 4, 4), mode="reflect")  # (B, C, H+8, W+8)
    dy, dx = torch.randint(0, 9, (2, B, 1), generator=g).to(x.device)
    rows, cols = dy + torch.arange(H, device=x.device), dx + torch.arange(W, device=x.device)  # (B, H), (B, W)
    b = torch.arange(B, device=x.device)[:, None, None]
    x = pad.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (B, C, H, W)
    flip = (torch.rand(B, generator=g) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def train_classifier(train: "ImageSet", test: "ImageSet", cfg: ClassifierConfig,
                     device: str | torch.device = "cpu") -> tuple[ImageClassifier, float]:
    """Train on ``train`` (AdamW, one-cycle schedule, label smoothing) and return the model in eval
    mode with its accuracy on ``test``. Deterministic for a given ``cfg.seed`` on CPU."""
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise ValueError(f"classifier steps and batch_size must be >= 1, got {cfg.steps} and {cfg.batch_size}")
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    C, H, W = train.images.shape[1:]
    model = ImageClassifier(C, train.num_classes, cfg.width, cfg.feature_dim).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.15)
    images, labels = train.images.to(device), train.labels.to(device)  # uint8 on device: 4x less memory
    n, augment = len(labels), H >= 32
    model.train()
    for _ in range(cfg.steps):
        idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=g).to(device)
        x = to_model_range(images[idx])  # (B, C, H, W)
        if augment:
            x = _augment(x, g)
        loss = F.cross_entropy(model(x), labels[idx], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    acc, _ = accuracy_by_class(predict(model, test.images), test.labels, test.num_classes)
    return model, acc


@torch.no_grad()
def _batched(model: ImageClassifier, images_u8: torch.Tensor, fn, batch: int) -> torch.Tensor:
    device = next(model.parameters()).device
    out = [fn(to_model_range(images_u8[i:i + batch].to(device))).cpu() for i in range(0, len(images_u8), batch)]
    return torch.cat(out) if out else torch.zeros(0)


def predict(model: ImageClassifier, images_u8: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """uint8 (N, C, H, W) -> (N,) int64 predicted labels, on CPU."""
    was = model.training
    model.eval()
    pred = _batched(model, images_u8, lambda x: model(x).argmax(1), batch).long()
    model.train(was)
    return pred


def extract_features(model: ImageClassifier, images_u8: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """uint8 (N, C, H, W) -> (N, feature_dim) float32 features, on CPU."""
    was = model.training
    model.eval()
    feats = _batched(model, images_u8, model.features, batch).float()
    model.train(was)
    return feats


def accuracy_by_class(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> tuple[float, list[float]]:
    """Overall accuracy and the accuracy within each true class (NaN for a class with no sample)."""
    pred, target = torch.as_tensor(pred).long().flatten(), torch.as_tensor(target).long().flatten()
    if pred.shape != target.shape:
        raise ValueError(f"pred has {pred.numel()} labels, target {target.numel()}")
    hit = (pred == target).float()
    total = torch.bincount(target, minlength=num_classes).float()
    right = torch.bincount(target, weights=hit, minlength=num_classes)
    per_class = [float(r / t) if t > 0 else math.nan for r, t in zip(right.tolist(), total.tolist())]
    return (float(hit.mean()) if len(hit) else math.nan), per_class


def _describe(data: "ImageSet") -> dict:
    # A content digest beside the source string: two splits of one source must not share a cache.
    h = hashlib.sha256(data.images.contiguous().cpu().numpy().tobytes())
    h.update(data.labels.cpu().numpy().astype("int64").tobytes())
    return {"source": str(data.source), "shape": list(data.images.shape[1:]), "n": int(len(data.labels)),
            "num_classes": int(data.num_classes), "sha256": h.hexdigest()}


def fingerprint(train: "ImageSet", test: "ImageSet", cfg: ClassifierConfig) -> dict:
    """What a cached classifier must have been trained with to be reused."""
    return {"format": _FORMAT, "train": _describe(train), "test": _describe(test), "config": asdict(cfg)}


def _load(folder: Path, want: dict) -> tuple[ImageClassifier, dict] | None:
    """The cached model when both files exist and were written for ``want``, else None. The weights
    carry the fingerprint in their own metadata, so a crash between the two writes is caught."""
    from safetensors import safe_open

    wpath, jpath = folder / WEIGHTS, folder / REPORT
    if not (wpath.is_file() and jpath.is_file()):
        return None
    report = read_json(jpath)
    key = json.dumps(want, sort_keys=True)
    if json.dumps(report.get("fingerprint"), sort_keys=True) != key:
        return None
    with safe_open(str(wpath), framework="pt") as f:
        if (f.metadata() or {}).get("fingerprint") != key:
            return None
    cfg, tr = want["config"], want["train"]
    model = ImageClassifier(tr["shape"][0], tr["num_classes"], cfg["width"], cfg["feature_dim"])
    model.load_state_dict(read_safetensors(wpath))  # strict: a foreign file fails loudly
    return model.eval(), report


def cached_classifier(folder: str | Path, train: "ImageSet", test: "ImageSet", cfg: ClassifierConfig,
                      device: str | torch.device = "cpu") -> tuple[ImageClassifier, dict]:
    """The classifier for this data and config: loaded from ``folder`` when its fingerprint matches,
    else trained and saved there (weights first, then the JSON; each written atomically).

    ``info`` holds ``trained`` (False when loaded), ``test_accuracy``, ``train_seconds`` (of the run
    that trained it) and ``fingerprint``."""
    folder = Path(folder)
    want = fingerprint(train, test, cfg)
    hit = _load(folder, want)
    if hit is not None:
        model, report = hit
        return model.to(device), {**report, "trained": False}
    t0 = time.perf_counter()
    model, acc = train_classifier(train, test, cfg, device)
    report = {"test_accuracy": acc, "train_seconds": round(time.perf_counter() - t0, 3),
              "device": str(device), "fingerprint": want}
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_safetensors(state, folder / WEIGHTS, metadata={"fingerprint": json.dumps(want, sort_keys=True)})
    atomic_write_json(folder / REPORT, report)
    return model, {**report, "trained": True}
