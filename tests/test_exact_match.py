import unicodedata

import pytest

from dpr.evaluation.exact_match import exact_match_score, max_exact_match, normalize_answer


@pytest.mark.parametrize(
    "text, normalized",
    [
        ("The Beatles", "beatles"),
        ("  a   Tale of Two  Cities ", "tale of two cities"),
        ("U.S.A.", "usa"),
        ("Rock 'n' Roll!", "rock n roll"),
        ("theatre and an answer", "theatre and answer"),  # articles only as whole words
        ("the-the", "thethe"),  # punctuation goes before the article rule sees word boundaries
        ("Café «déjà vu»", "café «déjà vu»"),  # only ASCII punctuation is removed
        ("", ""),
    ],
)
def test_normalize_answer(text, normalized):
    assert normalize_answer(text) == normalized


def test_exact_match_score():
    assert exact_match_score("the Eiffel Tower.", "Eiffel tower")
    assert not exact_match_score("Eiffel", "Eiffel Tower")


def test_max_exact_match():
    assert max_exact_match("1,000", ["one thousand", "1000"])
    assert not max_exact_match("1000", ["one thousand"])
    assert not max_exact_match("anything", [])


def test_combining_marks_belong_to_their_word():
    """As DPR (the `regex` package): in NFD, "España" keeps its final "a" (the standard `re` took it for the
    article "a" after the combining tilde)."""
    decomposed = unicodedata.normalize("NFD", "España")
    assert normalize_answer(decomposed) == unicodedata.normalize("NFD", "españa")
    assert exact_match_score(decomposed, unicodedata.normalize("NFD", "españa"))
    assert not exact_match_score(decomposed, unicodedata.normalize("NFD", "españ"))
