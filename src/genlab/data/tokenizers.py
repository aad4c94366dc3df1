"""Tokenizers trained locally with the `tokenizers` library, saved and loaded as Hugging Face files.

General text (the text family, any local corpus):

    tok = train_char_tokenizer(texts)                  # one token per character seen, plus specials
    tok = train_bpe_tokenizer(texts, vocab_size=2048)  # byte-level BPE: any text round-trips
    save_tokenizer(tok, "runs/tok")                    # tokenizer.json, tokenizer_config.json, special_tokens_map.json
    tok = load_tokenizer_file("runs/tok/tokenizer.json")  # a damaged file is a FileFormatError naming it

Both trainers put the special tokens first, in the order given (default ``SPECIAL_TOKENS``:
<pad>=0 <eos>=1 <bos>=2 <unk>=3 <mask>=4), and add nothing to encoded text by themselves.

Gemma-like processor folders for the VLM tests and demos. A real PaliGemma checkpoint has a
257k-token Gemma tokenizer. The tests and the offline demo need something with the same *shape*
but small enough to pair with a tiny model and cheap enough to build in a fraction of a second:

    make_tiny_tokenizer("runs/tiny-tok")       # vocab 300: <pad>=0 <eos>=1 <bos>=2 <unk>=3 ... <image>=299

The folder holds the same files a Hugging Face PaliGemma checkpoint holds for its
processor (tokenizer.json, tokenizer_config.json, special_tokens_map.json,
preprocessor_config.json), so both `genlab.vlm.processor.PaliGemmaProcessor` and
`transformers.PaliGemmaProcessor` load it, which is what the parity tests use.

The tokenizer pipeline copies Gemma's: spaces become "▁", a byte-fallback BPE model,
and a decoder that turns "▁" back into spaces. `make_tiny_sentencepiece` writes a
tokenizer.model instead, for the processor's sentencepiece fallback. Nothing is downloaded.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from genlab.errors import FileFormatError
from genlab.io import atomic_write_bytes, atomic_write_text

# Gemma's fixed special-token ids; the model tests rely on them (pad=0, eos=1, bos=2).
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
IMAGE_TOKEN = "<image>"
# Every printable ASCII character (and "▁", Gemma's space) gets a token, so plain English never hits <unk>.
ALPHABET = sorted(set(string.ascii_letters + string.digits + string.punctuation + "\n▁"))

# A short built-in corpus: captions and questions about simple scenes, the kind of
# text the shapes-world VQA demo produces, plus a little general English.
DEFAULT_CORPUS = [
    "a red cube is to the left of a blue sphere.",
    "a small green cylinder sits behind the large yellow cube.",
    "there are three objects: two spheres and one cube.",
    "what color is the cube? red",
    "how many spheres are there? two",
    "is the cylinder made of metal? no, it is rubber.",
    "what shape is the large object on the right? sphere",
    "caption en: a gray sphere next to a purple cylinder.",
    "answer en what is the color of the small cube? green",
    "describe the image: four shapes on a plain background.",
    "the cat sat on the mat and looked at the dog.",
    "a photo of a dog running on the beach at sunset.",
    "two people are riding bicycles along a river.",
    "the quick brown fox jumps over the lazy dog.",
    "a bowl of fruit with apples, bananas and oranges.",
    "where is the blue square? top left",
    "count the triangles in the picture. 1, 2, 3, 4, 5.",
    "is there a circle below the square? yes",
    "the image shows a small red triangle and a big white circle.",
    "detect cube; sphere; cylinder",
]


# ----------------------------------------------------------------------------- general text tokenizers
# The roles transformers gives the default special tokens (written to tokenizer_config.json).
_ROLES = {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>",
          "mask_token": "<mask>"}


def _check_specials(special_tokens: Sequence[str]) -> list[str]:
    specials = list(special_tokens)
    if len(set(specials)) != len(specials):
        raise ValueError(f"special_tokens has duplicates: {specials}")
    return specials


def train_char_tokenizer(texts: Iterable[str], special_tokens: Sequence[str] = SPECIAL_TOKENS,
                         unk_token: str = "<unk>") -> Tokenizer:
    """A character-level tokenizer: one token per distinct character (Unicode code point) of ``texts``.

    Ids: the special tokens first, in the order given, then the characters in sorted order. Encoding
    adds no special tokens; special tokens written in the text are matched verbatim. A character
    never seen in training becomes ``unk_token`` (which must be one of ``special_tokens``), and
    ``decode(encode(s).ids) == s`` for every ``s`` made of seen characters.
    """
    specials = _check_specials(special_tokens)
    if unk_token not in specials:
        raise ValueError(f"unk_token {unk_token!r} must be one of special_tokens {specials}")
    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    vocab = {token: i for i, token in enumerate(specials)}
    for ch in sorted(chars - set(vocab)):
        vocab[ch] = len(vocab)
    # BPE without merges over the whole text (no pre-tokenizer) splits it into single characters.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk_token))
    tok.add_special_tokens(specials)
    tok.decoder = decoders.Fuse()  # concatenate the characters back, no separators
    return tok


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int,
                        special_tokens: Sequence[str] = SPECIAL_TOKENS) -> Tokenizer:
    """A byte-level BPE tokenizer (GPT-2 style) with at most ``vocab_size`` tokens.

    Text is split GPT-2's way (words, numbers, punctuation, spaces attached to the following word)
    and each piece is seen as its UTF-8 bytes, so every string of any script round-trips exactly
    and nothing is ever unknown. Ids: the special tokens first, in the order given, then the 256
    byte tokens, then the learned merges, up to ``vocab_size`` in all (exactly ``vocab_size`` when
    the corpus has enough distinct pairs to merge). Encoding adds no special tokens.
    """
    specials = _check_specials(special_tokens)
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # 256 printable stand-ins for the bytes
    if vocab_size < len(specials) + len(alphabet):
        raise ValueError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs {len(alphabet)} byte "
                         f"tokens plus {len(specials)} special tokens")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def save_tokenizer(tok: Tokenizer, folder: str | Path, special_tokens_map: dict[str, str] | None = None) -> Path:
    """Write ``tok`` as a Hugging Face tokenizer folder; return the folder.

    Files (each written atomically): ``tokenizer.json`` (the bytes ``Tokenizer.save`` writes),
    ``special_tokens_map.json`` and ``tokenizer_config.json`` (class ``PreTrainedTokenizerFast``),
    so ``transformers.AutoTokenizer.from_pretrained(folder)`` gives the same ids. The roles
    (``pad_token``, ``eos_token``, ...) default to the tokens of ``SPECIAL_TOKENS`` that ``tok``
    has (<pad>, <eos>, <bos>, <unk>, <mask>); pass ``special_tokens_map`` to name others.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = tok.get_vocab(with_added_tokens=True)
    roles = {role: t for role, t in _ROLES.items() if t in vocab} if special_tokens_map is None \
        else dict(special_tokens_map)
    missing = sorted(t for t in roles.values() if t not in vocab)
    if missing:
        raise ValueError(f"special_tokens_map names tokens the tokenizer does not have: {missing}")
    atomic_write_text(folder / "tokenizer.json", tok.to_str(pretty=True))
    _write_json(folder / "special_tokens_map.json", roles)
    _write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", **roles, "clean_up_tokenization_spaces": False})
    return folder


