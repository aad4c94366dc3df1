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

Damaged input is a ``genlab.errors.GenlabError`` that names the file: a config.json that is not
JSON or not a valid PaliGemma config (``ConfigError``), a truncated, empty or foreign safetensors
file or a broken index (``FileFormatError``), weights that disagree with config.json
(``CheckpointMismatchError``). Missing folders and files stay ``FileNotFoundError``s that say
what to put where.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from genlab.errors import CheckpointMismatchError, ConfigError, FileFormatError  # noqa: F401  (re-exported)
from genlab.io import atomic_write_json, read_json, save_safetensors
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
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            what = "no" if weight_map is None else f"an empty or non-mapping ({type(weight_map).__name__})"
            raise FileFormatError(f"{index}: {what} \"weight_map\" (it should map each tensor name to its "
                                  f"shard file, as transformers writes it)")
        names = set(weight_map.values())
        for name in names:
            if not isinstance(name, str) or not name or Path(name).name != name:
                raise FileFormatError(f"{index}: weight_map names shard {name!r}; expected a file name "
                                      f"in the same folder, such as model-00001-of-00002.safetensors")
        files = [folder / name for name in sorted(names)]
        for f in files:
            if not f.is_file():
                raise FileFormatError(f"{index} lists shard {f.name}, which is missing from {folder}")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(
        f"no weights in {folder}: expected model.safetensors or model.safetensors.index.json with its "
        f"shards (a Hugging Face PaliGemma folder, e.g. google/paligemma-3b-pt-224 downloaded with its "
        f"*.safetensors files)")


def check_model_folder(folder: str | Path) -> Path:
    """``folder`` as a Path, if it is a folder holding a config.json; otherwise an error saying what
    is wrong (missing, a file, a genlab run folder whose model is in ``hf/``)."""
    folder = Path(folder)
    if folder.is_file():
        raise ConfigError(f"model folder {folder} is a file, not a folder: give the folder that holds "
                          f"config.json, the *.safetensors weights and the tokenizer files")
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist: download a Hugging Face PaliGemma "
                                f"checkpoint (config.json + *.safetensors) there")
    if not (folder / "config.json").is_file():
        if (folder / "hf" / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in {folder}: it looks like a genlab run folder; its model "
                                    f"is in {folder / 'hf'} (did you mean {folder / 'hf'}?)")
        raise FileNotFoundError(f"no config.json in {folder}: put the Hugging Face PaliGemma "
                                f"config.json next to the *.safetensors weights there")
    return folder


def read_config(folder: str | Path) -> PaliGemmaConfig:
    """The PaliGemmaConfig of ``folder/config.json``, validated (``PaliGemmaConfig.validate``).
    Bad JSON, wrong field types or impossible sizes are a ConfigError naming the file."""
    path = check_model_folder(folder) / "config.json"
    try:
        raw = read_json(path)
    except FileFormatError as e:
        raise ConfigError(str(e)) from e
    try:
        return PaliGemmaConfig.from_hf_dict(raw).validate()
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
    except NotImplementedError as e:
        raise ConfigError(f"{path}: not supported by genlab: {e}") from e
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # a field of the wrong kind
        raise ConfigError(f"{path}: not a valid PaliGemma config ({type(e).__name__}: {e})") from e


def load_paligemma(folder: str | Path, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu") -> tuple[PaliGemma, PaliGemmaConfig]:
    """Build a PaliGemma from a Hugging Face folder (config.json + safetensors, sharded or not).

    Returns ``(model, config)`` with the model in eval mode, in ``dtype`` on ``device``.
    Raises FileNotFoundError for a missing folder/config/weights; ConfigError for a config.json
    that is not valid; FileFormatError naming a truncated, empty or foreign weight file or a broken
    index; and CheckpointMismatchError (a GenlabError) naming every unmapped, unexpected,
    duplicated, missing or wrongly shaped key.
    """
    folder = check_model_folder(folder)
    cfg = read_config(folder)
    try:
        with torch.device("meta"):
            model = PaliGemma(cfg)
    except (NotImplementedError, ValueError) as e:  # e.g. an activation genlab does not implement
        raise ConfigError(f"{folder / 'config.json'}: cannot build this model ({e})") from e
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tensors: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    unmapped, unexpected, duplicated, bad_shape, seen = [], [], [], [], set()
    to_read: list[tuple[Path, str, str]] = []  # (file, key in the file, genlab name), read once all keys check out
    for path in _weight_files(folder):
        try:
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
                    to_read.append((path, key, name))
        except (SafetensorError, OSError) as e:  # truncated, empty, foreign or unreadable file
            raise FileFormatError(f"{path}: not a readable safetensors file ({_first_line(e)}); it may be "
                                  f"truncated or damaged") from e
    missing = [f"{genlab_to_hf_key(name)} (genlab {name})" for name in expected if name not in seen]
    problems = [f"{label}: " + ", ".join(items) for label, items in (
        ("keys no rule maps", unmapped), ("unexpected keys", unexpected),
        ("keys mapping to the same parameter", duplicated), ("shape mismatches", bad_shape),
        ("missing parameters", missing)) if items]
    if problems:
        raise CheckpointMismatchError(f"checkpoint in {folder} does not match its config.json: " + "; ".join(problems))
    for path, key, name in to_read:
        # One tensor per opening of the file, copied (copy=True) into memory genlab owns: the pages of
        # the memory-mapped file that a read touches count in this process's memory until the mapping
        # closes, so reading every tensor under one mapping would peak at twice the model's size (the
        # trap that doubles QLoRA's CPU peak in the HF stack); views into the mapping would also let
        # the kernel evict and re-read those pages (one CPU decode run was 8x slower so).
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                tensors[name] = f.get_tensor(key).to(device=device, dtype=dtype, copy=True)
        except (SafetensorError, OSError) as e:
            raise FileFormatError(f"{path}: not a readable safetensors file ({_first_line(e)}); it may be "
                                  f"truncated or damaged") from e
    model.load_state_dict(tensors, strict=True, assign=True)  # replaces the meta tensors
    return model.eval(), cfg


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


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
    # Each file is written under a temporary name and renamed into place (genlab.io: with the user's
    # umask, so a shared folder's weights are as readable as its other files), and weights of an earlier
    # save (a stale index or shards) are removed, so a crash never leaves a folder that loads
    # half-written or old weights.
    for old in [*folder.glob("model*.safetensors"), folder / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)
    if len(shards) == 1:
        save_safetensors(shards[0], folder / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_safetensors(shard, folder / name, metadata={"format": "pt"})
            weight_map.update({key: name for key in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        atomic_write_json(folder / "model.safetensors.index.json",
                          {"metadata": {"total_size": total}, "weight_map": weight_map})
    # config.json last: a folder with a config always has complete weights beside it.
    atomic_write_json(folder / "config.json", config.to_hf_dict())
