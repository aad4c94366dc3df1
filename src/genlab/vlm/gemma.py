"""Gemma (PaliGemma 1) and Gemma 2 (PaliGemma 2) decoders with prefix-LM masking.

Numerics follow ``transformers`` 5: token embeddings are scaled by sqrt(hidden) in the weight
dtype; RMSNorm computes ``x / rms(x) * (1 + w)`` in float32; RoPE angles are float32; the MLP
is GeGLU with tanh-approximated GELU. Gemma 2 adds soft-capped attention scores, a query scale
of ``query_pre_attn_scalar ** -0.5``, "sandwich" norms around attention and MLP, and
alternating sliding-window / full layers (layer 0 slides).

Masking. The decoder sees a left-padded batch. ``attention_mask`` (B, L) marks real tokens and
``token_type_ids`` (B, L) marks the prefix (0: image + prompt, attended bidirectionally) and the
suffix (1: attended causally). Without ``token_type_ids`` every real token of the first chunk is
prefix, as at PaliGemma inference. Tokens added once the cache is non-empty are suffix.
Positions count real tokens from 1 (transformers' PaliGemma convention), so a left-padded row
gets the same positions as the same prompt alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch
import torch.utils.checkpoint
from torch import nn

from genlab.nn.attention import Attention, KVCache, RotaryEmbedding
from genlab.nn.blocks import activation
from genlab.nn.norms import RMSNorm

# transformers' defaults for fields a config.json may leave out.
_HF_DEFAULTS = {
    "gemma": dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=16),
    "gemma2": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, query_pre_attn_scalar=256,
                   sliding_window=4096, final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
}


@dataclass
class GemmaConfig:
    """The text half of a PaliGemma config. ``model_type`` is "gemma" or "gemma2"."""

    model_type: str = "gemma"
    vocab_size: int = 257152
    hidden_size: int = 2048
    intermediate_size: int = 16384
    num_hidden_layers: int = 18
    num_attention_heads: int = 8
    num_key_value_heads: int = 1
    head_dim: int = 256
    hidden_act: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192
    attention_bias: bool = False
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: int | list[int] = 1
    # Gemma 2 only (None = off)
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None
    layer_types: list[str] | None = field(default=None)

    def __post_init__(self):
        if self.model_type not in _HF_DEFAULTS:
            raise NotImplementedError(f"text model_type {self.model_type!r} (expected 'gemma' or 'gemma2')")
        if self.model_type == "gemma2" and self.layer_types is None and isinstance(self.num_hidden_layers, int):
            self.layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention"
                                for i in range(self.num_hidden_layers)]

    @property
    def gemma2(self) -> bool:
        return self.model_type == "gemma2"

    def is_sliding(self, layer_idx: int) -> bool:
        return (self.sliding_window is not None and self.layer_types is not None
                and self.layer_types[layer_idx] == "sliding_attention")

    @classmethod
    def from_hf_dict(cls, d: dict) -> "GemmaConfig":
        """Read a ``text_config`` dict; fields it omits take transformers' defaults for its model_type."""
        model_type = d.get("model_type", "gemma")
        if model_type not in _HF_DEFAULTS:
            raise NotImplementedError(f"text model_type {model_type!r} (expected 'gemma' or 'gemma2')")
        kw = {**_HF_DEFAULTS[model_type], "model_type": model_type}
        kw.update({f.name: d[f.name] for f in fields(cls) if f.name in d and f.name != "model_type"})
        act = d.get("hidden_activation") if model_type == "gemma2" else d.get("hidden_act")
        if act is not None:  # transformers maps Gemma 1's legacy "gelu" to the tanh approximation
            kw["hidden_act"] = "gelu_pytorch_tanh" if (model_type == "gemma" and act == "gelu") else act
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ValueError(f"rope_parameters must be a mapping, got {rope!r}")
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise NotImplementedError(f"rope type {rope.get('rope_type')!r}: only default RoPE is supported")
        kw["rope_theta"] = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
        return cls(**kw)

    def to_hf_dict(self, tie_word_embeddings: bool, num_image_tokens: int) -> dict:
        d = asdict(self)
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": d.pop("rope_theta")}
        d["hidden_activation" if self.gemma2 else "hidden_act"] = d.pop("hidden_act")
        if not self.gemma2:
            for key in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
                        "sliding_window", "layer_types"):
                d.pop(key)
        return {**d, "tie_word_embeddings": tie_word_embeddings, "num_image_tokens": num_image_tokens,
                "attention_dropout": 0.0, "use_bidirectional_attention": True}

    def validate(self, where: str = "text_config") -> "GemmaConfig":
        """Return self if a decoder can be built from this config; else raise
        ``genlab.errors.ConfigError`` naming the field by its Hugging Face name, prefixed by
        ``where``: e.g. ``text_config: num_attention_heads=4 is not a multiple of
        num_key_value_heads=3``."""
        from genlab.errors import ConfigError

        def bad(message: str):
            raise ConfigError(f"{where}: {message}")

        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not is_int(value):
                bad(f"{name} must be an integer, got {value!r}")
            if value < 1:
                bad(f"{name} must be >= 1, got {value}")
        if self.num_attention_heads % self.num_key_value_heads:
            bad(f"num_attention_heads={self.num_attention_heads} is not a multiple of num_key_value_heads="
                f"{self.num_key_value_heads} (each key/value head serves a whole group of query heads)")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not is_number(value) or not value > 0:
                bad(f"{name} must be a number > 0, got {value!r}")
        for name in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"):
            value = getattr(self, name)
            if value is not None and (not is_number(value) or not value > 0):
                bad(f"{name} must be a number > 0 or null, got {value!r}")
        if self.sliding_window is not None and (not is_int(self.sliding_window) or self.sliding_window < 1):
            bad(f"sliding_window must be an integer >= 1 or null, got {self.sliding_window!r}")
        if not isinstance(self.hidden_act, str):
            bad(f"hidden_act must be a string, got {self.hidden_act!r}")
        if not isinstance(self.attention_bias, bool):
            bad(f"attention_bias must be true or false, got {self.attention_bias!r}")
        if self.layer_types is not None:
            kinds = {"sliding_attention", "full_attention"}
            if (not isinstance(self.layer_types, list) or len(self.layer_types) != self.num_hidden_layers
                    or any(kind not in kinds for kind in self.layer_types)):
                bad(f"layer_types must list one of {sorted(kinds)} per layer ({self.num_hidden_layers} "
                    f"layers), got {self.layer_types!r}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, list) else [value]
            for token_id in ids:
                if token_id is None and name != "eos_token_id":
                    continue  # transformers allows an unset pad / bos id
                if not is_int(token_id) or token_id < 0:
                    bad(f"{name} must be a token id (an integer >= 0), got {value!r}")
                if token_id >= self.vocab_size:
                    bad(f"{name}={value} does not fit in vocab_size={self.vocab_size} "
                        f"(ids run 0..{self.vocab_size - 1})")
        return self


class GemmaMLP(nn.Module):
    """GeGLU: down(act(gate(x)) * up(x))."""

    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class GemmaDecoderLayer(nn.Module):
    """Gemma 1: x + attn(n1(x)); x + mlp(n2(x)).
    Gemma 2: x + n2(attn(n1(x))); x + n4(mlp(n3(x))) with n2..n4 the "sandwich" norms."""

    def __init__(self, cfg: GemmaConfig, layer_idx: int):
        super().__init__()
        D, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.layer_idx = layer_idx
        self.sliding = cfg.is_sliding(layer_idx)
        self.gemma2 = cfg.gemma2
        scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
        self.input_layernorm = RMSNorm(D, eps, offset=1.0)
        self.self_attn = Attention(D, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                                   bias=cfg.attention_bias, scale=scale, softcap=cfg.attn_logit_softcapping)
        self.post_attention_layernorm = RMSNorm(D, eps, offset=1.0)
        self.mlp = GemmaMLP(cfg)
        if self.gemma2:
            self.pre_feedforward_layernorm = RMSNorm(D, eps, offset=1.0)
            self.post_feedforward_layernorm = RMSNorm(D, eps, offset=1.0)

    def forward(self, x: torch.Tensor, masks: tuple, rope: tuple, cache: KVCache | None,
                static: bool = False) -> torch.Tensor:
        mask = masks[1] if self.sliding else masks[0]
        h = self.self_attn(self.input_layernorm(x), mask, rope, cache, self.layer_idx, static=static)
        if not self.gemma2:
            x = x + h
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(h)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


def prefix_lm_masks(key_mask: torch.Tensor, q_start: int, prefix: torch.Tensor | None,
                    sliding_window: int | None):
    """Boolean masks (B, 1, L, S) for full and sliding-window layers (the latter None if unused).

    ``key_mask`` (B, S) marks real keys; queries are the last ``L = S - q_start`` slots;
    ``prefix`` (B, L) (first chunk only) marks tokens that see each other bidirectionally.
    Query i sees real key j when j <= i, or when both are prefix; sliding layers also need
    i - j < window unless both are prefix (as transformers overlays its blocks). Each query
    also sees itself, so padded rows never become all-False (a NaN source).
    """
    S = key_mask.shape[1]
    i = torch.arange(q_start, S, device=key_mask.device)[:, None]  # (L, 1)
    j = torch.arange(S, device=key_mask.device)[None, :]  # (1, S)
    causal = j <= i
    both_prefix = None if prefix is None else prefix[:, :, None] & prefix[:, None, :]  # (B, L, S)
    keys = key_mask[:, None, :]

    def combine(allowed):
        if both_prefix is not None:
            allowed = allowed | both_prefix
        return ((allowed & keys) | (i == j)).unsqueeze(1)

    full = combine(causal)
    sliding = None if sliding_window is None else combine(causal & (i - j < sliding_window))
    return full, sliding


class GemmaModel(nn.Module):
    """Embeddings in, final-normed hidden states out; the LM head lives with the caller."""

    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.layers = nn.ModuleList(GemmaDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, offset=1.0)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.uses_sliding = any(layer.sliding for layer in self.layers)
        # Recompute each layer's activations in the backward pass instead of keeping them (training
        # only): about a layer's worth of activations alive instead of all of them, for ~1/3 more compute.
        self.gradient_checkpointing = False

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, L, D) times sqrt(D), the scale rounded to the weight dtype."""
        w = self.embed_tokens.weight
        return self.embed_tokens(input_ids) * torch.tensor(self.config.hidden_size ** 0.5).to(w.dtype)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        cfg, w = self.config, self.embed_tokens.weight
        return KVCache(cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, cfg.head_dim, max_len,
                       dtype=w.dtype, device=w.device)

    def forward(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """Run the decoder on ``embeds`` (B, L, D); ``attention_mask`` (B, L) covers the new tokens
        only (earlier ones are remembered by ``cache``). Returns hidden states (B, L, D)."""
        masks, position_ids = self._masks_and_positions(embeds, attention_mask, token_type_ids, position_ids, cache)
        rope = self.rotary(position_ids, embeds.dtype)
        x = embeds
        recompute = self.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:
                x = torch.utils.checkpoint.checkpoint(layer, x, masks, rope, None, use_reentrant=False)
            else:
                x = layer(x, masks, rope, cache)
        if cache is not None:
            cache.advance(embeds.shape[1])
        return self.norm(x)

    def decode_step(self, embeds: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One real token per row, ``embeds`` (B, 1, D), written at slot ``cache.pos``; returns
        hidden states (B, 1, D). Every shape is fixed by the cache (attention spans all ``max_len``
        slots, unfilled ones masked out) and only tensors change between steps, so
        ``torch.compile(dynamic=False)`` compiles it once and a CUDA graph can replay it.
        ``cache.length`` is left alone: the caller calls ``cache.advance(1)`` afterwards."""
        cache.key_mask.index_fill_(1, cache.pos, True)
        cache.seen += 1
        full = cache.key_mask[:, None, None, :]  # (B, 1, 1, max_len)
        sliding = None
        if self.uses_sliding:  # the query sits at slot pos; keys pos - window and older drop out
            slots = torch.arange(cache.max_len, device=embeds.device)
            sliding = full & (slots > cache.pos - self.config.sliding_window)
        rope = self.rotary(cache.seen[:, None], embeds.dtype)  # positions (B, 1), 1-based real tokens
        x = embeds
        for layer in self.layers:
            x = layer(x, (full, sliding), rope, cache, static=True)
        return self.norm(x)

    def _masks_and_positions(self, embeds, attention_mask, token_type_ids, position_ids, cache):
        B, L, _ = embeds.shape
        new = (torch.ones(B, L, dtype=torch.bool, device=embeds.device) if attention_mask is None
               else attention_mask.bool())
        q_start = 0 if cache is None else cache.length
        if q_start and token_type_ids is not None:
            raise ValueError("token_type_ids apply to the first chunk only; later tokens are causal")
        prefix = None
        if q_start == 0:
            prefix = new if token_type_ids is None else new & (token_type_ids == 0)
        if cache is None:
            key_mask, seen = new, 0
        else:
            cache.key_mask[:, q_start:q_start + L] = new
            key_mask, seen = cache.key_mask[:, :q_start + L], cache.seen[:, None].clone()
            cache.seen += new.sum(-1)
        if position_ids is None:
            position_ids = seen + new.long().cumsum(-1)  # 1 at the first real token
        window = self.config.sliding_window if self.uses_sliding else None
        return prefix_lm_masks(key_mask, q_start, prefix, window), position_ids
