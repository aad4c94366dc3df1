"""Smoke test of benchmarks/qformer.py --part throughput --quick: genlab's Q-Former query path and
transformers' Blip2QFormerModel hold the same weights, agree, train the same parameters, and every
reported number is usable; the hand count of FLOPs equals torch's own count."""

import json
import math

import pytest
import torch

from tests.benchmarks._load import load_benchmark

pytest.importorskip("transformers")


def test_quick_throughput_agrees_and_reports_finite_numbers(tmp_path, capsys):
    bench = load_benchmark("qformer")
    out = tmp_path / "qformer.json"
    threads = torch.get_num_threads()
    try:
        res = bench.main(["--part", "throughput", "--quick", "--threads", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    a = res["agreement"]
    assert a["max_abs_out_diff"] < 1e-5 and a["max_abs_out"] > 0.1  # real outputs, not zeros
    assert a["max_abs_grad_diff"] < 1e-6 and a["max_abs_grad"] > 0
    trained = res["trained_parameters"]
    assert trained["genlab"] == trained["transformers"] > 0
    for name in ("genlab", "transformers"):
        row = res["rows"][name]
        assert len(row["times_ms"]) == 3 and all(t > 0 for t in row["times_ms"])
        assert math.isclose(row["samples_per_s"], 2 / (row["median_ms"] / 1e3))  # tiny config: batch 2
    g, t = res["rows"]["genlab"]["median_ms"], res["rows"]["transformers"]["median_ms"]
    assert math.isclose(res["speed_ratio"], t / g) and res["paired_speed_ratio"] > 0
    saved = json.loads(out.read_text())
    assert saved["config"] == "tiny" and saved["speed_ratio"] == res["speed_ratio"]
    printed = capsys.readouterr().out
    assert "| impl | median ms | samples/s |" in printed and "speed genlab / transformers" in printed


def test_hand_counted_flops_equal_torch_flop_counter():
    """step_flops against torch.utils.flop_counter on a real step (SDPA's math path, which the
    counter sees through; the CPU's fused kernel is not counted)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    bench = load_benchmark("qformer")
    s = bench.sizes("tiny")
    s["layers"] = 3  # an odd count: cross-attention in layers 0 and 2
    ours, hf, hf_query = bench.build_pair(s, torch.device("cpu"), torch.float32, seed=0)
    (vision,) = bench.vision_inputs(s, 1, torch.device("cpu"), torch.float32, seed=1)
    for step in bench.make_steps(ours, hf, hf_query):
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            step(vision)
        assert counter.get_total_flops() == bench.step_flops(s)["total"], step.name
