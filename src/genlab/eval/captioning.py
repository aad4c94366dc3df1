"""Caption metrics of the COCO captioning benchmark: BLEU-4, CIDEr-D and ROUGE-L.

Each metric comes from the library that defines it in practice: sacrebleu for BLEU (corpus
level, 0-100), pycocoevalcap's ``Cider`` (the coco-caption code, which is CIDEr-D: clipped tf-idf
n-gram cosines with a Gaussian length penalty, x10) and Google's rouge-score for ROUGE-L. genlab
adds the input checks, the text normalisation that stands in for the COCO tokenizer, and the
padding that lets every prediction have its own number of references.

All three score normalised text (``normalize_caption``), so "A red cube." and "a red cube" are the
same caption to every metric. CIDEr's idf weights come from the references of the whole corpus:
it is a corpus metric, and scoring one image alone gives 0 (every n-gram has idf log(1/1) = 0).
"""

from __future__ import annotations

import re
from typing import Sequence

from genlab.errors import ConfigError

_APOSTROPHE = re.compile(r"['\u2019`]")
_PUNCT = re.compile(r"[^\w\s]")
_SPACE = re.compile(r"\s+")


def normalize_caption(text: str) -> str:
    """Lower-case ``text``, delete apostrophes ("man's" -> "mans"), turn every other punctuation
    mark into a space ("left-hand," -> "left hand") and collapse white space.

    A stand-in for the PTBTokenizer of the COCO evaluation code, which runs Stanford CoreNLP and so
    needs Java: both lower-case and drop punctuation, so on plain captions they agree; they differ
    on clitics (PTB keeps "'s" as its own word) and hyphenated words (PTB keeps "left-hand").
    Scores are therefore close to, not identical with, published COCO numbers.
    """
    text = _APOSTROPHE.sub("", text.lower())
    return _SPACE.sub(" ", _PUNCT.sub(" ", text)).strip()


def _prepare(preds: Sequence[str], refs: Sequence[Sequence[str]], name: str) -> tuple[list[str], list[list[str]]]:
    """Check the inputs and return them normalised. References that are None or empty after
    normalisation are dropped; a prediction left with none is an error, never an empty reference."""
    if isinstance(preds, str) or isinstance(refs, str):
        raise ValueError(f"{name}: preds and refs must be sequences, not a single string")
    if len(preds) != len(refs):
        raise ValueError(f"{name}: {len(preds)} predictions but {len(refs)} reference lists")
    if not preds:
        raise ValueError(f"{name}: no predictions to score")
    out_p, out_r = [], []
    for i, (p, rs) in enumerate(zip(preds, refs)):
        if isinstance(rs, str):
            raise ValueError(f"{name}: refs[{i}] is a string; it must be a list of reference strings")
        if p is None or not isinstance(p, str):
            raise ValueError(f"{name}: preds[{i}] must be a string, got {type(p).__name__}")
        rs = [normalize_caption(r) for r in rs if r is not None]
        rs = [r for r in rs if r]
        if not rs:
            raise ValueError(f"{name}: prediction {i} ({p!r}) has no (non-empty) reference")
        out_p.append(normalize_caption(p))
        out_r.append(rs)
    return out_p, out_r


def _bleu4(preds: list[str], refs: list[list[str]]) -> float:
    from sacrebleu.metrics import BLEU

    # sacrebleu takes reference *streams*: stream k holds the k-th reference of every prediction.
    # A prediction with fewer references gets None in the later streams, which sacrebleu drops
    # (BLEU._cache_references); an empty string would instead be kept as a zero-length reference
    # and could become the "closest reference length", lifting the brevity penalty.
    n_streams = max(map(len, refs))
    streams = [[rs[k] if k < len(rs) else None for rs in refs] for k in range(n_streams)]
    return float(BLEU(max_ngram_order=4).corpus_score(preds, streams).score)


def _cider(preds: list[str], refs: list[list[str]]) -> float:
    from pycocoevalcap.cider.cider import Cider

    gts = {i: rs for i, rs in enumerate(refs)}
    res = {i: [p] for i, p in enumerate(preds)}
    score, _ = Cider().compute_score(gts, res)  # n = 4, sigma = 6: CIDEr-D as in coco-caption
    return float(score)


def _rouge_l(preds: list[str], refs: list[list[str]]) -> float:
    try:
        from rouge_score import rouge_scorer
    except ImportError as e:
        raise ConfigError("ROUGE needs the rouge-score package: pip install rouge-score") from e
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    # score_multi keeps, per prediction, the reference with the highest F1.
    return sum(scorer.score_multi(rs, p)["rougeL"].fmeasure for p, rs in zip(preds, refs)) / len(preds)


def bleu4(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 of ``preds`` against ``refs`` (one list of references per prediction, any
    number each) on sacrebleu's 0-100 scale, with its defaults (13a tokenizer, "exp" smoothing of
    zero n-gram counts), computed on normalised text. Counts are pooled over the corpus before the
    geometric mean, so this is not the mean of sentence BLEUs. ``ValueError`` when the lengths
    differ or a prediction has no reference."""
    return _bleu4(*_prepare(preds, refs, "bleu4"))


def cider(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """CIDEr-D (Vedantam et al., 2015) with pycocoevalcap's ``Cider`` on normalised text, on its
    native scale (x10; about 0-10, a perfect match of a long caption approaching 10). The idf
    weights come from the references of this corpus, so the score depends on the whole set.
    ``ValueError`` when the lengths differ or a prediction has no reference."""
    return _cider(*_prepare(preds, refs, "cider"))


def rouge_l(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Mean over predictions of the ROUGE-L F1 (rouge-score, Porter stemming) against the best of
    that prediction's references, in [0, 1]. ``ValueError`` as for ``bleu4``."""
    return _rouge_l(*_prepare(preds, refs, "rouge_l"))


def caption_metrics(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> dict[str, float]:
    """``{"bleu4", "cider", "rouge_l", "n"}``: the three metrics above on one normalised corpus and
    the number of predictions scored."""
    p, r = _prepare(preds, refs, "caption_metrics")
    return {"bleu4": _bleu4(p, r), "cider": _cider(p, r), "rouge_l": _rouge_l(p, r), "n": len(p)}
