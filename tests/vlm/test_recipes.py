"""The shapes PaliGemma recipe: batches, the shifted loss, and a tiny end-to-end run with its HF export."""

import io
import json
import re
from dataclasses import replace

import pytest
import torch

from genlab.config import load_config
from genlab.train.engine import TrainConfig
from genlab.vlm.hf_io import load_paligemma
from genlab.vlm.paligemma import PaliGemma
from genlab.vlm.processor import PaliGemmaProcessor
from genlab.vlm.siglip import SiglipConfig
from genlab.vlm.gemma import GemmaConfig
from genlab.vlm.recipes import (
    ShapesBatchSource,
    ShapesPaliGemmaConfig,
    VLMEval,
    answer,
    build_tokenizer,
    init_weights,
    model_config,
    suffix_loss,
    train,
    with_tokenizer,
)

torch.set_num_threads(1)


def tiny_cfg(tmp_path, task="caption", steps=3) -> ShapesPaliGemmaConfig:
    return ShapesPaliGemmaConfig(
        run_dir=str(tmp_path / task), task=task,
        vision=SiglipConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                            image_size=16, patch_size=8),
        text=GemmaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, max_position_embeddings=1024),
        eval=VLMEval(n=12, batch_size=6, max_new_tokens=6, grid=4),
        train=TrainConfig(steps=steps, batch_size=8, lr=1e-3, ema_decay=0.0, checkpoint_every=0, log_every=1,
                          progress=False, device="cpu", threads=1),
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = tiny_cfg(tmp_path_factory.mktemp("src"), task="vqa")
    processor = build_tokenizer(cfg, tmp_path_factory.mktemp("tok"))
    return cfg, processor


def test_every_word_of_the_world_is_one_token(setup):
    """Captions and questions cost one token per word (punctuation at most one more); answers one token."""
    import numpy as np

    from genlab.data.shapes import COLORS, MATERIALS, SHAPES, SIZES, text_corpus, vocabulary

    _, processor = setup
    encode = processor.tokenizer.encode
    # scenes of up to 10 objects: the tokenizer was trained on scenes of 1-3, and must still know every text
    for text in text_corpus(np.random.default_rng(5), 100, min_objects=1, max_objects=10):
        punctuation = text.count("?") + text.count(",") + text.count(":")
        assert len(encode(text)) <= len(text.split()) + punctuation, text
    words = vocabulary()
    assert {*COLORS, *SHAPES, *SIZES, *MATERIALS, "yes", "no", "10", "behind", "cylinders"} <= set(words)
    for word in words:
        assert len(encode(word)) == 1, word  # alone, as an answer is
        assert len(encode("a " + word)) == len(encode("a")) + 1, word  # and inside a sentence
    assert encode("caption en\n") == encode("caption en") + encode("\n") and len(encode("caption en")) == 2


@pytest.mark.parametrize("task", ["caption", "vqa"])
def test_labels_are_the_answer_and_eos_only(setup, task):
    cfg, processor = setup
    cfg = replace(cfg, task=task)
    images, prompts, answers, _ = ShapesBatchSource(processor, cfg, seed=4).examples(6)
    batch = ShapesBatchSource(processor, cfg, seed=4).next_batch(6)
    labels, ids = batch["labels"], batch["input_ids"]
    for b in range(6):
        scored = labels[b] != -100
        want = processor.tokenizer.encode(answers[b]) + [processor.eos_token_id]
        assert labels[b][scored].tolist() == want  # exactly the answer's tokens, then <eos>
        assert scored.sum() == len(want) and scored[-len(want):].all()  # ... at the end of the row
        assert torch.equal(labels[b][scored], ids[b][scored])
        assert prompts[b] == "caption en" if task == "caption" else prompts[b].startswith("answer en ")
    assert batch["pixel_values"].shape == (6, 3, 16, 16)


def test_vqa_asks_only_the_chosen_kinds(setup):
    from genlab.data.questions import ATTRIBUTES

    cfg, processor = setup
    cfg = replace(cfg, data=replace(cfg.data, question_kinds=("query_attribute",), max_objects=3))
    _, prompts, answers, kinds = ShapesBatchSource(processor, cfg, seed=0).examples(30)
    assert set(kinds) == {"query_attribute"} and set(answers) <= {w for v in ATTRIBUTES.values() for w in v}
    assert all(re.fullmatch(r"answer en what (color|shape|size|material) is the [a-z ]+\?", p) for p in prompts)
    cfg = replace(cfg, data=replace(cfg.data, question_kinds=("exist", "compare_integer")))
    _, prompts, answers, kinds = ShapesBatchSource(processor, cfg, seed=0).examples(30)
    assert set(kinds) == {"exist", "compare_integer"} and set(answers) == {"yes", "no"}


