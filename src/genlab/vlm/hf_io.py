"""Load and save PaliGemma checkpoints in Hugging Face folder format (config.json + safetensors).

Weight names are mapped by an explicit prefix table covering the three layouts in use:

* hub checkpoints (transformers 4.x): ``language_model.model.*``, ``language_model.lm_head.*``,
  ``vision_tower.vision_model.*``, ``multi_modal_projector.*``;
* what transformers 5 ``save_pretrained`` writes: the same but ``vision_tower.*`` directly;
* transformers 5 in-memory names: ``model.language_model.*``, ``model.vision_tower.*``,
  ``model.multi_modal_projector.*``, ``lm_head.*``.

Loading is strict: a key no rule maps, a parameter the files lack, two file keys landing on one
parameter, or a shape mismatch is an error that names the key. The only optional key is a tied
``lm_head.weight`` (its values are the embeddings'). ``save_paligemma`` writes the layout
transformers 5 itself writes, so ``PaliGemmaForConditionalGeneration.from_pretrained`` reads it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from genlab.vlm.paligemma import PaliGemma, PaliGemmaConfig

# (prefix in the file, prefix in genlab); the first matching rule wins, so longer prefixes first.
_LOAD_RULES = [
    ("model.language_model.", "language_model."),
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("vision_tower.", "vision_tower."),
    ("multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "lm_head."),
]
# genlab prefix -> prefix written to disk (transformers 5 save_pretrained layout)
_SAVE_RULES = [
    ("language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("vision_tower.", "vision_tower."),
    ("multi_modal_projector.", "multi_modal_projector."),
]
_TIED_HEAD = "lm_head.weight"


class CheckpointMismatchError(KeyError):
    """The weight files and the model built from config.json disagree (message names each key)."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


def hf_to_genlab_key(key: str) -> str | None:
    """The genlab parameter name for a checkpoint key, or None if no rule covers it."""
    for src, dst in _LOAD_RULES:
        if key.startswith(src):
            return dst + key[len(src):]
    return None


def genlab_to_hf_key(name: str) -> str:
    for src, dst in _SAVE_RULES:
        if name.startswith(src):
            return dst + name[len(src):]
    raise KeyError(f"no save rule for parameter {name!r}")


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{index} lists shard {f.name}, which is missing from {folder}")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(
        f"no weights in {folder}: expected model.safetensors or model.safetensors.index.json with its "
        f"shards (a Hugging Face PaliGemma folder, e.g. google/paligemma-3b-pt-224 downloaded with its "
        f"*.safetensors files)")


def read_config(folder: str | Path) -> PaliGemmaConfig:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {Path(folder)}: put the Hugging Face PaliGemma "
                                f"config.json next to the *.safetensors weights there")
    return PaliGemmaConfig.from_hf_dict(json.loads(path.read_text()))


def load_paligemma(folder: str | Path, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu") -> tuple[PaliGemma, PaliGemmaConfig]:
    """Build a PaliGemma from a Hugging Face folder (config.json + safetensors, sharded or not).

    Returns ``(model, config)`` with the model in eval mode, in ``dtype`` on ``device``.
    Raises FileNotFoundError for a missing folder/config/weights, and CheckpointMismatchError (a
    KeyError) naming every unmapped, unexpected, duplicated, missing or wrongly shaped key.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist: download a Hugging Face PaliGemma "
                                f"checkpoint (config.json + *.safetensors) there")
    cfg = read_config(folder)
    with torch.device("meta"):
        model = PaliGemma(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tensors: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    unmapped, unexpected, duplicated, bad_shape, seen = [], [], [], [], set()
    for path in _weight_files(folder):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                name = hf_to_genlab_key(key)
                if name is None:
                    unmapped.append(key)
                    continue
                if name == _TIED_HEAD and cfg.tie_word_embeddings:
                    name = "language_model.embed_tokens.weight"  # tied: only its shape is checked
                    shape = tuple(f.get_slice(key).get_shape())
                    if shape != expected[name]:
                        bad_shape.append(f"{key}: file {shape} vs model {expected[name]}")
                    continue
                if name not in expected:
                    unexpected.append(key)
                    continue
                if name in seen:
                    duplicated.append(f"{key} and {source[name]} -> {name}")
                    continue
                seen.add(name)
                source[name] = key
                shape = tuple(f.get_slice(key).get_shape())
                if shape != expected[name]:
                    bad_shape.append(f"{key}: file {shape} vs model {expected[name]}")
                    continue
                # copy=True: own the memory rather than keep views into the memory-mapped file, whose
                # pages the kernel may evict and re-read (one CPU decode run here was 8x slower so).
                tensors[name] = f.get_tensor(key).to(device=device, dtype=dtype, copy=True)
    missing = [f"{genlab_to_hf_key(name)} (genlab {name})" for name in expected if name not in seen]
    problems = [f"{label}: " + ", ".join(items) for label, items in (
        ("keys no rule maps", unmapped), ("unexpected keys", unexpected),
        ("keys mapping to the same parameter", duplicated), ("shape mismatches", bad_shape),
        ("missing parameters", missing)) if items]
    if problems:
        raise CheckpointMismatchError(f"checkpoint in {folder} does not match its config.json: " + "; ".join(problems))
    model.load_state_dict(tensors, strict=True, assign=True)  # replaces the meta tensors
    return model.eval(), cfg


def save_paligemma(model: PaliGemma, config: PaliGemmaConfig, folder: str | Path,
                   max_shard_bytes: int | None = None) -> None:
    """Write ``config.json`` and the weights (transformers 5 layout) to ``folder``.

    With ``max_shard_bytes`` the weights are split into ``model-0000i-of-0000n.safetensors`` plus
    ``model.safetensors.index.json``, as transformers does for large checkpoints.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {genlab_to_hf_key(k): v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    # Each file is written under a temporary name and renamed into place, and weights of an earlier save
    # (a stale index or shards) are removed, so a crash never leaves a folder that loads half-written or old
    # weights.
    for old in [*folder.glob("model*.safetensors"), folder / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)

    def put(name: str, write) -> None:
        tmp = folder / f".{name}.tmp"
        write(tmp)
        os.replace(tmp, folder / name)

    if len(shards) == 1:
        put("model.safetensors", lambda p: save_file(shards[0], str(p), metadata={"format": "pt"}))
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            put(name, lambda p, shard=shard: save_file(shard, str(p), metadata={"format": "pt"}))
            weight_map.update({key: name for key in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        put("model.safetensors.index.json", lambda p: p.write_text(json.dumps(index, indent=2) + "\n"))
    # config.json last: a folder with a config always has complete weights beside it.
    put("config.json", lambda p: p.write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n"))
