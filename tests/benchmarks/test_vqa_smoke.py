"""Smoke test of benchmarks/vqa.py --part memory --quick: genlab and the transformers + peft +
bitsandbytes stack each measured in every mode, in fresh processes, on the tiny config."""

import json
import subprocess
import sys

import pytest

from tests.benchmarks._load import BENCHMARKS

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")


def test_quick_memory_part_measures_both_stacks_alike(tmp_path):
    out = tmp_path / "vqa_memory.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "vqa.py"), "--part", "memory", "--quick", "--threads",
                           "1", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert set(rows) == {f"{impl}/{mode}" for impl in ("genlab", "peer") for mode in ("full", "lora", "qlora")}
    for mode in ("full", "lora", "qlora"):
        g, p = rows[f"genlab/{mode}"], rows[f"peer/{mode}"]
        # the same model, the same adapters: the same trainable parameters and AdamW state on both sides
        assert g["trainable_parameters"] == p["trainable_parameters"] > 0
        assert g["optimizer_state_bytes"] == p["optimizer_state_bytes"] == 8 * g["trainable_parameters"]
        assert g["peak_bytes"] > 0 and p["peak_bytes"] > 0
    # both stacks quantise the same decoder linears to the same NF4 bytes
    assert rows["genlab/qlora"]["weight_bytes"]["nf4"] == rows["peer/qlora"]["weight_bytes"]["nf4"]
    assert "| mode | genlab peak MiB | peer peak MiB |" in proc.stdout and "| qlora |" in proc.stdout


def test_quick_quality_part_reports_before_and_after(tmp_path):
    out = tmp_path / "vqa_quality.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "vqa.py"), "--part", "quality", "--quick", "--modes",
                           "lora", "--runs", str(tmp_path / "runs"), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    row = doc["rows"]["lora"]
    report = json.loads((tmp_path / "runs" / "lora" / "report.json").read_text())
    assert row["after"]["accuracy"] == report["after"]["accuracy"] and row["before"] is not None
    assert "| lora |" in proc.stdout and (tmp_path / "runs" / "lora" / "hf" / "model.safetensors").is_file()
