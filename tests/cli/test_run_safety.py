"""A run never loses work: the rows of shared/findings/tried-as-a-new-user-2026-12-01.md (flow train,
resume, sample, eval) as tests on a tiny run folder. Every failing command exits 2 with one line
naming the flag or file, and leaves every existing file exactly as it was."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from genlab.cli import main
from tests._cli import fails, snapshot

FAST = ["--train.batch-size", "64", "--train.warmup-steps", "0", "--train.no-progress", "--model.hidden", "32",
        "--eval.n-samples", "100", "--eval.nfes", "2", "--eval.nll-samples", "0", "--eval.density-resolution", "0",
        "--eval.adaptive", ""]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 20-step run with checkpoints at 10 and 20."""
    run = tmp_path_factory.mktemp("runs") / "done"
    assert main(["flow", "train", "--run-dir", str(run), "--train.steps", "20", "--train.checkpoint-every", "10",
                 *FAST]) == 0
    return run


@pytest.fixture
def copy(finished, tmp_path):
    def make(name="run"):
        dst = tmp_path / name
        shutil.copytree(finished, dst)
        return dst
    return make


@pytest.mark.parametrize("flag,value,needle", [
    ("--train.steps", "-5", "--train.steps=-5: must be >= 1"),          # F03
    ("--train.steps", "0", "--train.steps=0: must be >= 1"),            # F04
    ("--train.batch-size", "0", "--train.batch-size=0: must be >= 1"),  # F05
    ("--train.batch-size", "-3", "--train.batch-size=-3"),              # F06
    ("--train.device", "tpu", "--train.device=tpu"),                    # F26
    ("--train.checkpoint-every", "-1", "--train.checkpoint-every=-1: must be >= 0"),  # F22
    ("--eval.nfes", "0", "--eval.nfes=0"),                              # F23: before training
    ("--train.keep-checkpoints", "0", "--train.keep-checkpoints=0: must be >= 1"),  # F25
    ("--train.warmup-steps", "-10", "--train.warmup-steps=-10: must be >= 0"),  # F29
    ("--eval.n-samples", "0", "--eval.n-samples=0"),                    # X07: before training
    ("--train.lr", "nan", "--train.lr=nan"),                            # F08
    ("--train.ema-decay", "1.5", "--train.ema-decay=1.5"),              # X06
    ("--train.micro-batch-size", "7", "--train.micro-batch-size=7"),    # F19
    ("--data.source", "nosuch", "--data.source=nosuch"),                # F15
    ("--model.depth", "0", "--model.depth=0"),                          # F21
])
def test_bad_values_are_refused_before_anything_is_written(tmp_path, capsys, flag, value, needle):
    run = tmp_path / "new"
    fails(["flow", "train", "--run-dir", str(run), "--train.steps", "5", *FAST, flag, value], capsys, needle)
    assert not run.exists()


def test_unavailable_cuda_is_a_clear_error(tmp_path, capsys):  # F20
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    fails(["flow", "train", "--run-dir", str(tmp_path / "r"), "--train.device", "cuda"], capsys,
          "--train.device=cuda: CUDA is not available")


def test_run_dir_under_a_file(tmp_path, capsys):  # X01
    (tmp_path / "text.png").write_text("not a folder")
    fails(["flow", "train", "--run-dir", str(tmp_path / "text.png" / "run")], capsys, "is a file, not a folder")


def test_fresh_run_into_a_run_refuses_and_bad_overrides_change_nothing(copy, capsys):  # R13, W1
    run = copy()
    before = snapshot(run)
    fails(["flow", "train", "--run-dir", str(run), "--model.hidden", "64", *FAST[:2]], capsys,
          "already holds a run", f"--resume {run}", "--overwrite")
    fails(["flow", "train", "--run-dir", str(run), "--train.batch-size", "-3", "--overwrite"], capsys,
          "--train.batch-size=-3")
    assert snapshot(run) == before
    assert main(["flow", "sample", "--run-dir", str(run), "--n", "50"]) == 0  # R13b: the run still samples


