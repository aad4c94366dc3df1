"""Frechet distances between image sets: on genlab's own classifier features, and real Inception FID.

The Frechet distance between two Gaussians N(mu1, S1), N(mu2, S2) is
``||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2})``, the squared 2-Wasserstein distance between them.
FID (Heusel et al., 2017) is this distance between Gaussians fitted to Inception-v3 pool features.

``classifier_fd`` takes it on the features of ``genlab.eval.classifier.ImageClassifier``: it needs no
download and works on 8x8 digits, but it is NOT Inception FID and its values are not comparable to
published FID numbers. ``inception_fid`` computes the real one through torchmetrics / torch-fidelity,
only from a local weights file; nothing is ever downloaded.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy import linalg

from genlab.eval.classifier import ImageClassifier, extract_features

NO_WEIGHTS = ("not computed: pass --fid-weights PATH (a local Inception-v3 FID weights file; "
              "nothing is downloaded)")
PIP_LINE = "pip install 'torchmetrics[image]'  (brings torch-fidelity)"


def feature_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """(N, F) features -> mean (F,) and unbiased covariance (F, F), in float64."""
    x = feats.detach().cpu().double().numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"feature_stats needs (N, F) features with N >= 2, got shape {x.shape}")
    return x.mean(0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def _sqrtm(a: np.ndarray) -> np.ndarray:
    # scipy warns on singular input; a singular PSD product still has a usable root, and a failed
    # one comes back non-finite, which the caller checks.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        return linalg.sqrtm(a)


def frechet_distance(mu1, cov1, mu2, cov2, eps: float = 1e-6) -> float:
    """The Frechet distance between N(mu1, cov1) and N(mu2, cov2) (a squared distance, >= 0)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"mismatched Gaussians: mu {mu1.shape} / {mu2.shape}, cov {cov1.shape} / {cov2.shape}")
    covmean = _sqrtm(cov1 @ cov2)
    if not np.isfinite(covmean).all():
        # Singular product (rank-deficient features, fewer samples than dimensions): nudge both
        # covariances by eps * I, as the reference FID code does.
        offset = np.eye(len(mu1)) * eps
        covmean = _sqrtm((cov1 + offset) @ (cov2 + offset))
    # sqrtm of a product of two PSD matrices has real eigenvalues; round-off leaves a tiny imaginary part.
    covmean = np.real(covmean)
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(covmean))
    return max(value, 0.0)  # round-off can dip a hair below zero for identical statistics


def classifier_fd(model: ImageClassifier, real_u8: torch.Tensor, fake_u8: torch.Tensor, batch: int = 512) -> float:
    """Frechet distance between real and generated uint8 (N, C, H, W) images on the classifier's
    feature layer. Not Inception FID: a within-genlab number to compare runs on the same data."""
    mu1, cov1 = feature_stats(extract_features(model, real_u8, batch))
    mu2, cov2 = feature_stats(extract_features(model, fake_u8, batch))
    return frechet_distance(mu1, cov1, mu2, cov2)


def _rgb_u8(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 1 or 3, H, W) -> uint8 (N, 3, H, W). torchmetrics resizes to 299x299 itself."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 (N, 1|3, H, W) images, got {tuple(images.shape)} {images.dtype}")
    return images.expand(-1, 3, -1, -1).contiguous() if images.shape[1] == 1 else images


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The weights file read safely (safetensors, or torch.load with weights_only=True)."""
    from genlab.io import read_safetensors, read_torch

    state = read_safetensors(path) if path.suffix == ".safetensors" else read_torch(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (torch-fidelity's "
                         f"weights-inception-2015-12-05-6726825d.pth)")
    return state


def inception_fid(real_u8: torch.Tensor, fake_u8: torch.Tensor, weights_path: str | os.PathLike | None,
                  device: str | torch.device = "cpu", batch: int = 64) -> tuple[float | None, str]:
    """Inception FID (2048-d pool3, torchmetrics' ``FrechetInceptionDistance``) between two uint8
    image sets, or ``(None, reason)`` when it cannot be computed offline: no weights path, a missing
    file, or torchmetrics / torch-fidelity not installed.

    ``weights_path`` is torch-fidelity's Inception-v3 file (``weights-inception-2015-12-05-*.pth``)
    or the same state dict as ``.safetensors``. torch-fidelity would unpickle it with
    ``weights_only=False``; genlab reads it safely first and hands torch-fidelity a copy holding
    only those tensors. With a few hundred samples (digits) the value is strongly biased upward;
    compare runs with equal sample counts only."""
    if not weights_path:
        return None, NO_WEIGHTS
    path = Path(weights_path).expanduser()
    if not path.is_file():
        return None, f"not computed: --fid-weights {path} does not exist (nothing is downloaded)"
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        import torch_fidelity  # noqa: F401  (torchmetrics' Inception network comes from it)
    except ImportError as e:
        return None, f"not computed: {e.name or 'torchmetrics'} is not installed ({PIP_LINE})"
    real, fake = _rgb_u8(real_u8), _rgb_u8(fake_u8)
    state = _load_state_dict(path)
    with tempfile.TemporaryDirectory() as tmp:
        clean = Path(tmp) / "inception.pth"
        torch.save(state, clean)  # only tensors: the unrestricted unpickle inside torch-fidelity is safe
        metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(clean))
    metric = metric.to(device)
    with torch.no_grad():
        for images, is_real in ((real, True), (fake, False)):
            for i in range(0, len(images), batch):
                metric.update(images[i:i + batch].to(device), real=is_real)
        value = float(metric.compute())
    return value, f"Inception FID (torchmetrics, 2048-d pool3), {len(real)} real / {len(fake)} generated images"
