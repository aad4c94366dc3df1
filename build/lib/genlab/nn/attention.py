"""Multi-head attention shared by the families: MHA / GQA / MQA, cross-attention, RoPE, a
preallocated KV cache.

Shapes: ``B`` batch, ``L`` new (query) tokens, ``S`` key tokens (cached + new), ``H`` query heads,
``G`` key/value heads (``H % G == 0``; ``G == H`` is MHA, ``G == 1`` is MQA), ``D`` head size.

Masks are boolean and broadcastable to ``(B, 1, L, S)``: ``True`` means "may attend". Every
query row must allow at least one key (a row of ``False`` would give NaN, which then leaks into
other rows through the values of that token).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------------------- rotary embedding
class RotaryEmbedding(nn.Module):
    """Rotary position embedding (the "rotate half" layout used by Llama / Gemma).

    ``forward(positions)`` returns ``(cos, sin)``, each ``(B, L, D)``. Angles are computed in
    float32 from integer positions and only then cast to ``dtype``.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        # A plain CPU attribute, not a buffer: model.to(bfloat16) must not round the frequencies,
        # and a model built on the meta device (for loading) still gets real values.
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim
        self.inv_freq = 1.0 / (theta ** exponents)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32):
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions[..., None].float() * self.inv_freq  # (B, L, D/2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (B, L, D)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, H, L, D) by the angles behind ``cos``/``sin`` (B, L, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


