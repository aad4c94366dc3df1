"""Turn (image, prompt[, suffix]) into the tensors a PaliGemma model reads.

One example is laid out as PaliGemma was trained (Beyer et al., 2024):

    <image> x N   <bos>   prompt "\\n"   |   suffix <eos>   <pad>...
    '--------------- prefix --------------'  '-- suffix --'
    token_type 0, labels -100                token_type 1, labels = ids

The prefix (image tokens + prompt) is attended bidirectionally by the model, the
suffix causally; the loss is taken on the suffix only. A batch is padded on the
LEFT so that every sequence ends at the last column, which is where generation
appends new tokens.

Images go through SigLIP's preprocessing: RGB (transparency composited on white, see `to_rgb`),
PIL bicubic resize to (S, S), x/255, then (x - 0.5) / 0.5 per channel, channels first.

The tokenizer is read from a checkpoint folder: tokenizer.json with the `tokenizers`
library, or tokenizer.model with sentencepiece. Ids match
`transformers.PaliGemmaProcessor` on the same folder (see tests/vlm/test_processor.py).
A damaged file of the folder (truncated tokenizer.json, garbage tokenizer.model, bad JSON,
fields of the wrong type) is a `genlab.errors.FileFormatError` naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from genlab.errors import ConfigError, FileFormatError
from genlab.io import read_json

IMAGE_TOKEN = "<image>"
EXPECTED_FILES = "tokenizer.json (or tokenizer.model), plus optionally tokenizer_config.json, " \
    "special_tokens_map.json, preprocessor_config.json and config.json"


# ----------------------------------------------------------------------------- images

_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")  # PIL modes with an alpha band ("LAB"'s A is a colour)


def to_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """A PIL image or a uint8 array (H, W) / (H, W, C) as a uint8 RGB array (H, W, 3).

    Transparency (an alpha band, or a palette / single-colour ``transparency``) is composited over
    white, as transformers' ``convert_to_rgb`` does; every other mode (L, 1, P, CMYK, YCbCr, I, F,
    ...) goes through PIL's ``convert("RGB")``, also as transformers does. Two deliberate
    differences: 16-bit greyscale (``I;16*``, e.g. a 16-bit PNG) is scaled to 8 bits (value / 257)
    rather than clipped at 255 (which turns nearly every pixel white), and LAB is converted as a
    colour space (transformers mistakes its A channel for alpha).
    """
    if isinstance(image, Image.Image):
        if image.mode.startswith("I;16"):
            grey = np.asarray(image).astype(np.float64) / 257  # (H, W), 0..65535 -> 0..255
            image = Image.fromarray(np.round(grey).astype(np.uint8), mode="L")
        try:
            if image.mode in _ALPHA_MODES or image.info.get("transparency") is not None:
                white = Image.new("RGBA", image.size, (255, 255, 255, 255))
                image = Image.alpha_composite(white, image.convert("RGBA"))
            return np.asarray(image.convert("RGB"))
        except ValueError as e:  # a mode PIL cannot convert (e.g. "La")
            raise ValueError(f"cannot convert a mode-{image.mode} image to RGB ({e})") from e
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"numpy images must be uint8 (H, W[, C]) in [0, 255], got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"numpy images must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got {arr.shape}")
    if arr.shape[-1] == 1:
        return np.repeat(arr, 3, axis=-1)
    if arr.shape[-1] == 4:  # blend onto white with the alpha channel, as transformers does
        alpha = arr[..., 3:] / 255
        return np.round(alpha * arr[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return arr


@dataclass
class SiglipImageTransform:
    """Images -> normalised float32 tensor (B, 3, S, S), identical to SigLIP's HF preprocessing."""

    image_size: int
    mean: Sequence[float] = (0.5, 0.5, 0.5)
    std: Sequence[float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    resample: int = Image.Resampling.BICUBIC

    def to_rgb(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """A PIL image or a uint8 array (H, W) / (H, W, C) as a uint8 RGB array (H, W, 3); see `to_rgb`."""
        return to_rgb(image)

    def __call__(self, images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
        size = (self.image_size, self.image_size)
        batch = []
        for image in images:
            rgb = Image.fromarray(self.to_rgb(image)).resize(size, resample=self.resample)
            # Same rounding path as transformers: uint8 -> float64 * scale -> float32, then normalise in float32.
            x = (np.asarray(rgb).astype(np.float64) * self.rescale_factor).astype(np.float32)  # (S, S, 3)
            x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
            batch.append(x.transpose(2, 0, 1))  # (3, S, S)
        return torch.from_numpy(np.stack(batch))  # (B, 3, S, S)


# ----------------------------------------------------------------------------- tokenizers

class _HFTokenizersBackend:
    """tokenizer.json through the `tokenizers` library; added tokens (<image>, <bos>...) stay atomic."""

    def __init__(self, path: Path):
        from genlab.data.tokenizers import load_tokenizer_file

        self.tok = load_tokenizer_file(path)  # a damaged file is a FileFormatError naming it

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)


class _SentencePieceBackend:
    """tokenizer.model through sentencepiece (fallback when a folder has no tokenizer.json)."""

    def __init__(self, path: Path):
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:  # "could not parse ModelProto", "unk is not defined", ...
            raise FileFormatError(f"{path}: not a readable sentencepiece tokenizer.model ({_first_line(e)}); "
                                  f"it may be truncated or damaged") from e

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)  # unknown pieces map to <unk>: check the round trip
        return i if self.sp.id_to_piece(i) == token else None

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        # sentencepiece drops control tokens (<bos>, <eos>, <pad>) silently; spell them out when asked to keep them.
        special = {i for i in ids
                   if self.sp.is_control(i) or self.sp.is_unknown(i) or self.sp.id_to_piece(i) == IMAGE_TOKEN}
        if skip_special_tokens:
            return self.sp.decode([i for i in ids if i not in special])
        out, run = [], []
        for i in ids:
            if i in special:
                out += [self.sp.decode(run), self.sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        return "".join(out + [self.sp.decode(run)])

    def __len__(self) -> int:
        return self.sp.get_piece_size()


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _read_json(path: Path) -> dict[str, Any]:
    """The mapping in ``path`` ({} when there is no such file); a FileFormatError naming the file
    when it is not JSON or not a mapping."""
    if not path.is_file():
        return {}
    return read_json(path)


def _token_str(value: Any, path: Path, key: str) -> str | None:
    """Special tokens are stored either as "<bos>" or as {"content": "<bos>", ...}."""
    token = value.get("content") if isinstance(value, dict) else value
    if token is not None and not isinstance(token, str):
        raise FileFormatError(f"{path}: {key} must be a token string or {{\"content\": ...}}, got {value!r}")
    return token


def _field(where: Path | str, d: dict, key: str, kind: str, default: Any = None) -> Any:
    """``d[key]`` checked against ``kind`` ("int>=1", "number>0", "int", "size", "triple"), else a
    FileFormatError naming ``where`` (the file) and ``key``; ``default`` when the key is absent or null."""
    value = d.get(key)
    if value is None:
        return default

    def num(v, integer=False):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        return ok and (not integer or isinstance(v, int))

    ok = {
        "int>=1": lambda v: num(v, True) and v >= 1,
        "int": lambda v: num(v, True),
        "number>0": lambda v: num(v) and v > 0,
        "triple": lambda v: isinstance(v, (list, tuple)) and len(v) == 3 and all(num(x) for x in v),
        "size": lambda v: isinstance(v, dict) and all(num(v.get(k), True) and v[k] >= 1 for k in ("height", "width")),
    }[kind](value)
    if not ok:
        want = {"int>=1": "an integer >= 1", "int": "an integer", "number>0": "a number > 0",
                "triple": "a list of 3 numbers", "size": 'a mapping {"height": H, "width": W} of integers >= 1'}
        raise FileFormatError(f"{where}: {key} must be {want[kind]}, got {value!r}")
    return value


def load_tokenizer(folder: Path) -> _HFTokenizersBackend | _SentencePieceBackend:
    """tokenizer.json if present, else tokenizer.model; a clear error when the folder or both files are missing."""
    if not folder.is_dir():
        raise FileNotFoundError(f"PaliGemma folder {folder} does not exist; expected it to hold {EXPECTED_FILES}")
    if (folder / "tokenizer.json").is_file():
        return _HFTokenizersBackend(folder / "tokenizer.json")
    if (folder / "tokenizer.model").is_file():
        return _SentencePieceBackend(folder / "tokenizer.model")
    raise FileNotFoundError(f"no tokenizer in {folder}: expected {folder / 'tokenizer.json'} "
                            f"or {folder / 'tokenizer.model'} (a Hugging Face PaliGemma checkpoint has both)")


def special_tokens(folder: Path, tokenizer) -> dict[str, tuple[str, int]]:
    """{"bos" | "eos" | "pad" | "image": (token, id)}, names from tokenizer_config.json or
    special_tokens_map.json when they say so, Gemma's names otherwise."""
    cfg_path, map_path = folder / "tokenizer_config.json", folder / "special_tokens_map.json"
    tok_cfg = _read_json(cfg_path)
    tok_map = _read_json(map_path)
    extra = tok_cfg.get("extra_special_tokens")
    extra = extra if isinstance(extra, dict) else {}  # older files keep a plain list here
    # key -> (token, where its name came from)
    names = {"image": (_token_str(extra.get("image_token"), cfg_path, "extra_special_tokens.image_token"), cfg_path)}
    for key in ("bos", "eos", "pad"):
        names[key] = (_token_str(tok_cfg.get(f"{key}_token"), cfg_path, f"{key}_token"), cfg_path)
        if names[key][0] is None:
            names[key] = (_token_str(tok_map.get(f"{key}_token"), map_path, f"{key}_token"), map_path)
    out = {}
    for key, (token, source) in names.items():
        if token is None:  # Gemma's names when no file gives one
            token, source = (IMAGE_TOKEN if key == "image" else f"<{key}>"), None
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            if source is not None:
                raise FileFormatError(f"{source} names the {key} token {token!r}, which the tokenizer in {folder} "
                                      f"does not have")
            raise FileFormatError(f"the tokenizer in {folder} has no {key} token {token!r} (Gemma's name; "
                                  f"tokenizer_config.json or special_tokens_map.json can name another)")
        out[key] = (token, token_id)
    return out


def image_settings(
    folder: Path, image_size: int | None, num_image_tokens: int | None
) -> tuple[SiglipImageTransform, int]:
    """The image transform and the number of image tokens. Sizes come from the arguments, else
    preprocessor_config.json (size, image_seq_length), else config.json (vision_config)."""
    pre_path, cfg_path = folder / "preprocessor_config.json", folder / "config.json"
    pre = _read_json(pre_path)
    vision = _read_json(cfg_path).get("vision_config") or {}
    if not isinstance(vision, dict):
        raise FileFormatError(f"{cfg_path}: vision_config must be a mapping, got {vision!r}")
    vision_path = f"{cfg_path}: vision_config"  # names the section in messages
    if image_size is None:
        size = _field(pre_path, pre, "size", "size", {})
        if size and size["height"] != size["width"]:
            raise FileFormatError(f"{pre_path}: only square images are supported, got size {size}")
        image_size = size.get("height") or _field(vision_path, vision, "image_size", "int>=1")
    if num_image_tokens is None:
        num_image_tokens = _field(pre_path, pre, "image_seq_length", "int>=1")
        patch = _field(vision_path, vision, "patch_size", "int>=1")
        if num_image_tokens is None and image_size and patch:
            num_image_tokens = (image_size // patch) ** 2  # one token per SigLIP patch
    if image_size is None or num_image_tokens is None:
        raise FileFormatError(f"cannot tell the image size / number of image tokens for {folder}: pass image_size= "
                              "and num_image_tokens=, or add preprocessor_config.json (size, image_seq_length) or "
                              "config.json")
    resample = _field(pre_path, pre, "resample", "int", Image.Resampling.BICUBIC)
    if resample not in {int(m) for m in Image.Resampling}:
        raise FileFormatError(f"{pre_path}: resample={resample} is not a PIL resampling filter "
                              f"(3 = bicubic, as SigLIP uses)")
    std = _field(pre_path, pre, "image_std", "triple", (0.5, 0.5, 0.5))
    if any(x <= 0 for x in std):
        raise FileFormatError(f"{pre_path}: image_std must be > 0 per channel, got {std}")
    transform = SiglipImageTransform(
        image_size=int(image_size),
        mean=tuple(_field(pre_path, pre, "image_mean", "triple", (0.5, 0.5, 0.5))),
        std=tuple(std),
        rescale_factor=float(_field(pre_path, pre, "rescale_factor", "number>0", 1 / 255)),
        resample=int(resample),
    )
    return transform, int(num_image_tokens)


# ----------------------------------------------------------------------------- processor

@dataclass
class PaliGemmaProcessor:
    """Images + prompts (+ suffixes for training) -> input_ids, attention_mask, token_type_ids,
    pixel_values[, labels], as torch tensors."""

    tokenizer: _HFTokenizersBackend | _SentencePieceBackend
    image_transform: SiglipImageTransform
    num_image_tokens: int
    special_ids: dict[str, int] = field(default_factory=dict)  # keys: bos, eos, pad, image
    image_token: str = IMAGE_TOKEN

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, image_size: int | None = None, num_image_tokens: int | None = None
    ) -> "PaliGemmaProcessor":
        """Load from a checkpoint folder (see `image_settings` for where the sizes come from).
        A config.json whose image_token_index disagrees with the tokenizer is an error."""
        folder = Path(folder)
        tokenizer = load_tokenizer(folder)
        specials = special_tokens(folder, tokenizer)
        transform, num_image_tokens = image_settings(folder, image_size, num_image_tokens)
        image_token, image_id = specials["image"]
        expected = _read_json(folder / "config.json").get("image_token_index")
        if expected is not None and expected != image_id:
            raise FileFormatError(f"{folder / 'config.json'} says image_token_index={expected} but the tokenizer "
                             f"maps {image_token!r} to {image_id}")
        ids = {key: token_id for key, (_, token_id) in specials.items()}
        return cls(tokenizer, transform, num_image_tokens, ids, image_token)

    # ids ---------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        return self.special_ids["image"]

    @property
    def bos_token_id(self) -> int:
        return self.special_ids["bos"]

    @property
    def eos_token_id(self) -> int:
        return self.special_ids["eos"]

    @property
    def pad_token_id(self) -> int:
        return self.special_ids["pad"]

    @property
    def image_size(self) -> int:
        return self.image_transform.image_size

    def __len__(self) -> int:
        """Number of ids the tokenizer can produce (base vocabulary + added tokens)."""
        return len(self.tokenizer)

    # encoding ----------------------------------------------------------------
    def prefix_ids(self, prompt: str) -> list[int]:
        """<image> x N, <bos>, then the prompt and its closing newline tokenized together, as transformers
        does. (Gemma's "\n" is an atomic piece, so this equals tokenizing it separately, as big_vision does.)"""
        if self.image_token in prompt:
            raise ConfigError(f"prompts must not contain {self.image_token!r}: the processor places image "
                              f"tokens itself")
        image = [self.image_token_id] * self.num_image_tokens
        return image + [self.bos_token_id] + self.tokenizer.encode(prompt + "\n")

    def suffix_ids(self, suffix: str) -> list[int]:
        """The target text, tokenized on its own (not merged with the prefix), closed by <eos>."""
        return self.tokenizer.encode(suffix) + [self.eos_token_id]

    def __call__(
        self,
        images: Image.Image | np.ndarray | Sequence[Image.Image | np.ndarray],
        prompts: str | Sequence[str],
        suffixes: str | Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """One image per prompt. Returns left-padded (B, L) long tensors input_ids, attention_mask,
        token_type_ids (1 on suffix tokens), labels (only with suffixes; -100 off the suffix), and
        pixel_values (B, 3, S, S) float32."""
        if isinstance(images, Image.Image) or (isinstance(images, np.ndarray) and images.ndim < 4):
            images = [images]  # a single image; a (B, H, W, C) array or a list is a batch
        images = list(images)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ConfigError("empty batch: pass at least one image and one prompt")
        if len(images) != len(prompts):
            raise ConfigError(f"got {len(images)} images for {len(prompts)} prompts; PaliGemma takes one per prompt")
        if suffixes is not None:
            suffixes = [suffixes] if isinstance(suffixes, str) else list(suffixes)
            if len(suffixes) != len(prompts):
                raise ConfigError(f"got {len(suffixes)} suffixes for {len(prompts)} prompts")

        rows = []  # (ids, token_type) per example
        for i, prompt in enumerate(prompts):
            prefix = self.prefix_ids(prompt)
            suffix = self.suffix_ids(suffixes[i]) if suffixes is not None else []
            rows.append((prefix + suffix, [0] * len(prefix) + [1] * len(suffix)))

        length = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)  # (B, L)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)  # (B, L)
        token_type_ids = torch.zeros((len(rows), length), dtype=torch.long)  # (B, L)
        for b, (ids, types) in enumerate(rows):
            start = length - len(ids)  # left padding: real tokens end at the last column
            input_ids[b, start:] = torch.tensor(ids)
            attention_mask[b, start:] = 1
            token_type_ids[b, start:] = torch.tensor(types)

        out = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
            "pixel_values": self.image_transform(images),
        }
        if suffixes is not None:
            out["labels"] = input_ids.masked_fill(token_type_ids == 0, -100)  # loss on suffix + <eos> only
        return out

    # decoding ----------------------------------------------------------------
    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Ids -> text. Negative ids (the -100 of labels) are dropped."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self.tokenizer.decode([int(i) for i in ids if i >= 0], skip_special_tokens=skip_special_tokens)

    def batch_decode(
        self, batch: Sequence[Sequence[int]] | torch.Tensor, skip_special_tokens: bool = True
    ) -> list[str]:
        """Decode each row of a (B, L) tensor or a list of id lists."""
        return [self.decode(row, skip_special_tokens) for row in batch]
