"""Run under torchrun by test_engine.py: train the regression model and save its final weights."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from _regression import ShardedRegression, make_model, mse_loss  # noqa: E402

from genlab.train.engine import TrainConfig, Trainer  # noqa: E402

run_dir, micro = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(1)
rank = int(__import__("os").environ.get("RANK", 0))
world = int(__import__("os").environ.get("WORLD_SIZE", 1))
cfg = TrainConfig(steps=6, batch_size=32, micro_batch_size=micro, lr=1e-2, ema_decay=0.9, checkpoint_every=3,
                  log_every=1, progress=False, device="cpu")
trainer = Trainer(make_model(), mse_loss, ShardedRegression(rank=rank, world=world), cfg, run_dir)
trainer.fit()
if rank == 0:
    torch.save({k: v.clone() for k, v in trainer.model.state_dict().items()}, Path(run_dir) / "final.pt")
if dist.is_initialized():
    dist.destroy_process_group()
