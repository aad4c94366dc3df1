"""The `genlab` command end to end on tiny settings: train, resume, sample, eval, config errors."""

import json

import pytest
import yaml

from genlab.cli import main
from genlab.config import ConfigError, load_config, merge
from genlab.flow.recipes import FlowConfig

TINY = ["--train.steps", "40", "--train.warmup-steps", "0", "--train.batch-size", "64", "--train.checkpoint-every", "20", "--train.no-progress",
        "--eval.n-samples", "200", "--eval.nfes", "1", "4", "--eval.nll-samples", "50",
        "--eval.density-resolution", "12", "--model.hidden", "32"]


def test_help_lists_families(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "genlab flow train" in out and "genlab demo" in out


def test_unknown_command(capsys):
    assert main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err


def test_train_writes_run_folder_then_resume_extends(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["flow", "train", "--run-dir", str(run), *TINY]) == 0
    for name in ["config.yaml", "metrics.jsonl", "eval.json", "samples.png", "trajectories.png", "density.png",
                 "loss.png", "w2_vs_nfe.png"]:
        assert (run / name).is_file(), name
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["steps"] == 40 and saved["model"]["hidden"] == 32
    report = json.loads((run / "eval.json").read_text())
    assert [r["nfe"] for r in report["solvers"] if r["solver"] == "euler"] == [1, 4]
    assert all(r["w2"] > 0 for r in report["solvers"]) and report["nll_bits_per_dim"] > 0

    # Resume with a longer schedule: continues from step 40, keeps the saved config otherwise.
    assert main(["flow", "train", "--resume", str(run), "--train.steps", "60"]) == 0
    records = [r for r in map(json.loads, open(run / "metrics.jsonl")) if r["split"] == "train"]
    steps = [r["step"] for r in records]
    assert steps[-1] == 60 and len(steps) == len(set(steps))
    # The extended run follows a 60-step cosine replayed to step 40: it keeps decaying to 0 at step 60.
    lr = {r["step"]: r["lr"] for r in records}
    later = [lr[s] for s in sorted(lr) if s > 40]
    assert all(a >= b for a, b in zip(later, later[1:])) and lr[60] == pytest.approx(0.0, abs=1e-12)
    assert (run / "checkpoints" / "step_00000060").is_dir()

    assert main(["flow", "sample", "--run-dir", str(run), "--solver", "rk4", "--steps", "2", "--n", "100"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["nfe"] == 8 and (run / "samples_rk4_2.png").is_file()
    assert main(["flow", "eval", "--run-dir", str(run)]) == 0


def test_preset_files_are_valid():
    for name in ["flow/toy2d", "flow/toy2d-cpu", "flow/icfm-cpu"]:
        cfg = load_config(FlowConfig, name)
        assert cfg.train.steps > 0
    assert load_config(FlowConfig, "flow/toy2d").train.batch_size == 64


def test_bad_config_key_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lrr: 0.1\n")
    assert main(["flow", "train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'train.lrr'" in err and str(bad) in err


@pytest.mark.parametrize("data,msg", [
    ({"train": {"steps": "many"}}, "'train.steps' must be an integer"),
    ({"objective": {"coupling": "greedy"}}, "'objective.coupling' = 'greedy' is not one of"),
    ({"eval": {"nfes": [1, "x"]}}, "'eval.nfes[1]' must be an integer"),
    ({"model": 3}, "section 'model' must be a mapping"),
])
def test_wrong_types_are_errors(data, msg):
    with pytest.raises(ConfigError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        merge(FlowConfig(), data)


def test_cli_type_error_exits(tmp_path):
    with pytest.raises(SystemExit):
        main(["flow", "train", "--run-dir", str(tmp_path), "--train.steps", "abc"])


def test_missing_run_folder_is_clear(tmp_path, capsys):
    assert main(["flow", "eval", "--run-dir", str(tmp_path / "nothing")]) == 2
    assert f"{tmp_path / 'nothing'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()


def test_fresh_run_replaces_an_old_run_only_with_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["flow", "train", "--run-dir", str(run), *TINY]) == 0  # checkpoints at 20 and 40
    (run / "samples_euler_2.png").write_bytes(b"an old picture")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    short = [a if a != "40" else "10" for a in TINY]
    assert main(["flow", "train", "--run-dir", str(run), *short]) == 2  # refuses, touches nothing
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert main(["flow", "train", "--run-dir", str(run), *short, "--overwrite"]) == 0
    assert "clearing the previous run" in capsys.readouterr().out
    assert not (run / "samples_euler_2.png").exists()  # the old run's pictures go too
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000010"]
    steps = [r["step"] for r in map(json.loads, open(run / "metrics.jsonl")) if r["split"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 10
    assert main(["flow", "eval", "--run-dir", str(run)]) == 0


def test_yaml_exponent_floats_are_numbers(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train: {lr: 1e-3}\n")  # YAML 1.1 reads this as a string
    assert load_config(FlowConfig, str(f)).train.lr == 1e-3


def test_python_dash_m_lists_every_family():
    import subprocess
    import sys

    for mod in ("genlab", "genlab.cli"):
        out = subprocess.run([sys.executable, "-m", mod, "--help"], capture_output=True, text=True, timeout=60).stdout
        assert "genlab flow train" in out and "genlab vlm generate" in out, mod


def test_family_help_and_unknown_family_command(capsys):
    assert main(["vlm", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"genlab vlm {c}" in out for c in ("train", "generate", "scenes"))
    assert main(["flow", "smaple"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'smaple'" in err and "genlab flow sample" in err


def test_train_help_lists_the_run_flags_first(capsys):
    with pytest.raises(SystemExit):
        main(["flow", "train", "--help"])
    out = capsys.readouterr().out
    assert out.index("--resume RUN_DIR") < out.index("--train.steps") and "--overwrite" in out
    assert "flow/toy2d-cpu" in out  # the shipped presets of this family
