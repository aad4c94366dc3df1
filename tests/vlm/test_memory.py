"""`genlab vlm memory` on a small random PaliGemma folder: every reported count against one computed
by hand from the config, the files it writes, and bad flags refused before any worker starts."""

import json
import math

import pytest
import torch

from genlab.cli import main
from genlab.vlm.gemma import GemmaConfig
from genlab.vlm.hf_io import save_paligemma
from genlab.vlm.memory import MemoryArgs, memory_cmd
from genlab.vlm.paligemma import PaliGemma, PaliGemmaConfig
from genlab.vlm.recipes import init_weights, tiny_vision

# A wide vocabulary so that what full fine-tuning adds (the embeddings' gradients and AdamW moments,
# 12 bytes x 2.1M) stands far above the few tens of MiB a fresh process allocates on its first step.
TEXT = GemmaConfig(vocab_size=8192, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=1, head_dim=64, max_position_embeddings=256)
R = 8


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("memory-model") / "hf"
    cfg = PaliGemmaConfig(vision=tiny_vision(), text=TEXT, image_token_id=TEXT.vocab_size - 1).validate()
    torch.manual_seed(0)
    model = PaliGemma(cfg)
    init_weights(model, 0.02)
    save_paligemma(model, cfg, d)
    return d


@pytest.fixture(scope="module")
def result(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("memory-out")
    args = MemoryArgs(model=str(folder), modes=("full,lora", "qlora"), batch_size=2, seq_len=32, steps=1,
                      r=R, alpha=16, out=str(out), threads=1)
    return memory_cmd(args), out


def shapes() -> list[tuple[int, int]]:
    """(in, out) of every decoder linear LoRA adapts, from the config."""
    t = TEXT
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    D, inner = t.hidden_size, t.intermediate_size
    per_layer = [(D, q), (D, kv), (D, kv), (q, D), (D, inner), (D, inner), (inner, D)]
    return per_layer * t.num_hidden_layers


def test_counts_match_the_config(result):
    doc, _ = result
    rows = {r["mode"]: r for r in doc["rows"]}
    assert list(rows) == ["full", "lora", "qlora"]
    t = TEXT
    linears = sum(i * o for i, o in shapes())
    decoder = t.vocab_size * t.hidden_size + linears + t.num_hidden_layers * 2 * t.hidden_size + t.hidden_size
    lora = sum(R * (i + o) for i, o in shapes())
    assert rows["full"]["trainable_parameters"] == decoder  # tied head: the embeddings count once
    assert rows["lora"]["trainable_parameters"] == rows["qlora"]["trainable_parameters"] == lora
    for r in rows.values():  # AdamW in fp32: two moments per trainable parameter; fp32 gradients
        assert r["optimizer_state_bytes"] == 2 * 4 * r["trainable_parameters"]
        assert r["gradient_bytes"] == 4 * r["trainable_parameters"]
        assert r["peak_bytes"] > 0 and r["peak_kind"] in ("VmHWM", "ru_maxrss")
        assert math.isfinite(r["loss"]) and r["step_seconds_median"] > 0
    # nf4: half a byte per weight, one 8-bit absmax per 64-weight block (double quantisation), and per
    # layer the fp32 absmax of every 256 such constants plus the 256-entry fp32 code book
    nf4 = sum(i * o // 2 + i * o // 64 + 4 * math.ceil(i * o / 64 / 256) + 4 * 256 for i, o in shapes())
    assert rows["qlora"]["weight_bytes"]["nf4"] == pytest.approx(nf4, rel=0.01)
    assert rows["qlora"]["weight_bytes"]["float32"] == rows["full"]["weight_bytes"]["float32"] - 4 * linears + 4 * lora
    assert rows["lora"]["peak_bytes"] < rows["full"]["peak_bytes"]
    assert rows["qlora"]["peak_bytes"] < rows["full"]["peak_bytes"]


def test_files_and_table(result, capsys):
    doc, out = result
    assert json.loads((out / "memory.json").read_text())["rows"] == doc["rows"]
    table = (out / "memory.md").read_text()
    assert table.startswith("| mode |") and "| full |" in table and "1.00x" in table
    assert (out / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("*.tmp"))


@pytest.mark.parametrize("flags, named", [
    (["--modes", "full,bogus"], "--modes=full,bogus"),
    (["--modes", "lora,lora"], "names a mode twice"),
    (["--steps", "0"], "--steps=0"),
    (["--batch-size", "0"], "--batch-size=0"),
    (["--r", "0"], "--r=0"),
    (["--threads", "-1"], "--threads=-1"),
    (["--device", "tpu"], "--device=tpu"),
    (["--seq-len", "5000"], "--seq-len=5000"),
])
def test_bad_flags_are_one_line_before_anything_runs(folder, tmp_path, capsys, flags, named):
    out = tmp_path / "never"
    assert main(["vlm", "memory", "--model", str(folder), "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("genlab: error: ") and named in err and err.count("\n") == 1
    assert not out.exists()


def test_missing_model_folder(tmp_path, capsys):
    assert main(["vlm", "memory", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "nope does not exist" in capsys.readouterr().err


def test_default_out_folder_of_a_run(tmp_path):
    run = tmp_path / "run"
    (run / "hf").mkdir(parents=True)
    (run / "config.yaml").write_text("x: 1\n")
    assert MemoryArgs(model=str(run / "hf")).out_dir() == run / "memory"
    assert str(MemoryArgs(model=str(tmp_path)).out_dir()) == "runs/vlm-memory"


def test_a_failing_worker_is_one_line_naming_the_mode(folder, tmp_path, capsys):
    import shutil

    broken = tmp_path / "hf"
    shutil.copytree(folder, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated: config.json still reads, the weights do not
    assert main(["vlm", "memory", "--model", str(broken), "--modes", "lora", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the lora mode run failed" in err and "model.safetensors" in err
