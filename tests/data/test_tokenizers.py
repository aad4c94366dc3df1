"""Locally trained tokenizers: round trips, vocabulary sizes, HF-format folders, damaged files."""

import json
import re

import pytest

from genlab.data.tokenizers import (DEFAULT_CORPUS, SPECIAL_TOKENS, load_tokenizer_file, make_tiny_tokenizer,
                                    save_tokenizer, train_bpe_tokenizer, train_char_tokenizer)
from genlab.errors import FileFormatError

UNICODE = "Grüße, naïve café — 日本語のテキスト 🙂\n\ttabs  and  double spaces, Ωμέγα."


def test_char_tokenizer_round_trips_unicode():
    tok = train_char_tokenizer([UNICODE, "plain ascii"])
    ids = tok.encode(UNICODE).ids
    assert len(ids) == len(UNICODE)  # one token per code point
    assert tok.decode(ids) == UNICODE
    vocab = tok.get_vocab()
    assert [vocab[t] for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    chars = sorted(set(UNICODE + "plain ascii"))
    assert [vocab[c] for c in chars] == list(range(len(SPECIAL_TOKENS), len(SPECIAL_TOKENS) + len(chars)))
    assert tok.encode("Z<mask>").ids == [vocab["<unk>"], vocab["<mask>"]]  # unseen char; verbatim special
    with pytest.raises(ValueError, match="unk_token"):
        train_char_tokenizer(["abc"], special_tokens=["<pad>"])


def test_bpe_tokenizer_respects_vocab_size_and_round_trips():
    corpus = DEFAULT_CORPUS * 3 + [UNICODE]
    for size in (300, 400):
        tok = train_bpe_tokenizer(corpus, size)
        assert tok.get_vocab_size() == size
    assert tok.decode(tok.encode(UNICODE).ids) == UNICODE
    unseen = "ünseen ßtuff ⚙ here"
    assert tok.decode(tok.encode(unseen).ids) == unseen  # byte level: nothing is unknown
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    with pytest.raises(ValueError, match="too small"):
        train_bpe_tokenizer(corpus, 200)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_saved_folder_loads_in_transformers_with_the_same_ids(tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    tok = train_char_tokenizer([UNICODE]) if kind == "char" else train_bpe_tokenizer(DEFAULT_CORPUS, 320)
    folder = save_tokenizer(tok, tmp_path / "tok")
    assert sorted(p.name for p in folder.iterdir()) == ["special_tokens_map.json", "tokenizer.json",
                                                        "tokenizer_config.json"]
    text = UNICODE
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    assert fast(text, add_special_tokens=False)["input_ids"] == tok.encode(text).ids
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    assert auto(text)["input_ids"] == tok.encode(text).ids
    assert (auto.pad_token_id, auto.eos_token_id, auto.mask_token_id) == (0, 1, 4)
    assert load_tokenizer_file(folder / "tokenizer.json").encode(text).ids == tok.encode(text).ids
    assert json.loads((folder / "special_tokens_map.json").read_text())["unk_token"] == "<unk>"


def test_damaged_tokenizer_file_is_a_file_format_error(tmp_path):
    folder = save_tokenizer(train_char_tokenizer(["hello"]), tmp_path / "tok")
    path = folder / "tokenizer.json"
    text = path.read_text()
    for damaged in (text[: len(text) // 2], "", "not json at all", json.dumps({"version": "1.0"})):
        path.write_text(damaged)
        with pytest.raises(FileFormatError, match=re.escape(str(path))):
            load_tokenizer_file(path)
    with pytest.raises(FileNotFoundError, match="missing"):
        load_tokenizer_file(tmp_path / "nowhere" / "tokenizer.json")


def test_tiny_tokenizer_folder_is_unchanged_by_the_move(tmp_path):
    """The Gemma-like folder the VLM tests use: fixed ids, <image> last, every file written."""
    folder = make_tiny_tokenizer(tmp_path / "tiny", vocab_size=300)
    tok = load_tokenizer_file(folder / "tokenizer.json")
    assert tok.get_vocab_size() == 300 and tok.token_to_id("<image>") == 299
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert {p.name for p in folder.iterdir()} == {"tokenizer.json", "tokenizer_config.json",
                                                  "special_tokens_map.json", "preprocessor_config.json"}
