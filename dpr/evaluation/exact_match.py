"""Exact-match scoring of reader answers with DPR's (SQuAD-style) answer normalisation."""
import re
import string
from typing import Iterable

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, drop ASCII punctuation, replace the articles a/an/the by a space, collapse whitespace."""
    lowered = text.lower()
    without_punctuation = "".join(ch for ch in lowered if ch not in _PUNCTUATION)
    without_articles = _ARTICLES.sub(" ", without_punctuation)
    return " ".join(without_articles.split())


def exact_match_score(prediction: str, gold: str) -> bool:
    """Whether the prediction equals the gold answer after normalisation."""
    return normalize_answer(prediction) == normalize_answer(gold)


def max_exact_match(prediction: str, golds: Iterable[str]) -> bool:
    """Whether the prediction exactly matches any of the gold answers (False when there are none)."""
    return any(exact_match_score(prediction, gold) for gold in golds)
