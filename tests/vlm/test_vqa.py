"""`genlab vlm finetune` and `genlab vlm eval-vqa` end to end on a tiny base model and tiny CLEVR folders."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from genlab.cli import main
from genlab.data.clevr import write_clevr
from genlab.train.engine import TrainConfig
from genlab.vlm.gemma import GemmaConfig
from genlab.vlm.recipes import ShapesPaliGemmaConfig, VLMEval, train
from genlab.vlm.siglip import SiglipConfig

torch.set_num_threads(1)
FAST = ["--train.steps", "4", "--train.batch-size", "8", "--train.log-every", "1", "--train.checkpoint-every", "2",
        "--train.no-progress", "--train.device", "cpu", "--eval.batch-size", "16", "--eval.max-new-tokens", "3",
        "--eval.grid", "4", "--lora.r", "4"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny caption model trained for 2 steps: an HF folder with a tokenizer that knows the world."""
    d = tmp_path_factory.mktemp("base")
    cfg = ShapesPaliGemmaConfig(
        run_dir=str(d / "run"),
        vision=SiglipConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                            image_size=24, patch_size=8),
        text=GemmaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, max_position_embeddings=256),
        eval=VLMEval(n=4, batch_size=4, max_new_tokens=4, grid=0),
        train=TrainConfig(steps=2, batch_size=4, checkpoint_every=0, progress=False, device="cpu", threads=1))
    return train(cfg) / "hf"


@pytest.fixture(scope="module")
def clevr(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clevr") / "CLEVR_v1.0"
    write_clevr(root, {"train": 12, "val": 4}, image_size=24, seed=3, min_objects=1, max_objects=3,
                questions_per_image=3)
    # A test split as CLEVR ships it: questions without answers or programs, no scenes file.
    (root / "images" / "test").mkdir()
    val = json.loads((root / "questions" / "CLEVR_val_questions.json").read_text())
    test = []
    for q in val["questions"][:6]:
        name = q["image_filename"].replace("_val_", "_test_")
        shutil.copy(root / "images" / "val" / q["image_filename"], root / "images" / "test" / name)
        test.append({"image_index": q["image_index"], "image_filename": name, "split": "test",
                     "question": q["question"], "question_index": q["question_index"]})
    (root / "questions" / "CLEVR_test_questions.json").write_text(json.dumps({"info": {}, "questions": test}))
    return root


def finetune(run: Path, base: Path, *extra: str) -> int:
    return main(["vlm", "finetune", "--model", str(base), "--run-dir", str(run), *FAST, *extra])


@pytest.mark.parametrize("mode", ["lora", "qlora", "full"])
def test_finetune_writes_the_run_and_eval_vqa_reproduces_its_answers(tmp_path, base, clevr, mode, capsys):
    run = tmp_path / mode
    assert finetune(run, base, "--mode", mode, "--data.root", str(clevr)) == 0
    for name in ("hf/config.json", "hf/model.safetensors", "hf/tokenizer.json", "answers.csv", "report.md",
                 "report.json", "before.json", "qa_grid.png", "loss.png", "config.yaml"):
        assert (run / name).is_file(), name
    assert (run / "adapter" / "adapter_model.safetensors").is_file() == (mode != "full")
    report = json.loads((run / "report.json").read_text())
    assert report["before"] is not None and report["after"]["n"] == 12  # 4 val images x 3 questions
    with open(run / "answers.csv", newline="") as f:
        trained = [r["prediction"] for r in csv.DictReader(f)]
    # The exported hf/ folder (adapters merged) answers exactly as the trained model did.
    capsys.readouterr()
    assert main(["vlm", "eval-vqa", "--model", str(run), "--max-new-tokens", "3", "--device", "cpu"]) == 0
    with open(run / "eval-vqa-val" / "answers.csv", newline="") as f:
        assert [r["prediction"] for r in csv.DictReader(f)] == trained


def test_resume_gives_the_same_adapter_bit_for_bit(tmp_path, base, clevr):
    assert finetune(tmp_path / "straight", base, "--data.root", str(clevr)) == 0
    assert finetune(tmp_path / "cut", base, "--data.root", str(clevr), "--train.steps", "2") == 0
    assert main(["vlm", "finetune", "--resume", str(tmp_path / "cut"), "--train.steps", "4"]) == 0
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cut" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "cut" / "report.json").read_text())["before"] is not None  # kept across the resume


def test_the_embedded_world_needs_no_data_folder(tmp_path, base):
    run = tmp_path / "embedded"
    assert finetune(run, base, "--data.world-train", "6", "--data.world-val", "2", "--data.max-objects", "2") == 0
    with open(run / "answers.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["image"].startswith("CLEVR_val_") for r in rows)  # no path into a deleted folder


def test_eval_vqa_on_a_split_without_answers_gives_predictions_only(tmp_path, base, clevr, capsys):
    out = tmp_path / "pred"
    assert main(["vlm", "eval-vqa", "--model", str(base), "--data.root", str(clevr), "--split", "test",
                 "--out", str(out), "--max-new-tokens", "2", "--device", "cpu"]) == 0
    assert "predictions only" in capsys.readouterr().out
    with open(out / "answers.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and all(r["reference"] == "" for r in rows)


@pytest.mark.parametrize("flags, message", [
    ([], "--model"),
    (["--data.root", "/nonexistent/clevr"], "--data.root"),
    (["--mode", "qlora", "--train.optimizer", "muon"], "muon"),
    (["--data.world-train", "2000000"], "--data.world-train"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, base, flags, message, capsys):
    run = tmp_path / "never"
    args = ["vlm", "finetune", "--run-dir", str(run), *FAST, *flags]
    if flags:
        args += ["--model", str(base)]
    assert main(args) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]
    assert not run.exists()


def test_training_on_a_split_without_answers_is_refused(tmp_path, base, clevr, capsys):
    run = tmp_path / "never"
    assert finetune(run, base, "--data.root", str(clevr), "--data.train-split", "test") != 0
    assert "without answers" in capsys.readouterr().err
    assert not run.exists()
