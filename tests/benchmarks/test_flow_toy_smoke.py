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
