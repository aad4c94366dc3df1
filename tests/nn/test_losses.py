"""linear_cross_entropy: the same loss, argmax hits and gradients as F.cross_entropy on the full logits."""

import pytest
import torch
import torch.nn.functional as F

from genlab.nn.losses import linear_cross_entropy


@pytest.mark.parametrize("softcap, chunk", [(None, 4), (None, 64), (3.0, 5)])
def test_equals_cross_entropy_on_the_full_logits(softcap, chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(13, 8, generator=g, requires_grad=True)
    w = torch.randn(37, 8, generator=g, requires_grad=True)
    y = torch.randint(0, 37, (13,), generator=g)
    loss, correct = linear_cross_entropy(h, w, y, softcap, chunk)
    loss.backward()
    got = (loss.detach(), h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    logits = h @ w.T
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    want = F.cross_entropy(logits, y)
    want.backward()
    torch.testing.assert_close(got[0], want.detach())
    torch.testing.assert_close(got[1], h.grad)
    torch.testing.assert_close(got[2], w.grad)
    assert int(correct) == int((logits.argmax(-1) == y).sum())


def test_frozen_weight_gets_no_gradient_and_no_rows_give_zero():
    h = torch.randn(6, 4, requires_grad=True)
    w = torch.randn(10, 4)
    loss, _ = linear_cross_entropy(h, w, torch.arange(6), None, 4)
    loss.backward()
    assert h.grad is not None and w.grad is None
    empty, n = linear_cross_entropy(torch.zeros(0, 4), w, torch.zeros(0, dtype=torch.long))
    assert float(empty) == 0.0 and int(n) == 0


# --------------------------------------------------------------------------------------------------
# contrastive_loss and sigmoid_loss against independent float64 loops.
# --------------------------------------------------------------------------------------------------

import math  # noqa: E402

from genlab.nn.losses import contrastive_loss, sigmoid_loss  # noqa: E402


def _log_softmax_loop(xs: list[float]) -> list[float]:
    m = max(xs)
    lse = m + math.log(sum(math.exp(x - m) for x in xs))
    return [x - lse for x in xs]


def _contrastive_loop(logits: torch.Tensor, pos: torch.Tensor, eps: float = 0.0) -> float:
    """CLIP's loss written out with Python floats: rows, then columns, each target uniform over the
    positives of its row/column and mixed with eps / C of the uniform distribution."""
    lg, p = logits.double().tolist(), pos.tolist()
    n_img, n_txt = len(lg), len(lg[0])

    def ce(rows: list[list[float]], masks: list[list[bool]]) -> float:
        total = 0.0
        for xs, m in zip(rows, masks):
            lp, k = _log_softmax_loop(xs), sum(m)
            for x, is_pos in zip(lp, m):
                q = (1 - eps) * (1.0 / k if is_pos else 0.0) + eps / len(xs)
                total -= q * x
        return total / len(rows)

    cols = [[lg[i][j] for i in range(n_img)] for j in range(n_txt)]
    col_masks = [[p[i][j] for i in range(n_img)] for j in range(n_txt)]
    return (ce(lg, p) + ce(cols, col_masks)) / 2


def _sigmoid_loop(logits: torch.Tensor, pos: torch.Tensor) -> float:
    total = 0.0
    for row, prow in zip(logits.double().tolist(), pos.tolist()):
        for x, is_pos in zip(row, prow):
            zx = x if is_pos else -x
            # log sigmoid(a) = -log(1 + e^-a), written stably for both signs
            total += -math.log1p(math.exp(-zx)) if zx >= 0 else zx - math.log1p(math.exp(zx))
    return -total / len(logits)


def _random_positives(n_img: int, n_txt: int, g: torch.Generator) -> torch.Tensor:
    """Each caption belongs to one image, every image has at least one caption (several for some)."""
    owner = torch.cat([torch.arange(n_img), torch.randint(0, n_img, (n_txt - n_img,), generator=g)])
    return torch.arange(n_img)[:, None] == owner[None, :]  # (N_img, N_txt)


def test_contrastive_loss_equals_cross_entropy_both_ways_on_the_diagonal():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(7, 7, generator=g, dtype=torch.float64) * 3
    y = torch.arange(7)
    want = (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y)) / 2
    torch.testing.assert_close(contrastive_loss(logits), want)
    assert math.isclose(float(contrastive_loss(logits)), _contrastive_loop(logits, torch.eye(7, dtype=torch.bool)),
                        rel_tol=1e-12)
    # label smoothing as F.cross_entropy defines it
    want_ls = (F.cross_entropy(logits, y, label_smoothing=0.1) + F.cross_entropy(logits.T, y, label_smoothing=0.1)) / 2
    torch.testing.assert_close(contrastive_loss(logits, label_smoothing=0.1), want_ls)


@pytest.mark.parametrize("n_img, n_txt, eps", [(4, 9, 0.0), (5, 5, 0.0), (3, 8, 0.2)])
def test_contrastive_loss_with_several_positives_matches_the_loop(n_img, n_txt, eps):
    g = torch.Generator().manual_seed(n_img * 10 + n_txt)
    logits = torch.randn(n_img, n_txt, generator=g) * 4
    pos = _random_positives(n_img, n_txt, g)
    if n_img == n_txt:  # a duplicate caption: texts 1 and 2 are the same string, both match images 1 and 2
        pos = torch.eye(n_img, dtype=torch.bool)
        pos[1, 2] = pos[2, 1] = True
    got = contrastive_loss(logits, pos, label_smoothing=eps)
    assert math.isclose(float(got), _contrastive_loop(logits, pos, eps), rel_tol=1e-5)


def test_contrastive_loss_uniform_target_over_duplicates():
    # Captions 0 and 1 are the same string of image 0. The best a model can do is split image 0's
    # mass evenly, and these logits do: row 0's cross-entropy is the entropy of uniform-over-2,
    # log 2; row 1 scores 0, so i2t = log 2 / 2. Every column is sure of its image: t2i = 0.
    # Loss = (log 2 / 2 + 0) / 2. (A one-hot target would instead charge log 2 for caption 1.)
    logits = torch.tensor([[50.0, 50.0, -50.0], [-50.0, -50.0, 50.0]])
    pos = torch.tensor([[True, True, False], [False, False, True]])
    torch.testing.assert_close(contrastive_loss(logits, pos), torch.tensor(math.log(2) / 2 / 2), atol=1e-6, rtol=0)


def test_contrastive_loss_needs_a_positive_in_every_row_and_column():
    pos = torch.tensor([[True, False, False], [False, True, False]])
    with pytest.raises(ValueError, match="columns"):
        contrastive_loss(torch.zeros(2, 3), pos)
    with pytest.raises(ValueError, match="square"):
        contrastive_loss(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="shape"):
        contrastive_loss(torch.zeros(2, 2), torch.eye(3, dtype=torch.bool))


def test_contrastive_loss_is_stable_at_extreme_logits_with_finite_gradients():
    # 1e4-scale logits: a naive exp() overflows. Row 0 puts its mass on the right caption
    # (loss 0), row 1 puts it on the wrong one by a margin of 2e4 (loss 2e4); the loop is exact.
    logits = torch.tensor([[1e4, -1e4], [1e4, -1e4]], requires_grad=True)
    loss = contrastive_loss(logits)
    assert torch.isfinite(loss)
    want = _contrastive_loop(logits.detach(), torch.eye(2, dtype=torch.bool))
    assert math.isclose(float(loss.detach()), want, rel_tol=1e-6)
    # i2t: row0 0, row1 2e4 -> mean 1e4; t2i: col0 softmax over (1e4, 1e4) -> log 2, col1 log 2 -> mean log 2
    assert math.isclose(want, (1e4 + math.log(2)) / 2, rel_tol=1e-9)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    # bf16 input is computed in float32 and stays finite
    assert torch.isfinite(contrastive_loss(logits.detach().bfloat16()))


@pytest.mark.parametrize("n_img, n_txt", [(6, 6), (3, 7)])
def test_sigmoid_loss_matches_the_loop(n_img, n_txt):
    g = torch.Generator().manual_seed(n_txt)
    logits = torch.randn(n_img, n_txt, generator=g) * 5 - 2
    pos = torch.eye(n_img, dtype=torch.bool) if n_img == n_txt else _random_positives(n_img, n_txt, g)
    got = sigmoid_loss(logits, pos if n_img != n_txt else None)
    assert math.isclose(float(got), _sigmoid_loop(logits, pos), rel_tol=1e-5)


def test_sigmoid_loss_at_extreme_logits_and_by_hand():
    # log sigmoid(z * x) is 0 (to float precision) when z * x = +1e4 and -1e4 when z * x = -1e4;
    # a naive log(1 / (1 + exp(-x))) gives -inf there. Positives on the diagonal:
    # (0,0) pos x=1e4 -> 0; (0,1) neg x=-1e4 -> 0; (1,0) neg x=1e4 -> -1e4; (1,1) pos x=1e4 -> 0,
    # so loss = -(1/2) * (-1e4) = 5e3.
    logits = torch.tensor([[1e4, -1e4], [1e4, 1e4]], requires_grad=True)
    loss = sigmoid_loss(logits)
    assert math.isclose(float(loss.detach()), 5e3, rel_tol=1e-7)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    # by hand at zero logits: every pair costs log 2, 4 pairs over 2 images -> 2 log 2
    assert math.isclose(float(sigmoid_loss(torch.zeros(2, 2))), 2 * math.log(2), rel_tol=1e-6)
