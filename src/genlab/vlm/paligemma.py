"""PaliGemma 1 and 2: SigLIP vision tower -> linear projector -> Gemma / Gemma 2 decoder.

The image's patch features replace the ``<image>`` placeholder tokens of the prompt (after the
text embeddings were scaled by sqrt(hidden); image features are not scaled, as in
``transformers`` 5). Image + prompt form a bidirectional prefix, the answer is decoded causally.

Parameter names are those of ``transformers``' PaliGemmaForConditionalGeneration without its
leading ``model.`` (``vision_tower.encoder.layers.0.self_attn.q_proj.weight``,
``language_model.layers.0.mlp.gate_proj.weight``...), so LoRA target names carry over.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from genlab.nn.attention import KVCache
from genlab.nn.losses import linear_cross_entropy
from genlab.vlm.gemma import GemmaConfig, GemmaModel
from genlab.vlm.siglip import SiglipConfig, SiglipVisionTower


@dataclass
class PaliGemmaConfig:
    """One config for the whole model; round-trips with a Hugging Face ``config.json``."""

    vision: SiglipConfig = field(default_factory=SiglipConfig)
    text: GemmaConfig = field(default_factory=GemmaConfig)
    image_token_id: int = 257152
    projection_dim: int | None = None  # width of the projector output; None -> text.hidden_size
    tie_word_embeddings: bool = True

    def __post_init__(self):
        if self.projection_dim is None:
            self.projection_dim = self.text.hidden_size
        if self.projection_dim != self.text.hidden_size and _is_int(self.text.hidden_size):
            from genlab.errors import ConfigError

            raise ConfigError(f"projection_dim={self.projection_dim} must equal text_config.hidden_size="
                              f"{self.text.hidden_size}")

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches

    def validate(self) -> "PaliGemmaConfig":
        """Return self if a model can be built from this config; else raise
        ``genlab.errors.ConfigError`` naming the field (Hugging Face names: ``vision_config.*``,
        ``text_config.*``, ``image_token_index``)."""
        from genlab.errors import ConfigError

        self.vision.validate("vision_config")
        self.text.validate("text_config")
        if self.projection_dim != self.text.hidden_size:
            raise ConfigError(f"projection_dim={self.projection_dim!r} must equal text_config.hidden_size="
                              f"{self.text.hidden_size}")
        token = self.image_token_id
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise ConfigError(f"image_token_index must be a token id (an integer >= 0), got {token!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError(f"tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")
        return self

    @classmethod
    def from_hf_dict(cls, d: dict) -> "PaliGemmaConfig":
        """Build from a parsed PaliGemma ``config.json`` (call ``validate()`` on the result to check
        its values). It must hold ``text_config`` and ``vision_config`` mappings."""
        from genlab.errors import ConfigError

        if d.get("model_type", "paligemma") != "paligemma":
            raise ConfigError(f"model_type {d.get('model_type')!r} is not 'paligemma'")
        for key in ("text_config", "vision_config"):
            if not isinstance(d.get(key), dict):
                what = "missing" if d.get(key) is None else f"not a mapping (got {type(d[key]).__name__})"
                raise ConfigError(f"{key} is {what}: a PaliGemma config.json holds a text_config (Gemma) and a "
                                  f"vision_config (SigLIP) section")
        text = GemmaConfig.from_hf_dict(d["text_config"])
        return cls(vision=SiglipConfig.from_hf_dict(d["vision_config"]), text=text,
                   image_token_id=d.get("image_token_index", d.get("image_token_id", 256000)),
                   projection_dim=d.get("projection_dim", text.hidden_size),
                   tie_word_embeddings=d.get("tie_word_embeddings", True))

    def to_hf_dict(self) -> dict:
        """A ``config.json`` dict that transformers' PaliGemmaConfig reads back to the same model."""
        t = self.text
        return {
            "architectures": ["PaliGemmaForConditionalGeneration"], "model_type": "paligemma",
            "image_token_index": self.image_token_id, "projection_dim": self.projection_dim,
            "hidden_size": t.hidden_size, "vocab_size": t.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id, "pad_token_id": t.pad_token_id,
            "text_config": t.to_hf_dict(self.tie_word_embeddings, self.num_image_tokens),
            "vision_config": self.vision.to_hf_dict(self.projection_dim),
        }


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class MultiModalProjector(nn.Module):
    def __init__(self, cfg: PaliGemmaConfig):
        super().__init__()
        self.linear = nn.Linear(cfg.vision.hidden_size, cfg.projection_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class LMLoss(NamedTuple):
    loss: torch.Tensor  # mean next-token cross-entropy over the scored tokens
    token_acc: torch.Tensor  # share of scored tokens whose argmax is right (no gradient)


class PaliGemma(nn.Module):
    def __init__(self, cfg: PaliGemmaConfig):
        super().__init__()
        self.config = cfg
        self.vision_tower = SiglipVisionTower(cfg.vision)
        self.multi_modal_projector = MultiModalProjector(cfg)
        self.language_model = GemmaModel(cfg.text)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(
            cfg.text.hidden_size, cfg.text.vocab_size, bias=False)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> projected patch features (B, N, hidden)."""
        return self.multi_modal_projector(self.vision_tower(pixel_values))

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty KV cache for ``batch_size`` rows of up to ``max_len`` tokens (prompt included)."""
        return self.language_model.new_cache(batch_size, max_len)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                num_logits_to_keep: int = 0, labels: torch.Tensor | None = None) -> torch.Tensor | LMLoss:
        """Logits (B, L, vocab) for ``input_ids`` (B, L), or for its last ``num_logits_to_keep``
        positions. ``pixel_values`` is given with the prompt (first chunk) only; with ``cache``,
        ``attention_mask`` covers the new tokens only. See ``gemma`` for the mask conventions.

        With ``labels`` (B, L; -100 where nothing is scored) it returns ``LMLoss``: the next-token
        cross-entropy (position t predicts labels[t + 1], as transformers shifts them), computed only
        at the scored positions and a chunk at a time (``nn.losses.linear_cross_entropy``), so the
        (B, L, vocab) logits are never built."""
        is_image = input_ids == self.config.image_token_id
        ids = input_ids
        if self.config.image_token_id >= self.config.text.vocab_size:  # placeholder outside the table
            ids = input_ids.masked_fill(is_image, 0)
        embeds = self.language_model.embed(ids)  # (B, L, D), text scaled by sqrt(D)
        if pixel_values is not None:
            embeds = merge_image_features(embeds, is_image, self.image_features(pixel_values))
        h = self.language_model(embeds, attention_mask, token_type_ids, position_ids, cache)  # (B, L, D)
        if labels is not None:
            return self.loss(h, labels)
        return self.logits(h[:, -num_logits_to_keep:])

    def loss(self, h: torch.Tensor, labels: torch.Tensor) -> LMLoss:
        """Shifted cross-entropy of the final hidden states ``h`` (B, L, D) against ``labels`` (B, L)."""
        scored = torch.zeros_like(labels, dtype=torch.bool)
        scored[:, :-1] = labels[:, 1:] != -100  # (B, L): positions whose next token is scored
        target = labels[:, 1:][labels[:, 1:] != -100]  # (N,), the same row-major order
        weight = self.language_model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        loss, correct = linear_cross_entropy(h[scored], weight, target, self.config.text.final_logit_softcapping)
        return LMLoss(loss, correct.float() / max(target.numel(), 1))

    def decode_step(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B, 1, vocab) for one new text token per row, ``input_ids`` (B, 1), after a
        prefill into ``cache``. Static shapes (see ``GemmaModel.decode_step``), so it can be
        compiled or CUDA-graphed; the caller then calls ``cache.advance(1)``."""
        h = self.language_model.decode_step(self.language_model.embed(input_ids), cache)
        return self.logits(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """LM head (tied to the embeddings unless configured otherwise) with Gemma 2's soft cap."""
        weight = self.language_model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(h, weight)
        cap = self.config.text.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap


def merge_image_features(embeds: torch.Tensor, is_image: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Write ``features`` (B, N, D) into the N ``is_image`` slots of each row of ``embeds`` (B, L, D)."""
    counts = is_image.sum(-1)
    if features.shape[0] != embeds.shape[0] or bool((counts != features.shape[1]).any()):
        raise ValueError(f"each row needs {features.shape[1]} image tokens for its image; "
                         f"got {counts.tolist()} tokens for {features.shape[0]} images")
    return embeds.masked_scatter(is_image.unsqueeze(-1), features.to(embeds.dtype))
