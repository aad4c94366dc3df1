"""BERT-family tokenizer helpers: truncation, padding to the batch's longest text, the attention mask."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from genlab.data.tokenizers import encode_padded, load_wordpiece_tokenizer


@pytest.fixture
def bert_folder(tmp_path):
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "red", "cube", "and", "sphere"])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(str(tmp_path / "tokenizer.json"))
    return tmp_path


def test_pads_to_longest_and_truncates(bert_folder):
    tok = load_wordpiece_tokenizer(bert_folder, max_length=5)
    ids, mask = encode_padded(tok, ["a red cube", "a red cube and a sphere", "cube"])
    assert ids.tolist() == [[2, 4, 5, 6, 3], [2, 4, 5, 6, 3], [2, 6, 3, 0, 0]]  # row 2 cut to 5 ([SEP] kept)
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]


def test_missing_tokenizer_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_wordpiece_tokenizer(tmp_path)
