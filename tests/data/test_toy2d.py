"""Toy 2-D distributions: shapes, statistics against the geometry, determinism, resume."""

import math

import pytest
import torch

from genlab.data.toy2d import (
    CIRCLE_RADII,
    EIGHT_GAUSSIANS_RADIUS,
    EIGHT_GAUSSIANS_STD,
    TOY2D_NAMES,
    Toy2DSource,
    sample_toy2d,
)

torch.set_num_threads(1)
N = 20_000


def draw(name: str, n: int = N, seed: int = 0) -> torch.Tensor:
    return sample_toy2d(name, n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", TOY2D_NAMES)
def test_shape_dtype_range_and_determinism(name):
    x = draw(name, 1000)
    assert x.shape == (1000, 2) and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    assert x.abs().max() < 6.0  # all live in about [-4.5, 4.5]^2
    assert torch.equal(x, draw(name, 1000))  # same seed, same points
    assert not torch.equal(x, draw(name, 1000, seed=1))
    assert sample_toy2d(name, 5, device="cpu").shape == (5, 2)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="8gaussians.*moons.*checkerboard"):
        sample_toy2d("swissroll", 10)
    with pytest.raises(ValueError, match="choose one of"):
        Toy2DSource("normal", "nope", seed=0)


def test_8gaussians_centres_on_circle():
    x = draw("8gaussians").double()
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    centres = EIGHT_GAUSSIANS_RADIUS * torch.stack([angles.cos(), angles.sin()], 1)  # (8, 2)
    nearest = torch.cdist(x, centres).argmin(1)
    counts = torch.bincount(nearest, minlength=8).double()
    assert torch.allclose(counts / N, torch.full((8,), 1 / 8, dtype=torch.float64), atol=0.01)
    for k in range(8):
        members = x[nearest == k]
        # Clusters are far apart (gap 2.7 vs std 0.35), so nearest-centre assignment is exact.
        assert torch.allclose(members.mean(0), centres[k], atol=0.03)
        assert torch.allclose(members.std(0), torch.full((2,), EIGHT_GAUSSIANS_STD, dtype=torch.float64), atol=0.02)


def arc_distance(p: torch.Tensor, centre: torch.Tensor, radius: float, sign: float) -> torch.Tensor:
    """Distance from points p (N, 2) to the half circle {centre + radius (cos a, sign sin a), a in [0, pi]}."""
    rel = p - centre
    to_circle = (rel.norm(dim=1) - radius).abs()
    ends = torch.stack([centre + torch.tensor([radius, 0.0], dtype=p.dtype),
                        centre - torch.tensor([radius, 0.0], dtype=p.dtype)])  # (2, 2)
    to_ends = torch.cdist(p, ends).min(dim=1).values
    return torch.where(sign * rel[:, 1] >= 0, to_circle, to_ends)


def test_moons_two_mirrored_arcs():
    x = draw("moons").double()
    assert torch.allclose(x.mean(0), torch.zeros(2, dtype=torch.float64), atol=0.05)
    # Upper moon: upper half circle of radius 2.5 around c; lower moon: its mirror image about 0.
    c = torch.tensor([-1.25, -0.625], dtype=torch.float64)
    d_up, d_low = arc_distance(x, c, 2.5, 1.0), arc_distance(x, -c, 2.5, -1.0)
    upper = d_up < d_low
    assert abs(upper.double().mean().item() - 0.5) < 0.02
    # Points sit within the noise (std 0.25 after scaling) of an arc: median |noise| ~ 0.2.
    dist = torch.minimum(d_up, d_low)
    assert dist.median() < 0.25 and (dist < 1.0).all()
    # The two clusters are mirror images: same mean distance from the origin.
    assert abs(x[upper].norm(dim=1).mean() - x[~upper].norm(dim=1).mean()) < 0.05


def test_checkerboard_alternating_cells():
    x = draw("checkerboard")
    assert (x >= -4).all() and (x <= 4).all()
    cells = torch.floor((x + 4) / 2).long().clamp(0, 3)  # (N, 2) column, row
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all()
    counts = torch.bincount(cells[:, 0] * 4 + cells[:, 1], minlength=16).double()
    filled = counts[counts > 0]
    assert len(filled) == 8
    assert torch.allclose(filled / N, torch.full((8,), 1 / 8, dtype=torch.float64), atol=0.01)


