"""A frozen vision encoder for the Q-Former: genlab's SigLIP tower read from, and written as, a
Hugging Face SigLIP folder.

    tower = load_vision_tower("runs/vlm-siglip-shapes/vision")      # genlab vlm pretrain-siglip's export
    tower = load_vision_tower("/models/siglip-base-patch16-224")    # a real SigLIP (text half ignored)
    save_vision_tower(tower, "out/vision")                         # SiglipVisionModel.from_pretrained reads it

Accepted folders: ``config.json`` with ``model_type`` ``siglip_vision_model`` (keys
``vision_model.*``) or ``siglip`` (a whole SigLIP: its ``vision_config`` and ``vision_model.*``
keys; ``text_model.*``, ``logit_scale`` and ``logit_bias`` belong to the text half and are skipped).
The attention-pooling head (``vision_model.head.*``) is skipped too: the Q-Former reads every patch
feature (B, N, D) after the final LayerNorm, as BLIP-2 does. Every other key must map onto the tower
and every tower parameter must be present (errors name the keys).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from genlab.errors import CheckpointMismatchError, ConfigError, FileFormatError
from genlab.io import atomic_write_json, read_json, save_safetensors
from genlab.vlm.siglip import SiglipConfig, SiglipVisionTower

PREFIX = "vision_model."
SKIPPED = ("text_model.", "vision_model.head.", "logit_scale", "logit_bias")


def read_vision_config(folder: str | Path) -> SiglipConfig:
    """The tower's config from ``folder/config.json`` (a SigLIP vision model or a whole SigLIP)."""
    folder = Path(folder)
    path = folder / "config.json"
    if not folder.is_dir():
        raise FileNotFoundError(f"vision folder {folder} does not exist: give a Hugging Face SigLIP folder "
                                f"(config.json + model.safetensors) or a `genlab vlm pretrain-siglip` run's vision/")
    if not path.is_file():
        hint = f" (did you mean {folder / 'vision'}?)" if (folder / "vision" / "config.json").is_file() else ""
        raise FileNotFoundError(f"no config.json in {folder}{hint}")
    try:
        raw = read_json(path)
    except FileFormatError as e:
        raise ConfigError(str(e)) from e
    kind = raw.get("model_type")
    if kind == "siglip":
        raw = raw.get("vision_config") or {}
    elif kind != "siglip_vision_model":
        raise ConfigError(f"{path}: model_type {kind!r} is not a SigLIP vision model (expected "
                          f"'siglip_vision_model' or 'siglip'); ViT folders are not supported yet")
    try:
        return SiglipConfig.from_hf_dict({**raw, "vision_use_head": False}).validate(where=str(path))
    except (TypeError, ValueError, NotImplementedError) as e:
        raise ConfigError(f"{path}: not a valid SigLIP vision config ({e})") from e


def load_vision_tower(folder: str | Path, dtype: torch.dtype = torch.float32) -> SiglipVisionTower:
    """The tower of ``folder`` in eval mode with its weights (strict key map, see the module doc)."""
    folder = Path(folder)
    cfg = read_vision_config(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    tower = SiglipVisionTower(cfg)
    expected = {k: tuple(v.shape) for k, v in tower.state_dict().items()}
    state, unexpected, bad_shape = {}, [], []
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    if key.startswith(SKIPPED):
                        continue
                    name = key[len(PREFIX):] if key.startswith(PREFIX) else None
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
    missing = [PREFIX + k for k in expected if k not in state]
    problems = [f"{label}: {', '.join(items)}" for label, items in (
        ("unexpected keys", unexpected), ("shape mismatches", bad_shape), ("missing keys", missing)) if items]
    if problems:
        raise CheckpointMismatchError(f"vision weights in {folder} do not match its config.json: " + "; ".join(problems))
    tower.load_state_dict(state, strict=True)
    return tower.to(dtype).eval()


def save_vision_tower(tower: SiglipVisionTower, folder: str | Path) -> Path:
    """Write ``tower`` as a SiglipVisionModel folder (weights first, config.json last, each atomic)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {PREFIX + k: v.detach().contiguous().cpu() for k, v in tower.state_dict().items()}
    save_safetensors(state, folder / "model.safetensors", metadata={"format": "pt"})
    cfg = tower.config
    atomic_write_json(folder / "config.json", {**cfg.to_hf_dict(projection_dim=cfg.hidden_size),
                                               "architectures": ["SiglipVisionModel"]})
    return folder
