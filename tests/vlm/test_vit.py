"""genlab's ViT tower (genlab.vlm.vit) read from Hugging Face ViT folders through vision_io: parity with
transformers' ViTModel, the folder's normalisation, clear errors, and a tiny stage-1 run on a ViT."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from genlab.errors import CheckpointMismatchError, ConfigError  # noqa: E402
from genlab.io import read_safetensors, save_safetensors  # noqa: E402
from genlab.train.checkpoint import latest_checkpoint  # noqa: E402
from genlab.vlm.alignment import image_tensor, tower_input  # noqa: E402
from genlab.vlm.qformer_train import build_aligner, train  # noqa: E402
from genlab.vlm.vision_io import load_vision_tower, read_vision_config, save_vision_tower  # noqa: E402
from genlab.vlm.vit import ViTConfig, ViTVisionTower, genlab_key, hf_key  # noqa: E402
from tests.vlm.test_qformer_train import tiny_cfg  # noqa: E402
from tests.vlm.tiny_blip import bert_folder, vit_folder  # noqa: E402

IMAGENET = dict(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])


def _hf_vit(tmp_path, name="vit", classifier=False, **cfg):
    """(transformers model in eval mode, its saved folder)."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(**{**dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                              intermediate_size=64, image_size=16, patch_size=4, num_labels=3), **cfg})
    model = (transformers.ViTForImageClassification(config) if classifier else
             transformers.ViTModel(config, add_pooling_layer=False))
    with torch.no_grad():  # HF zero-inits the biases and LayerNorms: make every weight count
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(str(tmp_path / name))
    return model.eval(), tmp_path / name


@pytest.mark.parametrize("cfg", [{}, {"qkv_bias": False, "hidden_act": "gelu_new", "layer_norm_eps": 1e-6}])
def test_vit_model_folder_matches_transformers(tmp_path, cfg):
    hf, folder = _hf_vit(tmp_path, **cfg)
    tower = load_vision_tower(folder)
    assert isinstance(tower, ViTVisionTower) and not tower.training
    assert tower.config.image_size == 16 and tower.config.hidden_size == 32
    assert tower.config.qkv_bias == cfg.get("qkv_bias", True)
    px = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        ours, theirs = tower(px), hf(pixel_values=px).last_hidden_state
    assert ours.shape == (3, 1 + 16, 32)  # [CLS] + 4 x 4 patches
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_classifier_folder_skips_head_and_vit_prefix(tmp_path):
    hf, folder = _hf_vit(tmp_path, classifier=True)
    keys = read_safetensors(folder / "model.safetensors").keys()
    assert "classifier.weight" in keys and all(k.startswith(("vit.", "classifier.")) for k in keys)
    tower = load_vision_tower(folder)
    px = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        theirs = hf.vit(pixel_values=px).last_hidden_state
        assert torch.allclose(tower(px), theirs, atol=1e-5)


def test_save_round_trips_through_transformers(tmp_path):
    _, folder = _hf_vit(tmp_path)
    tower = load_vision_tower(folder)
    tower.image_mean, tower.image_std = tuple(IMAGENET["mean"]), tuple(IMAGENET["std"])
    save_vision_tower(tower, tmp_path / "out")
    again = transformers.ViTModel.from_pretrained(str(tmp_path / "out"), add_pooling_layer=False).eval()
    px = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(again(pixel_values=px).last_hidden_state, tower(px), atol=1e-5)
    back = load_vision_tower(tmp_path / "out")
    assert back.config == tower.config and back.image_std == tuple(IMAGENET["std"])
    pre = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert pre["image_mean"] == IMAGENET["mean"] and pre["size"] == {"height": 16, "width": 16}
    proc = transformers.AutoImageProcessor.from_pretrained(str(tmp_path / "out"))
    assert list(proc.image_mean) == IMAGENET["mean"] and list(proc.image_std) == IMAGENET["std"]


