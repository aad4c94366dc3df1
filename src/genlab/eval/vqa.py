"""Exact-match accuracy of VQA answers with CLEVR answer normalisation, overall and per family.

CLEVR answers are single words: ``yes``/``no``, a count ``0``..``10``, a colour, shape, material
or size. A generated answer is right when it equals the reference after ``normalize_answer`` on
both sides. ROUGE (``genlab.eval.rouge``) is reported beside it, but on one-word answers it says
little that exact match does not (docs/theory/vlm.md explains what differs).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

# CLEVR counts go from 0 to 10; a model may answer in words, the dataset writes digits.
NUMBER_WORDS = {
    "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
# Deliberately absent: "no" -> "0" and "none" -> "0" (VQA v2 maps "none"). In CLEVR "no" is the
# answer to a yes/no question and must never become a count.

ARTICLES = ("a", "an", "the")
_TRAILING_PUNCT = ".,!?;:"
_SPACES = re.compile(r"\s+")


def normalize_answer(text: str | None) -> str:
    """The canonical form of an answer, so that two spellings of the same answer compare equal.

    In order: ``None`` becomes ``""``; lower case; white space collapsed and stripped; trailing
    punctuation (``.,!?;:``, repeated or not) removed; a leading article (a / an / the) removed when
    another word follows ("a cube" -> "cube"; CLEVR answers never start with one, so the article can
    only be the model's); each word that is a number word zero..ten becomes its digits ("Two." ->
    "2"). Nothing else changes: "no" stays "no", "cubes" stays "cubes" (no stemming: a plural answer
    to a CLEVR question is a different answer).
    """
    s = _SPACES.sub(" ", (text or "").lower()).strip()
    s = s.rstrip(_TRAILING_PUNCT + " ").strip()
    words = s.split(" ") if s else []
    if len(words) > 1 and words[0] in ARTICLES:
        words = words[1:]
    return " ".join(NUMBER_WORDS.get(w, w) for w in words)


def exact_match(pred: str | None, ref: str | None) -> bool:
    """True when the prediction equals the reference after ``normalize_answer`` on both.

    An empty (or ``None``) prediction is never right, even against an empty reference.
    """
    p = normalize_answer(pred)
    return bool(p) and p == normalize_answer(ref)


def score_vqa(preds: Sequence[str | None], refs: Sequence[str | None],
              families: Sequence[str | None] | None = None) -> dict[str, Any]:
    """Exact-match accuracy of ``preds`` against ``refs``, overall and per question family.

    Rows whose reference is ``None`` (CLEVR's test split publishes no answers) are skipped and
    counted in ``"skipped"``. Returns::

        {"accuracy": float | None, "n": int, "correct": int, "skipped": int,
         "per_family": {family: {"n": int, "correct": int, "accuracy": float}}}

    where ``n`` counts the scored rows, ``accuracy`` is ``correct / n`` (``None`` when ``n == 0``,
    so a JSON report never holds NaN) and ``per_family`` has its keys in sorted order (rows with
    family ``None`` go under ``"unknown"``; the mapping is empty when ``families`` is ``None``).
    Sequences of different lengths are a ``ValueError``.
    """
    if len(preds) != len(refs) or (families is not None and len(families) != len(refs)):
        lens = f"{len(preds)} predictions, {len(refs)} references"
        if families is not None:
            lens += f", {len(families)} families"
        raise ValueError(f"score_vqa: lengths differ ({lens})")
    fams = families if families is not None else [None] * len(refs)
    n = correct = skipped = 0
    per: dict[str, list[int]] = {}  # family -> [n, correct]
    for pred, ref, fam in zip(preds, refs, fams):
        if ref is None:
            skipped += 1
            continue
        ok = int(exact_match(pred, ref))
        n += 1
        correct += ok
        if families is not None:
            cell = per.setdefault("unknown" if fam is None else str(fam), [0, 0])
            cell[0] += 1
            cell[1] += ok
    return {
        "accuracy": correct / n if n else None,
        "n": n,
        "correct": correct,
        "skipped": skipped,
        "per_family": {f: {"n": c[0], "correct": c[1], "accuracy": c[1] / c[0]} for f, c in sorted(per.items())},
    }


def evaluate_vqa(preds: Sequence[str | None], refs: Sequence[str | None],
                 families: Sequence[str | None] | None = None) -> dict[str, Any]:
    """Everything ``write_vqa_report`` shows for one model: ``{"exact_match": score_vqa(...),
    "rouge": rouge(...) or None}``. ROUGE is computed on the raw strings (rouge-score lower-cases
    and drops punctuation itself) over the same rows as exact match; it is ``None`` when no row has a
    reference."""
    from genlab.eval.rouge import rouge

    em = score_vqa(preds, refs, families)
    return {"exact_match": em, "rouge": rouge([p or "" for p in preds], refs) if em["n"] else None}