def load_tokenizer_file(path: str | Path) -> Tokenizer:
    """``Tokenizer.from_file(path)``; a missing file is a FileNotFoundError, and a truncated, empty or
    foreign one (the library raises a bare Exception) is a ``FileFormatError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (expected a tokenizer.json written by genlab or transformers)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust library's errors have no public type
        lines = str(e).strip().splitlines()
        raise FileFormatError(f"{path}: not a readable tokenizer.json ({lines[0] if lines else type(e).__name__}); "
                              f"it may be truncated or damaged") from e


# ----------------------------------------------------------------------------- Gemma-like processor folders
def _train_bpe(corpus: list[str], vocab_size: int) -> Tokenizer:
    """Train a Gemma-style byte-fallback BPE model with at most `vocab_size` entries."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    # Training only: split before each "▁" so that merges never cross a word boundary.
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=ALPHABET,
        limit_alphabet=len(ALPHABET),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return tok


def _added(content: str, token_id: int, special: bool) -> dict:
    """One entry of tokenizer.json's `added_tokens` list (matched verbatim, never split)."""
    return {
        "id": token_id, "content": content, "single_word": False, "lstrip": False,
        "rstrip": False, "normalized": False, "special": special,
    }


def make_tiny_tokenizer(
    folder: str | Path,
    vocab_size: int = 300,
    corpus: list[str] | None = None,
    *,
    image_size: int = 32,
    num_image_tokens: int = 16,
    num_loc_tokens: int = 0,
) -> Path:
    """Train a tiny Gemma-like tokenizer and write a PaliGemma processor folder.

    Promises, for the written tokenizer:
      * ids 0..4 are <pad>, <eos>, <bos>, <unk>, <mask> (Gemma's order);
      * `<image>` has id `vocab_size - 1` and the total vocabulary is exactly `vocab_size`
        (unused slots are filled with `<unusedN>` tokens, as Gemma's own vocabulary has);
      * `num_loc_tokens` tokens `<loc0000>`, `<loc0001>`, ... sit just before `<image>`;
      * with the default corpus (no newlines) "\n" stays a single token, as in Gemma;
      * preprocessor_config.json describes a SigLIP image processor with
        `image_size` x `image_size` inputs and `num_image_tokens` image tokens.
    Returns the folder path.
    """
    n_reserved = 1 + num_loc_tokens  # <image> + loc tokens
    if vocab_size < len(SPECIAL_TOKENS) + len(ALPHABET) + n_reserved:
        raise ValueError(f"vocab_size={vocab_size} is too small for the alphabet and {n_reserved} extra tokens")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    tok = _train_bpe(list(corpus) if corpus is not None else DEFAULT_CORPUS, vocab_size - n_reserved)
    spec = json.loads(tok.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    added = [_added(t, i, True) for i, t in enumerate(SPECIAL_TOKENS)]

    # Pad to a fixed size so that `<image>` always lands on vocab_size - 1.
    n_unused = vocab_size - n_reserved - len(vocab)
    extra = [(f"<unused{i}>", True) for i in range(n_unused)]
    extra += [(f"<loc{i:04d}>", False) for i in range(num_loc_tokens)]
    extra += [(IMAGE_TOKEN, True)]
    for content, special in extra:
        vocab[content] = len(vocab)
        added.append(_added(content, vocab[content], special))
    assert len(vocab) == vocab_size and vocab[IMAGE_TOKEN] == vocab_size - 1
    spec["added_tokens"] = added

    final = Tokenizer.from_str(json.dumps(spec))
    # Inference pipeline exactly as transformers' GemmaTokenizer rebuilds it.
    final.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    final.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    final.post_processor = processors.TemplateProcessing(
        single="<bos>:0 $A:0", pair="<bos>:0 $A:0 <bos>:1 $B:1", special_tokens=[("<bos>", 2)]
    )
    atomic_write_text(folder / "tokenizer.json", final.to_str(pretty=True))  # the bytes Tokenizer.save writes

    _write_processor_files(folder, image_size, num_image_tokens)
    return folder


def make_tiny_sentencepiece(
    folder: str | Path,
    vocab_size: int = 120,
    corpus: list[str] | None = None,
    *,
    image_size: int = 32,
    num_image_tokens: int = 16,
) -> Path:
    """Train a tiny SentencePiece BPE model and write a folder holding tokenizer.model but no
    tokenizer.json (the fallback path of the processor). Ids 0..3 are <pad>, <eos>, <bos>, <unk>;
    "\n" and `<image>` are user-defined pieces right after them (ids 4 and 5)."""
    import io

    import sentencepiece as spm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(corpus) if corpus is not None else DEFAULT_CORPUS),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=["\n", IMAGE_TOKEN],
        add_dummy_prefix=False,  # Gemma adds no leading "▁"
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        minloglevel=2,
    )
    atomic_write_bytes(folder / "tokenizer.model", model.getvalue())
    _write_processor_files(folder, image_size, num_image_tokens)
    return folder


