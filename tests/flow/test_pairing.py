"""OTPairedSource: the pairing in the data pipeline gives the in-step pairing's batches, resumes bit for
bit through the Trainer, and stops its thread."""

import gc
import threading

import pytest
import torch

from genlab.data.toy2d import Toy2DSource
from genlab.flow.coupling import ot_pairing
from genlab.flow.models.mlp import MLPConfig
from genlab.flow.pairing import OTPairedSource, pair_rows
from genlab.flow.recipes import FlowConfig, build_model, make_loss_fn
from genlab.train import checkpoint as ckpt
from genlab.train.engine import TrainConfig, Trainer

torch.set_num_threads(1)


class LabelledToy(Toy2DSource):
    """Toy2DSource plus a per-row label that belongs to x1 (as a class label would)."""

    def next_batch(self, n):
        batch = super().next_batch(n)
        return {**batch, "label": torch.arange(n) * 10, "note": "kept"}


def _workers():
    return [t for t in threading.enumerate() if t.name == "genlab-ot-pairing"]


DEPTHS = [(1, 1), (2, 1), (2, 2), (3, 2)]  # (batches in flight, worker threads)


@pytest.mark.parametrize("depth,workers", DEPTHS)
@pytest.mark.parametrize("method,chunk", [("exact", 0), ("exact", 16), ("sinkhorn", 0)])
def test_batches_are_the_in_step_pairing(method, chunk, depth, workers):
    plain = LabelledToy("8gaussians", "moons", seed=3)
    with OTPairedSource(LabelledToy("8gaussians", "moons", seed=3), method, chunk=chunk, depth=depth,
                        workers=workers) as paired:
        for n in (64, 64, 64, 48, 64, 64, 32):  # a change of batch size drops the prefetched batches
            want = plain.next_batch(n)
            got = paired.next_batch(n)
            step = chunk or n
            for start in range(0, n, step):  # the engine's micro-batches, each paired by the loss
                rows = slice(start, start + step)
                perm = ot_pairing(want["x0"][rows], want["x1"][rows], method=method)
                assert torch.equal(got["x0"][rows], want["x0"][rows])
                assert torch.equal(got["x1"][rows], want["x1"][rows][perm])
                assert torch.equal(got["label"][rows], want["label"][rows][perm])
            assert got["note"] == "kept"


def test_pair_rows_refuses_nothing_to_pair():
    with pytest.raises(ValueError, match="exact"):
        OTPairedSource(Toy2DSource("normal", "moons", seed=0), "none")
    for depth, workers in [(0, 1), (2, 0), (2, 3)]:
        with pytest.raises(ValueError, match="depth"):
            OTPairedSource(Toy2DSource("normal", "moons", seed=0), depth=depth, workers=workers)
    batch = Toy2DSource("normal", "moons", seed=0).next_batch(8)
    assert torch.equal(pair_rows(batch, chunk=100)["x1"], pair_rows(batch)["x1"])  # chunk >= n: one chunk


@pytest.mark.parametrize("depth,workers", DEPTHS)
def test_state_dict_is_the_state_before_the_oldest_prefetched_batch(depth, workers):
    plain = Toy2DSource("8gaussians", "moons", seed=1)
    with OTPairedSource(Toy2DSource("8gaussians", "moons", seed=1), depth=depth, workers=workers) as paired:
        assert torch.equal(paired.state_dict()["generator"], plain.state_dict()["generator"])
        for _ in range(3):
            paired.next_batch(32), plain.next_batch(32)
            assert torch.equal(paired.state_dict()["generator"], plain.state_dict()["generator"])
        state = paired.state_dict()
        after = [paired.next_batch(32) for _ in range(depth + 1)]
        paired.next_batch(32)
        paired.load_state_dict(state)  # back in time, with depth batches in flight
        again = [paired.next_batch(32) for _ in range(depth + 1)]
        paired.next_batch(16)  # a new size: the prefetched batches of 32 are dropped, the source put back
        plain.load_state_dict(state)
        for n in [32] * (depth + 1) + [16]:
            plain.next_batch(n)
        assert torch.equal(paired.state_dict()["generator"], plain.state_dict()["generator"])
    for a, b in zip(after, again):
        assert torch.equal(a["x1"], b["x1"]) and torch.equal(a["x0"], b["x0"])


def _cfg(run_dir, steps=12, **train):
    cfg = FlowConfig(run_dir=str(run_dir), model=MLPConfig(hidden=32, depth=2, time_embed_dim=16))
    cfg.train = TrainConfig(steps=steps, batch_size=64, lr=1e-2, warmup_steps=2, ema_decay=0.9, checkpoint_every=4,
                            log_every=1, progress=False, device="cpu", threads=1, **train)
    return cfg


