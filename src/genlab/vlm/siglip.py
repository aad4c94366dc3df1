"""SigLIP vision tower as PaliGemma uses it: patch embedding, learned positions, a pre-LN
transformer encoder and a final LayerNorm; no pooling head (every patch token is kept).

Module names follow ``transformers``' SiglipVisionModel (``embeddings.patch_embedding``,
``encoder.layers.N.self_attn.q_proj`` / ``out_proj``, ``mlp.fc1`` / ``fc2``, ``post_layernorm``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from genlab.nn.attention import Attention
from genlab.nn.blocks import MLP
from genlab.nn.embeddings import PatchEmbedding


@dataclass
class SiglipConfig:
    """The vision half of a PaliGemma config (defaults: transformers' SiglipVisionConfig)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf_dict(cls, d: dict) -> "SiglipConfig":
        """Read a ``vision_config`` dict; fields it omits take transformers' defaults."""
        if d.get("vision_use_head", False):
            raise NotImplementedError("vision_use_head=True: PaliGemma's vision tower has no pooling head")
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        for key in ("image_size", "patch_size"):  # HF allows [h, w]; PaliGemma uses squares
            if isinstance(kw.get(key), (list, tuple)):
                if len(set(kw[key])) != 1:
                    raise NotImplementedError(f"non-square {key}={kw[key]} is not supported")
                kw[key] = kw[key][0]
        return cls(**kw)

    def to_hf_dict(self, projection_dim: int) -> dict:
        return {**asdict(self), "model_type": "siglip_vision_model", "vision_use_head": False,
                "projection_dim": projection_dim, "attention_dropout": 0.0}

    def validate(self, where: str = "vision_config") -> "SiglipConfig":
        """Return self if a tower can be built from this config (and transformers would build the
        same one); else raise ``genlab.errors.ConfigError`` naming the field by its Hugging Face
        name, prefixed by ``where``: e.g. ``vision_config: hidden_size=96 is not divisible by
        num_attention_heads=5``."""
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
        if not isinstance(self.hidden_act, str):
            bad(f"hidden_act must be a string, got {self.hidden_act!r}")
        if self.hidden_size % self.num_attention_heads:
            bad(f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads} (each head gets hidden_size / num_attention_heads channels; "
                f"transformers refuses such a config)")
        if self.image_size % self.patch_size:
            bad(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size} (the last "
                f"{self.image_size % self.patch_size} pixels of each row and column would be dropped)")
        return self


class SiglipEmbeddings(nn.Module):
    """Pixels (B, C, H, W) -> patch tokens plus learned position embeddings (B, N, D)."""

    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.patch_embedding = PatchEmbedding(cfg.num_channels, cfg.hidden_size, cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, N, D), row-major
        return x + self.position_embedding.weight


class SiglipMLP(MLP):
    """fc2(act(fc1(x))) with the config's sizes and ``hidden_act``."""

    def __init__(self, cfg: SiglipConfig):
        super().__init__(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)


class SiglipEncoderLayer(nn.Module):
    """Pre-LN block: x + attn(ln1(x)), then x + mlp(ln2(x)); bidirectional attention."""

    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = Attention(cfg.hidden_size, cfg.num_attention_heads, bias=True, out_name="out_proj")
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class SiglipVisionTower(nn.Module):
    """Images (B, C, H, W) at ``cfg.image_size`` -> one feature per patch (B, N, D).

    ``image_mean`` / ``image_std``: how callers normalise [0, 1] pixels for it (SigLIP's 0.5 / 0.5;
    ``vision_io`` reads a folder's preprocessor_config.json over them). Plain attributes, not buffers."""

    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if tuple(pixel_values.shape[-2:]) != (size, size):
            raise ValueError(f"pixel_values must be (B, {self.config.num_channels}, {size}, {size}), "
                             f"got {tuple(pixel_values.shape)}")
        return self.post_layernorm(self.encoder(self.embeddings(pixel_values)))