def test_spirals_follow_two_arms():
    x = draw("spirals").double()
    r, phi = x.norm(dim=1), torch.atan2(x[:, 1], x[:, 0])
    # Arm radius (noise-free) is pi * sqrt(u), u ~ U(0, 1): (r / pi)^2 has mean 1/2.
    assert abs(((r / math.pi) ** 2).mean().item() - 0.5) < 0.02
    # Every point lies within the noise (std 0.1) of one of the two arms
    # r(theta) = theta / 3 at polar angle pi - theta, and its mirror image.
    theta = torch.linspace(0, 3 * math.pi, 4000, dtype=torch.float64)
    arm = torch.stack([-theta.cos() * theta, theta.sin() * theta], 1) / 3  # (4000, 2)
    x = x[:4000]
    d_first, d_second = torch.cdist(x, arm).min(1).values, torch.cdist(x, -arm).min(1).values
    dist = torch.minimum(d_first, d_second)
    assert dist.median() < 0.12 and dist.quantile(0.99) < 0.4
    assert abs((d_first < d_second).double().mean().item() - 0.5) < 0.04


def test_circles_two_rings():
    r = draw("circles").double().norm(dim=1)
    outer = (r - CIRCLE_RADII[0]).abs() < (r - CIRCLE_RADII[1]).abs()
    assert abs(outer.double().mean().item() - 0.5) < 0.02
    assert abs(r[outer].mean().item() - CIRCLE_RADII[0]) < 0.02
    assert abs(r[~outer].mean().item() - CIRCLE_RADII[1]) < 0.02


def test_normal_moments():
    x = draw("normal").double()
    assert torch.allclose(x.mean(0), torch.zeros(2, dtype=torch.float64), atol=0.03)
    assert torch.allclose(torch.cov(x.T), torch.eye(2, dtype=torch.float64), atol=0.04)


def test_source_batches_and_exact_resume():
    src = Toy2DSource("normal", "moons", seed=3)
    batch = src.next_batch(16)
    assert set(batch) == {"x0", "x1"} and batch["x0"].shape == batch["x1"].shape == (16, 2)
    state = src.state_dict()
    assert state["generator"].dtype == torch.uint8
    later = [src.next_batch(8) for _ in range(3)]
    # A fresh source restored from the saved state draws exactly the same batches.
    resumed = Toy2DSource("normal", "moons", seed=999)
    resumed.load_state_dict({k: v.clone() for k, v in state.items()})
    for want in later:
        got = resumed.next_batch(8)
        assert torch.equal(got["x0"], want["x0"]) and torch.equal(got["x1"], want["x1"])


def test_source_seed_and_rank():
    a = Toy2DSource("normal", "8gaussians", seed=0).next_batch(4)
    b = Toy2DSource("normal", "8gaussians", seed=0).next_batch(4)
    c = Toy2DSource("normal", "8gaussians", seed=0, rank=1).next_batch(4)
    assert torch.equal(a["x0"], b["x0"]) and torch.equal(a["x1"], b["x1"])
    assert not torch.equal(a["x0"], c["x0"])
    # rank r uses seed + 1000 r
    d = Toy2DSource("normal", "8gaussians", seed=1000).next_batch(4)
    assert torch.equal(c["x0"], d["x0"])


def test_log_prob_matches_scipy_and_integrates_to_one():
    from scipy.stats import multivariate_normal

    from genlab.data.toy2d import has_log_prob, toy2d_log_prob

    assert [n for n in TOY2D_NAMES if has_log_prob(n)] == ["8gaussians", "checkerboard", "normal"]
    pts = torch.randn(50, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    ref_normal = multivariate_normal(mean=[0, 0]).logpdf(pts.numpy())
    assert torch.allclose(toy2d_log_prob("normal", pts), torch.from_numpy(ref_normal), atol=1e-10)
    angles = [2 * math.pi * k / 8 for k in range(8)]
    ref_mix = sum(
        multivariate_normal(mean=[EIGHT_GAUSSIANS_RADIUS * math.cos(a), EIGHT_GAUSSIANS_RADIUS * math.sin(a)],
                            cov=EIGHT_GAUSSIANS_STD**2).pdf(pts.numpy()) / 8
        for a in angles
    )
    assert torch.allclose(toy2d_log_prob("8gaussians", pts).exp(), torch.from_numpy(ref_mix), rtol=1e-8, atol=1e-300)
    # Riemann sums over [-6, 6]^2 integrate each density to one.
    h = 12 / 600
    axis = torch.arange(-6 + h / 2, 6, h, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    for name in ["normal", "8gaussians", "checkerboard"]:
        assert toy2d_log_prob(name, grid).exp().sum().item() * h * h == pytest.approx(1.0, abs=2e-3)
    # Checkerboard: every sample has positive density.
    assert torch.isfinite(toy2d_log_prob("checkerboard", draw("checkerboard", 1000))).all()
    with pytest.raises(ValueError, match="no closed-form"):
        toy2d_log_prob("moons", pts)