def _fit(cfg, data, prepaired, seed=7, **kw):
    torch.manual_seed(0)
    model = build_model(cfg)
    torch.manual_seed(seed)  # the loss draws its times from the global RNG; a resume restores it
    return Trainer(model, make_loss_fn(cfg, prepaired=prepaired), data, cfg.train, cfg.run_dir, **kw)


def _assert_same_weights(a, b):
    for x, y in [(a.model.state_dict(), b.model.state_dict()), (a.ema.state_dict(), b.ema.state_dict())]:
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


@pytest.mark.parametrize("micro,depth,workers", [(0, 1, 1), (16, 1, 1), (0, 2, 1), (16, 2, 2)])
def test_trainer_with_paired_source_equals_in_step_pairing(tmp_path, micro, depth, workers):
    in_step = _fit(_cfg(tmp_path / "a", micro_batch_size=micro), Toy2DSource("8gaussians", "moons", seed=0), False)
    in_step.fit()
    with OTPairedSource(Toy2DSource("8gaussians", "moons", seed=0), chunk=micro, depth=depth,
                        workers=workers) as data:
        piped = _fit(_cfg(tmp_path / "b", micro_batch_size=micro), data, True)
        piped.fit()
    _assert_same_weights(in_step, piped)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("depth,workers", DEPTHS)
def test_exact_resume_through_the_trainer(tmp_path, depth, workers):
    def source(seed):
        return OTPairedSource(Toy2DSource("8gaussians", "moons", seed=seed), depth=depth, workers=workers)

    with source(0) as data:
        straight = _fit(_cfg(tmp_path / "full"), data, True)
        straight.fit()

    def die_at_10(step, trainer):
        if step == 10:
            raise Interrupt()

    with source(0) as data:
        cut = _fit(_cfg(tmp_path / "cut"), data, True, callbacks=[die_at_10])
        with pytest.raises(Interrupt):
            cut.fit()  # the last checkpoint is step 8, taken with batches 9 .. 8 + depth in flight
    assert ckpt.latest_checkpoint(tmp_path / "cut").name == "step_00000008"
    with source(5) as data:  # another seed: resume restores it
        resumed = _fit(_cfg(tmp_path / "cut"), data, True, seed=999, resume=True)
        assert resumed.step == 8
        resumed.fit()
    _assert_same_weights(straight, resumed)


@pytest.mark.parametrize("depth,workers", DEPTHS)
def test_close_stops_the_threads_and_errors_reach_the_caller(depth, workers):
    before = len(_workers())
    paired = OTPairedSource(Toy2DSource("normal", "moons", seed=0), depth=depth, workers=workers)
    paired.next_batch(16)  # leaves depth batches in flight
    assert len(_workers()) == before + workers
    state = paired.state_dict()
    paired.close()
    paired.close()  # idempotent
    assert paired.closed and len(_workers()) == before
    assert torch.equal(paired.state_dict()["generator"], state["generator"])  # the batches in flight are dropped
    with pytest.raises(RuntimeError, match="after close"):
        paired.next_batch(16)

    OTPairedSource(Toy2DSource("normal", "moons", seed=0), depth=depth, workers=workers).next_batch(16)  # unclosed
    gc.collect()
    assert len(_workers()) == before

    class Broken(Toy2DSource):
        def next_batch(self, n):
            raise OSError("disk gone")

    with OTPairedSource(Broken("normal", "moons", seed=0), depth=depth, workers=workers) as paired:
        with pytest.raises(OSError, match="disk gone"):
            paired.next_batch(16)
    assert len(_workers()) == before

    class FailsOnce(Toy2DSource):  # the third draw fails; the batches drawn after it are redone in order
        calls = 0

        def next_batch(self, n):
            FailsOnce.calls += 1
            if FailsOnce.calls == 3:
                raise OSError("flaky")
            return super().next_batch(n)

    plain = Toy2DSource("normal", "moons", seed=0)
    with OTPairedSource(FailsOnce("normal", "moons", seed=0), depth=depth, workers=workers) as paired:
        got = [paired.next_batch(16) for _ in range(2)]
        with pytest.raises(OSError, match="flaky"):
            paired.next_batch(16)
        got += [paired.next_batch(16) for _ in range(3)]
    for batch in got:
        assert torch.equal(batch["x0"], plain.next_batch(16)["x0"])
