"""Token selection: filters against transformers' logits warpers, seeded draws, argument checks."""

import pytest
import torch

from genlab.nn.sampling import check_sampling_args, filter_logits, select_next

torch.set_num_threads(1)


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = lambda **kw: {int(select_next(logits, True, generator=g, **kw)) for _ in range(200)}
    g = torch.Generator().manual_seed(0)
    assert draws(top_k=2) == {0, 1}
    assert draws(top_p=0.75) == {0, 1}  # 0.5 + 0.3 reaches 0.75; 0.15 and 0.05 are cut
    assert draws(top_p=0.01) == {0}
    assert draws(temperature=0.01) == {0}
    assert int(select_next(logits)) == 0


def _transformers_filter(logits, temperature, top_k, top_p):
    """transformers' own warpers, in the order its generate() applies them."""
    transformers = pytest.importorskip("transformers")
    ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)
    if temperature != 1.0:
        logits = transformers.TemperatureLogitsWarper(temperature)(ids, logits)
    if top_k > 0:
        logits = transformers.TopKLogitsWarper(top_k)(ids, logits)
    if top_p < 1.0:
        logits = transformers.TopPLogitsWarper(top_p)(ids, logits)
    return logits


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.8),
                                                      (0.6, 20, 0.9), (1.0, 1, 1.0), (2.0, 100, 0.3)])
def test_filter_matches_transformers_warpers(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 64, generator=g) * 3
    logits[0, :8] = logits[0, 8]  # ties at the k-th value
    got = filter_logits(logits, temperature, top_k, top_p)
    want = _transformers_filter(logits.clone(), temperature, top_k, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.equal(got[~torch.isinf(got)], want[~torch.isinf(want)])
    # and the draw is multinomial over the softmax of exactly those logits
    tokens = select_next(logits, True, temperature, top_k, top_p, generator=torch.Generator().manual_seed(2))
    expected = torch.multinomial(want.softmax(-1), 1, generator=torch.Generator().manual_seed(2)).squeeze(1)
    assert torch.equal(tokens, expected)


def test_check_sampling_args_names_the_option():
    check_sampling_args(False, 0.0, 0, 1.0)  # greedy ignores temperature
    check_sampling_args(True, 0.5, 40, 0.95)
    for args, option in [((True, 0.0, 0, 1.0), "temperature"), ((True, -1.0, 0, 1.0), "temperature"),
                         ((True, float("nan"), 0, 1.0), "temperature"), ((False, 1.0, -1, 1.0), "top_k"),
                         ((True, 1.0, 2.5, 1.0), "top_k"), ((True, 1.0, 0, 0.0), "top_p"),
                         ((True, 1.0, 0, 1.5), "top_p"), ((False, 1.0, 0, float("nan")), "top_p")]:
        with pytest.raises(ValueError, match=rf"^{option} must be"):
            check_sampling_args(*args)