def test_key_renames_are_one_to_one():
    tower = ViTVisionTower(ViTConfig(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
                                     image_size=8, patch_size=4))
    names = list(tower.state_dict())
    hf = [hf_key(k) for k in names]
    assert "encoder.layer.1.attention.attention.query.weight" in hf and "encoder.layer.0.output.dense.bias" in hf
    assert "encoder.layer.0.attention.output.dense.weight" in hf and "encoder.layer.0.intermediate.dense.bias" in hf
    assert len(set(hf)) == len(names) and [genlab_key(k) for k in hf] == names


def test_preprocessor_config_sets_the_normalisation(tmp_path):
    pixels = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    tower = load_vision_tower(vit_folder(tmp_path / "imagenet", **IMAGENET))
    assert tower.image_mean == tuple(IMAGENET["mean"]) and tower.image_std == tuple(IMAGENET["std"])
    x = tower_input(tower, pixels)
    for c in range(3):  # channel by channel, against the formula
        want = (pixels[:, c].double() / 255 - IMAGENET["mean"][c]) / IMAGENET["std"][c]
        assert torch.allclose(x[:, c].double(), want, atol=1e-5)
    # no preprocessor_config.json: 0.5 / 0.5, exactly SigLIP's pixels / 127.5 - 1
    plain = load_vision_tower(vit_folder(tmp_path / "plain"))
    assert plain.image_mean == (0.5,) * 3 and plain.image_std == (0.5,) * 3
    assert torch.equal(tower_input(plain, pixels), pixels.float() / 127.5 - 1)
    assert torch.equal(image_tensor(pixels), pixels.float() / 127.5 - 1)
    # do_normalize: false means rescale only; a scalar mean applies to every channel
    (tmp_path / "plain" / "preprocessor_config.json").write_text(json.dumps({"do_normalize": False}))
    raw = load_vision_tower(tmp_path / "plain")
    assert torch.allclose(tower_input(raw, pixels), pixels.float() / 255)
    (tmp_path / "plain" / "preprocessor_config.json").write_text(json.dumps({"image_mean": 0.25, "image_std": 0.5}))
    assert load_vision_tower(tmp_path / "plain").image_mean == (0.25,) * 3
    (tmp_path / "plain" / "preprocessor_config.json").write_text(json.dumps({"image_std": [0.5, 0.0, 0.5]}))
    with pytest.raises(ConfigError, match="image_std must be > 0"):
        load_vision_tower(tmp_path / "plain")
    (tmp_path / "plain" / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.5]}))
    with pytest.raises(ConfigError, match="image_mean must be a number or a list of 3"):
        load_vision_tower(tmp_path / "plain")


def test_siglip_folders_read_their_preprocessor_config_too(tmp_path):
    from tests.vlm.tiny_blip import vision_folder

    folder = vision_folder(tmp_path / "siglip")
    pre = json.loads((folder / "preprocessor_config.json").read_text())  # written by save_vision_tower
    assert pre["image_mean"] == [0.5] * 3 and pre["image_processor_type"] == "SiglipImageProcessor"
    pre.update(image_mean=IMAGENET["mean"], image_std=IMAGENET["std"])
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    tower = load_vision_tower(folder)
    assert tower.image_std == tuple(IMAGENET["std"])
    pixels = torch.full((1, 3, 16, 16), 255, dtype=torch.uint8)
    got = tower_input(tower, pixels)[0, :, 0, 0]
    want = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET["mean"], IMAGENET["std"])])
    assert torch.allclose(got, want, atol=1e-6)


def test_bad_vit_folders_name_the_problem(tmp_path):
    _, folder = _hf_vit(tmp_path)
    state = read_safetensors(folder / "model.safetensors")
    state["decoder.weight"] = torch.zeros(2)
    del state["layernorm.bias"]
    state["encoder.layer.0.intermediate.dense.weight"] = torch.zeros(5, 32)
    save_safetensors(state, folder / "model.safetensors")
    with pytest.raises(CheckpointMismatchError) as err:
        load_vision_tower(folder)
    msg = str(err.value)
    assert "unexpected keys: decoder.weight" in msg
    assert msg.split("missing keys: ")[1].split(", ")[-1] == "layernorm.bias"  # named as the file spells it
    assert "encoder.layer.0.intermediate.dense.weight: file (5, 32) vs model (64, 32)" in msg
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_attention_heads": 5}))
    with pytest.raises(ConfigError, match="hidden_size=32 is not divisible by num_attention_heads=5"):
        read_vision_config(folder)
    (folder / "config.json").write_text(json.dumps({**config, "hidden_act": "swish_v9"}))
    with pytest.raises(ConfigError, match="hidden_act='swish_v9' is not supported"):
        read_vision_config(folder)
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "dinov2"}))
    with pytest.raises(ConfigError, match=r"model_type 'dinov2' .*accepted: 'siglip_vision_model', 'siglip', 'vit'"):
        load_vision_tower(folder)


