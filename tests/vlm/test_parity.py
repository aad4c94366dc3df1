"""genlab's PaliGemma against transformers' PaliGemmaForConditionalGeneration, same weights."""

import pytest
import torch

from genlab.vlm.hf_io import load_paligemma
from tests.vlm.tiny_hf import hf_positions, make_batch, tiny_hf_paligemma

torch.set_num_threads(1)
TOL = 1e-5
# (PaliGemma version, key/value heads): 4 query heads, so 1 is MQA and 2 is GQA
VARIANTS = [(1, 1), (1, 2), (2, 1), (2, 2)]


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda v: f"pg{v[0]}-kv{v[1]}")
def pair(request, tmp_path_factory):
    version, kv = request.param
    ref = tiny_hf_paligemma(version, kv, seed=version * 10 + kv)
    folder = tmp_path_factory.mktemp(f"pg{version}{kv}")
    ref.save_pretrained(folder)
    model, cfg = load_paligemma(folder)
    return ref, model, cfg


def hf_logits(ref, ids, mask, types, pixels):
    with torch.no_grad():
        return ref(input_ids=ids, pixel_values=pixels, attention_mask=mask, token_type_ids=types,
                   position_ids=hf_positions(mask)).logits


def test_config_read_back(pair):
    ref, _, cfg = pair
    t = ref.config.text_config
    assert cfg.text.model_type == t.model_type
    assert (cfg.text.num_key_value_heads, cfg.text.head_dim) == (t.num_key_value_heads, t.head_dim)
    assert cfg.text.rope_theta == 100.0 and cfg.image_token_id == 299


def test_vision_features_match(pair):
    ref, model, _ = pair
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = ref.model.get_image_features(pixels).pooler_output
        got = model.image_features(pixels)
    assert got.shape == (2, 16, 64)
    assert (got - want).abs().max() <= TOL


def test_logits_prefix_suffix_and_left_padding(pair):
    ref, model, _ = pair
    ids, mask, types, pixels = make_batch(pads=[0, 3, 5], text_len=6, suffix_len=5)
    want = hf_logits(ref, ids, mask, types, pixels)
    with torch.no_grad():
        got = model(ids, pixels, mask, types)
    real = mask.bool()
    assert (got - want)[real].abs().max() <= TOL
    # the suffix really is causal: calling everything prefix changes the answer
    with torch.no_grad():
        all_prefix = model(ids, pixels, mask, torch.zeros_like(types))
    assert (all_prefix - got)[real].abs().max() > 1e-3


def test_default_types_mean_all_prefix(pair):
    """Without token_type_ids the whole prompt is the bidirectional prefix (PaliGemma inference)."""
    ref, model, _ = pair
    ids, mask, types, pixels = make_batch(pads=[0, 2], text_len=7)
    want = hf_logits(ref, ids, mask, types, pixels)  # types are all 0 here
    with torch.no_grad():
        got = model(ids, pixels, mask)
    assert (got - want)[mask.bool()].abs().max() <= TOL


def test_positions_count_real_tokens(pair):
    """A left-padded row gives the same logits as the same prompt alone."""
    _, model, _ = pair
    ids, mask, types, pixels = make_batch(pads=[4, 0], text_len=5, suffix_len=3)
    with torch.no_grad():
        batch = model(ids, pixels, mask, types)
        alone = model(ids[:1, 4:], pixels[:1], mask[:1, 4:], types[:1, 4:])
    assert (batch[0, 4:] - alone[0]).abs().max() <= TOL


def test_image_token_count_is_checked(pair):
    _, model, _ = pair
    ids, mask, types, pixels = make_batch(pads=[0], text_len=4)
    ids[0, 0] = 5  # one image token fewer than the image has patches
    with pytest.raises(ValueError, match="image tokens"):
        model(ids, pixels, mask)


def test_soft_capping_and_sliding_window_matter():
    """Guards the Gemma 2 test case itself: both features change the logits at these sizes."""
    ids, mask, types, pixels = make_batch(pads=[0], text_len=6, suffix_len=6)
    base = hf_logits(tiny_hf_paligemma(2, 2, seed=3), ids, mask, types, pixels)
    wide = hf_logits(tiny_hf_paligemma(2, 2, seed=3, sliding_window=4096), ids, mask, types, pixels)
    assert (base - wide).abs().max() > 1e-3
    assert base.abs().max() <= 3.0  # final soft cap
