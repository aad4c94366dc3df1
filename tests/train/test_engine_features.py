"""What the engine does for the recipes to come: parameter groups, frozen parts, trainable-only state,
EMA warm-up, best/, init_from, validation, the map-style data adapter, on_save."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from genlab.errors import CheckpointMismatchError
from genlab.train import checkpoint as ckpt
from genlab.train.data import MapDataSource
from genlab.train.engine import TrainConfig, Trainer
from genlab.train.optim import freeze
from tests.train._regression import ShardedRegression, make_model, mse_loss

torch.set_num_threads(1)


def cfg(**kw):
    base = dict(steps=6, batch_size=16, lr=1e-2, checkpoint_every=3, log_every=1, progress=False, device="cpu",
                grad_clip=0.0)
    base.update(kw)
    return TrainConfig(**base)


class Tower(nn.Module):
    """A 'pretrained' part (with dropout, to see its mode) and a head trained on top of it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.base = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.LayerNorm(8))
        self.head = nn.Linear(8, 1)
        self.modes = []

    def forward(self, x):
        self.modes.append((self.base.training, self.head.training))
        return self.head(self.base(x))


def test_param_groups_scale_lr_and_skip_decay_on_norms_and_biases(tmp_path):
    model = Tower()
    t = Trainer(model, mse_loss, ShardedRegression(), cfg(weight_decay=0.1), tmp_path,
                param_groups=[{"module": model.base, "lr_scale": 0.1, "name": "base"}])
    groups = {(g["name"], g["weight_decay"]): g for g in t.optimizers[0].param_groups}
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for (_, wd), g in groups.items() if wd > 0 for p in g["params"]}
    assert decayed == {"base.0.weight", "head.weight"}  # not the LayerNorm, not the biases
    assert groups[("base", 0.1)]["base_lr"] == pytest.approx(1e-3) and groups[("rest", 0.1)]["base_lr"] == 1e-2
    t.fit()
    rows = [r for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if r["split"] == "train"]
    assert rows[-1]["lr/base"] == pytest.approx(rows[-1]["lr/rest"] * 0.1)


def test_frozen_part_stays_in_eval_mode_unchanged_and_out_of_checkpoints(tmp_path):
    model = Tower()
    before = {k: v.clone() for k, v in model.base.state_dict().items()}
    freeze(model.base)
    t = Trainer(model, mse_loss, ShardedRegression(), cfg(ema_decay=0.9), tmp_path,
                eval_fn=lambda step, m, final: {"out": m(torch.zeros(1, 4)).item()})
    t.fit()
    assert set(model.modes) == {(False, True), (False, False)}  # training steps, then the evaluation
    assert all(torch.equal(before[k], v) for k, v in model.base.state_dict().items())
    saved = load_file(str(ckpt.latest_checkpoint(tmp_path) / "model.safetensors"))
    assert set(saved) == {"head.weight", "head.bias"} == set(t.ema.state_dict())
    # The run loads back strictly into a model whose base is frozen again; a foreign key is refused.
    again = Tower()
    freeze(again.base)
    ckpt.load_weights(tmp_path, again, ema=False)
    assert torch.equal(again.head.weight, model.head.weight)
    with pytest.raises(CheckpointMismatchError, match="missing keys: base.0.bias, base.0.weight"):
        ckpt.load_weights(tmp_path, Tower(), ema=False)  # nothing frozen: the base is not in the file


def test_ema_warm_up_follows_the_formula(tmp_path):
    model = make_model()
    seen = []
    t = Trainer(model, mse_loss, ShardedRegression(), cfg(steps=4, ema_decay=0.99), tmp_path,
                callbacks=[lambda s, tr: seen.append({k: v.clone() for k, v in tr.model.state_dict().items()})])
    start = {k: v.clone() for k, v in model.state_dict().items()}
    t.fit()
    ema = dict(start)
    for k_update, weights in enumerate(seen):
        decay = min(0.99, (1 + k_update) / (10 + k_update))
        ema = {k: decay * ema[k] + (1 - decay) * weights[k] for k in ema}
    for k, v in t.ema.state_dict().items():
        torch.testing.assert_close(v, ema[k], rtol=1e-6, atol=1e-7)


def test_eval_sees_ema_weights_and_training_weights_come_back(tmp_path):
    model = make_model()
    got = {}

    def eval_fn(step, m, final):
        got["w"] = m[0].weight.detach().clone()
        return {}

    t = Trainer(model, mse_loss, ShardedRegression(), cfg(ema_decay=0.9), tmp_path, eval_fn=eval_fn)
    t.fit()
    assert torch.equal(got["w"], t.ema.state_dict()["0.weight"])
    assert not torch.equal(got["w"], model[0].weight)


def test_best_checkpoint_follows_the_metric_and_final_is_saved_after_eval(tmp_path):
    values = iter([3.0, 1.0, 2.0])  # evaluations at steps 2, 4 and the final one at 6
    t = Trainer(make_model(), mse_loss, ShardedRegression(), cfg(eval_every=2, best_metric="err", best_mode="min"),
                tmp_path, eval_fn=lambda step, m, final: {"err": next(values)})
    t.fit()
    best = json.loads((tmp_path / "checkpoints" / "best" / "best.json").read_text())
    assert best == {"step": 4, "metric": "err", "value": 1.0}
    assert torch.load(ckpt.latest_checkpoint(tmp_path) / "state.pt", weights_only=True)["best"] == 1.0


