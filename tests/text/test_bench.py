"""The offline judges against hand-computed values, and `genlab text bench` on a tiny MDLM + AR pair."""

import json
import math

import pytest
import torch

from genlab.cli import main
from genlab.text.bench import BenchArgs, bench, generative_perplexity, judge_row, unigram_entropy
from genlab.text.models import TextTransformerConfig
from genlab.text.recipes import TextConfig, TextData, TextEval, TextObjective, TextTokenizer, train
from genlab.train.engine import TrainConfig

WORDS = "the quick brown fox jumps over the lazy dog while romeo sings to juliet under the moon".split()


class UniformJudge(torch.nn.Module):
    """Zero logits over V tokens: every next token has probability 1 / V."""

    def __init__(self, V):
        super().__init__()
        self.V, self.mask_id = V, V
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t=None):
        return self.w * torch.zeros(*x.shape, self.V)


def test_gen_ppl_of_a_uniform_judge_is_the_vocabulary_size():
    tokens = torch.randint(0, 7, (5, 9), generator=torch.Generator().manual_seed(0))
    assert generative_perplexity(UniformJudge(7), tokens, batch_size=2) == pytest.approx(7.0, rel=1e-12)
    row = judge_row(tokens, UniformJudge(7))  # every sample has NLL log 7: no spread
    assert row["gen_ppl"] == pytest.approx(7.0, rel=1e-12) and row["gen_ppl_se"] == pytest.approx(0.0, abs=1e-12)


def test_unigram_entropy_by_hand():
    assert unigram_entropy(torch.full((3, 10), 4)) == 0.0
    assert unigram_entropy(torch.arange(6).repeat(2, 3)) == pytest.approx(math.log(6), rel=1e-12)
    # row 1: {0: 2, 1: 2} -> log 2; row 2: constant -> 0; mean log(2) / 2
    assert unigram_entropy(torch.tensor([[0, 1, 0, 1], [3, 3, 3, 3]])) == pytest.approx(math.log(2) / 2, rel=1e-12)


def _corpus(folder, words, seed=0):
    folder.mkdir()
    g = torch.Generator().manual_seed(seed)
    for i in range(6):
        idx = torch.randint(0, len(words), (120,), generator=g).tolist()
        (folder / f"doc{i}.txt").write_text(" ".join(words[j] for j in idx) + "\n")
    return folder


def _tiny(run_dir, corpus, ar=False):
    return TextConfig(
        run_dir=str(run_dir), data=TextData(source="folder", path=str(corpus), seq_len=32, val_fraction=0.2),
        tokenizer=TextTokenizer(kind="char"),
        model=TextTransformerConfig(hidden=32, depth=1, heads=2, max_len=64, causal=ar),
        objective=TextObjective(kind="ar" if ar else "mdlm"),
        eval=TextEval(val_batches=1, batch_size=4, t_samples=1, num_samples=0, steps=4),
        train=TrainConfig(steps=3, batch_size=4, lr=1e-3, schedule="constant", checkpoint_every=0, log_every=1,
                          threads=1, progress=False))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    corpus = _corpus(root / "txts", WORDS)
    mdlm = train(_tiny(root / "mdlm", corpus))
    ar = train(_tiny(root / "ar", corpus, ar=True))
    other = train(_tiny(root / "other_ar", _corpus(root / "txts2", ["xyz", "qqq", "abc"]), ar=True))
    return mdlm, ar, other


def test_bench_writes_rows_reference_and_frontier(pair, tmp_path, capsys):
    mdlm, ar, _ = pair
    out = tmp_path / "b"
    report = bench(BenchArgs(checkpoint=str(mdlm), judge=str(ar), samplers=("ancestral", "cached", "first_hitting"),
                             steps=(2, 4, 64), num_samples=3, out=str(out)))
    saved = json.loads((out / "bench.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(report["rows"]))
    assert [(r["sampler"], r["steps"]) for r in saved["rows"]] == [
        (s, T) for s in ("ancestral", "cached", "first_hitting") for T in (2, 4, 64)]
    by = {(r["sampler"], r["steps"]): r for r in saved["rows"]}
    assert by[("ancestral", 4)]["nfe"] == 4 == by[("ancestral", 4)]["nfe_per_sample"]
    assert by[("first_hitting", 4)]["nfe"] == 4 and by[("first_hitting", 64)]["nfe"] == 32  # <= one jump a position
    # cached at 64 steps: one call per step that unmasks a token, on the rows that unmask one
    assert by[("cached", 64)]["nfe_per_sample"] <= min(by[("cached", 64)]["nfe"], 32)
    assert all(r["gen_ppl_se"] > 0 for r in saved["rows"])
    for T in (2, 4, 64):  # cached draws the same tokens as ancestral: the same judges' figures
        assert by[("cached", T)]["gen_ppl"] == by[("ancestral", T)]["gen_ppl"]
        assert by[("cached", T)]["entropy"] == by[("ancestral", T)]["entropy"]
    assert all(math.isfinite(r["gen_ppl"]) and 0 < r["entropy"] <= math.log(32) for r in saved["rows"])
    assert saved["reference"]["n"] == 3 and math.isfinite(saved["reference"]["gen_ppl"])
    assert (out / "bench_frontier.png").stat().st_size > 0
    assert "reference (val text)" in capsys.readouterr().out


def test_bench_without_judge_reports_entropy_only(pair, tmp_path):
    report = bench(BenchArgs(checkpoint=str(pair[0]), samplers=("dfm",), steps=(3,), num_samples=2,
                             out=str(tmp_path)))
    assert report["rows"][0]["gen_ppl"] is None and report["rows"][0]["entropy"] > 0


@pytest.mark.parametrize("flags, expected", [
    (["--samplers", "nope"], "--samplers=nope: unknown sampler nope; choose from ancestral"),
    (["--steps", "4", "0"], "--steps=4,0: each must be >= 1"),
    (["--num-samples", "0"], "--num-samples=0: must be >= 1"),
    (["--judge", "MDLM"], "is an mdlm run, not an AR baseline"),
    (["--judge", "OTHER"], "its tokenizer"),
])
def test_bench_flag_errors_are_one_line(pair, tmp_path, capsys, flags, expected):
    mdlm, ar, other = pair
    flags = [str(mdlm) if f == "MDLM" else str(other) if f == "OTHER" else f for f in flags]
    out = tmp_path / "never"
    assert main(["text", "bench", "--checkpoint", str(mdlm), "--judge", str(ar), "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("genlab: error: ") and expected in err[0], err
    assert not out.exists()


def test_bench_refuses_an_ar_checkpoint_and_a_foreign_judge(pair, tmp_path, capsys):
    mdlm, ar, _ = pair
    assert main(["text", "bench", "--checkpoint", str(ar)]) == 2
    assert "--checkpoint=" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text("# genlab run of the family: flow\n")
    assert main(["text", "bench", "--checkpoint", str(mdlm), "--judge", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--judge={tmp_path}" in err[0] and "flow run" in err[0]
