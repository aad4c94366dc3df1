"""Tiny random transformers PaliGemma models and batches, the reference for genlab's parity tests."""

from __future__ import annotations

import torch
import transformers as hf

from genlab.vlm.demo import hf_positions  # noqa: F401  (re-exported for the tests)

VOCAB, IMAGE_TOKEN, BOS, EOS, PAD = 300, 299, 2, 1, 0
NUM_IMAGE_TOKENS = 16  # (32 / 8) ** 2 patches


def tiny_hf_paligemma(version: int = 1, num_kv_heads: int = 1, tie: bool = True, seed: int = 0,
                      sliding_window: int = 6) -> "hf.PaliGemmaForConditionalGeneration":
    """PaliGemma 1 (Gemma) or 2 (Gemma 2) with 64-wide towers, in eval mode.

    Norm weights and biases are randomised too (they start at 0 / 1 in transformers), so the
    (1 + w) RMSNorm convention and every bias are actually exercised.
    """
    torch.manual_seed(seed)
    vision = hf.SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, image_size=32, patch_size=8, vision_use_head=False)
    text_kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=num_kv_heads, head_dim=16,
                   bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=tie,
                   rope_parameters={"rope_type": "default", "rope_theta": 100.0})
    if version == 1:
        text = hf.GemmaConfig(**text_kw)
    else:
        text = hf.Gemma2Config(**text_kw, sliding_window=sliding_window, query_pre_attn_scalar=24,
                               attn_logit_softcapping=5.0, final_logit_softcapping=3.0)
    cfg = hf.PaliGemmaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                             image_token_index=IMAGE_TOKEN, projection_dim=64, hidden_size=64,
                             vocab_size=VOCAB, tie_word_embeddings=tie)
    model = hf.PaliGemmaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def make_batch(pads: list[int], text_len: int = 8, suffix_len: int = 0, seed: int = 0):
    """A left-padded batch: row r is ``pads[r]`` pad tokens, 16 image tokens, BOS, prompt text
    (longer where the padding is shorter, so all rows have one length) and ``suffix_len`` suffix
    tokens. Returns input_ids, attention_mask, token_type_ids (B, L), pixel_values (B, 3, 32, 32)."""
    g = torch.Generator().manual_seed(seed)
    L = max(pads) + NUM_IMAGE_TOKENS + 1 + text_len + suffix_len
    rows = []
    for p in pads:
        text = torch.randint(3, IMAGE_TOKEN, (L - p - NUM_IMAGE_TOKENS - 1,), generator=g)
        rows.append(torch.cat([torch.full((p,), PAD), torch.full((NUM_IMAGE_TOKENS,), IMAGE_TOKEN),
                               torch.tensor([BOS]), text]))
    ids = torch.stack(rows)
    mask = (torch.arange(L)[None, :] >= torch.tensor(pads)[:, None]).long()
    types = torch.zeros_like(ids)
    types[:, L - suffix_len:] = 1
    pixels = torch.randn(len(pads), 3, 32, 32, generator=g)
    return ids, mask, types, pixels