def _write_processor_files(folder: Path, image_size: int, num_image_tokens: int) -> None:
    """The JSON files that make `transformers.PaliGemmaProcessor.from_pretrained(folder)` work."""
    special_map = {
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
        "unk_token": "<unk>", "mask_token": "<mask>",
    }
    _write_json(folder / "special_tokens_map.json", special_map)
    _write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "GemmaTokenizer",
        "processor_class": "PaliGemmaProcessor",
        **special_map,
        "extra_special_tokens": {"image_token": IMAGE_TOKEN},
        "add_bos_token": True,
        "add_eos_token": False,
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
    })
    _write_json(folder / "preprocessor_config.json", {
        "image_processor_type": "SiglipImageProcessor",
        "processor_class": "PaliGemmaProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"height": image_size, "width": image_size},
        "resample": 3,  # PIL.Image.BICUBIC
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "image_seq_length": num_image_tokens,
    })


def _write_json(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------- BERT-family text encoders
def load_wordpiece_tokenizer(folder: str | Path, max_length: int = 64) -> Tokenizer:
    """The tokenizer.json of a BERT-family folder (e.g. MiniLM, DistilBERT), truncating to ``max_length``
    tokens ([CLS] and [SEP] included) and padding each batch to its longest text (the folder's own fixed
    padding, if any, is replaced)."""
    tok = load_tokenizer_file(Path(folder) / "tokenizer.json")
    pad_id = tok.token_to_id("[PAD]")
    tok.enable_truncation(max_length)
    tok.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")
    return tok


def encode_padded(tok: Tokenizer, texts: Sequence[str]):
    """``(input_ids, attention_mask)``, each a LongTensor (B, L) padded to the batch's longest text."""
    import torch

    encs = tok.encode_batch(list(texts))
    ids = torch.tensor([e.ids for e in encs], dtype=torch.long)
    mask = torch.tensor([e.attention_mask for e in encs], dtype=torch.long)
    return ids, mask
