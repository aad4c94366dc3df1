"""The text backbone: shapes, bidirectional vs causal, time conditioning, parameter counts."""

import torch

from genlab.text.models import TextTransformer, TextTransformerConfig


def tiny(**kw):
    torch.manual_seed(0)
    m = TextTransformer(TextTransformerConfig(vocab_size=11, hidden=32, depth=2, heads=4, max_len=16, **kw))
    for p in m.parameters():  # move away from adaLN-Zero's identity start so every path matters
        torch.nn.init.normal_(p, std=0.2)
    return m.eval()


def test_shapes_and_mask_embedding():
    m = tiny()
    assert m.embed.num_embeddings == 12 and m.mask_id == 11
    out = m(torch.full((2, 7), 11), torch.rand(2))
    assert out.shape == (2, 7, 11)


def test_only_the_bidirectional_model_sees_the_future():
    x = torch.randint(0, 11, (1, 8))
    y = x.clone()
    y[0, 6] = (x[0, 6] + 1) % 11
    for causal in (False, True):
        m = tiny(causal=causal)
        a, b = m(x), m(y)
        assert torch.allclose(a[:, :6], b[:, :6], atol=1e-6) == causal  # earlier outputs change only if bidirectional
        assert not torch.allclose(a[:, 6], b[:, 6])


def test_causal_baseline_has_the_same_parameters():
    a, b = tiny(), tiny(causal=True)
    assert [(k, v.shape) for k, v in a.state_dict().items()] == [(k, v.shape) for k, v in b.state_dict().items()]


def test_time_conditioning_is_used_only_when_on():
    x = torch.randint(0, 12, (2, 8))
    t0, t1 = torch.tensor([0.1, 0.1]), torch.tensor([0.8, 0.8])
    on, off = tiny(time_conditioning=True), tiny()
    assert not torch.allclose(on(x, t0), on(x, t1))
    assert torch.equal(off(x, t0), off(x, t1))


def test_a_fresh_model_is_uniform():
    m = TextTransformer(TextTransformerConfig(vocab_size=11, hidden=32, depth=2, heads=4))
    assert torch.equal(m(torch.randint(0, 12, (2, 5))), torch.zeros(2, 5, 11))  # zero-initialised output
