import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from genlab.train import checkpoint as ckpt
from genlab.train.engine import TrainConfig, Trainer
from genlab.train.optim import build_optimizers, build_param_groups, build_scheduler
from tests.train._regression import ShardedRegression, make_model, mse_loss, noisy_mse_loss

HERE = Path(__file__).parent


def small_cfg(**kw):
    base = dict(steps=12, batch_size=32, lr=1e-2, ema_decay=0.9, checkpoint_every=4, log_every=1,
                progress=False, device="cpu", warmup_steps=2)
    base.update(kw)
    return TrainConfig(**base)


class Interrupt(Exception):
    pass


def _kill_at(step):
    def cb(s, trainer):
        if s == step:
            raise Interrupt()
    return cb


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_is_bitwise_identical(tmp_path, optimizer):
    torch.set_num_threads(1)
    cfg = small_cfg(optimizer=optimizer)
    full = Trainer(make_model(), noisy_mse_loss, ShardedRegression(), cfg, tmp_path / "full")
    torch.manual_seed(7)
    full.fit()

    t = Trainer(make_model(), noisy_mse_loss, ShardedRegression(), cfg, tmp_path / "cut", callbacks=[_kill_at(10)])
    torch.manual_seed(7)
    with pytest.raises(Interrupt):
        t.fit()  # dies at step 10; last checkpoint is step 8, steps 9-10 are lost
    assert ckpt.latest_checkpoint(tmp_path / "cut").name == "step_00000008"
    torch.manual_seed(999)  # the resumed process starts with a different RNG; resume must restore it
    resumed = Trainer(make_model(seed=3), noisy_mse_loss, ShardedRegression(seed=5), cfg, tmp_path / "cut",
                      resume=True)
    assert resumed.step == 8
    resumed.fit()

    for a, b in [(full.model.state_dict(), resumed.model.state_dict()), (full.ema.state_dict(), resumed.ema.state_dict())]:
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    # The metrics file reads as one run: each step logged exactly once.
    steps = [r["step"] for r in map(json.loads, open(tmp_path / "cut" / "metrics.jsonl")) if r["split"] == "train"]
    assert steps == list(range(1, 13))


def test_grad_accumulation_matches_full_batch(tmp_path):
    torch.set_num_threads(1)
    a = Trainer(make_model(), mse_loss, ShardedRegression(), small_cfg(micro_batch_size=0), tmp_path / "a")
    b = Trainer(make_model(), mse_loss, ShardedRegression(), small_cfg(micro_batch_size=8), tmp_path / "b")
    a.fit(), b.fit()
    for va, vb in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(va, vb, atol=1e-5, rtol=1e-5)


def test_checkpoint_files_and_pruning(tmp_path):
    t = Trainer(make_model(), mse_loss, ShardedRegression(), small_cfg(keep_checkpoints=2), tmp_path)
    t.fit()
    dirs = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert dirs == ["step_00000008", "step_00000012"]
    latest = ckpt.latest_checkpoint(tmp_path)
    weights = load_file(str(latest / "model.safetensors"))
    for k, v in t.model.state_dict().items():
        assert torch.equal(weights[k], v)
    assert not list(tmp_path.rglob("*.tmp"))
    state = torch.load(latest / "state.pt", weights_only=True)
    assert state["step"] == 12
    assert (tmp_path / "tensorboard").is_dir()


def test_warmup_cosine_schedule():
    p = torch.nn.Parameter(torch.zeros(2, 2))
    cfg = TrainConfig(steps=10, lr=1.0, warmup_steps=2, min_lr_ratio=0.1)
    lin = torch.nn.Linear(2, 2)
    opt = build_optimizers(build_param_groups(lin, 0.0), cfg)[0]
    sch = build_scheduler(opt, cfg)
    lrs = []
    for _ in range(10):
        assert len({g["lr"] for g in opt.param_groups}) == 1  # weight and bias groups share the schedule
        lrs.append(opt.param_groups[0]["lr"])
        opt.step(), sch.step()
    assert lrs[0] == pytest.approx(1 / 3) and lrs[1] == pytest.approx(2 / 3)
    assert lrs[2] == pytest.approx(1.0)
    import math
    for i in range(2, 10):  # cosine from 1.0 to 0.1 over 8 steps
        assert lrs[i] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (i - 2) / 8)))


def test_muon_takes_hidden_matrices_only():
    model = make_model()
    opts = build_optimizers(build_param_groups(model, 0.0), TrainConfig(optimizer="muon"))
    assert isinstance(opts[0], torch.optim.Muon) and isinstance(opts[1], torch.optim.AdamW)
    assert all(p.ndim == 2 for g in opts[0].param_groups for p in g["params"])
    n_params = sum(len(g["params"]) for o in opts for g in o.param_groups)
    assert n_params == len(list(model.parameters()))


def test_ddp_two_processes_match_single(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parents[1])}
    worker = str(HERE / "ddp_worker.py")
    single = subprocess.run([sys.executable, worker, str(tmp_path / "one"), "8"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", "29533", worker, str(tmp_path / "two"), "8"], env=env,
                         capture_output=True, text=True, timeout=180)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a = torch.load(tmp_path / "one" / "final.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "final.pt", weights_only=True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)
    assert (tmp_path / "two" / "checkpoints" / "step_00000006" / "rank_00001.pt").is_file()
