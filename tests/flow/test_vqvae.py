"""The VQ-VAE: shapes, the straight-through gradient, the quantiser's arithmetic against hand values,
dead-code restarts, and `genlab flow vqvae` end to end (train, resume, load, encode)."""

import json

import pytest
import torch

from genlab.flow.models.vqvae import VQVAE, VQVAEConfig, VectorQuantizer

torch.set_num_threads(1)


def _vq(**kw) -> VectorQuantizer:
    args = dict(num_codes=2, dim=2, commitment=0.25, ema_decay=0.99, dead_code_threshold=0.0, eps=1e-5)
    return VectorQuantizer(**{**args, **kw})


def _z(rows) -> torch.Tensor:
    """(N, D) rows -> (1, D, 1, N): N vectors along the width."""
    return torch.tensor(rows, dtype=torch.float32).t()[None, :, None, :].contiguous()


@pytest.mark.parametrize("channels,size,num_down,latent", [(1, 8, 1, (4, 4, 4)), (3, 32, 2, (4, 8, 8))])
def test_round_trip_shapes(channels, size, num_down, latent):
    torch.manual_seed(0)
    cfg = VQVAEConfig(hidden=16, num_down=num_down, res_blocks=1, latent_dim=4, codebook_size=16)
    model = VQVAE.from_config(cfg, channels=channels, image_size=size)
    x = torch.rand(3, channels, size, size) * 2 - 1
    assert model.latent_shape == latent
    for quantize in (True, False):
        z = model.encode(x, quantize=quantize)
        assert z.shape == (3, *latent)
        assert model.decode(z).shape == x.shape
    recon, loss, stats = model(x)
    assert recon.shape == x.shape and loss.shape == () and model.codes(x).shape == (3, *latent[1:])
    assert set(stats) >= {"perplexity", "used_codes"}
    # quantised latents are rows of the codebook
    zq = model.encode(x).permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.cdist(zq, model.quantizer.codebook).min(1).values.max() == 0
    with pytest.raises(ValueError, match="--model.num-down"):
        VQVAE.from_config(VQVAEConfig(num_down=3), channels=1, image_size=12)


def test_straight_through_gradient_is_the_identity():
    torch.manual_seed(0)
    model = VQVAE(channels=1, image_size=8, hidden=8, res_blocks=1, codebook_size=8)
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    codebook = model.quantizer.codebook.clone()  # training mode: the EMA step moves it after the look-up
    z_e = model.encoder(x)
    z_e.retain_grad()
    out = model.quantizer(z_e)
    out.quantized.retain_grad()
    model.decoder(out.quantized).pow(2).sum().backward()  # the reconstruction path only
    assert out.quantized.grad.abs().sum() > 0
    assert torch.equal(z_e.grad, out.quantized.grad)  # d/dz_e = d/dz_q exactly
    # the forward value is the codes' values, not the encoder output (up to z + (q - z) rounding)
    assert torch.allclose(out.quantized.detach(), codebook[out.codes].permute(0, 3, 1, 2), atol=1e-6)


def test_nearest_code_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    vq = _vq(num_codes=50, dim=4)
    vq.codebook.copy_(torch.randn(50, 4, generator=g))
    flat = torch.randn(300, 4, generator=g)
    brute = ((flat[:, None, :] - vq.codebook[None]) ** 2).sum(-1).argmin(1)
    assert torch.equal(vq.nearest(flat), brute)


@pytest.mark.parametrize("ema_decay,factor", [(0.99, 0.25), (0.0, 1.25)])
def test_commitment_loss_by_hand(ema_decay, factor):
    vq = _vq(ema_decay=ema_decay).eval()
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    out = vq(_z([[0.1, 0.2], [0.9, 1.3]]))
    assert out.codes.flatten().tolist() == [0, 1]
    # squared errors 0.01 + 0.04 + 0.01 + 0.09 = 0.15 over 4 numbers; EMA: beta * that, learned: (1 + beta) *
    assert out.loss.item() == pytest.approx(factor * 0.15 / 4, rel=1e-5)


def test_ema_update_by_hand():
    vq = _vq(ema_decay=0.5, eps=1e-5).train()
    vq.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    vq.embed_sum.copy_(vq.codebook)  # cluster_size starts at 1 each: as if each code had seen itself once
    out = vq(_z([[0.1, 0.2], [0.3, 0.0], [0.9, 1.3]]))
    assert out.codes.flatten().tolist() == [0, 0, 1]
    # counts (2, 1): cluster = 0.5 * 1 + 0.5 * counts; embed_sum = 0.5 * old + 0.5 * sum of assigned
    assert vq.cluster_size.tolist() == pytest.approx([1.5, 1.0])
    sums = torch.tensor([[0.2, 0.1], [0.95, 1.15]])
    assert torch.allclose(vq.embed_sum, sums)
    n, eps = 2.5, 1e-5
    smoothed = (torch.tensor([1.5, 1.0]) + eps) / (n + 2 * eps) * n  # Laplace smoothing
    assert torch.allclose(vq.codebook, sums / smoothed[:, None], atol=1e-7)
    assert vq.codebook[0].tolist() == pytest.approx([0.2 / 1.5, 0.1 / 1.5], abs=1e-5)
    assert out.stats["perplexity"].item() == pytest.approx(torch.tensor([2 / 3, 1 / 3]).log().mul(
        torch.tensor([-2 / 3, -1 / 3])).sum().exp().item(), rel=1e-5)
    assert out.stats["used_codes"].item() == 1.0


