"""Every plot writes a readable, non-empty PNG."""

import numpy as np
import torch
from PIL import Image

from genlab.flow import plots

torch.set_num_threads(1)


def assert_png(path, min_size=(200, 200)):
    assert path.exists() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        assert im.size[0] >= min_size[0] and im.size[1] >= min_size[1]
        # Not a blank canvas: more than a handful of distinct colours.
        assert len(set(im.convert("RGB").getdata())) > 10


def test_samples_and_trajectories(tmp_path):
    g = torch.Generator().manual_seed(0)
    samples, target = torch.randn(300, 2, generator=g), np.random.default_rng(0).normal(size=(200, 2))
    assert_png(plots.plot_samples(samples, target, tmp_path / "s.png", title="check"))
    assert_png(plots.plot_samples(samples, None, tmp_path / "sub" / "s1.png"))
    times = torch.linspace(0, 1, 20)
    traj = (1 - times)[:, None, None] * samples[None] + times[:, None, None] * (samples + 3)[None]  # (T, B, 2)
    assert_png(plots.plot_trajectories(traj, tmp_path / "t.png", n=100))


def test_density_from_function_and_grid(tmp_path):
    seen = {}

    def log_prob(x):
        seen["grid"] = x
        return -0.5 * (x - torch.tensor([1.0, 0.0])).square().sum(-1)

    assert_png(plots.plot_density(log_prob, (-3, 3, -2, 2), tmp_path / "d.png", resolution=50))
    grid = seen["grid"]
    assert grid.shape == (2500, 2)
    # Row-major over (y, x): x varies fastest, starting at the lower-left corner.
    assert torch.allclose(grid[0], torch.tensor([-3.0, -2.0])) and torch.allclose(grid[1, 1], torch.tensor(-2.0))
    assert torch.allclose(grid[-1], torch.tensor([3.0, 2.0]))
    values = log_prob(grid).reshape(50, 50).numpy()
    assert_png(plots.plot_density(values, (-3, 3, -2, 2), tmp_path / "d2.png"))


def test_loss_and_nfe_curves(tmp_path):
    steps = np.arange(400)
    losses = 2.0 * np.exp(-steps / 100) + 0.1 * np.random.default_rng(0).random(400)
    assert_png(plots.plot_loss_curve(steps, losses, tmp_path / "loss.png"))
    nfes = [1, 2, 4, 8, 16]
    assert_png(plots.plot_nfe_curve(nfes, [2.0, 1.1, 0.6, 0.4, 0.35], tmp_path / "nfe.png"))
    curves = {"I-CFM": [2.0, 1.1, 0.6, 0.4, 0.35], "OT-CFM": [0.9, 0.5, 0.4, 0.35, 0.34]}
    assert_png(plots.plot_nfe_curve(nfes, curves, tmp_path / "nfe2.png"))
