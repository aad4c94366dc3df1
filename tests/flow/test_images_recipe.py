"""The image recipe end to end on a tiny DiT: train through `genlab flow train`, exact resume, the
sample command (grids, samples.npz, its flags and aliases), eval, and its bad-input lines."""

import json

import numpy as np
import pytest
import torch

from genlab.cli import main
from genlab.io import read_safetensors
from tests._cli import fails

TINY = ["--config", "flow/digits", "--train.batch-size", "8", "--train.no-progress", "--train.threads", "1",
        "--model.hidden", "16", "--model.depth", "1", "--model.heads", "2", "--sampling.num-steps", "2",
        "--sampling.grid-per-class", "2", "--eval.samples-per-class", "2", "--eval.cfg-scales", "0", "3",
        "--eval.nfes", "1", "--eval.fd-samples", "10", "--eval.batch-size", "64", "--eval.classifier.steps", "3"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("img") / "run"
    assert main(["flow", "train", "--run-dir", str(run), "--train.steps", "4", "--train.checkpoint-every", "2",
                 "--sampling.grid-every", "2", *TINY]) == 0
    return run


def test_training_writes_grids_checkpoints_and_the_report(run):
    assert (run / "samples" / "grid_00000002.png").is_file()  # a grid every --sampling.grid-every steps
    assert (run / "checkpoints" / "step_00000004" / "ema.safetensors").is_file()
    report = json.loads((run / "eval.json").read_text())
    assert report["step"] == 4 and report["weights"] == "ema" and report["space"] == "pixels"
    assert [r["cfg_scale"] for r in report["by_cfg_scale"]] == [0.0, 3.0]
    assert all(len(r["per_class"]) == 10 for r in report["by_cfg_scale"])
    # a guided step is two forwards; Heun two calls per step
    forwards = {(r["solver"], r["steps"]): r["forwards"] for r in report["nfe_table"]}
    assert forwards == {("euler", 1): 2, ("heun", 1): 4}
    assert report["inception_fid"].startswith("not computed")
    for name in ("samples.png", "accuracy.png", "loss.png", "classifier/classifier.safetensors"):
        assert (run / name).is_file(), name


def test_resume_is_bitwise_identical(tmp_path, monkeypatch):
    from genlab.train.engine import Trainer

    torch.set_num_threads(1)
    straight, cut = tmp_path / "a", tmp_path / "b"
    args = ["--train.steps", "4", "--train.checkpoint-every", "2", "--sampling.grid-every", "1", "--data.hflip",
            "--train.eval-every", "1", *TINY]
    assert main(["flow", "train", "--run-dir", str(straight), *args]) == 0
    train_step = Trainer.train_step

    def dies_at_step_3(self):
        if self.step == 3:
            raise KeyboardInterrupt
        return train_step(self)

    monkeypatch.setattr(Trainer, "train_step", dies_at_step_3)
    with pytest.raises(SystemExit) as e:
        main(["flow", "train", "--run-dir", str(cut), *args])  # the last checkpoint is step 2
    assert e.value.code == 130
    monkeypatch.undo()
    torch.manual_seed(999)  # another process state: resume restores the run's random streams
    assert main(["flow", "train", "--resume", str(cut)]) == 0
    for name in ("model.safetensors", "ema.safetensors"):
        a = read_safetensors(straight / "checkpoints" / "step_00000004" / name)
        b = read_safetensors(cut / "checkpoints" / "step_00000004" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_class_grid_and_samples_npz(run, tmp_path):
    out = tmp_path / "grid"
    assert main(["flow", "sample", "--checkpoint", str(run), "--class-grid", "--samples-per-class", "3",
                 "--num-steps", "2", "--out", str(out)]) == 0
    with np.load(out / "samples.npz") as f:
        images, labels = f["images"], f["labels"]
    assert images.dtype == np.uint8 and images.shape == (30, 1, 8, 8)
    assert labels.dtype == np.int64 and labels.tolist() == [k for k in range(10) for _ in range(3)]  # row = class
    assert (out / "class_grid.png").is_file()


def test_sample_flags_aliases_and_checkpoint_folders(run, tmp_path, capsys):
    ckpt = run / "checkpoints" / "step_00000002"
    out = tmp_path / "one"
    # the reference guide's underscore spellings, a checkpoint folder, a class label, a solver and a scale
    assert main(["flow", "sample", "--checkpoint", str(ckpt), "--num_samples", "5", "--class_label", "7",
                 "--num_steps", "2", "--cfg_scale", "4.0", "--solver", "heun", "--out", str(out)]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["num_samples"] == 5 and info["cfg_scale"] == 4.0 and info["forwards_per_image"] == 2 * 2 * 2
    with np.load(out / "samples.npz") as f:
        assert f["labels"].tolist() == [7] * 5
    # default: unconditional (-1) into the run's samples/; the old --run-dir / --n / --steps still work
    assert main(["flow", "sample", "--run-dir", str(run), "--n", "4", "--steps", "1"]) == 0
    with np.load(run / "samples" / "samples.npz") as f:
        assert f["labels"].tolist() == [-1] * 4 and f["images"].shape == (4, 1, 8, 8)


def test_same_seed_same_images(run, tmp_path):
    for name in ("a", "b"):
        assert main(["flow", "sample", "--checkpoint", str(run), "--n", "4", "--steps", "2", "--seed", "3",
                     "--out", str(tmp_path / name)]) == 0
    with np.load(tmp_path / "a" / "samples.npz") as a, np.load(tmp_path / "b" / "samples.npz") as b:
        assert np.array_equal(a["images"], b["images"])


def test_eval_command_rewrites_the_report(run, capsys):
    before = json.loads((run / "eval.json").read_text())
    assert main(["flow", "eval", "--checkpoint", str(run)]) == 0
    printed = json.loads(capsys.readouterr().out)
    after = json.loads((run / "eval.json").read_text())
    assert after["step"] == before["step"] and after["classifier"]["trained"] is False  # the cached judge
    assert printed["accuracy_cfg3"] == after["by_cfg_scale"][1]["accuracy"]


@pytest.mark.parametrize("args, needle", [
    (["--class-label", "10"], "--class-label 10: this run has classes 0..9"),
    (["--class-grid", "--class-label", "1"], "--class-grid"),
    (["--cfg-scale", "-1"], "--cfg-scale=-1.0"),
    (["--num-samples", "1"], "--num-samples=1"),
    (["--num-steps", "0"], "--num-steps=0"),
    (["--solver", "nope"], "--solver=nope"),
])
def test_sample_bad_input_is_one_line(run, tmp_path, capsys, args, needle):
    out = tmp_path / "never"
    fails(["flow", "sample", "--checkpoint", str(run), "--out", str(out), *args], capsys, needle)
    assert not out.exists()


def test_sample_needs_a_checkpoint(capsys, tmp_path):
    fails(["flow", "sample"], capsys, "--checkpoint")
    fails(["flow", "sample", "--checkpoint", str(tmp_path / "missing")], capsys, "does not exist")


def test_a_2d_run_refuses_image_flags(tmp_path, capsys):
    run = tmp_path / "toy"
    assert main(["flow", "train", "--run-dir", str(run), "--train.steps", "2", "--train.no-progress",
                 "--eval.n-samples", "20", "--eval.nfes", "1", "--eval.nll-samples", "0",
                 "--eval.density-resolution", "0", "--eval.adaptive", "", "--model.hidden", "16"]) == 0
    fails(["flow", "sample", "--checkpoint", str(run), "--class-label", "1"], capsys, "a 2-D run has no classes")
