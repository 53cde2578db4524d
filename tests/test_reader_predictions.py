"""Reader inference (§6): non-nested spans within the length limit, word-boundary extension, relevance order,
eval_top_docs thresholds by retrieval index, empty candidates, the combined-score option, the prediction
file and EM with SQuAD's normalization."""
import logging

import numpy as np
import pytest
from transformers import BertTokenizerFast

from dpr.data.reader_data import ReaderPassage
from dpr.evaluation.reader_predictions import (
    answer_text,
    best_spans,
    exact_match_by_top_k,
    extend_to_words,
    log_exact_match,
    prediction_record,
    question_nbest,
    read_predictions,
    select_predictions,
    write_predictions,
)
from tests.tiny_models import write_vocab


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return BertTokenizerFast(vocab=str(write_vocab(tmp_path_factory.mktemp("vocab"))), do_lower_case=True)


def passage(tokenizer, text: str, question: str = "what is it?") -> ReaderPassage:
    head = tokenizer(question, "title")["input_ids"]
    body = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ReaderPassage(id=text, passage_offset=len(head), sequence_ids=np.array(head + body))


def test_best_spans_hand_checked():
    start = np.array([0.0, 5, 0, 0, 0, 4])
    end = np.array([0.0, 0, 5, 0, 4, 0])
    # (1,2)=10 wins; the 5s all contain or lie inside it; (2,4) overlaps it partly (allowed), (3,4) and (4,4)
    # lie inside (2,4); (5,5) is free
    spans = best_spans(start, end, max_answer_length=3, top_spans=3)
    assert [span[:3] for span in spans] == [(1, 2, 10.0), (2, 4, 4.0), (5, 5, 4.0)]
    assert all((span.logit_start, span.logit_end) == span[:2] for span in spans)  # no tokens: nothing widened


def test_span_scores_are_summed_in_float64_as_dpr_does():
    """A near-tie that float32 rounds away: 1 + 2**-25 is 1 in float32, so a float32 sum ties the two spans and
    keeps the first; DPR sums Python floats (float64) and picks the second."""
    start = np.array([1.0, 1.0], dtype=np.float32)
    end = np.array([0.0, 2.0**-25], dtype=np.float32)
    assert np.float32(start[1] + end[1]) == np.float32(start[0] + end[0])  # the tie in float32
    best = best_spans(start, end, max_answer_length=1, top_spans=1)[0]
    assert (best.start, best.end) == (1, 1) and best.score == 1.0 + 2.0**-25


def test_best_spans_are_never_nested_and_respect_the_length_limit():
    rng = np.random.default_rng(0)
    for _ in range(20):
        start, end = rng.normal(size=30), rng.normal(size=30)
        spans = best_spans(start, end, max_answer_length=4, top_spans=10)
        assert len(spans) == 10
        assert [span.score for span in spans] == sorted((span.score for span in spans), reverse=True)
        for i, (s, e, score, _, _) in enumerate(spans):
            assert 0 <= e - s < 4 and score == pytest.approx(start[s] + end[e])
            for s2, e2, *_ in spans[:i]:
                assert not (s <= s2 and e2 <= e) and not (s2 <= s and e <= e2)
        candidates = [(i, j) for i in range(30) for j in range(i, min(i + 4, 30))]
        best = max(candidates, key=lambda ij: start[ij[0]] + end[ij[1]])
        assert spans[0][:2] == best


def test_spans_of_one_word_are_one_answer_after_widening():
    """DPR compares a span with the accepted spans once they are widened: "##a" after "p" adds nothing new."""
    tokens = ["p", "##a", "##r", "is", "c", "##a"]
    start = np.array([5.0, 4, 0, 0, 3, 0])
    end = np.array([5.0, 4, 0, 0, 0, 3])
    spans = best_spans(start, end, max_answer_length=1, top_spans=10, tokens=tokens)
    # raw (0,0) -> "par" (0,2); (1,1) lies inside it; raw (4,4) -> "ca" (4,5); (5,5) lies inside that; then "is"
    assert [span[:2] for span in spans] == [(0, 2), (4, 5), (3, 3)]
    assert [(span.logit_start, span.logit_end, span.score) for span in spans] == [(0, 0, 10.0), (4, 4, 3.0),
                                                                                  (3, 3, 0.0)]
    assert len({span[:2] for span in spans}) == len(spans)


def test_question_nbest_never_repeats_a_span_of_a_passage(tokenizer):
    p = passage(tokenizer, "paris is the capital")
    start, end, relevance = logits_for([p], len(p.sequence_ids), [(0, 1, 1), (0, 2, 2)], [0.0])
    nbest = question_nbest([p], start, end, relevance, tokenizer, max_answer_length=1)
    assert answer_text(nbest[0], tokenizer) == "paris" and answer_text(nbest[1], tokenizer) != "paris"
    assert len({(span.start, span.end) for span in nbest}) == len(nbest)


def test_spans_widen_to_whole_words():
    tokens = ["p", "##a", "##r", "is", "c", "##a"]
    assert extend_to_words(tokens, 1, 1) == (0, 2)
    assert extend_to_words(tokens, 0, 0) == (0, 2)
    assert extend_to_words(tokens, 3, 4) == (3, 5)
    assert extend_to_words(tokens, 3, 3) == (3, 3)


