"""The DiT velocity model: shapes, adaLN-Zero start, patch layout, null class, label dropout, checkpointing."""

import pytest
import torch

from genlab.config import ConfigError, validate
from genlab.flow.models.dit import DiT, DiTConfig, drop_labels, patchify, unpatchify
from genlab.nn.embeddings import PatchEmbedding

torch.set_num_threads(1)

TINY = dict(hidden=32, depth=2, heads=4, patch=2)


def _tiny(seed=0, **kw) -> DiT:
    torch.manual_seed(seed)
    return DiT.from_config(DiTConfig(**{**TINY, **kw}), channels=3, image_size=8, num_classes=5)


def _perturb(model: DiT, seed=1) -> DiT:
    """Move every parameter away from its (partly zero) initial value, so nothing is trivially 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _batch(B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, 8, 8, generator=g), torch.rand(B, generator=g), torch.tensor([0, 4, 5, 2])[:B]


def test_shapes_forward_backward_and_output_zero_at_init():
    model = _tiny()
    x, t, y = _batch()
    out = model(x, t, y)
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(x))  # zero final layer: a fresh DiT predicts exactly 0
    _perturb(model)
    out = model(x, t, y)
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert "pos_embed" not in model.state_dict() and not any(n == "pos_embed" for n, _ in model.named_parameters())
    assert model.null_class == 5 and model.y_embedder.num_embeddings == 6


def test_blocks_start_as_identity_and_conditioning_init():
    model = _tiny()
    tokens = torch.randn(2, 16, 32)
    c = torch.randn(2, 32)
    for block in model.blocks:
        assert torch.equal(block(tokens, c), tokens)  # every gate is 0: the residual branch adds nothing
    assert model.y_embedder.weight.std().item() == pytest.approx(0.02, rel=0.3)
    q = model.blocks[0].attn.q_proj.weight
    bound = (6 / (32 + 3 * 32)) ** 0.5  # xavier over DiT's fused (3D, D) qkv matrix
    assert q.abs().max() <= bound and q.abs().max() > 0.8 * bound


def test_patchify_layout_matches_patch_embedding_and_unpatchify_inverts_it():
    x = torch.randn(2, 3, 8, 6)
    tokens = patchify(x, 2)  # (2, 12, 12)
    assert tokens.shape == (2, 12, 12)
    torch.testing.assert_close(unpatchify(tokens, 2, 3, 4, 3), x, rtol=0, atol=0)
    # token n = i * 3 + j is patch (i, j), features (row, col, channel): check one entry by hand
    i, j, r, q, ch = 2, 1, 1, 0, 2
    assert tokens[1, i * 3 + j, (r * 2 + q) * 3 + ch] == x[1, ch, 2 * i + r, 2 * j + q]
    # PatchEmbedding orders its tokens the same way (a conv that copies one pixel of each patch)
    conv = PatchEmbedding(3, 1, 2, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, ch, r, q] = 1.0
    torch.testing.assert_close(conv(x)[..., 0], tokens[..., (r * 2 + q) * 3 + ch])


def test_null_class_and_none_labels_agree_and_labels_matter():
    model = _perturb(_tiny())
    x, t, y = _batch()
    null = torch.full_like(y, model.null_class)
    torch.testing.assert_close(model(x, t, None), model(x, t, null))
    assert not torch.allclose(model(x, t, y), model(x, t, null))


def test_interval_input_h_none_is_zero_and_h_matters():
    model = _perturb(_tiny(interval_input=True))
    x, t, y = _batch()
    torch.testing.assert_close(model(x, t, y), model(x, t, y, h=torch.zeros(4)))
    assert not torch.allclose(model(x, t, y, h=torch.full((4,), 0.5)), model(x, t, y))
    assert _tiny().h_embedder is None


def test_drop_labels_rate():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (20000,), generator=g)
    out = drop_labels(y, 0.1, null_class=5, generator=g)
    dropped = out == 5
    assert dropped.float().mean().item() == pytest.approx(0.1, abs=0.01)  # ~4.7 sigma
    assert torch.equal(out[~dropped], y[~dropped])
    model = _tiny()
    assert torch.equal(model.drop_labels(y, 0.0), y)
    assert (model.drop_labels(y, generator=g) == 5).float().mean().item() == pytest.approx(0.1, abs=0.01)


def test_grad_checkpointing_gives_the_same_grads():
    x, t, y = _batch()

    def grads(ckpt):
        model = _perturb(_tiny(grad_checkpointing=ckpt)).train()
        model(x, t, y).square().mean().backward()
        return [p.grad for p in model.parameters()]

    for a, b in zip(grads(False), grads(True)):
        torch.testing.assert_close(a, b)


def test_config_checks_and_size_errors():
    with pytest.raises(ConfigError, match="heads"):
        validate(DiTConfig(hidden=30, heads=4))
    with pytest.raises(ConfigError, match="multiple of 4"):
        validate(DiTConfig(hidden=6, heads=3))
    validate(DiTConfig())
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        DiT.from_config(DiTConfig(**TINY), channels=3, image_size=9, num_classes=2)
    with pytest.raises(ValueError, match="expected images"):
        _tiny()(torch.randn(1, 3, 4, 4), torch.rand(1))