def test_dead_code_restart_replaces_an_unused_code():
    rows = [[0.1, 0.2], [0.3, 0.0], [0.2, 0.1]]
    torch.manual_seed(0)
    # learned codebook: the restarted code is exactly one of the batch's vectors
    vq = _vq(num_codes=3, ema_decay=0.0, dead_code_threshold=1.0).train()
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0, 0.0], [0.1, 0.1], [100.0, 100.0]]))
    vq.cluster_size.copy_(torch.tensor([5.0, 5.0, 0.0]))  # code 2 has gone unused
    out = vq(_z(rows))
    assert out.stats["restarts"].item() == 1
    assert vq.codebook[2].tolist() in [pytest.approx(r) for r in rows]
    assert torch.equal(vq.codebook[:2], torch.tensor([[0.0, 0.0], [0.1, 0.1]]))
    # EMA codebook: the restart sets the code, its count (= threshold) and its sum consistently
    vq = _vq(num_codes=3, dead_code_threshold=2.0)
    vq.codebook.copy_(torch.tensor([[0.0, 0.0], [0.1, 0.1], [100.0, 100.0]]))
    vq.cluster_size.copy_(torch.tensor([5.0, 1.9, 3.0]))
    assert vq.restart_dead_codes(torch.tensor(rows)) == 1
    assert vq.codebook[1].tolist() in [pytest.approx(r) for r in rows]
    assert vq.cluster_size.tolist() == [5.0, 2.0, 3.0]
    assert torch.allclose(vq.embed_sum[1], 2.0 * vq.codebook[1])
    assert vq.restart_dead_codes(torch.tensor(rows)) == 0


@pytest.mark.parametrize("ema_decay", [0.99, 0.0])
def test_eval_mode_and_encode_leave_the_codebook_alone(ema_decay):
    torch.manual_seed(0)
    model = VQVAE(channels=1, image_size=8, hidden=8, res_blocks=1, codebook_size=8, ema_decay=ema_decay,
                  dead_code_threshold=5.0)  # every code "dead": training mode would restart them all
    before = {k: v.clone() for k, v in model.quantizer.state_dict().items()}
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    model.eval()
    model(x)
    model.train()
    model.encode(x)  # encode never touches the statistics, in any mode
    assert all(torch.equal(v, before[k]) for k, v in model.quantizer.state_dict().items())
    model(x)  # training mode: statistics move
    assert not torch.equal(model.quantizer.cluster_size, before["cluster_size"])


def test_cli_trains_writes_pictures_resumes_and_loads(tmp_path, capsys):
    from genlab.cli import main
    from genlab.config import load_config, validate
    from genlab.data.images import ImageDataConfig, load_images
    from genlab.flow.vqvae import VQVAERunConfig, encode_dataset, load_vqvae

    run = tmp_path / "vq"
    tiny = ["--train.batch-size", "16", "--train.no-progress", "--train.checkpoint-every", "2", "--recon-every", "2",
            "--model.hidden", "8", "--model.res-blocks", "1", "--model.codebook-size", "16"]
    assert main(["flow", "vqvae", "--run-dir", str(run), "--train.steps", "3", *tiny]) == 0
    for name in ("config.yaml", "reconstructions.png", "eval.json", "vqvae.json", "loss.png"):
        assert (run / name).is_file(), name
    report = json.loads((run / "eval.json").read_text())
    assert report["step"] == 3 and report["latent_shape"] == [4, 4, 4] and report["codebook_size"] == 16
    assert 1 <= report["perplexity"] <= 16 and report["used_codes"] == report["used_codes_count"] / 16
    train = [json.loads(r) for r in open(run / "metrics.jsonl")]
    assert {"recon_mse", "vq_loss", "perplexity", "used_codes"} <= set(train[0])

    assert main(["flow", "vqvae", "--resume", str(run), "--train.steps", "5"]) == 0
    assert json.loads((run / "eval.json").read_text())["step"] == 5
    assert (run / "checkpoints" / "step_00000005").is_dir()

    vq, cfg = load_vqvae(run)
    assert not vq.training and cfg.model.hidden == 8 and cfg.train.steps == 5
    test = load_images(ImageDataConfig(), "test")
    z = encode_dataset(vq, test, quantize=True, batch=100)
    assert z.shape == (len(test), 4, 4, 4) and z.dtype == torch.float32
    assert torch.allclose(z[:10], vq.encode(torch.as_tensor(test.images[:10]).float() / 127.5 - 1))
    assert vq.decode(z[:2]).shape == (2, 1, 8, 8)

    preset = load_config(VQVAERunConfig, "flow/vqvae-digits")
    validate(preset)
    assert preset.data.name == "digits" and preset.train.ema_decay == 0
