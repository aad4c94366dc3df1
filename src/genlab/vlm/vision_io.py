"""A frozen vision encoder for the Q-Former: genlab's SigLIP or ViT tower read from, and written as, a
Hugging Face SigLIP or ViT folder.

    tower = load_vision_tower("runs/vlm-siglip-shapes/vision")      # genlab vlm pretrain-siglip's export
    tower = load_vision_tower("/models/siglip-base-patch16-224")    # a real SigLIP (text half ignored)
    tower = load_vision_tower("/models/vit-base-patch16-224-in21k") # a ViT (ViTModel or ViTForImageClassification)
    save_vision_tower(tower, "out/vision")       # SiglipVisionModel / ViTModel.from_pretrained reads it

Accepted folders: ``config.json`` with ``model_type``

* ``siglip_vision_model`` (keys ``vision_model.*``) or ``siglip`` (a whole SigLIP: its
  ``vision_config`` and ``vision_model.*`` keys; ``text_model.*``, ``logit_scale`` and ``logit_bias``
  belong to the text half and are skipped). The attention-pooling head (``vision_model.head.*``) is
  skipped too: the Q-Former reads every patch feature (B, N, D) after the final LayerNorm, as BLIP-2 does.
* ``vit`` (ViTModel's keys ``embeddings.*``, ``encoder.layer.N.*``, ``layernorm.*``, or the same with
  ViTForImageClassification's ``vit.`` prefix). ``pooler.*``, ``classifier.*`` and
  ``embeddings.mask_token`` are skipped; the tower gives (B, 1 + N, D), [CLS] first.

Every other key must map onto the tower and every tower parameter must be present (errors name the
keys). Normalisation: the tower's ``image_mean`` / ``image_std`` come from the folder's
``preprocessor_config.json`` when it has one (``do_normalize: false`` means mean 0, std 1), else
0.5 / 0.5 (the default of both SiglipImageProcessor and ViTImageProcessor); ``save_vision_tower``
writes them back there.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from genlab.errors import CheckpointMismatchError, ConfigError, FileFormatError
from genlab.io import atomic_write_json, read_json, save_safetensors
from genlab.vlm.siglip import SiglipConfig, SiglipVisionTower
from genlab.vlm.vit import ViTConfig, ViTVisionTower, genlab_key, hf_key

PREFIX = "vision_model."
SKIPPED = ("text_model.", "vision_model.head.", "logit_scale", "logit_bias")
VIT_PREFIX = "vit."  # ViTForImageClassification (and other ViT heads) keep the backbone under vit.
VIT_SKIPPED = ("pooler.", "classifier.", "embeddings.mask_token")  # after the vit. prefix is removed
MODEL_TYPES = ("siglip_vision_model", "siglip", "vit")
DEFAULT_MEAN = DEFAULT_STD = 0.5

VisionConfig = SiglipConfig | ViTConfig
VisionTower = SiglipVisionTower | ViTVisionTower


def read_vision_config(folder: str | Path) -> VisionConfig:
    """The tower's config from ``folder/config.json`` (a SigLIP vision model, a whole SigLIP or a ViT)."""
    folder = Path(folder)
    path = folder / "config.json"
    if not folder.is_dir():
        raise FileNotFoundError(f"vision folder {folder} does not exist: give a Hugging Face SigLIP or ViT folder "
                                f"(config.json + model.safetensors) or a `genlab vlm pretrain-siglip` run's vision/")
    if not path.is_file():
        hint = f" (did you mean {folder / 'vision'}?)" if (folder / "vision" / "config.json").is_file() else ""
        raise FileNotFoundError(f"no config.json in {folder}{hint}")
    try:
        raw = read_json(path)
    except FileFormatError as e:
        raise ConfigError(str(e)) from e
    kind = raw.get("model_type")
    if kind not in MODEL_TYPES:
        raise ConfigError(f"{path}: model_type {kind!r} is not a SigLIP vision model or a ViT (accepted: "
                          f"{', '.join(repr(k) for k in MODEL_TYPES)})")
    try:
        if kind == "vit":
            return ViTConfig.from_hf_dict(raw).validate(where=str(path))
        if kind == "siglip":
            raw = raw.get("vision_config") or {}
        return SiglipConfig.from_hf_dict({**raw, "vision_use_head": False}).validate(where=str(path))
    except (TypeError, ValueError, NotImplementedError) as e:
        name = "ViT" if kind == "vit" else "SigLIP vision"
        raise ConfigError(f"{path}: not a valid {name} config ({e})") from e


