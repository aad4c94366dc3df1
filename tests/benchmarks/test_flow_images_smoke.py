"""Smoke test of benchmarks/flow_images.py --part throughput in --quick mode (skipped without diffusers)."""

import json
import math

import pytest

from tests.benchmarks._load import load_benchmark, run_quick

pytest.importorskip("diffusers")


def test_quick_throughput_prints_both_models_and_a_ratio(tmp_path, capsys):
    bench = load_benchmark("flow_images")
    out = tmp_path / "flow_images.json"
    results = run_quick(bench, out)
    printed = capsys.readouterr().out
    rows = [line.split() for line in printed.splitlines() if line.split()[:1] in (["genlab"], ["diffusers"])]
    assert [r[0] for r in rows] == ["genlab", "diffusers"]
    for r in rows:
        assert int(r[1].replace(",", "")) > 0 and all(math.isfinite(float(v)) and float(v) > 0 for v in r[2:4])
        assert float(r[4]) >= 0  # TFLOP/s: rounds to 0.000 for the quick model
    assert "genlab/diffusers steps/s" in printed
    assert results["ratio_of_medians"] > 0 and set(results["params"]) == {"genlab", "diffusers"}
    saved = json.loads(out.read_text())
    assert saved["part"] == "throughput" and saved["settings"]["hidden"] == 32


def test_flop_formula():
    bench = load_benchmark("flow_images")
    s = bench.Shape(hidden=768, depth=12, heads=12, patch=2, image_size=32, channels=3, classes=10, batch=1)
    n, d = 256, 768
    per_token = 12 * (12 * d * d) + 2 * 3 * 4 * d  # q, k, v, out (4 d^2) + MLP (8 d^2) per block; patch in/out
    assert bench.model_flops_per_image(s) == 6 * per_token * n + 12 * 12 * n * n * d


def test_quick_quality_trains_the_three_digits_presets(tmp_path, capsys):
    bench = load_benchmark("flow_images")
    results = bench.main(["--part", "quality", "--quick", "--threads", "1", "--runs", str(tmp_path / "runs")])
    printed = capsys.readouterr().out
    for name in ("digits", "digits-meanflow", "digits-latent"):
        assert name in printed and results[name]["by_cfg_scale"] and results[name]["nfe_table"]
    assert [r["solver"] for r in results["digits-meanflow"]["nfe_table"]] == ["meanflow"]
    assert (tmp_path / "runs" / "vqvae-digits" / "reconstructions.png").is_file()