def test_bad_override_on_resume_is_not_saved(copy, capsys):  # R12, R12b
    run = copy()
    before = snapshot(run)
    fails(["flow", "train", "--resume", str(run), "--train.batch-size", "0"], capsys, "--train.batch-size=0")
    assert snapshot(run) == before
    capsys.readouterr()
    assert main(["flow", "train", "--resume", str(run), "--train.steps", "30", *FAST]) == 0
    rows = [r for r in map(json.loads, open(run / "metrics.jsonl")) if r["split"] == "train"]
    assert [r["step"] for r in rows][-1] == 30 and len({r["step"] for r in rows}) == len(rows)


def test_resuming_a_finished_run_says_so_and_adds_nothing(copy, capsys):
    run = copy()
    before = snapshot(run)
    assert main(["flow", "train", "--resume", str(run)]) == 0
    assert "already finished at step 20" in capsys.readouterr().out
    assert snapshot(run) == before


@pytest.mark.parametrize("form", [["--resume", "{run}"], ["--resume={run}"]])  # F24
def test_resume_spellings(copy, capsys, form):
    run = copy()
    args = [a.format(run=run) for a in form]
    assert main(["flow", "train", *args, "--train.steps", "25", *FAST]) == 0
    assert (run / "checkpoints" / "step_00000025").is_dir()


def test_resume_with_another_run_dir_is_an_error(copy, tmp_path, capsys):  # X03
    run = copy()
    fails(["flow", "train", "--resume", str(run), "--run-dir", str(tmp_path / "elsewhere")], capsys, "drop --run-dir")
    assert not (tmp_path / "elsewhere").exists()


def test_resume_without_latest_uses_the_newest_complete_step(copy, capsys):  # R04
    run = copy()
    (run / "checkpoints" / "latest").unlink()
    shutil.rmtree(run / "checkpoints" / "step_00000020")
    (run / "checkpoints" / "step_00000030.tmp").mkdir()  # a half-written save is never used
    assert main(["flow", "train", "--resume", str(run), "--train.steps", "20", *FAST]) == 0
    assert "using the newest complete step folder step_00000010" in capsys.readouterr().out
    rows = [r["step"] for r in map(json.loads, open(run / "metrics.jsonl")) if r["split"] == "train"]
    assert rows == sorted(set(rows)) and rows[-1] == 20


@pytest.mark.parametrize("damage", ["no_checkpoints", "empty"])  # R10, F17
def test_resume_with_nothing_to_resume_refuses(copy, tmp_path, capsys, damage):
    run = copy()
    if damage == "no_checkpoints":
        shutil.rmtree(run / "checkpoints")
    else:
        shutil.rmtree(run)
        run.mkdir()
    before = snapshot(run)
    fails(["flow", "train", "--resume", str(run)], capsys, str(run))
    assert snapshot(run) == before


@pytest.mark.parametrize("name,how", [
    ("model.safetensors", "half"), ("ema.safetensors", "half"), ("model.safetensors", "empty"),  # R01-R03
    ("state.pt", "half"),  # R08
])
def test_damaged_checkpoint_files_are_named(copy, capsys, name, how):
    run = copy()
    f = run / "checkpoints" / "step_00000020" / name
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if how == "half" else b"")
    before = snapshot(run)
    fails(["flow", "train", "--resume", str(run), "--train.steps", "25"], capsys, str(f))
    if name != "state.pt":
        fails(["flow", "sample", "--run-dir", str(run)] if name == "ema.safetensors" else
              ["flow", "eval", "--run-dir", str(run), "--raw"], capsys, str(f))  # S14
    assert snapshot(run) == before


def test_sample_validates_before_writing(copy, tmp_path, capsys):  # S09, S11
    run = copy()
    before = snapshot(run)
    fails(["flow", "sample", "--run-dir", str(run), "--n", "0"], capsys, "--num-samples=0")  # --n is its alias
    fails(["flow", "sample", "--run-dir", str(run), "--out", str(tmp_path / "no" / "dir" / "x.pt")], capsys,
          "--out=", "does not exist")
    fails(["flow", "sample", "--run-dir", str(run), "--solver", "nosuch"], capsys, "--solver=nosuch")
    assert snapshot(run) == before
    assert main(["flow", "sample", "--run-dir", str(run), "--solver", "dopri5", "--n", "50"]) == 0
    assert (run / "samples_dopri5.pt").is_file()  # adaptive solvers ignore --steps, so no steps in the name


