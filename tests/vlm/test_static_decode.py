"""The static-shape decode step (``PaliGemma.decode_step``): same logits as the growing-cache
forward and as full recomputation, same greedy tokens as transformers, with left padding and for
PaliGemma 2 (sliding window + soft-capping), and one compiled graph for every step."""

import tempfile

import pytest
import torch

import genlab.vlm.generation as generation
from genlab.vlm.generation import generate
from genlab.vlm.hf_io import load_paligemma
from tests.vlm.tiny_hf import EOS, PAD, make_batch, tiny_hf_paligemma

torch.set_num_threads(1)
TOL = 1e-5


@pytest.fixture(scope="module", params=[(1, 1), (2, 2)], ids=["pg1-mqa", "pg2-gqa-window6"])
def pair(request, tmp_path_factory):
    version, kv = request.param
    ref = tiny_hf_paligemma(version, kv, seed=3 + version, sliding_window=6)
    folder = tmp_path_factory.mktemp(f"static{version}")
    ref.save_pretrained(folder)
    return ref, load_paligemma(folder)[0]


def decode_both_ways(model, ids, mask, pixels, steps, step_fn=None):
    """Greedy decoding of ``steps`` tokens twice from one prompt: through the static step (into a
    cache with spare slots, so masked-out slots exist) and through ``model(token, cache=...)``.
    Returns (static logits, dynamic logits, tokens), logits (B, steps + 1, V)."""
    B, P = ids.shape
    step_fn = step_fn or model.decode_step
    static, dynamic = model.new_cache(B, P + steps + 5), model.new_cache(B, P + steps)
    first = model(ids, pixels, mask, cache=static)[:, -1]
    assert torch.equal(first, model(ids, pixels, mask, cache=dynamic)[:, -1])
    got, want, tokens = [first], [first], []
    for _ in range(steps):
        tokens.append(got[-1].argmax(-1))
        got.append(step_fn(tokens[-1][:, None], static)[:, -1])
        static.advance(1)
        want.append(model(tokens[-1][:, None], cache=dynamic)[:, -1])
    assert static.length == dynamic.length and int(static.pos) == static.length
    return torch.stack(got, 1), torch.stack(want, 1), torch.stack(tokens, 1)


@torch.no_grad()
def test_static_step_equals_growing_cache_and_full_recomputation(pair):
    _, model = pair
    ids, mask, _, pixels = make_batch(pads=[0, 4, 2], text_len=4, seed=8)
    B, P = ids.shape
    steps = 10  # the prompt is > 20 tokens and the window 6: sliding layers drop keys every step
    got, want, tokens = decode_both_ways(model, ids, mask, pixels, steps)
    assert (got - want).abs().max() <= TOL
    seq = torch.cat([ids, tokens], 1)
    full_mask = torch.cat([mask, torch.ones(B, steps, dtype=mask.dtype)], 1)
    types = torch.cat([torch.zeros_like(ids), torch.ones(B, steps, dtype=torch.long)], 1)
    full = model(seq, pixels, full_mask, types)
    assert (got - full[:, P - 1:]).abs().max() <= TOL


@torch.no_grad()
def test_static_generate_matches_transformers_greedy(pair):
    ref, model = pair
    ids, mask, _, pixels = make_batch(pads=[3, 0], text_len=5, seed=9)
    want = ref.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, token_type_ids=torch.zeros_like(ids),
                        max_new_tokens=12, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)[:, ids.shape[1]:]
    assert torch.equal(generate(model, ids, mask, pixels, 12), want)


def test_sliding_window_is_applied_in_static_step(pair):
    """Guard for the test above: widening the window changes PaliGemma 2's logits, so the
    equalities there would catch a static step that ignored the window."""
    _, model = pair
    cfg = model.language_model.config
    if cfg.sliding_window is None:
        pytest.skip("PaliGemma 1 has no sliding window")
    ids, mask, _, pixels = make_batch(pads=[0], text_len=4, seed=8)
    with torch.no_grad():
        narrow, _, _ = decode_both_ways(model, ids, mask, pixels, 3)
        cfg.sliding_window = 10_000
        try:
            wide = decode_both_ways(model, ids, mask, pixels, 3)[0]
        finally:
            cfg.sliding_window = 6
    assert (narrow[:, 1:] - wide[:, 1:]).abs().max() > 1e-3


def test_static_step_compiles_once(pair):
    """dynamo sees the same shapes and python state every step: one graph, no recompilation
    (the aot_eager backend checks tracing and guards without paying for C++ compilation)."""
    _, model = pair
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    step = torch.compile(model.decode_step, backend="aot_eager", dynamic=False)
    ids, mask, _, pixels = make_batch(pads=[0, 2], text_len=4, seed=10)
    with torch.no_grad():
        got, want, _ = decode_both_ways(model, ids, mask, pixels, 6, step_fn=step)
    assert (got - want).abs().max() <= TOL
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["recompiles"] and counters["stats"]["calls_captured"] > 0


def test_compiled_generate_picks_the_right_graph_for_each_model_and_batch(monkeypatch):
    """After its first compiled step, generate skips dynamo's guard checks; a second batch size
    and a second model (other config) must still run their own graphs and give the eager tokens.
    (aot_eager instead of inductor: same tracing and guards, no C++ compile.)"""
    monkeypatch.setattr(generation, "compiled_decode_step",
                        lambda model, cache: torch.compile(model.decode_step, backend="aot_eager", dynamic=False))
    torch._dynamo.reset()
    models = [tiny_hf_paligemma(version, kv, seed=20 + version, sliding_window=6) for version, kv in [(1, 1), (2, 2)]]
    with torch.no_grad():
        for i, ref in enumerate(models):
            with tempfile.TemporaryDirectory() as folder:
                ref.save_pretrained(folder)
                model = load_paligemma(folder)[0]
            for pads in ([0, 2], [0]):
                ids, mask, _, pixels = make_batch(pads=pads, text_len=4, seed=12 + i)
                eager = generate(model, ids, mask, pixels, 8, eos_token_id=-1)
                assert torch.equal(generate(model, ids, mask, pixels, 8, eos_token_id=-1, compile=True), eager)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 4  # one per (model, batch)


def test_compiled_generate_shares_one_graph_across_nearby_prompt_lengths(pair, monkeypatch):
    """The cache length is rounded up to a bucket, so prompts of 21 and 26 tokens (+ 8 new) reuse
    one compiled step, and still give the eager tokens."""
    _, model = pair
    monkeypatch.setattr(generation, "compiled_decode_step",
                        lambda model, cache: torch.compile(model.decode_step, backend="aot_eager", dynamic=False))
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    with torch.no_grad():
        for text_len in (4, 9):
            ids, mask, _, pixels = make_batch(pads=[0, 1], text_len=text_len, seed=30 + text_len)
            eager = generate(model, ids, mask, pixels, 8, eos_token_id=-1)
            assert torch.equal(generate(model, ids, mask, pixels, 8, eos_token_id=-1, compile=True), eager)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"]


@pytest.mark.slow
def test_generate_compile_gives_the_eager_tokens(pair):
    """generate(compile=True) with inductor (compiles C++: tens of seconds)."""
    _, model = pair
    ids, mask, _, pixels = make_batch(pads=[0, 3], text_len=4, seed=11)
    eager = generate(model, ids, mask, pixels, 10, eos_token_id=-1)
    assert torch.equal(generate(model, ids, mask, pixels, 10, eos_token_id=-1, compile=True), eager)