# ----------------------------------------------------------------------------- KV cache
class KVCache:
    """Keys and values of every layer, preallocated once for ``max_len`` tokens.

    ``k``/``v`` are lists of ``num_layers`` tensors (B, G, max_len, D), one per layer (separate
    tensors, not views of one, so a compiled step can update each in place); the first ``length``
    slots are filled.
    Each attention layer calls ``update`` with its new keys/values; the model calls
    ``advance`` once after all layers have seen the new tokens. ``key_mask`` (B, max_len)
    records which cached slots are real tokens (False for left padding) and ``seen`` (B,) counts
    the real tokens per row, so positions and padding masks need not be rebuilt each step.

    Static-shape decoding (for ``torch.compile`` and CUDA graphs) uses ``write`` instead of
    ``update``: the write slot is the device tensor ``pos`` (always equal to ``length``), and the
    whole ``max_len`` buffer is returned, so no shape or python value changes from step to step.
    Slots not yet written hold zeros (finite), which ``key_mask`` hides from attention.
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int,
                 max_len: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.key_mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.seen = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)  # (1,): ``length`` as a tensor
        self.length = 0
        self.max_len = max_len

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        """Store ``k``/``v`` (B, G, L, D) after the filled slots; return all keys/values (B, G, S, D)."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise RuntimeError(f"KVCache is full: {end} tokens > max_len={self.max_len}")
        self.k[layer_idx][:, :, self.length:end] = k
        self.v[layer_idx][:, :, self.length:end] = v
        return self.k[layer_idx][:, :, :end], self.v[layer_idx][:, :, :end]

    def write(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        """Store one token's ``k``/``v`` (B, G, 1, D) at slot ``pos``; return the whole buffers
        (B, G, max_len, D). Shapes never depend on how full the cache is (static decoding)."""
        self.k[layer_idx].index_copy_(2, self.pos, k)
        self.v[layer_idx].index_copy_(2, self.pos, v)
        return self.k[layer_idx], self.v[layer_idx]

    def advance(self, n: int) -> None:
        """Mark ``n`` more slots as filled (call once per forward, after the last layer)."""
        if self.length + n > self.max_len:
            raise RuntimeError(f"KVCache is full: {self.length + n} tokens > max_len={self.max_len}")
        self.length += n
        self.pos += n


# ----------------------------------------------------------------------------- attention
def causal_mask(q_len: int, k_len: int, device=None) -> torch.Tensor:
    """(q_len, k_len) boolean mask, aligned bottom-right: the last query sees every key."""
    q = torch.arange(k_len - q_len, k_len, device=device)
    return torch.arange(k_len, device=device)[None, :] <= q[:, None]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
           scale: float | None = None, softcap: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale [soft-capped] + mask) v for q (B, H, L, D) and k, v (B, G, S, D).

    Grouped heads are handled by folding the ``H // G`` query heads that share a key/value
    head into one group, so keys and values are never copied. Usually this is
    ``F.scaled_dot_product_attention``. Two cases take the explicit path (scores, float32
    softmax, weighted sum): soft-capping (``cap * tanh(s / cap)`` on the scores, Gemma 2),
    which needs the scores themselves; and one query per row under ``torch.compile`` on CPU
    (decoding), where inductor fuses the explicit path into two small products and one kernel,
    while SDPA's CPU kernel pays a fixed cost per call that is a visible part of a decode step.
    """
    B, H, L, D = q.shape
    G, S = k.shape[1], k.shape[2]
    rep = H // G
    scale = D ** -0.5 if scale is None else scale
    if mask is not None and mask.dim() < 4:  # (S,), (L, S) or (B, L, S) -> broadcastable 4-D
        mask = mask.view((1,) * (4 - mask.dim()) + tuple(mask.shape))
    explicit = softcap is not None or (L == 1 and q.device.type == "cpu" and torch.compiler.is_compiling())
    if not explicit:
        if rep == 1:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        if L == 1:  # decoding: the group's queries become the rows of one (rep, S) problem
            out = F.scaled_dot_product_attention(q.reshape(B, G, rep, D), k, v, attn_mask=mask, scale=scale)
            return out.reshape(B, H, 1, D)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    qg = q.reshape(B, G, rep * L, D)  # row r * L + i is query i of head g * rep + r
    scores = (qg @ k.transpose(-1, -2)).view(B, G, rep, L, S) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:  # (B, 1, L, S) -> (B, 1, 1, L, S): the same mask for every head
        scores = scores.masked_fill(~mask.unsqueeze(2), torch.finfo(scores.dtype).min)
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    return (probs.view(B, G, rep * L, S) @ v).view(B, G, rep, L, D).reshape(B, H, L, D)


class Attention(nn.Module):
    """Self- or cross-attention with separate q/k/v projections and an output projection.

    Module names follow Hugging Face (``q_proj``, ``k_proj``, ``v_proj`` and ``o_proj``, or
    ``out_proj`` via ``out_name``) so LoRA target names carry over. ``forward`` optionally
    applies RoPE to queries and keys, appends keys/values to a ``KVCache``, and attends under a
    boolean mask; ``is_causal`` adds a bottom-right causal mask.

    Cross-attention: ``forward(x, context=c)`` takes keys and values from ``c`` (B, S, kv_dim)
    instead of ``x``; ``kv_dim`` (default ``dim``) is the input size of ``k_proj``/``v_proj``.
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None, head_dim: int | None = None,
                 bias: bool = False, scale: float | None = None, softcap: float | None = None,
                 out_name: str = "o_proj", kv_dim: int | None = None):
        super().__init__()
        self.dim = dim
        self.kv_dim = kv_dim or dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.head_dim = head_dim or dim // num_heads
        if num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        self.scale = self.head_dim ** -0.5 if scale is None else scale
        self.softcap = softcap
        self.q_proj = nn.Linear(dim, num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(self.kv_dim, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(self.kv_dim, self.num_kv_heads * self.head_dim, bias=bias)
        self.out_name = out_name
        setattr(self, out_name, nn.Linear(num_heads * self.head_dim, dim, bias=bias))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: KVCache | None = None, layer_idx: int = 0, is_causal: bool = False,
                static: bool = False, *, context: torch.Tensor | None = None) -> torch.Tensor:
        """Attend from ``x`` (B, L, dim) and return (B, L, dim).

        ``static=True`` (one token, with ``cache``): write at ``cache.pos`` and attend over the
        whole ``max_len`` buffer; ``mask`` must then cover all ``max_len`` slots.

        ``context`` (B, S, kv_dim) makes this cross-attention: keys and values are projections of
        ``context``, ``mask`` is broadcastable to (B, 1, L, S), and RoPE, the KV cache and
        ``is_causal`` (which need queries and keys on one sequence) are refused with a ValueError.
        """
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, L, D)
        if context is None and self.kv_dim != self.dim:
            raise ValueError(f"keys and values come from kv_dim={self.kv_dim} features, not dim={self.dim}: "
                             f"pass context=... (cross-attention)")
        if context is not None and (rope is not None or cache is not None or is_causal):
            raise ValueError("cross-attention (context=...) takes no rope, cache or is_causal: "
                             "they need queries and keys from one sequence")
        src = x if context is None else context  # (B, S, kv_dim): what keys and values are made from
        S = src.shape[1]
        k = self.k_proj(src).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, G, S, D)
        v = self.v_proj(src).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.write(layer_idx, k, v) if static else cache.update(layer_idx, k, v)  # (B, G, S, D)
            if k.dtype != q.dtype:  # e.g. a float32 cache under bf16 autocast
                k, v = k.to(q.dtype), v.to(q.dtype)
        if is_causal and L > 1:
            tri = causal_mask(L, k.shape[2], x.device)
            mask = tri if mask is None else mask & tri
        out = attend(q, k, v, mask, self.scale, self.softcap)  # (B, H, L, D)
        return getattr(self, self.out_name)(out.transpose(1, 2).reshape(B, L, -1))