def logits_for(passages, width, picks, relevance):
    """[M, T] start/end logits that prefer the (row, start, end) picks (indices in the passage part)."""
    start, end = np.zeros((len(relevance), width)), np.zeros((len(relevance), width))
    for row, s, e in picks:
        offset = passages[row].passage_offset
        start[row, offset + s] = 8.0
        end[row, offset + e] = 8.0
    return start, end, np.array(relevance, dtype=float)


def test_relevance_order_subwords_padding_rows_and_thresholds(tokenizer):
    passages = [passage(tokenizer, "paris is the capital"), passage(tokenizer, "rome is the capital")]
    width = max(len(p.sequence_ids) for p in passages) + 2
    # row 0: start on the 2nd piece of "paris", end on its 3rd; row 1: "rome"; row 2 is padding, most relevant
    start, end, relevance = logits_for(passages, width, [(0, 1, 2), (1, 0, 3)], [1.0, 2.0, 9.0])
    nbest = question_nbest(passages, start, end, relevance, tokenizer, max_answer_length=10)
    assert {p.passage_index for p in nbest} == {0, 1}
    assert nbest[0].passage_index == 1 and answer_text(nbest[0], tokenizer) == "rome"
    first_of_row_0 = next(p for p in nbest if p.passage_index == 0)
    assert answer_text(first_of_row_0, tokenizer) == "paris"  # widened from "##a ##r"
    chosen = select_predictions(nbest, [1, 2, 50])
    assert answer_text(chosen[1], tokenizer) == "paris"  # among the first retrieved passage only
    assert answer_text(chosen[2], tokenizer) == "rome" and chosen[50] is chosen[2]


def test_truncated_rows_only_read_the_tokens_the_model_saw(tokenizer):
    p = passage(tokenizer, "paris is the capital of france")
    width = p.passage_offset + 5  # the row was cut after "p ##a ##r ##i ##s"
    start, end, relevance = logits_for([p], width, [(0, 0, 4)], [0.0])
    nbest = question_nbest([p], start, end, relevance, tokenizer, max_answer_length=10)
    assert all(s.end < 5 for s in nbest) and answer_text(nbest[0], tokenizer) == "paris"
    cut_off = passage(tokenizer, "paris", question="what " * 10)
    empty = question_nbest([cut_off], *logits_for([cut_off], cut_off.passage_offset, [], [0.0]), tokenizer, 10)
    assert empty == []


def test_no_candidates_give_an_empty_prediction_not_an_exception(tokenizer):
    predictions = select_predictions([], [10, 20])
    assert predictions == {10: None, 20: None}
    record = prediction_record("q?", ["x"], predictions, tokenizer)
    assert [e["prediction"]["text"] for e in record["predictions"]] == ["", ""]
    assert exact_match_by_top_k([record]) == {10: 0.0, 20: 0.0}


def test_combined_scores_can_prefer_a_peaked_span_in_a_less_relevant_passage(tokenizer):
    passages = [passage(tokenizer, "paris is the capital"), passage(tokenizer, "rome is the capital")]
    width = max(len(p.sequence_ids) for p in passages)
    start, end, relevance = logits_for(passages, width, [(0, 0, 4)], [1.0, 1.5])
    start[1, passages[1].passage_offset] = end[1, passages[1].passage_offset + 3] = 0.5  # a weak "rome"
    nbest = question_nbest(passages, start, end, relevance, tokenizer, max_answer_length=10)
    assert answer_text(select_predictions(nbest, [2])[2], tokenizer) == "rome"  # DPR: the most relevant passage
    assert answer_text(select_predictions(nbest, [2], combine_scores=True)[2], tokenizer) == "paris"


def test_prediction_file_format_and_exact_match(tokenizer, tmp_path, caplog):
    p = passage(tokenizer, "the denver broncos won")
    start, end, relevance = logits_for([p], len(p.sequence_ids), [(0, 0, 7)], [0.3])  # "the" .. "b" of broncos
    nbest = question_nbest([p], start, end, relevance, tokenizer, max_answer_length=10)
    records = [
        prediction_record("who won?", ["Denver Broncos"], select_predictions(nbest, [1]), tokenizer),
        prediction_record("who lost?", ["Carolina Panthers"], select_predictions(nbest, [1]), tokenizer),
    ]
    entry = records[0]["predictions"][0]
    assert set(records[0]) == {"question", "gold_answers", "predictions"} and entry["top_k"] == 1
    assert set(entry["prediction"]) == {"text", "score", "relevance_score", "passage_idx", "passage"}
    assert entry["prediction"]["text"] == "the denver broncos"  # "the" is dropped by the normalization
    assert entry["prediction"]["passage"] == "the denver broncos won"
    assert entry["prediction"]["passage_idx"] == 0 and entry["prediction"]["relevance_score"] == pytest.approx(0.3)
    path = tmp_path / "predictions.json"
    write_predictions(str(path), records)
    assert read_predictions(str(path)) == records
    ems = exact_match_by_top_k(read_predictions(str(path)))
    assert ems == {1: 50.0}
    with caplog.at_level(logging.INFO):
        log_exact_match(ems)
    assert "n=1\tEM 50.00" in caplog.text
