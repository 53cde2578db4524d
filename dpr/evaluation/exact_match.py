"""Exact-match scoring of reader answers with DPR's (SQuAD-style) answer normalisation.

The article rule uses the `regex` package, as DPR does: its word boundaries follow Unicode, so a combining mark
belongs to its word (the standard `re` sees a boundary after it and cuts the final "a" of an NFD "España").
"""
import string
from typing import Iterable

import regex

_ARTICLES = regex.compile(r"\b(a|an|the)\b")
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
