"""Answers from the reader's logits (DPR's span selection), the prediction file, and exact match.

Per question, passages are visited in descending relevance; in each, every span of at most max_answer_length
tokens is scored start + end, and the best spans are accepted in score order, each widened to whole words over
`##` subwords; as in DPR, a span that contains or lies inside an already accepted (widened) span is passed over, so
two subword spans of one word give one answer (partial overlaps are allowed). For a threshold n of
eval_top_docs the answer is the best span of the most relevant passage among the first n retrieved. An
extension (off by default, DPR #28) instead picks, among those passages, the span with the highest
relevance logit + log p(start) + log p(end).
"""
import json
import logging
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from transformers import PreTrainedTokenizerBase

from dpr.data.reader_data import ReaderPassage
from dpr.evaluation.exact_match import max_exact_match
from dpr.foundation.files import atomic_output

logger = logging.getLogger(__name__)

TOP_SPANS_PER_PASSAGE = 10


@dataclass
class SpanPrediction:
    start: int  # inclusive token indices into passage_token_ids, widened to whole words
    end: int
    span_score: float
    relevance_score: float
    passage_index: int  # in retrieval order
    passage_token_ids: np.ndarray
    combined_score: float  # relevance logit + log p(start | passage) + log p(end | passage)


class ScoredSpan(NamedTuple):
    start: int  # inclusive token indices, widened to whole words when the tokens are known
    end: int
    score: float  # start_logits[logit_start] + end_logits[logit_end], summed in float64
    logit_start: int  # the span the logits scored, before widening
    logit_end: int


def best_spans(start_logits: np.ndarray, end_logits: np.ndarray, max_answer_length: int,
               top_spans: int = TOP_SPANS_PER_PASSAGE, tokens: Optional[Sequence[str]] = None) -> List[ScoredSpan]:
    """Up to top_spans spans, best first, with end - start < max_answer_length, each widened to whole words over
    `tokens` (when given) and none containing or contained in a better one once that one is widened. Equal scores
    keep (start, end) order."""
    length = len(start_logits)
    starts = np.repeat(np.arange(length), max_answer_length)
    ends = starts + np.tile(np.arange(max_answer_length), length)
    inside = ends < length
    starts, ends = starts[inside], ends[inside]
    # in float64, as DPR sums Python floats: a float32 sum rounds near-ties into ties and can pick another span
    scores = start_logits[starts].astype(np.float64) + end_logits[ends].astype(np.float64)
    accepted: List[ScoredSpan] = []
    for k in np.argsort(-scores, kind="stable"):
        s, e = int(starts[k]), int(ends[k])
        if any((s <= span.start and span.end <= e) or (span.start <= s and e <= span.end) for span in accepted):
            continue
        wide_s, wide_e = extend_to_words(tokens, s, e) if tokens is not None else (s, e)
        accepted.append(ScoredSpan(wide_s, wide_e, float(scores[k]), s, e))
        if len(accepted) == top_spans:
            break
    return accepted


def extend_to_words(tokens: Sequence[str], start: int, end: int) -> Tuple[int, int]:
    """Widen [start, end] so it neither starts nor is followed by a `##` subword token."""
    while start > 0 and tokens[start].startswith("##"):
        start -= 1
    while end + 1 < len(tokens) and tokens[end + 1].startswith("##"):
        end += 1
    return start, end


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x.astype(np.float64) - x.max()  # float64, as the span scores
    return shifted - np.log(np.exp(shifted).sum())


