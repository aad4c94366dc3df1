"""The BLIP-2 Q-Former (Li et al. 2023, "BLIP-2: Bootstrapping Language-Image Pre-training with Frozen
Image Encoders and Large Language Models"), written from scratch.

A BERT-sized transformer runs over two kinds of positions at once: ``Q`` learned *query tokens* and,
optionally, the tokens of a caption. Every layer has one self-attention shared by both kinds; in every
``cross_attention_frequency``-th layer the query positions (only) also cross-attend to the features of
a frozen vision tower; and each kind has its own feed-forward (``intermediate_query`` / ``output_query``
for queries, ``intermediate`` / ``output`` for text). Which positions may see which is the only thing
that differs between the three uses (the attention masks):

* image side (``query_features``): queries alone, cross-attending to the image; no text at all, so
  an image embedding can never depend on a caption;
* text side (``text_features``): the caption alone, bidirectional (BERT), no cross-attention;
* matching (``itm_logits``): queries and caption together, each attending to the other.

Post-LayerNorm BERT layers, as in transformers. Module and parameter names are those of transformers'
``Blip2ForImageTextRetrieval`` (``query_tokens``, ``embeddings.*``, ``qformer.layernorm``,
``qformer.encoder.layer.{i}.attention.attention.query`` ..., ``vision_projection``,
``text_projection``, ``itm_head``), so its checkpoints load by name (``genlab.vlm.qformer_io``). As
there, the embedding LayerNorm is ``qformer.layernorm`` and normalises the query tokens too (they
enter the stack through it), while ``embeddings`` holds only the word and position tables. The one
genlab-only parameter is ``temp``, BLIP-2's learnable contrastive temperature (LAVIS keeps it;
transformers drops it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genlab.errors import ConfigError
from genlab.nn.attention import attend
from genlab.nn.blocks import ACTIVATIONS, Activation
# The checkpoint maps (qformer_io, kept apart for length) are re-exported here.
from genlab.vlm.qformer_io import init_from_bert, load_blip2_retrieval, qformer_state_for_hf  # noqa: F401

__all__ = ["QFormerConfig", "QFormer", "init_from_bert", "load_blip2_retrieval", "qformer_state_for_hf"]


@dataclass
class QFormerConfig:
    """Sizes of a Q-Former. Field names are those of transformers' ``Blip2QFormerConfig`` (and of
    ``Blip2Config`` for ``num_query_tokens`` / ``image_text_hidden_size``)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408
    num_query_tokens: int = 32
    image_text_hidden_size: int = 256
    pad_token_id: int = 0
    position_embedding_type: str = "absolute"  # the only kind genlab implements
    hidden_dropout_prob: float = 0.0  # kept for config round trips; genlab applies no dropout
    attention_probs_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    temp: float = 0.07  # initial contrastive temperature (BLIP-2)

    def validate(self) -> "QFormerConfig":
        """``self`` if every field is usable; otherwise a ConfigError naming the field."""
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                    "max_position_embeddings", "cross_attention_frequency", "encoder_hidden_size",
                    "num_query_tokens", "image_text_hidden_size")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"QFormerConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"QFormerConfig.hidden_size ({self.hidden_size}) must be a multiple of "
                              f"num_attention_heads ({self.num_attention_heads})")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"QFormerConfig.hidden_act {self.hidden_act!r} is not one of "
                              f"{', '.join(sorted(ACTIVATIONS))}")
        if self.position_embedding_type != "absolute":
            raise ConfigError(f"QFormerConfig.position_embedding_type {self.position_embedding_type!r}: "
                              f"genlab implements only 'absolute'")
        if not (isinstance(self.pad_token_id, int) and 0 <= self.pad_token_id < self.vocab_size):
            raise ConfigError(f"QFormerConfig.pad_token_id must be in [0, vocab_size), got {self.pad_token_id!r}")
        for name in ("layer_norm_eps", "temp"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"QFormerConfig.{name} must be a positive number, got {value!r}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if getattr(self, name) != 0:
                raise ConfigError(f"QFormerConfig.{name} must be 0: genlab's Q-Former has no dropout")
        return self

    @classmethod
    def from_bert_config(cls, bert: dict[str, Any], encoder_hidden_size: int, **overrides: Any) -> "QFormerConfig":
        """A Q-Former with the text sizes of a BERT-family ``config.json`` (``bert``), cross-attending
        to vision features of width ``encoder_hidden_size``; ``overrides`` set any other field.
        Dropout fields of the BERT config are not copied (genlab applies none)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(f"QFormerConfig has no field {', '.join(unknown)}")
        copied = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "hidden_act", "max_position_embeddings", "layer_norm_eps", "pad_token_id",
                  "position_embedding_type", "initializer_range")
        values = {k: bert[k] for k in copied if bert.get(k) is not None}
        values.update(encoder_hidden_size=encoder_hidden_size, **overrides)
        return cls(**values).validate()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- layers (HF names)
class QFormerMultiHeadAttention(nn.Module):
    """``query`` / ``key`` / ``value`` projections and scaled dot-product attention (no output
    projection: that is ``QFormerSelfOutput.dense``). Keys and values come from ``kv`` (the vision
    features for cross-attention, width ``encoder_hidden_size``) or from ``x`` itself."""

    def __init__(self, cfg: QFormerConfig, kv_size: int):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_size, cfg.hidden_size)
        self.value = nn.Linear(kv_size, cfg.hidden_size)

    def forward(self, x: Tensor, kv: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        kv = x if kv is None else kv
        B, L, D = x.shape
        S = kv.shape[1]
        q = self.query(x).view(B, L, self.heads, -1).transpose(1, 2)  # (B, H, L, Dh)
        k = self.key(kv).view(B, S, self.heads, -1).transpose(1, 2)  # (B, H, S, Dh)
        v = self.value(kv).view(B, S, self.heads, -1).transpose(1, 2)  # (B, H, S, Dh)
        return attend(q, k, v, mask).transpose(1, 2).reshape(B, L, D)  # (B, L, D)


class QFormerSelfOutput(nn.Module):
    """``LayerNorm(dense(h) + residual)``: BERT's post-LN residual step (used after attention)."""

    def __init__(self, cfg: QFormerConfig, in_size: int | None = None):
        super().__init__()
        self.dense = nn.Linear(in_size or cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, h: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class QFormerAttention(nn.Module):
    """Attention followed by its post-LN residual: ``attention`` (q/k/v) then ``output``."""

    def __init__(self, cfg: QFormerConfig, cross: bool = False):
        super().__init__()
        self.attention = QFormerMultiHeadAttention(cfg, cfg.encoder_hidden_size if cross else cfg.hidden_size)
        self.output = QFormerSelfOutput(cfg)

    def forward(self, x: Tensor, kv: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        return self.output(self.attention(x, kv, mask), x)  # (B, L, D)


class QFormerIntermediate(nn.Module):
    """``act(dense(x))``: the up-projection of a feed-forward."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.intermediate_act_fn = Activation(cfg.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.intermediate_act_fn(self.dense(x))  # (B, L, I)


class QFormerLayer(nn.Module):
    """One Q-Former layer over ``x`` (B, Q + L, D) whose first ``n_query`` positions are queries.

    Self-attention runs over all positions under ``mask``; then the query positions alone
    cross-attend to ``vision`` (if this layer has cross-attention and ``n_query > 0``) and go through
    the query feed-forward, the text positions through the text feed-forward.
    """

    def __init__(self, cfg: QFormerConfig, layer_idx: int):
        super().__init__()
        self.attention = QFormerAttention(cfg)
        self.has_cross_attention = layer_idx % cfg.cross_attention_frequency == 0
        if self.has_cross_attention:
            self.crossattention = QFormerAttention(cfg, cross=True)
        self.intermediate = QFormerIntermediate(cfg)
        self.output = QFormerSelfOutput(cfg, cfg.intermediate_size)
        self.intermediate_query = QFormerIntermediate(cfg)
        self.output_query = QFormerSelfOutput(cfg, cfg.intermediate_size)

    def forward(self, x: Tensor, n_query: int, mask: Tensor | None = None, vision: Tensor | None = None,
                vision_mask: Tensor | None = None) -> Tensor:
        h = self.attention(x, mask=mask)  # (B, Q + L, D)
        queries, text = h[:, :n_query], h[:, n_query:]  # (B, Q, D), (B, L, D)
        parts = []
        if n_query > 0:
            if self.has_cross_attention:
                if vision is None:
                    raise ValueError("query positions need vision features in a cross-attention layer")
                queries = self.crossattention(queries, kv=vision, mask=vision_mask)
            parts.append(self.output_query(self.intermediate_query(queries), queries))
        if text.shape[1] > 0:
            parts.append(self.output(self.intermediate(text), text))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]  # (B, Q + L, D)


class QFormerEncoder(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.layer = nn.ModuleList(QFormerLayer(cfg, i) for i in range(cfg.num_hidden_layers))

    def forward(self, x: Tensor, n_query: int, mask: Tensor | None = None, vision: Tensor | None = None,
                vision_mask: Tensor | None = None) -> Tensor:
        for layer in self.layer:
            x = layer(x, n_query, mask, vision, vision_mask)
        return x


class QFormerModel(nn.Module):
    """transformers' ``Blip2QFormerModel``: the embedding LayerNorm (``layernorm``, applied to every
    input position, queries included) and the layer stack (``encoder``)."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = QFormerEncoder(cfg)

    def forward(self, x: Tensor, n_query: int, mask: Tensor | None = None, vision: Tensor | None = None,
                vision_mask: Tensor | None = None) -> Tensor:
        return self.encoder(self.layernorm(x), n_query, mask, vision, vision_mask)  # (B, Q + L, D)


class QFormerTextEmbeddings(nn.Module):
    """Word + absolute position embeddings of the text (``Blip2TextEmbeddings``; no LayerNorm here:
    it is ``qformer.layernorm``). Positions count from 0 at the first text token."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: Tensor) -> Tensor:
        L = input_ids.shape[1]
        if L > self.position_embeddings.num_embeddings:
            raise ValueError(f"{L} text tokens, but max_position_embeddings is "
                             f"{self.position_embeddings.num_embeddings}")
        positions = torch.arange(L, device=input_ids.device)
        return self.word_embeddings(input_ids) + self.position_embeddings(positions)  # (B, L, D)


def key_mask(mask: Tensor | None, name: str) -> Tensor | None:
    """A (B, S) padding mask (bool or 0/1 integers; True / 1 = a real token) as a boolean
    (B, 1, 1, S) key mask for ``attend``; None stays None. Every row must keep a key."""
    if mask is None:
        return None
    if mask.dim() != 2:
        raise ValueError(f"{name} must be (batch, length), got shape {tuple(mask.shape)}")
    mask = mask.bool()
    if not mask.any(dim=1).all():
        raise ValueError(f"{name} has a row with no real token")
    return mask[:, None, None, :]


# ----------------------------------------------------------------------------- the model
class QFormer(nn.Module):
    """The BLIP-2 Q-Former with its retrieval heads (see the module docstring).

    ``query_tokens`` (1, Q, D) start N(0, 0.02); ``embeddings`` are the text word + position tables;
    ``qformer`` is the LayerNorm + layer stack; ``vision_projection`` / ``text_projection`` map
    D -> image_text_hidden_size (E) for contrastive retrieval; ``itm_head`` maps D -> 2 (no match,
    match); ``temp`` is the learnable temperature (init ``cfg.temp`` = 0.07), so contrastive logits
    are cosine / temp.

    Masks: ``attention_mask`` (B, L) and ``vision_mask`` (B, S) are padding masks, True or 1 for real
    tokens (a bool or integer tensor); None means every position is real.
    """

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.config = cfg.validate()
        D = cfg.hidden_size
        self.query_tokens = nn.Parameter(torch.randn(1, cfg.num_query_tokens, D) * cfg.initializer_range)
        self.embeddings = QFormerTextEmbeddings(cfg)
        self.qformer = QFormerModel(cfg)
        self.vision_projection = nn.Linear(D, cfg.image_text_hidden_size)
        self.text_projection = nn.Linear(D, cfg.image_text_hidden_size)
        self.itm_head = nn.Linear(D, 2)
        self.temp = nn.Parameter(torch.tensor(float(cfg.temp)))
        self._init_weights()

    def _init_weights(self) -> None:
        """BERT's initialisation: N(0, initializer_range) weights, zero biases, unit LayerNorms."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()

    def _check_vision(self, vision: Tensor) -> None:
        if vision.dim() != 3 or vision.shape[-1] != self.config.encoder_hidden_size:
            raise ValueError(f"vision features must be (batch, tokens, {self.config.encoder_hidden_size}), "
                             f"got shape {tuple(vision.shape)}")

    def query_features(self, vision: Tensor, vision_mask: Tensor | None = None) -> Tensor:
        """Last hidden states (B, Q, D) of the query tokens reading ``vision`` (B, S, Dv). No text is
        involved, so the result depends on the image alone."""
        self._check_vision(vision)
        queries = self.query_tokens.expand(vision.shape[0], -1, -1)  # (B, Q, D)
        return self.qformer(queries, queries.shape[1], None, vision, key_mask(vision_mask, "vision_mask"))

    def text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Last hidden states (B, L, D) of the text alone (bidirectional BERT, no queries, no image).
        Padded positions get values too (they attend to the real tokens); ignore them."""
        x = self.embeddings(input_ids)  # (B, L, D)
        return self.qformer(x, 0, key_mask(attention_mask, "attention_mask"))

    def image_embeds(self, vision: Tensor, vision_mask: Tensor | None = None) -> Tensor:
        """(B, Q, E): each query's ``vision_projection``, L2-normalised."""
        return F.normalize(self.vision_projection(self.query_features(vision, vision_mask)), dim=-1)

    def text_embeds(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, E): ``text_projection`` of the first ([CLS]) token's last hidden state, L2-normalised."""
        cls = self.text_features(input_ids, attention_mask)[:, 0]  # (B, D)
        return F.normalize(self.text_projection(cls), dim=-1)

    def similarity(self, image_embeds: Tensor, text_embeds: Tensor, scaled: bool = True) -> Tensor:
        """(Bi, Bt) contrastive logits: for each image and text, the largest cosine over the image's
        queries, divided by ``temp`` (the max is taken before the division). ``scaled=False`` returns
        the cosines themselves (transformers' ``logits_per_image``)."""
        sim = torch.einsum("iqe,te->iqt", image_embeds, text_embeds).amax(dim=1)  # (Bi, Bt)
        return sim / self.temp if scaled else sim

    def itm_logits(self, vision: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None,
                   vision_mask: Tensor | None = None) -> Tensor:
        """(B, 2) image-text matching logits of the pairs (vision[b], input_ids[b]).

        Queries and text run jointly ([queries; text], queries attending to the text and the text to
        the queries, padding hidden), the queries also reading the image; the logits are ``itm_head``
        averaged over the query positions, as in transformers' ``Blip2ForImageTextRetrieval``.
        """
        self._check_vision(vision)
        B, Q = input_ids.shape[0], self.config.num_query_tokens
        if vision.shape[0] != B:
            raise ValueError(f"itm_logits pairs images and texts: {vision.shape[0]} images, {B} texts")
        queries = self.query_tokens.expand(B, -1, -1)  # (B, Q, D)
        x = torch.cat([queries, self.embeddings(input_ids)], dim=1)  # (B, Q + L, D)
        mask = None
        if attention_mask is not None:
            real = torch.ones(B, Q, dtype=torch.bool, device=input_ids.device)
            mask = key_mask(torch.cat([real, attention_mask.bool()], dim=1), "attention_mask")  # (B, 1, 1, Q + L)
        h = self.qformer(x, Q, mask, vision, key_mask(vision_mask, "vision_mask"))  # (B, Q + L, D)
        return self.itm_head(h[:, :Q]).mean(dim=1)  # (B, 2)

    def encode_sentences(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, D) sentence features: ``text_features`` averaged over the real tokens (the mean pooling
        of sentence-transformers, e.g. all-MiniLM-L6-v2)."""
        h = self.text_features(input_ids, attention_mask)  # (B, L, D)
        if attention_mask is None:
            return h.mean(dim=1)
        w = attention_mask.to(h.dtype).unsqueeze(-1)  # (B, L, 1)
        return (h * w).sum(dim=1) / w.sum(dim=1).clamp_min(1e-9)
