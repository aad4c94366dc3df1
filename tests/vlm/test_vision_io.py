"""genlab's SigLIP tower read from / written as a Hugging Face SigLIP folder, checked against
transformers' SiglipVisionModel on tiny random configs."""

import json

import pytest
import torch

from genlab.errors import CheckpointMismatchError, ConfigError
from genlab.io import read_safetensors, save_safetensors
from genlab.vlm.siglip import SiglipConfig, SiglipVisionTower
from genlab.vlm.vision_io import load_vision_tower, save_vision_tower

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
            patch_size=4)


def _tower(seed: int = 0) -> SiglipVisionTower:
    torch.manual_seed(seed)
    tower = SiglipVisionTower(SiglipConfig(**TINY))
    with torch.no_grad():
        for p in tower.parameters():
            p.normal_(0, 0.1)
    return tower.eval()


def test_save_is_read_by_transformers_with_equal_features(tmp_path):
    tower = _tower()
    save_vision_tower(tower, tmp_path / "vision")
    hf = transformers.SiglipVisionModel.from_pretrained(str(tmp_path / "vision")).eval()
    px = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        ours, theirs = tower(px), hf(pixel_values=px).last_hidden_state
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    again = load_vision_tower(tmp_path / "vision")
    with torch.no_grad():
        assert torch.equal(again(px), ours)


def test_whole_siglip_folder_skips_text_half_and_head(tmp_path):
    cfg = transformers.SiglipConfig(
        vision_config=dict(TINY, vision_use_head=True),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         vocab_size=50, max_position_embeddings=16))
    torch.manual_seed(1)
    hf = transformers.SiglipModel(cfg).eval()
    hf.save_pretrained(str(tmp_path / "siglip"))
    tower = load_vision_tower(tmp_path / "siglip")
    px = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        theirs = hf.vision_model(pixel_values=px).last_hidden_state
        assert torch.allclose(tower(px), theirs, atol=1e-5)


def test_bad_folders_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_vision_tower(tmp_path / "nope")
    save_vision_tower(_tower(), tmp_path / "v")
    state = read_safetensors(tmp_path / "v" / "model.safetensors")
    state["vision_model.extra.weight"] = torch.zeros(2)
    del state["vision_model.post_layernorm.bias"]
    save_safetensors(state, tmp_path / "v" / "model.safetensors")
    with pytest.raises(CheckpointMismatchError, match="vision_model.extra.weight.*vision_model.post_layernorm.bias"):
        load_vision_tower(tmp_path / "v")
    (tmp_path / "v" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConfigError, match="not a SigLIP vision model"):
        load_vision_tower(tmp_path / "v")
