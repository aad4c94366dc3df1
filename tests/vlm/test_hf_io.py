"""Loading and saving Hugging Face PaliGemma folders: layouts, shards, strictness, config round trip."""

import json
import shutil

import pytest
import torch
import transformers as hf
from safetensors.torch import load_file, save_file

from genlab.vlm.hf_io import CheckpointMismatchError, load_paligemma, save_paligemma
from genlab.vlm.paligemma import PaliGemmaConfig
from tests.vlm.tiny_hf import hf_positions, make_batch, tiny_hf_paligemma

torch.set_num_threads(1)
TOL = 1e-5
BATCH = make_batch(pads=[0, 2], text_len=5, suffix_len=3)


def genlab_logits(model):
    ids, mask, types, pixels = BATCH
    with torch.no_grad():
        return model(ids, pixels, mask, types)


def hf_logits(ref):
    ids, mask, types, pixels = BATCH
    with torch.no_grad():
        return ref(input_ids=ids, pixel_values=pixels, attention_mask=mask, token_type_ids=types,
                   position_ids=hf_positions(mask)).logits


def close(a, b):
    return (a - b)[BATCH[1].bool()].abs().max() <= TOL


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A PaliGemma 2 with an untied head (so lm_head is a real key), saved by transformers."""
    ref = tiny_hf_paligemma(2, 2, tie=False, seed=1)
    folder = tmp_path_factory.mktemp("hf")
    ref.save_pretrained(folder)
    return ref, folder


def copy_with(folder, dst, edit):
    """Copy a single-file checkpoint to ``dst`` with its tensors passed through ``edit``."""
    shutil.copytree(folder, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    save_file(edit(tensors), str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize("tied", [False, True])
def test_save_then_transformers_loads_it(saved, tmp_path, tied):
    ref, folder = saved
    if tied:  # PaliGemma 1 with the usual tied head: no lm_head key is written
        ref, folder = tiny_hf_paligemma(1, 1, tie=True, seed=2), tmp_path / "tied"
        ref.save_pretrained(folder)
    model, cfg = load_paligemma(folder)
    save_paligemma(model, cfg, tmp_path / "out")
    back = hf.PaliGemmaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    assert close(hf_logits(back), hf_logits(ref))
    assert close(genlab_logits(load_paligemma(tmp_path / "out")[0]), hf_logits(ref))


@pytest.mark.parametrize("version", [1, 2])
def test_config_round_trips_through_transformers(version, tmp_path):
    ref = tiny_hf_paligemma(version, 2)
    ref.save_pretrained(tmp_path)
    model, cfg = load_paligemma(tmp_path)
    again = PaliGemmaConfig.from_hf_dict(hf.PaliGemmaConfig(**cfg.to_hf_dict()).to_dict())
    assert again == cfg


def test_transformers_sharded_checkpoint_loads(saved, tmp_path):
    ref, _ = saved
    ref.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert close(genlab_logits(load_paligemma(tmp_path)[0]), hf_logits(ref))


def test_genlab_sharded_save_loads_in_both(saved, tmp_path):
    ref, folder = saved
    model, cfg = load_paligemma(folder)
    save_paligemma(model, cfg, tmp_path, max_shard_bytes=60_000)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert close(genlab_logits(load_paligemma(tmp_path)[0]), hf_logits(ref))
    back = hf.PaliGemmaForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert close(hf_logits(back), hf_logits(ref))


def test_hub_and_in_memory_layouts_load(saved, tmp_path):
    """Hub checkpoints nest ``vision_tower.vision_model.``; transformers 5 modules sit under ``model.``."""
    ref, folder = saved

    def hub(t):
        return {k.replace("vision_tower.", "vision_tower.vision_model."): v for k, v in t.items()}

    def in_memory(t):
        out = {}
        for k, v in t.items():
            k = k.replace("language_model.model.", "model.language_model.").replace("language_model.lm_head.", "lm_head.")
            out[k if k.startswith(("model.", "lm_head.")) else "model." + k] = v
        return out

    for name, edit in (("hub", hub), ("mem", in_memory)):
        model, _ = load_paligemma(copy_with(folder, tmp_path / name, edit))
        assert close(genlab_logits(model), hf_logits(ref))


def test_missing_unexpected_and_misshapen_keys_are_named(saved, tmp_path):
    _, folder = saved
    key = "language_model.model.layers.1.self_attn.k_proj.weight"
    cases = {
        "missing": (lambda t: {k: v for k, v in t.items() if k != key}, key),
        "extra": (lambda t: {**t, "language_model.model.layers.9.mlp.up_proj.weight": torch.zeros(1)}, "layers.9.mlp.up_proj"),
        "stray": (lambda t: {**t, "optimizer.step": torch.zeros(1)}, "optimizer.step"),
        "shape": (lambda t: {**t, key: torch.zeros(3, 64)}, key),
    }
    for name, (edit, needle) in cases.items():
        with pytest.raises(CheckpointMismatchError, match=needle.replace(".", r"\.")):
            load_paligemma(copy_with(folder, tmp_path / name, edit))


def test_tied_head_may_be_absent_or_present(tmp_path):
    ref = tiny_hf_paligemma(1, 1, tie=True)
    ref.save_pretrained(tmp_path / "a")
    assert "language_model.lm_head.weight" not in load_file(str(tmp_path / "a" / "model.safetensors"))
    with_head = copy_with(tmp_path / "a", tmp_path / "b", lambda t: {
        **t, "language_model.lm_head.weight": t["language_model.model.embed_tokens.weight"].clone()})
    for sub in ("a", "b"):
        assert close(genlab_logits(load_paligemma(tmp_path / sub)[0]), hf_logits(ref))


def test_missing_folder_config_or_weights_say_what_to_put_where(saved, tmp_path):
    _, folder = saved
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_paligemma(tmp_path / "nowhere")
    (tmp_path / "noconfig").mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_paligemma(tmp_path / "noconfig")
    (tmp_path / "noweights").mkdir()
    shutil.copy(folder / "config.json", tmp_path / "noweights")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors.*noweights|noweights.*model\.safetensors"):
        load_paligemma(tmp_path / "noweights")


HUB_PG1 = {  # shape of google/paligemma-3b-pt-224's config.json: most fields left to defaults
    "architectures": ["PaliGemmaForConditionalGeneration"], "bos_token_id": 2, "eos_token_id": 1,
    "hidden_size": 2048, "ignore_index": -100, "image_token_index": 257152, "model_type": "paligemma",
    "pad_token_id": 0, "projection_dim": 2048,
    "text_config": {"hidden_size": 2048, "intermediate_size": 16384, "model_type": "gemma",
                    "num_attention_heads": 8, "num_hidden_layers": 18, "num_image_tokens": 256,
                    "num_key_value_heads": 1, "torch_dtype": "float32", "vocab_size": 257216},
    "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "model_type": "siglip_vision_model",
                      "num_attention_heads": 16, "num_hidden_layers": 27, "num_image_tokens": 256,
                      "patch_size": 14, "projection_dim": 2048, "projector_hidden_act": "gelu_fast",
                      "vision_use_head": False},
}
HUB_PG2 = {  # shape of google/paligemma2-3b-pt-224's config.json
    **HUB_PG1, "projection_dim": 2304,
    "text_config": {"hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304, "intermediate_size": 9216,
                    "model_type": "gemma2", "num_hidden_layers": 26, "num_image_tokens": 256,
                    "num_key_value_heads": 4, "query_pre_attn_scalar": 256, "sliding_window": 4096,
                    "vocab_size": 257216, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
                    "cache_implementation": "hybrid"},
    "vision_config": {**HUB_PG1["vision_config"], "projection_dim": 2304},
}


@pytest.mark.parametrize("raw", [HUB_PG1, HUB_PG2], ids=["pg1", "pg2"])
def test_hub_config_reads_like_transformers(raw):
    ours = PaliGemmaConfig.from_hf_dict(json.loads(json.dumps(raw)))
    theirs = hf.PaliGemmaConfig(**json.loads(json.dumps(raw)))
    t, v = theirs.text_config, theirs.vision_config
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings"):
        assert getattr(ours.text, name) == getattr(t, name), name
    assert ours.text.rope_theta == t.rope_parameters["rope_theta"]
    act = t.hidden_activation if t.model_type == "gemma2" else t.hidden_act
    assert ours.text.hidden_act == act
    if t.model_type == "gemma2":
        for name in ("query_pre_attn_scalar", "sliding_window", "final_logit_softcapping",
                     "attn_logit_softcapping", "layer_types"):
            assert getattr(ours.text, name) == getattr(t, name), name
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "image_size", "patch_size", "layer_norm_eps", "hidden_act"):
        assert getattr(ours.vision, name) == getattr(v, name), name
    assert (ours.image_token_id, ours.projection_dim, ours.num_image_tokens) == (257152, raw["projection_dim"], 256)


def test_bfloat16_load(saved):
    ref, folder = saved
    model, _ = load_paligemma(folder, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ids, mask, types, pixels = BATCH
    with torch.no_grad():
        got = model(ids, pixels.bfloat16(), mask, types).float()
    assert (got - hf_logits(ref))[mask.bool()].abs().max() < 0.1


def test_resave_replaces_old_shards_and_leaves_no_temporary_files(tmp_path):
    cfg = PaliGemmaConfig.from_hf_dict(tiny_hf_paligemma().config.to_dict())
    from genlab.vlm.paligemma import PaliGemma

    torch.manual_seed(0)
    a, b = PaliGemma(cfg), PaliGemma(cfg)
    save_paligemma(a, cfg, tmp_path, max_shard_bytes=50_000)  # sharded, with an index
    assert (tmp_path / "model.safetensors.index.json").is_file()
    save_paligemma(b, cfg, tmp_path)  # single file: the stale index and shards must go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded, _ = load_paligemma(tmp_path)
    for (k, v), w in zip(b.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(v, w), k
