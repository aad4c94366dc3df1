"""genlab's PaliGemma processor against transformers' PaliGemmaProcessor on the same tiny folders."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from genlab.data.tokenizers import make_tiny_sentencepiece, make_tiny_tokenizer
from genlab.vlm.processor import PaliGemmaProcessor

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()  # silences "you passed text and images without <image> tokens"

PROMPTS = ["what color is the cube?", "caption en", "answer en how  many spheres are there? é", ""]
SUFFIXES = ["red", "a small green cylinder sits behind the cube.", "two", "detect <loc0001><loc0002> cube"]


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (20 + 7 * i, 45 - 5 * i, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tiny-tok"), vocab_size=300, num_loc_tokens=4)


@pytest.fixture(scope="module")
def ours(tiny_folder):
    return PaliGemmaProcessor.from_pretrained(tiny_folder)


@pytest.fixture(scope="module")
def theirs(tiny_folder):
    return transformers.PaliGemmaProcessor.from_pretrained(str(tiny_folder))


def _hf(proc, images, prompts, suffixes=None):
    proc.tokenizer.padding_side = "left"
    return proc(images=images, text=prompts, suffix=suffixes, padding="longest", return_tensors="pt")


def _assert_same(a: dict, b, keys=("input_ids", "attention_mask", "token_type_ids")):
    for key in keys:
        assert torch.equal(a[key], b[key].to(a[key].dtype)), key
    torch.testing.assert_close(a["pixel_values"], b["pixel_values"], atol=1e-6, rtol=0)


def test_tiny_tokenizer_ids_match_the_model_tests(ours, theirs):
    assert (ours.pad_token_id, ours.eos_token_id, ours.bos_token_id, ours.image_token_id) == (0, 1, 2, 299)
    assert theirs.image_token_id == 299 and theirs.tokenizer.bos_token_id == 2 and theirs.tokenizer.eos_token_id == 1
    assert len(ours) == 300 and ours.image_size == 32 and ours.num_image_tokens == 16


def test_single_prompt_matches_transformers(ours, theirs):
    image = _images(1)[0]
    a, b = ours(image, PROMPTS[0]), _hf(theirs, image, PROMPTS[0])
    _assert_same(a, b)
    ids = a["input_ids"][0].tolist()
    n = ours.num_image_tokens
    assert ids[:n] == [299] * n and ids[n] == 2  # <image> x N, then <bos>
    assert a["pixel_values"].shape == (1, 3, 32, 32) and a["pixel_values"].dtype == torch.float32
    assert "labels" not in a


def test_batch_of_different_lengths_is_left_padded_like_transformers(ours, theirs):
    images = _images(len(PROMPTS))
    a, b = ours(images, PROMPTS), _hf(theirs, images, PROMPTS)
    _assert_same(a, b)
    lengths = a["attention_mask"].sum(1)
    assert lengths.unique().numel() > 1  # the batch really needed padding
    for row, mask in zip(a["input_ids"], a["attention_mask"]):
        pad = int((mask == 0).sum())
        assert mask[:pad].eq(0).all() and mask[pad:].eq(1).all()  # padding on the left only
        assert row[:pad].eq(ours.pad_token_id).all() and row[pad] == ours.image_token_id


def test_suffix_gives_transformers_labels_and_token_types(ours, theirs):
    images = _images(len(PROMPTS), seed=1)
    a, b = ours(images, PROMPTS, SUFFIXES), _hf(theirs, images, PROMPTS, SUFFIXES)
    _assert_same(a, b, keys=("input_ids", "attention_mask", "token_type_ids", "labels"))
    for row, labels, types in zip(a["input_ids"], a["labels"], a["token_type_ids"]):
        target = row[types == 1]
        assert target[-1] == ours.eos_token_id  # every suffix ends with <eos>
        assert torch.equal(labels[labels != -100], target)


def test_pixel_values_match_for_every_image_kind(ours, theirs):
    rng = np.random.default_rng(2)
    rgba = Image.fromarray(rng.integers(0, 256, (33, 17, 4), dtype=np.uint8), "RGBA")
    gray = Image.fromarray(rng.integers(0, 256, (64, 48), dtype=np.uint8), "L")
    big = Image.fromarray(rng.integers(0, 256, (96, 80, 3), dtype=np.uint8))  # downscale, not only upscale
    arr = rng.integers(0, 256, (21, 30, 3), dtype=np.uint8)
    arr_rgba = rng.integers(0, 256, (21, 30, 4), dtype=np.uint8)
    images = [rgba, gray, big, arr, arr_rgba]
    ref = theirs.image_processor(images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours.image_transform(images), ref, atol=1e-6, rtol=0)
    stacked = np.stack([arr, arr[::-1]])  # a (B, H, W, C) array is a batch of B images
    ref = theirs.image_processor(list(stacked), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours(stacked, ["a", "b"])["pixel_values"], ref, atol=1e-6, rtol=0)
    # the HF processor builds these numbers with its own steps; spot-check one against the formula
    x = np.asarray(big.resize((32, 32), Image.Resampling.BICUBIC), np.float32) / 255
    np.testing.assert_allclose(ours.image_transform([big])[0].numpy(), (x.transpose(2, 0, 1) - 0.5) / 0.5, atol=1e-6)


def test_decode_round_trip_and_transformers_decode(ours, theirs):
    enc = ours(_images(2), PROMPTS[:2], SUFFIXES[:2])
    assert ours.decode(enc["labels"][1]) == SUFFIXES[1]  # -100 dropped, <eos> skipped
    texts = ours.batch_decode(enc["input_ids"])
    assert texts == [p + "\n" + s for p, s in zip(PROMPTS[:2], SUFFIXES[:2])]
    assert texts == theirs.batch_decode(enc["input_ids"], skip_special_tokens=True)
    for keep in (False, True):
        ids = enc["input_ids"][0]
        assert ours.decode(ids, skip_special_tokens=not keep) == theirs.decode(ids, skip_special_tokens=not keep)
    loc_ids = ours(_images(1), "detect", "<loc0001><loc0003> cube")["input_ids"][0]
    assert ours.decode(loc_ids).endswith("<loc0001><loc0003> cube")  # loc tokens are text, not special


def test_sentencepiece_fallback_matches_transformers(tmp_path):
    folder = make_tiny_sentencepiece(tmp_path / "sp", vocab_size=120)
    assert not (folder / "tokenizer.json").exists()
    ours = PaliGemmaProcessor.from_pretrained(folder)
    theirs = transformers.PaliGemmaProcessor.from_pretrained(str(folder))
    assert ours.image_token_id == theirs.image_token_id == 5
    prompts, suffixes = PROMPTS[:3], SUFFIXES[:3]
    images = _images(3, seed=3)
    a, b = ours(images, prompts, suffixes), _hf(theirs, images, prompts, suffixes)
    _assert_same(a, b, keys=("input_ids", "attention_mask", "token_type_ids", "labels"))
    assert ours.batch_decode(a["labels"]) == suffixes
    for skip in (True, False):
        assert ours.batch_decode(a["input_ids"], skip) == theirs.batch_decode(a["input_ids"], skip_special_tokens=skip)


def test_sizes_from_arguments_and_config_json(tiny_folder, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_folder, folder)
    assert PaliGemmaProcessor.from_pretrained(folder, image_size=48, num_image_tokens=9).image_size == 48
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(ValueError, match="image_size"):
        PaliGemmaProcessor.from_pretrained(folder)
    config = {"image_token_index": 299, "vision_config": {"image_size": 64, "patch_size": 16}, "text_config": {}}
    (folder / "config.json").write_text(json.dumps(config))
    proc = PaliGemmaProcessor.from_pretrained(folder)
    assert (proc.image_size, proc.num_image_tokens) == (64, 16)
    config["image_token_index"] = 7  # disagrees with the tokenizer's <image> id
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="image_token_index=7"):
        PaliGemmaProcessor.from_pretrained(folder)


def test_clear_errors(tiny_folder, tmp_path, ours):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere.*tokenizer.json"):
        PaliGemmaProcessor.from_pretrained(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer.json.*tokenizer.model"):
        PaliGemmaProcessor.from_pretrained(empty)
    with pytest.raises(ValueError, match="<image>"):
        ours(_images(1), "<image> what is this?")
    with pytest.raises(ValueError, match="2 images for 1 prompts"):
        ours(_images(2), "caption en")
    with pytest.raises(TypeError, match="uint8"):
        ours(np.zeros((8, 8, 3), np.float32), "caption en")


def test_newline_is_tokenized_together_with_the_prompt(tmp_path):
    # Gemma never merges "\n" with its neighbours, but a tokenizer may: with "?\n" frequent in the corpus,
    # BPE learns such a merge, and we must still produce transformers' ids (prompt + "\n" as one string).
    corpus = ["what is it?\nred", "where is it?\nleft", "is it big?\nyes"] * 10
    folder = make_tiny_tokenizer(tmp_path / "nl", vocab_size=300, corpus=corpus)
    ours = PaliGemmaProcessor.from_pretrained(folder)
    theirs = transformers.PaliGemmaProcessor.from_pretrained(str(folder))
    images, prompts = _images(2), ["what is it?", "is it big?"]
    a = ours(images, prompts, ["red", "yes"])
    _assert_same(a, _hf(theirs, images, prompts, ["red", "yes"]), keys=("input_ids", "token_type_ids", "labels"))
    # ...and that merge really is used, so the parity above tells "prompt + \n" from "prompt, then \n".
    tok, n = ours.tokenizer, ours.num_image_tokens + 1
    assert ours.prefix_ids("is it big?")[n:] != tok.encode("is it big?") + tok.encode("\n")
