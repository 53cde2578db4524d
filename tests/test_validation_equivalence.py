"""calculate_matches (passage by passage, each distinct passage tokenized at most once) equals DPR's question-by-
question computation, on real questions and answers and on adversarial Unicode; bad answers are counted."""
import logging
import unicodedata
from collections import Counter

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dpr.evaluation import qa_validation
from dpr.evaluation.qa_validation import calculate_matches, has_answer
from tests.conftest import shared_data_dir
from tests.qa_validation_reference import (
    nq_planted_workload,
    reference_calculate_matches,
    reference_has_answer,
    squad_bm25_workload,
)


@pytest.fixture(scope="module")
def squad_bm25():
    if not shared_data_dir().is_dir():
        pytest.skip("shared data not found")
    return squad_bm25_workload(shared_data_dir(), n_questions=300, n_docs=30)


@pytest.fixture(scope="module", params=["nq-test.qa.csv", "nq-dev.qa.csv"])
def nq_planted(request):
    if not shared_data_dir().is_dir():
        pytest.skip("shared data not found")
    return nq_planted_workload(shared_data_dir(), request.param, n_questions=400, n_docs=20)


def assert_equals_reference(workload, match_type):
    passages, answers, closest = workload
    stats = calculate_matches(passages, answers, closest, workers=1, match_type=match_type)
    top_k_hits, questions_doc_hits = reference_calculate_matches(passages, answers, closest, match_type)
    assert stats.questions_doc_hits == questions_doc_hits
    assert stats.top_k_hits == top_k_hits
    return stats


@pytest.mark.parametrize("match_type", ["string", "regex"])
def test_squad_bm25_candidates_equal_reference(squad_bm25, match_type):
    stats = assert_equals_reference(squad_bm25, match_type)
    assert 0.5 < stats.top_k_hits[0] / 300 < stats.top_k_hits[-1] / 300  # real retrieval: many hits, not all first


@pytest.mark.parametrize("match_type", ["string", "regex"])
def test_nq_answers_planted_in_candidates_equal_reference(nq_planted, match_type):
    stats = assert_equals_reference(nq_planted, match_type)
    hit_pairs = sum(map(sum, stats.questions_doc_hits))
    assert 200 < hit_pairs < sum(map(len, stats.questions_doc_hits)) / 10  # planted answers found, not everything


def test_each_distinct_passage_is_tokenized_at_most_once(nq_planted, monkeypatch):
    passages, answers, closest = nq_planted
    once = calculate_matches(passages, answers, closest, workers=1)
    tokenized = []
    key_from_nfd = qa_validation._key_from_nfd
    monkeypatch.setattr(qa_validation, "_key_from_nfd", lambda text: tokenized.append(text) or key_from_nfd(text))
    stats = calculate_matches(passages, answers * 3, closest * 3, workers=1)  # each passage retrieved 3x as often
    passage_texts = {unicodedata.normalize("NFD", text) for text, _title in passages.values()}
    tokenized_passages = Counter(text for text in tokenized if text in passage_texts)
    assert tokenized_passages and max(tokenized_passages.values()) == 1
    assert stats.questions_doc_hits == once.questions_doc_hits * 3


@pytest.mark.parametrize("match_type", ["string", "regex"])
def test_spawned_workers_equal_inline_over_many_tasks(squad_bm25, match_type):
    passages, answers, closest = squad_bm25
    assert len({doc_id for doc_ids, _ in closest for doc_id in doc_ids}) > 3 * qa_validation._PASSAGES_PER_TASK
    inline = calculate_matches(passages, answers, closest, workers=1, match_type=match_type)
    pooled = calculate_matches(passages, answers, closest, workers=2, match_type=match_type, start_method="spawn")
    assert pooled == inline


def test_final_sigma_does_not_hide_a_match():
    # Lowercased alone, the token ΟΔΟΣ ends in final ς; inside the whole text (before an apostrophe and a letter)
    # the same Σ lowercases to σ. The answer occurs as a token either way.
    text = "ΟΔΟΣ'Α"
    assert "οδος" not in text.lower()
    for answers, expected in ((["οδος"], True), (["ΟΔΟΣ ' Α"], True), (["Οδος'α"], True), (["οδοσ"], False)):
        assert reference_has_answer(answers, text, "string") == expected
        assert has_answer(answers, text) == expected
        stats = calculate_matches({"p": (text, "")}, [answers], [(["p"], [1.0])], workers=1)
        assert stats.questions_doc_hits == [[expected]]


