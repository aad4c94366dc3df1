"""Smoke test of benchmarks/text_sampling.py in --quick mode (skipped when flow_matching is not installed)."""

import json
import math

import pytest
import torch

from tests.benchmarks._load import load_benchmark, run_quick

pytest.importorskip("flow_matching")


def test_quick_run_rows_are_finite_and_cached_equals_ancestral(tmp_path, capsys):
    bench = load_benchmark("text_sampling")
    out = tmp_path / "text_sampling.json"
    results = run_quick(bench, out)
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["settings"]["steps"] == list(bench.QUICK_STEPS) and saved["settings"]["quick"]
    names = {r["sampler"] for r in saved["rows"]}
    assert names == set(bench.SAMPLERS) | set(bench.VARIANTS) | {"peer flow_matching"}
    assert all(r["nfe_per_sample"] <= r["nfe"] for r in saved["rows"])
    assert {"mdlm", "ar"} == set(saved["training"]) and all(s["tokens_per_s"] > 0 for s in saved["training"].values())
    for r in saved["rows"] + [saved["reference"]]:
        assert math.isfinite(r["gen_ppl"]) and r["gen_ppl"] > 1 and 0 < r["entropy"] <= math.log(32)
    peer = [r for r in saved["rows"] if r["sampler"] == "peer flow_matching"]
    assert [r["nfe"] for r in peer] == list(bench.QUICK_STEPS)  # one model call per Euler step
    assert saved["cached_vs_ancestral"]["identical_tokens"] is True
    assert len(saved["peer_ratios"]) == len(bench.QUICK_STEPS)
    assert "cached vs ancestral" in printed and "peer / genlab" in printed
    assert results["cached_vs_ancestral"] == saved["cached_vs_ancestral"]


def test_peer_wrapper_puts_no_mass_on_the_mask():
    """A denoiser sure of token 5 everywhere: the peer's solver, through the wrapper, returns 5 at every
    position (never the mask id V, which the wrapper gives zero mass) after one call per step."""
    bench = load_benchmark("text_sampling")

    class Prefers0(torch.nn.Module):
        def __init__(self, V):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.V = V

        def forward(self, x, t=None):
            logits = torch.full((*x.shape, self.V), -30.0)
            logits[..., 5] = 30.0  # token 5 (not a special token)
            return logits + self.w

    from genlab.data.tokenizers import train_char_tokenizer
    from genlab.text.recipes import TextConfig

    tok = train_char_tokenizer(["abcdefgh"])
    V = tok.get_vocab_size(with_added_tokens=True)
    cfg = TextConfig()
    cfg.model.vocab_size = V
    tokens, nfe, _ = bench.peer_draw(Prefers0(V), cfg, tok, steps=8, n=3, length=10, seed=0)
    assert nfe == 8 and tokens.shape == (3, 10) and bool((tokens == 5).all())