def test_batch_source_state_round_trip(setup):
    cfg, processor = setup
    a = ShapesBatchSource(processor, cfg, seed=1)
    a.next_batch(5)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)  # the engine stores it with torch.save and reads it weights-only
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    want = a.next_batch(7)
    b = ShapesBatchSource(processor, cfg, seed=99)
    b.load_state_dict(state)
    got = b.next_batch(7)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert not torch.equal(ShapesBatchSource(processor, cfg, seed=99).next_batch(7)["pixel_values"],
                           got["pixel_values"])


def test_loss_is_next_token_cross_entropy_on_the_answer(setup):
    cfg, processor = setup
    torch.manual_seed(0)
    model = PaliGemma(model_config(cfg, processor))
    init_weights(model, 0.5)  # large weights: wrong alignments give clearly different numbers
    batch = ShapesBatchSource(processor, cfg, seed=2).next_batch(4)
    loss, metrics = suffix_loss(model, batch)
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], batch["token_type_ids"])
    terms, unshifted = [], []
    for b in range(4):
        for t in range(1, logits.shape[1]):
            y = int(batch["labels"][b, t])
            if y != -100:  # the token at t is predicted by the logits at t - 1
                terms.append(-torch.log_softmax(logits[b, t - 1].double(), -1)[y])
                unshifted.append(-torch.log_softmax(logits[b, t].double(), -1)[y])
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
    assert abs(loss.item() - torch.stack(unshifted).mean().item()) > 0.1
    hits = [int(logits[b, t - 1].argmax()) == int(batch["labels"][b, t])
            for b in range(4) for t in range(1, logits.shape[1]) if int(batch["labels"][b, t]) != -100]
    assert metrics["token_acc"].item() == pytest.approx(sum(hits) / len(hits))
    loss.backward()
    assert model.vision_tower.embeddings.patch_embedding.weight.grad.abs().sum() > 0  # the image is used


def test_init_weights_keeps_the_first_logits_small(setup):
    cfg, processor = setup
    model = PaliGemma(model_config(cfg, processor))
    init_weights(model, 0.02)
    loss, _ = suffix_loss(model, ShapesBatchSource(processor, cfg, seed=3).next_batch(4))
    assert loss.item() == pytest.approx(torch.log(torch.tensor(float(len(processor)))).item(), rel=0.05)
    assert model.language_model.embed_tokens.weight[processor.pad_token_id].abs().sum() == 0


@pytest.mark.parametrize("task", ["caption", "vqa"])
def test_tiny_run_exports_a_working_hf_folder(tmp_path, task):
    cfg = tiny_cfg(tmp_path, task)
    run = train(cfg)
    for name in ("config.yaml", "metrics.jsonl", "eval.json", "examples.png", "loss.png"):
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    report = json.loads((run / "eval.json").read_text())
    assert report["n"] == 12 and report["task"] == task and report["weights"] == "trained"
    assert sum(v["n"] for v in report["by_kind"].values()) == 12

    model, mcfg = load_paligemma(run / "hf")
    processor = PaliGemmaProcessor.from_pretrained(run / "hf")
    assert mcfg.text.vocab_size == len(processor) and mcfg.num_image_tokens == processor.num_image_tokens == 4
    # the exported weights answer exactly as the model that was evaluated in the run
    images, prompts, truths, _ = ShapesBatchSource(processor, cfg, seed=cfg.eval.seed).examples(12)
    got = answer(model, processor, images, prompts, cfg.eval.max_new_tokens)
    assert got[:4] == [e["answer"] for e in report["examples"]]
    assert report["accuracy"] == pytest.approx(sum(g == t for g, t in zip(got, truths)) / 12)
    # and the saved config.yaml rebuilds the same recipe config, with the tokenizer's fields filled in
    assert load_config(ShapesPaliGemmaConfig, str(run / "config.yaml")) == with_tokenizer(cfg, processor)


def test_resumed_run_ends_with_the_same_weights(tmp_path):
    """Stop after 3 steps, resume to 6: the exported weights equal those of an uninterrupted 6-step run
    (the batch source's generator is restored with the checkpoint; a constant lr makes the 3-step
    run's schedule a prefix of the 6-step one)."""
    from safetensors.torch import load_file

    def cfg(name, steps):
        c = tiny_cfg(tmp_path / name, steps=steps)
        return replace(c, train=replace(c.train, schedule="constant", warmup_steps=0, checkpoint_every=3))

    full = train(cfg("full", 6))
    train(cfg("cut", 3))
    resumed = train(cfg("cut", 6), resume=True)
    a, b = load_file(str(full / "hf" / "model.safetensors")), load_file(str(resumed / "hf" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ckpts = tmp_path / "full" / "caption" / "checkpoints"
    at3, at6 = (load_file(str(ckpts / f"step_0000000{i}" / "model.safetensors")) for i in (3, 6))
    assert any(not torch.equal(at3[k], at6[k]) for k in at3)  # steps 4-6 did change the weights