# Letters with case quirks (final sigma, dotted İ, ß, ligatures, Kelvin), combining marks, composed/decomposed
# accents, digits, punctuation, regex metacharacters and Unicode spaces.
_TRICKY = "aAbσςΣİıiIßẞﬁKKé\u0301e\u00e9\u0308ΟΔ09٣.,'()[]*+?-$ \u00a0\u2009\n\t"


@settings(max_examples=300, deadline=None)
@example(text="ΑΣ'Α", pieces=[(0, 2, False)], match_type="string")  # the final-sigma case above
@given(
    text=st.text(alphabet=_TRICKY, max_size=40),
    pieces=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 12), st.booleans()), min_size=1, max_size=3),
    match_type=st.sampled_from(["string", "regex"]),
)
def test_random_unicode_matches_equal_reference(text, pieces, match_type):
    # Answers cut from the text itself (so that matches occur), some case-swapped or NFC-composed.
    answers = []
    for start, length, transform in pieces:
        answer = text[start : start + length]
        answers.append(unicodedata.normalize("NFC", answer.swapcase()) if transform else answer)
    expected = reference_has_answer(answers, text, match_type)
    assert has_answer(answers, text, match_type) == expected
    stats = calculate_matches({"p": (text, "t")}, [answers, answers[:1]], [(["p"], [1.0]), (["p"], [1.0])],
                              workers=1, match_type=match_type)
    assert stats.questions_doc_hits == [[expected], [reference_has_answer(answers[:1], text, match_type)]]


PASSAGES = {"a": ("Paris is the capital of France (since 987).", "Paris"), "b": ("Berlin, Germany.", "Berlin")}
CLOSEST = [(["a", "b"], [2.0, 1.0]), (["b", "a"], [2.0, 1.0]), (["a", "b"], [2.0, 1.0])]


def warnings_naming(caplog, text):
    return [r for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


def test_questions_without_answers_are_counted_and_named_once(caplog):
    with caplog.at_level(logging.WARNING):
        stats = calculate_matches(PASSAGES, [["Paris"], [], []], CLOSEST, workers=1)
    assert stats.questions_without_answers == 2
    assert stats.invalid_answers == 0
    assert stats.questions_doc_hits == [[True, False], [False, False], [False, False]]
    assert len(warnings_naming(caplog, "question 1 (0-based) has no answers")) == 1
    assert len(warnings_naming(caplog, "question 2 (0-based) has no answers")) == 1


def test_invalid_regex_answers_are_counted_and_named_once(caplog):
    answers = [["(since", "Paris"], ["[Ger", "(since", "[Ger"], [r"\(since \d+\)"]]
    with caplog.at_level(logging.WARNING):
        stats = calculate_matches(PASSAGES, answers, CLOSEST, workers=1, match_type="regex")
    assert stats.invalid_answers == 3  # "(since" twice (questions 0 and 1), "[Ger" once (repeated in question 1)
    assert stats.questions_without_answers == 0
    assert stats.questions_doc_hits == [[True, False], [False, False], [True, False]]
    assert len(warnings_naming(caplog, "'[Ger' is not a valid regex")) == 1
    assert len(warnings_naming(caplog, "question 0 (0-based): answer '(since'")) == 1
    assert len(warnings_naming(caplog, "question 1 (0-based): answer '(since'")) == 1


def test_answers_without_tokens_are_counted_under_string_match():
    stats = calculate_matches(PASSAGES, [["", "Paris"], [" \t"], ["(since"]], CLOSEST, workers=1)
    assert stats.invalid_answers == 2
    assert stats.questions_doc_hits == [[True, False], [False, False], [True, False]]


def test_well_formed_answers_report_nothing(caplog):
    with caplog.at_level(logging.WARNING):
        stats = calculate_matches(PASSAGES, [["Paris"], ["Germany"], ["987"]], CLOSEST, workers=1, match_type="regex")
    assert (stats.questions_without_answers, stats.invalid_answers) == (0, 0)
    assert not warnings_naming(caplog, "")
