"""Damaged Hugging Face PaliGemma folders: every case is a GenlabError that names the damaged file.

A tiny genlab folder (weights + tokenizer files) is written once; each case copies it, damages one
file and checks (1) the Python loader raises a GenlabError (not a KeyError, JSONDecodeError,
SafetensorError ...) whose message names the file, and (2) ``genlab vlm generate`` on it exits 2
with a single ``genlab: error: ...`` line.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from genlab.cli import main
from genlab.data.tokenizers import make_tiny_sentencepiece, make_tiny_tokenizer
from genlab.errors import ConfigError, FileFormatError, GenlabError
from genlab.vlm.gemma import GemmaConfig
from genlab.vlm.hf_io import CheckpointMismatchError, load_paligemma, read_config, save_paligemma
from genlab.vlm.paligemma import PaliGemma, PaliGemmaConfig
from genlab.vlm.processor import PaliGemmaProcessor
from genlab.vlm.siglip import SiglipConfig

torch.set_num_threads(1)


def tiny_config(vocab_size: int = 300, max_position_embeddings: int = 8192) -> PaliGemmaConfig:
    """PaliGemma 1 with one-layer 64-wide towers; 32-pixel images, 16 image tokens, <image> = 299."""
    vision = SiglipConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                          image_size=32, patch_size=8)
    text = GemmaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                       max_position_embeddings=max_position_embeddings)
    return PaliGemmaConfig(vision=vision, text=text, image_token_id=299)


def make_tiny_folder(folder: Path, max_shard_bytes: int | None = None, seed: int = 0, **config_kw) -> Path:
    """A complete folder `genlab vlm generate` reads: random weights, tiny tokenizer, processor files."""
    make_tiny_tokenizer(folder, vocab_size=300, image_size=32, num_image_tokens=16)
    cfg = tiny_config(**config_kw)
    torch.manual_seed(seed)
    model = PaliGemma(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    save_paligemma(model, cfg, folder, max_shard_bytes=max_shard_bytes)
    return folder


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    folder = make_tiny_folder(tmp_path_factory.mktemp("good"))
    Image.new("RGB", (32, 32), (200, 30, 30)).save(folder / "img.png")
    return folder


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    folder = make_tiny_folder(tmp_path_factory.mktemp("sharded"), max_shard_bytes=60_000)
    assert SHARD in [p.name for p in folder.glob("model-*.safetensors")]  # one of several
    return folder


# ----------------------------------------------------------------------------- damage helpers

def truncate(name: str, keep: float):
    def damage(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: int(len(data) * keep)])
    return damage


def write(name: str, text: str):
    def damage(folder: Path) -> None:
        (folder / name).write_text(text)
    return damage


def edit_json(name: str, edit):
    def damage(folder: Path) -> None:
        d = json.loads((folder / name).read_text())
        edit(d)
        (folder / name).write_text(json.dumps(d))
    return damage


def edit_tensors(edit):
    def damage(folder: Path) -> None:
        path = folder / "model.safetensors"
        save_file(edit(load_file(str(path))), str(path))
    return damage


def both(*damages):
    def damage(folder: Path) -> None:
        for d in damages:
            d(folder)
    return damage


def text_cfg(**kw):
    return edit_json("config.json", lambda d: d["text_config"].update(kw))


def vision_cfg(**kw):
    return edit_json("config.json", lambda d: d["vision_config"].update(kw))


SHARD = "model-00002-of-00009.safetensors"  # the second of the sharded folder's files
Q = "language_model.model.layers.0.self_attn.q_proj.weight"
O = "language_model.model.layers.0.self_attn.o_proj.weight"

# name: (damage, exception type, text the message must contain besides the file name, file name)
MODEL_CASES = {
    # config.json (V03)
    "config_truncated": (truncate("config.json", 0.5), ConfigError, "not valid JSON", "config.json"),
    "config_empty": (write("config.json", ""), ConfigError, "not valid JSON", "config.json"),
    "config_list": (write("config.json", "[1, 2]"), ConfigError, "expected a JSON dict", "config.json"),
    "config_model_type": (edit_json("config.json", lambda d: d.update(model_type="llava")), ConfigError,
                          "'llava' is not 'paligemma'", "config.json"),
    "config_no_text": (edit_json("config.json", lambda d: d.pop("text_config")), ConfigError,
                       "text_config is missing", "config.json"),
    "config_text_str": (edit_json("config.json", lambda d: d.update(text_config="gemma")), ConfigError,
                        "text_config is not a mapping", "config.json"),
    "config_no_vision": (edit_json("config.json", lambda d: d.pop("vision_config")), ConfigError,
                         "vision_config is missing", "config.json"),
    "config_str_size": (text_cfg(hidden_size="64"), ConfigError, "hidden_size must be an integer, got '64'",
                        "config.json"),
    "config_float_layers": (text_cfg(num_hidden_layers=1.5), ConfigError, "num_hidden_layers must be an integer",
                            "config.json"),
    "config_rope_str": (text_cfg(rope_parameters="big"), ConfigError, "rope_parameters must be a mapping",
                        "config.json"),
    "config_vision_list": (vision_cfg(image_size=[32, 16]), ConfigError, "non-square image_size", "config.json"),
    "config_heads": (vision_cfg(num_attention_heads=5), ConfigError,
                     "hidden_size=64 is not divisible by num_attention_heads=5", "config.json"),
    "config_patch0": (vision_cfg(patch_size=0), ConfigError, "patch_size must be >= 1, got 0", "config.json"),
    "config_image30": (vision_cfg(image_size=30), ConfigError, "image_size=30 is not a multiple of patch_size=8",
                       "config.json"),
    "config_kv_heads": (text_cfg(num_key_value_heads=3), ConfigError,
                        "num_attention_heads=4 is not a multiple of num_key_value_heads=3", "config.json"),
    "config_small_vocab": (text_cfg(vocab_size=2), ConfigError, "bos_token_id=2 does not fit in vocab_size=2",
                           "config.json"),
    "config_activation": (text_cfg(hidden_act="swish_me"), ConfigError, "swish_me", "config.json"),
    # weights (V04, V05)
    "weights_truncated": (truncate("model.safetensors", 0.5), FileFormatError, "not a readable safetensors",
                          "model.safetensors"),
    "weights_empty": (write("model.safetensors", ""), FileFormatError, "not a readable safetensors",
                      "model.safetensors"),
    "weights_foreign": (write("model.safetensors", "this is not a tensor file, it is text"), FileFormatError,
                        "not a readable safetensors", "model.safetensors"),
    # weights that disagree with config.json (V06, V07, V08, V14)
    "shape": (edit_tensors(lambda t: {**t, Q: torch.zeros(65, 64)}), CheckpointMismatchError,
              "file (65, 64) vs model (64, 64)", Q),
    "missing_key": (edit_tensors(lambda t: {k: v for k, v in t.items() if k != O}), CheckpointMismatchError,
                    "missing parameters", O),
    "extra_key": (edit_tensors(lambda t: {**t, "foo.bar.weight": torch.zeros(1)}), CheckpointMismatchError,
                  "keys no rule maps", "foo.bar.weight"),
    "wrong_vocab": (text_cfg(vocab_size=999), CheckpointMismatchError, "vs model (999, 64)", "embed_tokens"),
}

INDEX_CASES = {  # on the sharded folder
    "index_truncated": (truncate("model.safetensors.index.json", 0.5), "not valid JSON"),
    "index_no_weight_map": (edit_json("model.safetensors.index.json", lambda d: d.pop("weight_map")),
                            'no "weight_map"'),
    "index_weight_map_list": (edit_json("model.safetensors.index.json", lambda d: d.update(weight_map=[1])),
                              "non-mapping (list)"),
    "index_shard_outside": (edit_json("model.safetensors.index.json",
                                      lambda d: d["weight_map"].update({Q: "../elsewhere.safetensors"})),
                            "'../elsewhere.safetensors'"),
    "index_shard_missing": (lambda f: (f / SHARD).unlink(), f"lists shard {SHARD}, which is missing"),
    "shard_truncated": (truncate(SHARD, 0.3), "not a readable safetensors file"),
}

# damaged tokenizer / processor files: PaliGemmaProcessor.from_pretrained
PROCESSOR_CASES = {
    "tokenizer_truncated": (truncate("tokenizer.json", 1 / 3), "tokenizer.json", "not a readable tokenizer.json"),
    "tokenizer_empty": (write("tokenizer.json", ""), "tokenizer.json", "not a readable tokenizer.json"),
    "tokenizer_config_bad": (truncate("tokenizer_config.json", 0.5), "tokenizer_config.json", "not valid JSON"),
    "tokenizer_config_token_type": (edit_json("tokenizer_config.json", lambda d: d.update(bos_token=5)),
                                    "tokenizer_config.json", "bos_token must be a token string"),
    "tokenizer_config_unknown_token": (edit_json("tokenizer_config.json", lambda d: d.update(eos_token="<nope>")),
                                       "tokenizer_config.json", "names the eos token '<nope>', which the tokenizer"),
    "special_map_bad": (write("special_tokens_map.json", "{"), "special_tokens_map.json", "not valid JSON"),
    "preprocessor_bad": (truncate("preprocessor_config.json", 0.5), "preprocessor_config.json", "not valid JSON"),
    "preprocessor_size_type": (edit_json("preprocessor_config.json", lambda d: d.update(size=32)),
                               "preprocessor_config.json", "size must be a mapping"),
    "preprocessor_seq_type": (edit_json("preprocessor_config.json", lambda d: d.update(image_seq_length="16")),
                              "preprocessor_config.json", "image_seq_length must be an integer >= 1"),
    "preprocessor_std_zero": (edit_json("preprocessor_config.json", lambda d: d.update(image_std=[0.5, 0, 0.5])),
                              "preprocessor_config.json", "image_std must be > 0"),
    "preprocessor_resample": (edit_json("preprocessor_config.json", lambda d: d.update(resample=42)),
                              "preprocessor_config.json", "resample=42"),
    "sentencepiece_garbage": (both(lambda f: (f / "tokenizer.json").unlink(),
                                   write("tokenizer.model", "garbage, not a sentencepiece model")),
                              "tokenizer.model", "not a readable sentencepiece"),
}


def damaged(src: Path, tmp_path: Path, damage) -> Path:
    folder = tmp_path / "damaged"
    shutil.copytree(src, folder)
    damage(folder)
    return folder


def assert_one_error_line(folder: Path, image: Path, needle: str, capsys) -> None:
    capsys.readouterr()
    rc = main(["vlm", "generate", "--model", str(folder), "--image", str(image), "--max-new-tokens", "2",
               "--device", "cpu"])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert rc == 2 and captured.out == ""
    assert len(lines) == 1 and lines[0].startswith("genlab: error: ") and needle in lines[0], captured.err


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_damaged_model_files_name_the_file(good, tmp_path, case, capsys):
    damage, kind, text, name = MODEL_CASES[case]
    folder = damaged(good, tmp_path, damage)
    with pytest.raises(kind) as info:
        load_paligemma(folder)
    assert isinstance(info.value, GenlabError) and not isinstance(info.value, KeyError)
    message = str(info.value)
    assert text in message and name in message, message
    if kind is not CheckpointMismatchError:  # mismatches name the folder and the keys, the rest the file
        assert str(folder / name) in message, message
    assert_one_error_line(folder, good / "img.png", text, capsys)


@pytest.mark.parametrize("case", list(INDEX_CASES))
def test_damaged_index_and_shards_name_the_file(sharded, good, tmp_path, case, capsys):
    damage, text = INDEX_CASES[case]
    folder = damaged(sharded, tmp_path, damage)
    with pytest.raises(FileFormatError) as info:
        load_paligemma(folder)
    message = str(info.value)
    assert text in message, message
    named = folder / (SHARD if case == "shard_truncated" else "model.safetensors.index.json")
    assert str(named) in message, message
    assert_one_error_line(folder, good / "img.png", text, capsys)


@pytest.mark.parametrize("case", list(PROCESSOR_CASES))
def test_damaged_processor_files_name_the_file(good, tmp_path, case, capsys):
    damage, name, text = PROCESSOR_CASES[case]
    folder = damaged(good, tmp_path, damage)
    with pytest.raises(FileFormatError) as info:
        PaliGemmaProcessor.from_pretrained(folder)
    message = str(info.value)
    assert str(folder / name) in message and text in message, message
    assert_one_error_line(folder, good / "img.png", text, capsys)


def test_a_genuine_sentencepiece_folder_still_loads(tmp_path):
    proc = PaliGemmaProcessor.from_pretrained(make_tiny_sentencepiece(tmp_path))
    assert proc.image_token_id == 5 and proc.eos_token_id == 1


def test_a_file_or_a_run_folder_as_model(good, tmp_path, capsys):
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        load_paligemma(good / "config.json")
    run = tmp_path / "run"
    shutil.copytree(good, run / "hf")
    with pytest.raises(FileNotFoundError, match=f"did you mean {run / 'hf'}"):
        load_paligemma(run)
    assert_one_error_line(good / "img.png", good / "img.png", "is a file, not a folder", capsys)
    assert_one_error_line(run, good / "img.png", f"did you mean {run / 'hf'}", capsys)


def test_checkpoint_mismatch_is_a_genlab_error_not_a_key_error():
    assert issubclass(CheckpointMismatchError, GenlabError) and not issubclass(CheckpointMismatchError, KeyError)
    assert str(CheckpointMismatchError("a: b")) == "a: b"  # no KeyError quotes


# ----------------------------------------------------------------------------- config validation (T12)

def check(cfg, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    assert str(info.value) == message


def test_the_tiny_and_the_default_configs_are_valid():
    assert tiny_config().validate() == tiny_config()
    PaliGemmaConfig().validate()


@pytest.mark.parametrize("field, value, message", [
    ("num_attention_heads", 5, "hidden_size=64 is not divisible by num_attention_heads=5"),
    ("patch_size", 0, "patch_size must be >= 1, got 0"),
    ("patch_size", -8, "patch_size must be >= 1, got -8"),
    ("image_size", 30, "image_size=30 is not a multiple of patch_size=8"),
    ("image_size", 0, "image_size must be >= 1, got 0"),
    ("hidden_size", 0, "hidden_size must be >= 1, got 0"),
    ("intermediate_size", 0, "intermediate_size must be >= 1, got 0"),
    ("num_hidden_layers", 0, "num_hidden_layers must be >= 1, got 0"),
    ("num_channels", 0, "num_channels must be >= 1, got 0"),
    ("hidden_size", 64.0, "hidden_size must be an integer, got 64.0"),
    ("num_attention_heads", True, "num_attention_heads must be an integer, got True"),
    ("layer_norm_eps", 0.0, "layer_norm_eps must be a number > 0, got 0.0"),
])
def test_siglip_config_rules(field, value, message):
    cfg = tiny_config().vision
    setattr(cfg, field, value)
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    assert str(info.value).startswith(f"vision_config: {message}"), str(info.value)
    with pytest.raises(ConfigError, match="^vision_config: "):
        PaliGemmaConfig(vision=cfg, text=tiny_config().text).validate()
    with pytest.raises(ConfigError, match="^--vision: "):
        cfg.validate("--vision")


@pytest.mark.parametrize("field, value, message", [
    ("num_key_value_heads", 3, "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    ("num_key_value_heads", 0, "num_key_value_heads must be >= 1, got 0"),
    ("num_attention_heads", 0, "num_attention_heads must be >= 1, got 0"),
    ("vocab_size", 0, "vocab_size must be >= 1, got 0"),
    ("vocab_size", 2, "bos_token_id=2 does not fit in vocab_size=2 (ids run 0..1)"),
    ("eos_token_id", [1, 300], "eos_token_id=[1, 300] does not fit in vocab_size=300 (ids run 0..299)"),
    ("pad_token_id", -1, "pad_token_id must be a token id (an integer >= 0), got -1"),
    ("head_dim", 0, "head_dim must be >= 1, got 0"),
    ("hidden_size", 0, "hidden_size must be >= 1, got 0"),
    ("intermediate_size", -1, "intermediate_size must be >= 1, got -1"),
    ("num_hidden_layers", 0, "num_hidden_layers must be >= 1, got 0"),
    ("max_position_embeddings", 0, "max_position_embeddings must be >= 1, got 0"),
    ("rms_norm_eps", -1e-6, "rms_norm_eps must be a number > 0, got -1e-06"),
    ("rope_theta", 0.0, "rope_theta must be a number > 0, got 0.0"),
    ("sliding_window", 0, "sliding_window must be an integer >= 1 or null, got 0"),
    ("final_logit_softcapping", -3.0, "final_logit_softcapping must be a number > 0 or null, got -3.0"),
    ("layer_types", ["full_attention", "full_attention"], "layer_types must list one of"),
    ("hidden_size", "64", "hidden_size must be an integer, got '64'"),
])
def test_gemma_config_rules(field, value, message):
    cfg = tiny_config().text
    setattr(cfg, field, value)
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    assert str(info.value).startswith(f"text_config: {message}"), str(info.value)


def test_paligemma_config_rules():
    cfg = tiny_config()
    cfg.image_token_id = -1
    check(cfg, "image_token_index must be a token id (an integer >= 0), got -1")
    with pytest.raises(ConfigError, match="projection_dim=32 must equal text_config.hidden_size=64"):
        PaliGemmaConfig(vision=tiny_config().vision, text=tiny_config().text, projection_dim=32)


def test_read_config_validates_what_it_reads(good, tmp_path):
    assert read_config(good) == tiny_config()
    folder = damaged(good, tmp_path, vision_cfg(hidden_size=96, num_attention_heads=5))
    with pytest.raises(ConfigError) as info:
        read_config(folder)
    assert str(info.value) == (f"{folder / 'config.json'}: vision_config: hidden_size=96 is not divisible by "
                               f"num_attention_heads=5 (each head gets hidden_size / num_attention_heads channels; "
                               f"transformers refuses such a config)")


def test_transformers_refuses_what_validate_refuses():
    """The SigLIP head rule is transformers' own: its attention refuses the config validate rejects."""
    hf = pytest.importorskip("transformers")
    cfg = hf.SiglipVisionConfig(hidden_size=96, num_attention_heads=5, intermediate_size=32, num_hidden_layers=1,
                                image_size=32, patch_size=8)
    with pytest.raises(ValueError, match="divisible"):
        hf.SiglipVisionModel(cfg)
    ours = SiglipConfig(hidden_size=96, num_attention_heads=5)
    with pytest.raises(ConfigError, match="not divisible"):
        ours.validate()


def test_saved_folders_have_the_users_umask(good):
    """Finding 10: weights are written like every other file (0644 under umask 022), not owner-only."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.safetensors", "config.json"):
        assert (good / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    assert not list(good.glob("*.tmp")) and not list(good.glob(".*.tmp"))


def test_images_of_the_good_folder_still_generate(good, capsys):
    assert main(["vlm", "generate", "--model", str(good), "--image", str(good / "img.png"),
                 "--max-new-tokens", "3", "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith(f"{good / 'img.png'} | caption en | ")
    np.testing.assert_equal(np.asarray(Image.open(good / "img.png"))[0, 0], [200, 30, 30])