def test_other_family_run_is_named(tmp_path, capsys):  # S04, T07
    run = tmp_path / "vlm"
    run.mkdir()
    (run / "config.yaml").write_text("# genlab run of the family: vlm\nrun_dir: x\n")
    fails(["flow", "sample", "--run-dir", str(run)], capsys, "holds a genlab vlm run, not a flow run")
    fails(["flow", "train", "--resume", str(run)], capsys, "holds a genlab vlm run")


def test_files_get_the_users_umask(finished):
    mask = os.umask(0)
    os.umask(mask)
    for f in [*finished.rglob("*.safetensors"), finished / "config.yaml", finished / "eval.json"]:
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask, f


def test_eval_reports_its_weights(finished):
    report = json.loads((finished / "eval.json").read_text())
    assert report["weights"] == "ema"


def test_ctrl_c_prints_the_resume_command(tmp_path, capsys, monkeypatch):  # K4
    import genlab.flow.recipes as recipes

    def interrupted(cfg, resume=False, overwrite=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(recipes, "train", interrupted)
    with pytest.raises(SystemExit) as e:
        main(["flow", "train", "--run-dir", str(tmp_path / "r")])
    assert e.value.code == 130
    err = capsys.readouterr().err
    assert f"genlab flow train --resume {tmp_path / 'r'}" in err and "Traceback" not in err


def test_debug_env_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("GENLAB_DEBUG", "1")
    from genlab.errors import ConfigError

    with pytest.raises(ConfigError):
        main(["flow", "train", "--run-dir", str(tmp_path / "r"), "--train.steps", "0"])


def test_kill_9_then_resume_is_bit_for_bit(tmp_path):
    """A real SIGKILL of `genlab flow train` at a random moment (checkpoints every step), then --resume:
    the final weights equal those of an uninterrupted run."""
    args = ["--train.steps", "300", "--train.checkpoint-every", "1", *FAST]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "genlab", "flow", "train"]
    subprocess.run([*cmd, "--run-dir", str(tmp_path / "full"), *args], env=env, check=True, capture_output=True,
                   timeout=300)
    proc = subprocess.Popen([*cmd, "--run-dir", str(tmp_path / "cut"), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "cut" / "checkpoints" / "latest").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run([*cmd, "--resume", str(tmp_path / "cut")], env=env, check=True, capture_output=True, timeout=300)
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = (tmp_path / r / "checkpoints" / "step_00000300" / name for r in ("full", "cut"))
        assert a.read_bytes() == b.read_bytes(), name


def test_resume_with_an_architecture_override_changes_nothing(copy, capsys):  # sibling of R12/R13
    run = copy()
    before = snapshot(run)
    fails(["flow", "train", "--resume", str(run), "--train.steps", "30", "--model.hidden", "64"], capsys,
          "does not match the model", "shape mismatches")
    assert snapshot(run) == before


@pytest.mark.parametrize("flag,value,needle", [
    ("--vision.num-attention-heads", "5", "--vision: hidden_size=96 is not divisible by num_attention_heads=5"),  # T12
    ("--vision.patch-size", "0", "--vision: patch_size must be >= 1"),  # T04
    ("--vision.image-size", "30", "--vision: image_size=30 is not a multiple of patch_size=8"),  # T02
    ("--data.max-objects", "11", "--data.max-objects=11: at most"),  # T13: fails fast instead of hanging
    ("--eval.n", "0", "--eval.n=0: must be >= 1"),  # T10: before training
    ("--data.vocab-size", "10", "vocab_size=10"),  # T06
])
def test_vlm_train_validates_first(tmp_path, capsys, flag, value, needle):
    run = tmp_path / "vlm"
    fails(["vlm", "train", "--run-dir", str(run), "--train.steps", "2", flag, value], capsys, needle)
    assert not run.exists()
