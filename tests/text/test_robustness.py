"""Bad input to the newest commands (text train / sample / eval / bench, vlm scenes): each exits 2 with
one line naming the flag or file, before anything is written or changed."""

import shutil
from pathlib import Path

import pytest

from genlab.cli import main
from tests._cli import fails, snapshot

TINY = ["--train.steps", "2", "--train.batch-size", "4", "--train.no-progress", "--data.source", "shakespeare",
        "--tokenizer.kind", "char", "--data.seq-len", "32", "--model.hidden", "32", "--model.depth", "1",
        "--model.heads", "2", "--eval.val-batches", "1", "--eval.batch-size", "4", "--eval.t-samples", "1",
        "--eval.num-samples", "1", "--eval.steps", "4"]
HUGE = "99999999999999999999"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("text") / "t"
    assert main(["text", "train", "--run-dir", str(out), *TINY]) == 0
    return out


def fails_cleanly(argv, capsys, expect: str, watch: Path) -> None:
    before = snapshot(watch)
    err = fails(argv, capsys, expect)
    assert "\n" not in err, err
    assert snapshot(watch) == before


@pytest.mark.parametrize("flags, expect", [
    (["--num-samples", HUGE], "--num-samples="),
    (["--steps", "100000000000"], "--steps="),
    (["--temperature", "inf"], "--temperature=inf"),
    (["--seed", HUGE], "--seed="),
    (["--prefix", "日本語", "--steps", "2", "--num-samples", "1"], "--prefix"),
])
def test_sample_rejects_nonsense(run, tmp_path, capsys, flags, expect):
    fails_cleanly(["text", "sample", "--checkpoint", str(run), *flags], capsys, expect, run.parent)


def test_eval_rejects_huge_t_samples(run, capsys):
    fails_cleanly(["text", "eval", "--checkpoint", str(run), "--t-samples", HUGE], capsys, "--t-samples=", run.parent)


def test_resume_with_a_damaged_tokenizer_names_it(run, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    text = (bad / "tokenizer.json").read_text()
    (bad / "tokenizer.json").write_text(text[: len(text) // 2])  # truncated mid-write
    fails_cleanly(["text", "train", "--resume", str(bad), "--train.steps", "3"], capsys, "tokenizer.json", tmp_path)


def test_empty_config_yaml_is_named(run, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    (bad / "config.yaml").write_text("")
    for argv in (["text", "sample", "--checkpoint", str(bad)], ["text", "eval", "--checkpoint", str(bad)],
                 ["text", "train", "--resume", str(bad)]):
        fails_cleanly(argv, capsys, "config.yaml is empty", tmp_path)


@pytest.mark.parametrize("flags, expect", [
    (["--device", "cuda:x"], "--device=cuda:x"),
    (["--device", "tpu"], "--device=tpu"),
    (["--seed", HUGE], "--seed="),
    (["--steps", "2", "99999999999"], "--steps="),
    (["--num-samples", HUGE], "--num-samples="),
    (["--out", "FILE/sub"], "is a file, not a folder"),
    (["--out", "FILE"], "is a file; give a folder"),
    (["--out", "missing/deeper/b"], "does not exist"),
])
def test_bench_rejects_nonsense(run, tmp_path, capsys, flags, expect):
    (tmp_path / "FILE").write_text("x")
    flags = [str(tmp_path / f) if f.startswith("FILE") else f for f in flags]
    fails_cleanly(["text", "bench", "--checkpoint", str(run), "--samplers", "ancestral", *flags], capsys, expect,
                  run.parent)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE"]


@pytest.mark.parametrize("flags, expect", [
    (["--train.seed", HUGE], "--train.seed="),
    (["--eval.t-samples", "99999999999"], "--eval.t-samples="),
    (["--eval.steps", "99999999999"], "--eval.steps="),
    (["--eval.num-samples", "99999999999"], "--eval.num-samples="),
    (["--eval.sampler", "nope"], "--eval.sampler=nope"),
    (["--tokenizer.kind", "bpe", "--tokenizer.vocab-size", "99999999999"], "--tokenizer.vocab-size="),
])
def test_train_rejects_nonsense_before_the_folder_is_touched(tmp_path, capsys, flags, expect):
    fails_cleanly(["text", "train", "--run-dir", str(tmp_path / "r"), *TINY, *flags], capsys, expect, tmp_path)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flags, expect", [
    (["--n", "99999999999"], "--n="),
    (["--image-size", "9999999"], "--image-size="),
    (["--min-objects", "3", "--max-objects", "2"], "--max-objects=2"),
    (["--max-objects", "11"], "--max-objects=11"),  # more than CLEVR's 10 objects
    (["--seed", "-1"], "--seed=-1"),
    (["--out", "FILE/x"], "is a file, not a folder"),
])
def test_vlm_scenes_rejects_nonsense(tmp_path, capsys, flags, expect):
    (tmp_path / "FILE").write_text("x")
    flags = [str(tmp_path / f) if f.startswith("FILE") else f for f in flags]
    if "--out" not in flags:
        flags += ["--out", str(tmp_path / "imgs")]
    fails_cleanly(["vlm", "scenes", *flags], capsys, expect, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE"]
