"""Smoke test of benchmarks/flow_toy.py in --quick mode (skipped when torchcfm is not installed)."""

import json
import math

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from tests.benchmarks._load import load_benchmark, run_quick

pytest.importorskip("torchcfm")


def test_quick_run_prints_four_finite_rows(tmp_path, capsys):
    bench = load_benchmark("flow_toy")
    out = tmp_path / "flow_toy.json"
    results = run_quick(bench, out)
    printed = capsys.readouterr().out
    names = ["genlab I-CFM", "torchcfm I-CFM", "genlab OT-CFM", "torchcfm OT-CFM"]
    rows = [line for line in printed.splitlines() if any(line.startswith(n) for n in names)]
    assert len(rows) == 4
    for line in rows:
        numbers = [float(tok) for tok in line.split()[2:]]
        assert len(numbers) == 6 + 4  # six Euler NFEs, dopri5 W2 and NFE, steps/s median and best
        assert all(math.isfinite(v) and v >= 0 for v in numbers)
    assert set(results["median"]) == set(names)
    assert json.loads(out.read_text())["settings"]["steps"] == 20
    for kind in ("OT-CFM", "I-CFM"):
        assert "genlab/torchcfm" in printed and kind in printed


class _Still(torch.nn.Module):
    """Zero velocity: every solver must return its starting points unchanged."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, **extras):
        return self.w * x


def test_evaluation_w2_matches_scipy_assignment():
    """With v = 0 every W2 column is W2(source noise, target), checked against scipy's assignment solver."""
    bench = load_benchmark("flow_toy")
    s = bench.Settings(n_eval=300, nfes=(1, 2, 8))
    got = bench.evaluate(_Still(), s)
    g = torch.Generator().manual_seed(bench.EVAL_SEED)
    x0 = bench.sample_toy2d(bench.SOURCE, s.n_eval, generator=g).double()
    target = bench.sample_toy2d(bench.TARGET, s.n_eval, generator=g).double()
    cost = (torch.cdist(x0, target) ** 2).numpy()
    rows, cols = linear_sum_assignment(cost)  # equal uniform weights: optimal plan is a permutation
    expected = math.sqrt(cost[rows, cols].mean())
    for key in ("euler_1", "euler_2", "euler_8", "dopri5"):
        assert got[key] == pytest.approx(expected, rel=1e-6)


def test_quick_icfm_study_reports_final_and_ema(tmp_path, capsys):
    bench = load_benchmark("flow_toy")
    threads = torch.get_num_threads()
    try:
        results = bench.main(["--icfm-study", "--quick", "--seeds", "2", "--out", str(tmp_path / "study.json")])
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "Mann-Whitney" in printed and json.loads((tmp_path / "study.json").read_text())["settings"]["seeds"] == 2
    for lib in ("genlab", "torchcfm"):
        for weights in ("final", "ema"):
            values = results["w2"][lib][weights]
            assert len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values)
    assert all(0 <= t["mann_whitney_p"] <= 1 for t in results["tests"].values())


def test_torchcfm_ema_follows_the_engine_rule():
    """The study's AveragedModel EMA for torchcfm gives genlab's EMA weights on the same trajectory."""
    from genlab.train.optim import EMA

    bench = load_benchmark("flow_toy")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    ours, theirs = EMA(model, 0.95), bench._engine_like_ema(model, 0.95)
    for _ in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ours.update(model)
        theirs.update_parameters(model)
    for name, p in theirs.module.named_parameters():
        torch.testing.assert_close(p, ours.shadow[name], rtol=1e-6, atol=1e-6)
