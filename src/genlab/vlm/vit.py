"""A ViT vision tower (Dosovitskiy et al. 2021) as BLIP-2 reads one: patch embedding, a [CLS] token,
learned positions, a pre-LN transformer encoder and the final LayerNorm; no pooler, every token kept.

Module names follow ``transformers``' ViTModel (``embeddings.cls_token``, ``embeddings.position_embeddings``,
``embeddings.patch_embeddings.projection``, ``encoder.layer.N.layernorm_before`` / ``layernorm_after``,
final ``layernorm``) except inside a layer, where the shared ``Attention`` and ``MLP`` name their
projections ``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj`` and ``fc1`` / ``fc2``. ``hf_key`` and
``genlab_key`` translate between the two namings (a fixed one-to-one table, so loading stays strict).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from genlab.nn.attention import Attention
from genlab.nn.blocks import ACTIVATIONS, MLP
from genlab.nn.embeddings import PatchEmbedding

# a layer's HF module path -> genlab's (ViTSelfAttention, ViTSelfOutput, ViTIntermediate, ViTOutput)
_LAYER_RENAMES = {
    "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
_BACK = {v: k for k, v in _LAYER_RENAMES.items()}
_LAYER_KEY = re.compile(r"^(encoder\.layer\.\d+)\.(.+)\.(weight|bias)$")


def _rename(key: str, table: dict[str, str]) -> str:
    m = _LAYER_KEY.match(key)
    if m and m.group(2) in table:
        return f"{m.group(1)}.{table[m.group(2)]}.{m.group(3)}"
    return key


def genlab_key(hf_key: str) -> str:
    """A ViTModel state-dict key (no ``vit.`` prefix) -> the tower's key (unknown keys pass through)."""
    return _rename(hf_key, _LAYER_RENAMES)


def hf_key(key: str) -> str:
    """The tower's state-dict key -> ViTModel's."""
    return _rename(key, _BACK)


@dataclass
class ViTConfig:
    """The fields of transformers' ViTConfig a frozen tower needs (defaults: ViT-B/16 at 224)."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    qkv_bias: bool = True

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf_dict(cls, d: dict) -> "ViTConfig":
        """Read a ViT ``config.json`` dict; fields it omits take transformers' defaults."""
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        for key in ("image_size", "patch_size"):  # HF allows [h, w]; the tower is square
            if isinstance(kw.get(key), (list, tuple)):
                if len(set(kw[key])) != 1:
                    raise NotImplementedError(f"non-square {key}={kw[key]} is not supported")
                kw[key] = kw[key][0]
        return cls(**kw)

    def to_hf_dict(self) -> dict:
        return {**asdict(self), "model_type": "vit", "hidden_dropout_prob": 0.0,
                "attention_probs_dropout_prob": 0.0, "encoder_stride": self.patch_size}

    def validate(self, where: str = "config.json") -> "ViTConfig":
        """Return self if a tower can be built from this config; else raise
        ``genlab.errors.ConfigError`` naming the field, prefixed by ``where``."""
        from genlab.errors import ConfigError

        def bad(message: str):
            raise ConfigError(f"{where}: {message}")

        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_channels", "image_size", "patch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                bad(f"{name} must be an integer, got {value!r}")
            if value < 1:
                bad(f"{name} must be >= 1, got {value}")
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            bad(f"layer_norm_eps must be a number > 0, got {eps!r}")
        if not isinstance(self.hidden_act, str) or self.hidden_act not in ACTIVATIONS:
            bad(f"hidden_act={self.hidden_act!r} is not supported; choose one of {', '.join(sorted(ACTIVATIONS))}")
        if not isinstance(self.qkv_bias, bool):
            bad(f"qkv_bias must be true or false, got {self.qkv_bias!r}")
        if self.hidden_size % self.num_attention_heads:
            bad(f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads} (each head gets hidden_size / num_attention_heads channels)")
        if self.image_size % self.patch_size:
            bad(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        return self


class ViTPatchEmbeddings(nn.Module):
    """Holds the projection under HF's name (``patch_embeddings.projection``)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.projection = PatchEmbedding(cfg.num_channels, cfg.hidden_size, cfg.patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projection(pixel_values)  # (B, N, D), row-major


class ViTEmbeddings(nn.Module):
    """Pixels (B, C, S, S) -> [CLS; patches] plus learned positions (B, 1 + N, D)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.hidden_size))
        self.patch_embeddings = ViTPatchEmbeddings(cfg)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embeddings(pixel_values.to(self.cls_token.dtype))  # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        return torch.cat([cls, x], dim=1) + self.position_embeddings  # (B, 1 + N, D)


class ViTLayer(nn.Module):
    """Pre-LN block: x + attn(layernorm_before(x)), then x + mlp(layernorm_after(x))."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attention = Attention(cfg.hidden_size, cfg.num_attention_heads, bias=True)
        if not cfg.qkv_bias:  # ViT's output projection keeps its bias whatever qkv_bias says
            for name in ("q_proj", "k_proj", "v_proj"):
                getattr(self.attention, name).register_parameter("bias", None)
        self.layernorm_after = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.layernorm_before(x))
        return x + self.mlp(self.layernorm_after(x))


class ViTEncoder(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.layer = nn.ModuleList(ViTLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x)
        return x


class ViTVisionTower(nn.Module):
    """Normalised images (B, C, S, S) at ``cfg.image_size`` -> last_hidden_state (B, 1 + N, D).

    ``image_mean`` / ``image_std`` (per channel, plain attributes so the state dict is only the
    weights) say how callers normalise [0, 1] pixels for it; ``vision_io`` reads them from the
    folder's preprocessor_config.json."""

    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)  # google/vit-*: 0.5, ImageNet-trained ViTs differ
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = ViTEmbeddings(cfg)
        self.encoder = ViTEncoder(cfg)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[-2:]) != (size, size):
            raise ValueError(f"pixel_values must be (B, {self.config.num_channels}, {size}, {size}), "
                             f"got {tuple(pixel_values.shape)}")
        return self.layernorm(self.encoder(self.embeddings(pixel_values)))