def read_normalisation(folder: str | Path, num_channels: int = 3) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(image_mean, image_std), one per channel, from ``folder/preprocessor_config.json``; 0.5 / 0.5
    when there is no such file or it omits them. A bad value is a ConfigError naming the field."""
    path = Path(folder) / "preprocessor_config.json"
    raw = {}
    if path.is_file():
        try:
            raw = read_json(path)
        except FileFormatError as e:
            raise ConfigError(str(e)) from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("do_normalize", True) is False:
        return (0.0,) * num_channels, (1.0,) * num_channels

    def channels(name: str, default: float) -> tuple[float, ...]:
        value = raw.get(name, default)
        values = value if isinstance(value, (list, tuple)) else [value] * num_channels
        if len(values) != num_channels or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                              or not math.isfinite(v) for v in values):
            raise ConfigError(f"{path}: {name} must be a number or a list of {num_channels} numbers, got {value!r}")
        return tuple(float(v) for v in values)

    mean, std = channels("image_mean", DEFAULT_MEAN), channels("image_std", DEFAULT_STD)
    if not all(s > 0 for s in std):
        raise ConfigError(f"{path}: image_std must be > 0 in every channel, got {list(std)}")
    return mean, std


def _tower_key(cfg: VisionConfig, key: str) -> str | None:
    """A file key -> the tower's state-dict key; None for a skipped key, "" for an unknown one."""
    if isinstance(cfg, ViTConfig):
        name = key[len(VIT_PREFIX):] if key.startswith(VIT_PREFIX) else key
        return None if name.startswith(VIT_SKIPPED) else genlab_key(name)
    if key.startswith(SKIPPED):
        return None
    return key[len(PREFIX):] if key.startswith(PREFIX) else ""


def _file_key(cfg: VisionConfig, name: str) -> str:
    """The tower's key as a Hugging Face file spells it (for save and for naming missing keys)."""
    return hf_key(name) if isinstance(cfg, ViTConfig) else PREFIX + name


def load_vision_tower(folder: str | Path, dtype: torch.dtype = torch.float32) -> VisionTower:
    """The tower of ``folder`` in eval mode with its weights (strict key map, see the module doc) and
    its normalisation (``image_mean`` / ``image_std``)."""
    folder = Path(folder)
    cfg = read_vision_config(folder)
    mean, std = read_normalisation(folder, cfg.num_channels)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    tower = ViTVisionTower(cfg) if isinstance(cfg, ViTConfig) else SiglipVisionTower(cfg)
    expected = {k: tuple(v.shape) for k, v in tower.state_dict().items()}
    state, unexpected, bad_shape = {}, [], []
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    name = _tower_key(cfg, key)
                    if name is None:
                        continue
                    if name not in expected:
                        unexpected.append(key)
                        continue
                    t = f.get_tensor(key)
                    if tuple(t.shape) != expected[name]:
                        bad_shape.append(f"{key}: file {tuple(t.shape)} vs model {expected[name]}")
                        continue
                    state[name] = t.to(dtype=dtype, copy=True)
        except (SafetensorError, OSError) as e:
            raise FileFormatError(f"{path}: not a readable safetensors file ({e}); it may be truncated") from e
    missing = [_file_key(cfg, k) for k in expected if k not in state]
    problems = [f"{label}: {', '.join(items)}" for label, items in (
        ("unexpected keys", unexpected), ("shape mismatches", bad_shape), ("missing keys", missing)) if items]
    if problems:
        raise CheckpointMismatchError(f"vision weights in {folder} do not match its config.json: " + "; ".join(problems))
    tower.load_state_dict(state, strict=True)
    tower.image_mean, tower.image_std = mean, std
    return tower.to(dtype).eval()


def save_vision_tower(tower: VisionTower, folder: str | Path) -> Path:
    """Write ``tower`` as a SiglipVisionModel or ViTModel folder (weights, preprocessor_config.json,
    config.json last, each atomic)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = tower.config
    state = {_file_key(cfg, k): v.detach().contiguous().cpu() for k, v in tower.state_dict().items()}
    save_safetensors(state, folder / "model.safetensors", metadata={"format": "pt"})
    vit = isinstance(cfg, ViTConfig)
    atomic_write_json(folder / "preprocessor_config.json", {
        "image_processor_type": "ViTImageProcessor" if vit else "SiglipImageProcessor",
        "do_resize": True, "size": {"height": cfg.image_size, "width": cfg.image_size},
        "resample": 2 if vit else 3,  # PIL bilinear (ViT) / bicubic (SigLIP), the processors' defaults
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(tower.image_mean), "image_std": list(tower.image_std)})
    config = ({**cfg.to_hf_dict(), "architectures": ["ViTModel"]} if vit else
              {**cfg.to_hf_dict(projection_dim=cfg.hidden_size), "architectures": ["SiglipVisionModel"]})
    atomic_write_json(folder / "config.json", config)
    return folder
