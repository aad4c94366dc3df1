"""The text recipe end to end on a tiny folder corpus: train, exact resume, sample, eval, errors."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from genlab.cli import main
from genlab.data.tokenizers import load_tokenizer_file
from genlab.text.models import TextTransformerConfig
from genlab.text.recipes import EvalArgs, SampleArgs, TextConfig, TextData, TextEval, TextTokenizer, evaluate_run, \
    load_trained, sample, train
from genlab.train.engine import TrainConfig

WORDS = "the quick brown fox jumps over the lazy dog while romeo sings to juliet under the moon".split()


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "txts"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(6):
        idx = torch.randint(0, len(WORDS), (120,), generator=g).tolist()
        (folder / f"doc{i}.txt").write_text(" ".join(WORDS[j] for j in idx) + "\n")
    return folder


def tiny_cfg(run_dir, corpus, steps=4, kind="char", **model):
    return TextConfig(
        run_dir=str(run_dir), data=TextData(source="folder", path=str(corpus), seq_len=32, val_fraction=0.2),
        tokenizer=TextTokenizer(kind=kind, vocab_size=300),
        model=TextTransformerConfig(hidden=32, depth=1, heads=2, max_len=64, **model),
        eval=TextEval(val_batches=1, batch_size=4, t_samples=1, num_samples=1, steps=4),
        train=TrainConfig(steps=steps, batch_size=4, lr=1e-3, schedule="constant", checkpoint_every=2,
                          log_every=1, threads=1, progress=False))


def test_train_writes_tokenizer_report_and_samples(tmp_path, corpus):
    run = train(tiny_cfg(tmp_path / "run", corpus))
    report = json.loads((run / "eval.json").read_text())
    assert report["step"] == 4 and report["bits_per_char"] == pytest.approx(report["nelbo"] / 0.6931471805599453)
    assert report["corpus"]["train_documents"] == 4 and report["corpus"]["val_documents"] == 2
    assert len(report["samples"]) == 1 and len(report["samples"][0]["text"]) == 32
    tok = load_tokenizer_file(run / "tokenizer.json")
    model, cfg, tok2 = load_trained(run)
    assert cfg.model.vocab_size == tok.get_vocab_size() == model.embed.num_embeddings - 1
    assert tok.decode(tok.encode("romeo sings").ids) == "romeo sings"  # the tokenizer round-trips


def test_resumed_run_ends_with_the_same_weights(tmp_path, corpus):
    full = train(tiny_cfg(tmp_path / "full", corpus, steps=4))
    train(tiny_cfg(tmp_path / "cut", corpus, steps=2))
    cut = train(tiny_cfg(tmp_path / "cut", corpus, steps=4), resume=True)
    a = load_file(str(full / "checkpoints" / "step_00000004" / "model.safetensors"))
    b = load_file(str(cut / "checkpoints" / "step_00000004" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    at2 = load_file(str(full / "checkpoints" / "step_00000002" / "model.safetensors"))
    assert any(not torch.equal(at2[k], a[k]) for k in a)


def test_bpe_and_ar_runs(tmp_path, corpus):
    run = train(replace(tiny_cfg(tmp_path / "ar", corpus, kind="bpe", causal=True),
                        objective=replace(TextConfig().objective, kind="ar")))
    report = json.loads((run / "eval.json").read_text())
    assert report["bits_per_char"] < report["bits_per_token"]  # a BPE token covers more than one character
    assert report["samples"][0]["sampler"] == "autoregressive"


def test_sample_command_writes_jsonl(tmp_path, corpus, capsys):
    run = train(tiny_cfg(tmp_path / "run", corpus, steps=2))
    out = tmp_path / "samples.jsonl"
    records = sample(SampleArgs(checkpoint=str(run), sampler="ancestral", steps=8, num_samples=3, prefix="romeo",
                                out=str(out)))
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == records and len(lines) == 3
    assert all(set(r) == {"text", "sampler", "steps", "nfe", "seconds"} for r in lines)
    assert all(r["text"].startswith("romeo") and len(r["text"]) == 32 and r["steps"] == 8 for r in lines)
    assert "romeo" in capsys.readouterr().out
    flat = evaluate_run(EvalArgs(checkpoint=str(run)))
    assert flat["step"] == 2 and flat["bits_per_char"] > 0


def test_cli_errors_are_one_line(tmp_path, corpus, capsys):
    assert main(["text", "sample", "--checkpoint", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--checkpoint" in err
    assert main(["text", "train", "--run-dir", str(tmp_path / "r"), "--data.source", "folder", "--data.path",
                 str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing" in err and not (tmp_path / "r").exists()
    assert main(["text", "train", "--run-dir", str(tmp_path / "r"), "--model.causal"]) == 2
    assert "--model.causal" in capsys.readouterr().err
    run = train(tiny_cfg(tmp_path / "run", corpus, steps=2))
    assert main(["text", "sample", "--checkpoint", str(run), "--sampler", "nope"]) == 2
    assert "--sampler=nope" in capsys.readouterr().err
    assert main(["text", "sample", "--checkpoint", str(run), "--out", str(tmp_path / "no" / "s.jsonl")]) == 2
    assert not (tmp_path / "no").exists()
