"""ROUGE-1/2/L/Lsum with Google's ``rouge-score`` (Porter stemming), averaged over pairs.

``rouge-score`` does the counting; what genlab adds is the averaging, a sentence splitter for
ROUGE-Lsum that needs no downloaded NLTK data, and one clear error when the package is missing.
The course's formula (overlapping words over the words of the reference) is ROUGE-N *recall*;
precision divides by the words of the prediction and F1 is their harmonic mean. See
docs/theory/vlm.md, "ROUGE-N and ROUGE-L".
"""

from __future__ import annotations

import re
from typing import Sequence

from genlab.errors import ConfigError

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

# A sentence ends at ., ! or ? followed by white space (or at an existing line break). The look-behind
# keeps the punctuation with its sentence and leaves decimals ("3.5") and abbreviations without a
# following space alone. Good enough for captions and answers; not a general-purpose segmenter.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\s*\n\s*")


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text`` in order, stripped, empty ones dropped (``""`` gives ``[]``)."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def _scorer():
    try:
        from rouge_score import rouge_scorer
    except ImportError as e:  # an optional extra: only VQA / captioning evaluation needs it
        raise ConfigError("ROUGE needs the rouge-score package: pip install rouge-score") from e
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge(preds: Sequence[str], refs: Sequence[str | None]) -> dict[str, dict[str, float]]:
    """Mean ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum over the pairs ``(preds[i], refs[i])``.

    Returns ``{"rouge1" | "rouge2" | "rougeL" | "rougeLsum": {"precision", "recall", "f1"}}``, each the
    plain (macro) average of the per-pair scores. Tokens are lower-cased, split on anything outside
    ``[a-z0-9]`` and Porter-stemmed (rouge-score stems words longer than 3 letters), so "cubes"
    matches "cube". For ROUGE-Lsum both texts are split into sentences with ``split_sentences`` and
    joined with "\\n", the separator rouge-score expects. An empty prediction scores 0 on every
    measure. Pairs whose reference is ``None`` (an unanswered test split) are skipped, as in
    ``score_vqa``; a length mismatch or no pair left is a ``ValueError``.
    """
    if len(preds) != len(refs):
        raise ValueError(f"rouge: {len(preds)} predictions but {len(refs)} references")
    pairs = [(p, r) for p, r in zip(preds, refs) if r is not None]
    if not pairs:
        raise ValueError("rouge: no pair has a reference to score against")
    scorer = _scorer()
    totals = {t: {"precision": 0.0, "recall": 0.0, "f1": 0.0} for t in ROUGE_TYPES}
    for pred, ref in pairs:
        pred, ref = pred or "", ref or ""  # None prediction = empty answer = 0, never a crash
        # score(target, prediction): the reference comes first. Lsum reads "\n" as sentence breaks;
        # the other types ignore them (the tokenizer treats "\n" as a space).
        scores = scorer.score("\n".join(split_sentences(ref)), "\n".join(split_sentences(pred)))
        for t in ROUGE_TYPES:
            s = scores[t]
            totals[t]["precision"] += float(s.precision)
            totals[t]["recall"] += float(s.recall)
            totals[t]["f1"] += float(s.fmeasure)
    n = len(pairs)
    return {t: {k: v / n for k, v in d.items()} for t, d in totals.items()}