def question_nbest(passages: Sequence[ReaderPassage], start_logits: np.ndarray, end_logits: np.ndarray,
                   relevance_logits: np.ndarray, tokenizer: PreTrainedTokenizerBase,
                   max_answer_length: int) -> List[SpanPrediction]:
    """Candidate answers of one question, passages in descending relevance. Logits are [M, T] and [M] for the
    question's passage rows; rows past len(passages) are padding and skipped."""
    width = start_logits.shape[-1]
    nbest: List[SpanPrediction] = []
    for index in np.argsort(-relevance_logits, kind="stable"):
        index = int(index)
        if index >= len(passages):
            continue
        passage = passages[index]
        offset, seq_len = passage.passage_offset, min(len(passage.sequence_ids), width)
        if seq_len <= offset:
            continue
        ctx_ids = np.asarray(passage.sequence_ids[offset:seq_len])
        starts, ends = start_logits[index, offset:seq_len], end_logits[index, offset:seq_len]
        log_p_start, log_p_end = _log_softmax(starts), _log_softmax(ends)
        tokens = tokenizer.convert_ids_to_tokens(ctx_ids.tolist())
        relevance = float(relevance_logits[index])
        for span in best_spans(starts, ends, max_answer_length, tokens=tokens):
            combined = relevance + float(log_p_start[span.logit_start] + log_p_end[span.logit_end])
            nbest.append(SpanPrediction(span.start, span.end, span.score, relevance, index, ctx_ids, combined))
    return nbest


def answer_text(span: SpanPrediction, tokenizer: PreTrainedTokenizerBase) -> str:
    """The span decoded (only chosen answers are: decoding every candidate would dominate inference)."""
    return tokenizer.decode(span.passage_token_ids[span.start : span.end + 1].tolist(), skip_special_tokens=True)


def select_predictions(nbest: Sequence[SpanPrediction], top_docs: Sequence[int],
                       combine_scores: bool = False) -> Dict[int, Optional[SpanPrediction]]:
    """For each n: the first candidate from the n first retrieved passages (the best span of the most relevant
    of them), or with combine_scores the one with the highest combined score; None when there is none."""
    out: Dict[int, Optional[SpanPrediction]] = {}
    for n in top_docs:
        candidates = [p for p in nbest if p.passage_index < n]
        if not candidates:
            out[n] = None
        elif combine_scores:
            out[n] = max(candidates, key=lambda p: p.combined_score)
        else:
            out[n] = candidates[0]
    return out


def prediction_record(question: str, gold_answers: Sequence[str], predictions: Dict[int, Optional[SpanPrediction]],
                      tokenizer: PreTrainedTokenizerBase) -> dict:
    """One question of DPR's prediction file; a question without a candidate gets an empty prediction."""
    entries = []
    for n, span in predictions.items():
        if span is None:
            prediction = {"text": "", "score": None, "relevance_score": None, "passage_idx": None, "passage": ""}
        else:
            prediction = {
                "text": answer_text(span, tokenizer),
                "score": span.span_score,
                "relevance_score": span.relevance_score,
                "passage_idx": span.passage_index,
                "passage": tokenizer.decode(span.passage_token_ids.tolist(), skip_special_tokens=True),
            }
        entries.append({"top_k": int(n), "prediction": prediction})
    return {"question": question, "gold_answers": list(gold_answers), "predictions": entries}


def exact_match_by_top_k(records: Sequence[dict]) -> Dict[int, float]:
    """EM (in %) per top_k over prediction records: mean over questions of max over gold answers, with
    SQuAD's answer normalization."""
    hits: Dict[int, List[bool]] = {}
    for record in records:
        for entry in record["predictions"]:
            hits.setdefault(entry["top_k"], []).append(
                max_exact_match(entry["prediction"]["text"], record["gold_answers"]))
    return {n: 100.0 * sum(h) / len(h) for n, h in hits.items()}


def log_exact_match(ems: Dict[int, float]) -> None:
    for n, em in ems.items():
        logger.info("n=%d\tEM %.2f", n, em)


def write_predictions(path: str, records: Sequence[dict]) -> None:
    with atomic_output(path) as temp_name, open(temp_name, "w", encoding="utf-8") as f:
        f.write(json.dumps(list(records), indent=4) + "\n")
    logger.info("Saved reader predictions of %d questions to %s", len(records), path)


def read_predictions(path: str) -> List[dict]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
