"""Smoke test of benchmarks/paligemma_infer.py: the tiny config runs end to end on CPU, genlab and
transformers agree on the logits and the greedy tokens, and every reported number is usable."""

import json
import math
import os

from tests.benchmarks._load import load_benchmark


def test_tiny_config_agrees_and_reports_finite_numbers(tmp_path, capsys):
    bench = load_benchmark("paligemma_infer")
    out = tmp_path / "result.json"
    res = bench.main(["--config", "tiny", "--new-tokens", "2", "--batch-sizes", "1", "--repeats", "1",
                      "--threads", "1", "--out", str(out)])
    b = res["batches"][1]
    assert res["max_abs_logit_diff"] < 1e-4 and res["max_abs_logit"] > 0.1  # real logits, not zeros
    assert b["tokens_identical"] and b["tokens_shape"] == [1, 2]
    for lib in ("genlab", "transformers"):
        for key in ("prefill_ms", "first_token_ms", "decode_step_ms", "decode_tok_s"):
            assert math.isfinite(b[lib][key]) and b[lib][key] > 0, (lib, key)
        # the RSS high-water mark can only be reset where /proc/self/clear_refs is writable
        if os.access("/proc/self/clear_refs", os.W_OK):
            assert math.isfinite(b[lib]["peak_mib"]) and b[lib]["peak_mib"] >= 0
    assert b["matmul_floor_ms"] > 0 and b["matmul_bytes"] > 0
    assert json.loads(out.read_text())["batches"]["1"]["tokens_identical"] is True
    printed = capsys.readouterr().out
    assert "decode tok/s" in printed and "genlab/tf" in printed