@pytest.fixture(scope="module")
def vit_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("vit-blip")
    vit_folder(root / "vision", hidden_size=48, **IMAGENET)  # 48 wide: not the BERT's 32 nor SigLIP's
    bert_folder(root / "bert")
    return root


def test_stage1_trains_on_a_vit_folder(vit_assets, tmp_path):
    cfg = tiny_cfg(vit_assets, tmp_path / "r", steps=3, schedule="constant", warmup_steps=0)
    model, _, _ = build_aligner(cfg)
    assert model.qformer.config.encoder_hidden_size == 48 and model.image_size == 16
    pixels = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    manual = torch.stack([(pixels[:, c].float() / 255 - IMAGENET["mean"][c]) / IMAGENET["std"][c] for c in range(3)], 1)
    with torch.no_grad():
        feats = model.vision_features(pixels)
        assert feats.shape == (2, 17, 48)  # [CLS] + 16 patches, every token goes to the Q-Former
        assert torch.allclose(feats, model.vision(manual), atol=1e-5)
        assert not torch.allclose(feats, model.vision(pixels.float() / 127.5 - 1), atol=1e-3)  # not SigLIP's 0.5
    run = train(cfg)
    report = json.loads((run / "eval.json").read_text())
    assert report["n_images"] == 12 and all(0 <= report[k] <= 1 for k in ("i2t_r1", "i2t_r5", "t2i_r10"))
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logged if "loss" in r]
    assert len(losses) >= 3 and all(torch.isfinite(torch.tensor(losses)))
    saved = read_safetensors(latest_checkpoint(run) / "model.safetensors")
    assert not any(k.startswith("vision.") for k in saved)  # the frozen ViT stays out of checkpoints
    kv = [v for k, v in saved.items() if ".crossattention." in k and k.endswith("key.weight")]
    assert kv and all(v.shape[1] == 48 for v in kv)  # cross-attention reads the ViT's 48-wide features


def test_stage2_prefix_reads_the_vit_with_its_normalisation(vit_assets, tmp_path):
    pytest.importorskip("peft")
    from genlab.vlm.captioner import build_captioner
    from tests.vlm.test_captioner import tiny_config
    from tests.vlm.tiny_blip import lm_folder

    assets = {"vision": vit_assets / "vision", "bert": vit_assets / "bert", "lm": lm_folder(tmp_path / "lm")}
    torch.manual_seed(1)
    model, _, _ = build_captioner(tiny_config(assets, tmp_path / "run"))
    assert model.image_size == 16 and model.qformer.config.encoder_hidden_size == 48
    pixels = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    manual = torch.stack([(pixels[:, c].float() / 255 - IMAGENET["mean"][c]) / IMAGENET["std"][c] for c in range(3)], 1)
    with torch.no_grad():
        want = model.adapter(model.qformer.query_features(model.vision(manual)))  # (B, Q, H)
        got = model.prefix(pixels)
    assert got.shape == (2, 4, 64) and torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("text", ["[0.5, 0.5, 0.5]", '{"image_mean": [NaN, 0.5, 0.5]}'])
def test_a_preprocessor_config_that_is_not_an_object_or_not_finite_is_one_clear_error(tmp_path, text):
    from genlab.errors import ConfigError
    from genlab.vlm.vision_io import read_normalisation

    (tmp_path / "preprocessor_config.json").write_text(text)
    with pytest.raises(ConfigError, match="preprocessor_config.json"):
        read_normalisation(tmp_path)
