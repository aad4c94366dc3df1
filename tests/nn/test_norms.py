import torch

from genlab.nn.norms import RMSNorm


def test_rmsnorm_matches_closed_form_with_offset():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    for offset in (0.0, 1.0):
        norm = RMSNorm(16, eps=1e-6, offset=offset).double()
        with torch.no_grad():
            norm.weight.normal_()
        rms = torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-6)
        want = x / rms * (offset + norm.weight.detach())
        assert torch.allclose(norm(x), want, atol=1e-12)


def test_rmsnorm_starts_as_plain_normalisation():
    x = torch.randn(4, 8) * 3
    for offset in (0.0, 1.0):
        y = RMSNorm(8, offset=offset)(x)
        assert torch.allclose(y.pow(2).mean(-1), torch.ones(4), atol=1e-4)


def test_rmsnorm_bf16_scales_in_float32_before_casting():
    """Gemma's order: (x_hat * (1 + w)) in float32, then one rounding to bf16."""
    torch.manual_seed(1)
    norm = RMSNorm(64, offset=1.0)
    with torch.no_grad():
        norm.weight.normal_()
    norm = norm.bfloat16()
    x = torch.randn(2, 64).bfloat16()
    xf, w = x.float(), norm.weight.detach().float()
    want = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + w)).bfloat16()
    rounded_first = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16() * (1 + w).bfloat16()
    assert not torch.equal(rounded_first, want)  # the order is observable at this size
    got = norm(x)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want)
