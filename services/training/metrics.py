"""Caption scores: normalized exact match and word-overlap F1."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)


def normalize_text(text: str) -> str:
    """Lowercase, drop punctuation, collapse spaces: 'A tone, then noise.' -> 'a tone then noise'."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def word_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of word precision and recall over normalized word multisets."""
    p, r = normalize_text(prediction).split(), normalize_text(reference).split()
    if not p and not r:
        return 1.0
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_text(prediction) == normalize_text(reference)


def corpus_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    if len(predictions) != len(references):
        raise ValueError("predictions and references differ in length")
    n = max(1, len(references))
    return {
        "exact_match": sum(exact_match(p, r) for p, r in zip(predictions, references, strict=True)) / n,
        "word_f1": sum(word_f1(p, r) for p, r in zip(predictions, references, strict=True)) / n,
        "count": float(len(references)),
    }
