"""SigLIP vision tower as PaliGemma uses it: patch embedding, learned positions, a pre-LN
transformer encoder and a final LayerNorm; no pooling head (every patch token is kept).

Module names follow ``transformers``' SiglipVisionModel (``embeddings.patch_embedding``,
``encoder.layers.N.self_attn.q_proj`` / ``out_proj``, ``mlp.fc1`` / ``fc2``, ``post_layernorm``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from genlab.nn.attention import Attention

ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


def activation(name: str):
    """The activation called ``name`` in a Hugging Face config (only the GELUs PaliGemma uses)."""
    if name not in ACTIVATIONS:
        raise NotImplementedError(f"activation {name!r} is not supported (known: {sorted(ACTIVATIONS)})")
    return ACTIVATIONS[name]


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


class SiglipEmbeddings(nn.Module):
    """Pixels (B, C, H, W) -> patch tokens plus learned position embeddings (B, N, D)."""

    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, D, h, w)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D), patches in row-major order
        return x + self.position_embedding.weight


class SiglipMLP(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


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
    """Images (B, C, H, W) at ``cfg.image_size`` -> one feature per patch (B, N, D)."""

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
