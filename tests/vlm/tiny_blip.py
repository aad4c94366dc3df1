"""Tiny random assets for the BLIP-2 stages' tests, written as the folders the real ones come in: a
BERT-family folder (the Q-Former's text side), a SigLIP or ViT vision folder, a causal LM folder."""

import json

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from genlab.data.shapes import text_corpus, vocabulary
from genlab.data.tokenizers import make_tiny_tokenizer
from genlab.vlm.siglip import SiglipConfig, SiglipVisionTower
from genlab.vlm.vision_io import save_vision_tower


def bert_folder(folder, seed: int = 0):
    """A random 2-layer BERT (32 wide) whose WordPiece tokenizer knows every word of the shapes world."""
    import transformers

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", ",", "."] + sorted({w for t in vocabulary() for w in t.split()})
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=64)
    transformers.BertModel(cfg).save_pretrained(str(folder), safe_serialization=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def lm_folder(folder):
    """A random 2-layer Llama (64 wide) with a BPE tokenizer trained on the shapes world's texts."""
    import transformers

    make_tiny_tokenizer(folder, 300, text_corpus(np.random.default_rng(0), 50) + ["Describe this image"])
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   eos_token_id=1, pad_token_id=0, bos_token_id=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(folder))
    return folder


def vision_folder(folder, image_size: int = 16, seed: int = 1):
    """A random 1-layer SigLIP tower (32 wide, patch 4) saved as a HF SigLIP vision folder."""
    torch.manual_seed(seed)
    cfg = SiglipConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       image_size=image_size, patch_size=4)
    return save_vision_tower(SiglipVisionTower(cfg), folder)


def vit_folder(folder, image_size: int = 16, seed: int = 1, hidden_size: int = 48, mean=None, std=None,
               classifier: bool = False):
    """A random 1-layer transformers ViT (patch 4) saved with save_pretrained: ViTModel without its pooler,
    or ViTForImageClassification (``classifier``: keys under ``vit.`` plus ``classifier.*``); with a
    preprocessor_config.json when ``mean`` / ``std`` are given."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.ViTConfig(hidden_size=hidden_size, num_hidden_layers=1, num_attention_heads=4,
                                 intermediate_size=2 * hidden_size, image_size=image_size, patch_size=4,
                                 num_labels=5)
    model = (transformers.ViTForImageClassification(cfg) if classifier else
             transformers.ViTModel(cfg, add_pooling_layer=False))
    model.save_pretrained(str(folder))
    if mean is not None or std is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(
            {"image_processor_type": "ViTImageProcessor", "do_normalize": True, "image_mean": mean or [0.5] * 3,
             "image_std": std or [0.5] * 3}))
    return folder