def test_init_from_loads_weights_only(tmp_path):
    first = Trainer(make_model(), mse_loss, ShardedRegression(), cfg(), tmp_path / "a")
    first.fit()
    second = Trainer(make_model(seed=5), mse_loss, ShardedRegression(), cfg(init_from=str(tmp_path / "a")),
                     tmp_path / "b")
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()))
    assert second.step == 0


def test_validation_is_the_loss_on_every_val_batch(tmp_path):
    data = ShardedRegression()
    val = [data.next_batch(5), data.next_batch(3)]
    t = Trainer(make_model(), mse_loss, ShardedRegression(seed=1), cfg(), tmp_path, val_data=val)
    t.fit()
    with torch.no_grad():
        want = sum(mse_loss(t.model, b)[0] * len(b["x"]) for b in val) / 8
    row = [r for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if r["split"] == "val"][-1]
    assert row["step"] == 6 and row["loss"] == pytest.approx(want.item(), rel=1e-6)
    assert (tmp_path / "loss.png").is_file()  # drawn by the engine, validation points included


def test_on_save_runs_after_each_checkpoint(tmp_path):
    steps = []
    Trainer(make_model(), mse_loss, ShardedRegression(), cfg(), tmp_path,
            on_save=lambda step, tr: steps.append((step, ckpt.latest_checkpoint(tmp_path).name))).fit()
    assert steps == [(3, "step_00000003"), (6, "step_00000006")]


class Squares(torch.utils.data.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return {"i": torch.tensor(i), "sq": torch.tensor(i * i)}


def test_map_data_source_epochs_shards_and_resumes():
    a = MapDataSource(Squares(), seed=3)
    epoch = torch.cat([a.next_batch(5)["i"] for _ in range(2)])
    assert sorted(epoch.tolist()) == list(range(10))  # one epoch is a permutation
    state = a.state_dict()
    want = [a.next_batch(4)["i"].tolist() for _ in range(3)]  # crosses into the next epoch
    b = MapDataSource(Squares(), seed=3)
    b.load_state_dict(state)
    assert [b.next_batch(4)["i"].tolist() for _ in range(3)] == want
    r0, r1 = (MapDataSource(Squares(), seed=3, rank=r, world_size=2) for r in (0, 1))
    x, y = r0.next_batch(5)["i"].tolist(), r1.next_batch(5)["i"].tolist()
    assert not set(x) & set(y) and sorted(x + y) == list(range(10))
    batch = r0.next_batch(3)
    assert torch.equal(batch["sq"], batch["i"] ** 2)  # rows stay together through collation


def test_map_data_source_with_worker_processes_gives_the_same_batches():
    a, b = MapDataSource(Squares(), seed=1), MapDataSource(Squares(), seed=1, num_workers=2)
    assert [a.next_batch(3)["i"].tolist() for _ in range(4)] == [b.next_batch(3)["i"].tolist() for _ in range(4)]


def test_muon_rule_is_explicit_and_overridable(tmp_path):
    class WithLora(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)
            self.lora_A = nn.Linear(8, 2, bias=False)
            self.head = nn.Linear(8, 1)

    def muon_names(t):
        names = {id(p): n for n, p in t.model.named_parameters()}
        return sorted(names[id(p)] for g in t.optimizers[0].param_groups for p in g["params"])

    t = Trainer(WithLora(), mse_loss, ShardedRegression(), cfg(optimizer="muon"), tmp_path / "a")
    assert isinstance(t.optimizers[0], torch.optim.Muon) and muon_names(t) == ["proj.weight"]
    t = Trainer(WithLora(), mse_loss, ShardedRegression(), cfg(optimizer="muon"), tmp_path / "b",
                muon_rule=lambda name, p: name == "head.weight")
    assert muon_names(t) == ["head.weight"]


def test_group_lrs_survive_an_extended_resume(tmp_path):
    def trainer(steps, resume=False):
        model = Tower()
        return Trainer(model, mse_loss, ShardedRegression(), cfg(steps=steps, warmup_steps=2), tmp_path,
                       param_groups=[{"module": model.base, "lr_scale": 0.1, "name": "base"}], resume=resume)

    trainer(6).fit()
    trainer(10, resume=True).fit()
    rows = [r for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if r["split"] == "train"]
    assert [r["step"] for r in rows] == list(range(1, 11))
    for r in rows:  # every step, both groups: base lr x scale x the 10-step schedule's factor
        assert r["lr/base"] == pytest.approx(0.1 * r["lr/rest"], rel=1e-9)
    from genlab.train.optim import lr_factor

    assert rows[-1]["lr/rest"] == pytest.approx(1e-2 * lr_factor(10, 10, 2, "cosine", 0.0), abs=1e-12)
    assert rows[7]["lr/rest"] == pytest.approx(1e-2 * lr_factor(8, 10, 2, "cosine", 0.0))
