"""Answer matching and top-k retrieval accuracy, as DPR validates a retriever.

`has_answer` follows DrQA's SimpleTokenizer semantics (NFD, uncased token-sequence match, or a regex search).
`calculate_matches` spreads the questions over worker processes; every task carries the passage texts it needs,
so it works under the spawn start method too (DPR shares the documents through a module global, which needs fork).
"""
import json
import logging
import multiprocessing
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import regex

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]
# One retrieval result per question: the passage ids best first, and their scores.
RetrievedDocs = tuple[Sequence[object], Sequence[float]]

MATCH_TYPES = ("string", "regex")
REPORT_TOP_KS = (1, 5, 20, 50, 100)
_QUESTIONS_PER_TASK_CHUNK = 16


class SimpleTokenizer:
    """DrQA's SimpleTokenizer: runs of letters/digits/marks, or any single non-space character."""

    ALPHA_NUM = r"[\p{L}\p{N}\p{M}]+"
    NON_WS = r"[^\p{Z}\p{C}]"

    def __init__(self) -> None:
        self._pattern = regex.compile(
            f"({self.ALPHA_NUM})|({self.NON_WS})",
            flags=regex.IGNORECASE | regex.UNICODE | regex.MULTILINE,
        )

    def words(self, text: str, uncased: bool = False) -> list[str]:
        """The token strings of `text`, lowercased when `uncased`."""
        tokens = [match.group() for match in self._pattern.finditer(text)]
        return [token.lower() for token in tokens] if uncased else tokens


_TOKENIZER = SimpleTokenizer()


def _contains_token_sequence(haystack: Sequence[str], needle: Sequence[str]) -> bool:
    width = len(needle)
    return any(haystack[start : start + width] == needle for start in range(len(haystack) - width + 1))


def _regex_search(pattern: str, text: str) -> bool:
    try:
        compiled = regex.compile(pattern, flags=regex.IGNORECASE | regex.UNICODE | regex.MULTILINE)
    except Exception:  # DPR counts any pattern that fails to compile as no match
        return False
    return compiled.search(text) is not None


def has_answer(
    answers: Sequence[str],
    text: str,
    match_type: str = "string",
    tokenizer: Optional[SimpleTokenizer] = None,
) -> bool:
    """Whether any answer occurs in `text`: as a token sequence (`string`) or as a regex match (`regex`).

    An answer with no tokens never matches (DPR's loop would match it everywhere).
    """
    if match_type not in MATCH_TYPES:
        raise ValueError(f"unknown match_type {match_type!r}; expected one of {MATCH_TYPES}")
    text = unicodedata.normalize("NFD", text)
    if match_type == "regex":
        return any(_regex_search(unicodedata.normalize("NFD", answer), text) for answer in answers)
    tokenizer = tokenizer or _TOKENIZER
    text_tokens = tokenizer.words(text, uncased=True)
    for answer in answers:
        answer_tokens = tokenizer.words(unicodedata.normalize("NFD", answer), uncased=True)
        if answer_tokens and _contains_token_sequence(text_tokens, answer_tokens):
            return True
    return False


@dataclass
class QAMatchStats:
    """`top_k_hits[k-1]`: questions with an answer in their top k; `questions_doc_hits[i][j]`: doc j of question i."""

    top_k_hits: list[int]
    questions_doc_hits: list[list[bool]]


def _match_question(task: tuple[Sequence[str], list[Optional[str]], str]) -> list[bool]:
    answers, doc_texts, match_type = task
    return [text is not None and has_answer(answers, text, match_type) for text in doc_texts]


def _doc_texts(passages: Mapping[object, tuple[Optional[str], Optional[str]]], doc_ids: Sequence[object]) -> list:
    texts = []
    for doc_id in doc_ids:
        text = passages[doc_id][0]  # only the text is searched, not the title (as DPR)
        if text is None:
            logger.warning("no text for passage %s: counted as a miss", doc_id)
        texts.append(text)
    return texts


def cumulative_top_k_hits(questions_doc_hits: Sequence[Sequence[bool]], n_docs: int) -> list[int]:
    """Per k, the number of questions whose first hit lies within the top k."""
    top_k_hits = [0] * n_docs
    for doc_hits in questions_doc_hits:
        first_hit = next((rank for rank, hit in enumerate(doc_hits) if hit), None)
        if first_hit is not None:
            for k in range(first_hit, n_docs):
                top_k_hits[k] += 1
    return top_k_hits


def calculate_matches(
    passages: Mapping[object, tuple[Optional[str], Optional[str]]],
    answers: Sequence[Sequence[str]],
    closest_docs: Sequence[RetrievedDocs],
    workers: int,
    match_type: str = "string",
    start_method: Optional[str] = None,
) -> QAMatchStats:
    """Mark which retrieved passages hold an answer and count top-k hits.

    `workers <= 1` runs in this process; otherwise a pool of `workers` processes started with `start_method`
    (None: the platform default). An id missing from `passages` raises KeyError, as in DPR.
    """
    if len(answers) != len(closest_docs):
        raise ValueError(f"{len(answers)} answer lists but {len(closest_docs)} retrieval results")
    if match_type not in MATCH_TYPES:
        raise ValueError(f"unknown match_type {match_type!r}; expected one of {MATCH_TYPES}")
    tasks = [
        (list(question_answers), _doc_texts(passages, doc_ids), match_type)
        for question_answers, (doc_ids, _scores) in zip(answers, closest_docs)
    ]
    logger.info("matching answers in %d questions' passages with %d workers", len(tasks), max(workers, 1))
    if workers <= 1:
        questions_doc_hits = [_match_question(task) for task in tasks]
    else:
        with multiprocessing.get_context(start_method).Pool(workers) as pool:
            questions_doc_hits = pool.map(_match_question, tasks, chunksize=_QUESTIONS_PER_TASK_CHUNK)
    n_docs = max((len(doc_ids) for doc_ids, _scores in closest_docs), default=0)
    return QAMatchStats(cumulative_top_k_hits(questions_doc_hits, n_docs), questions_doc_hits)


def top_k_accuracy(top_k_hits: Sequence[int], n_questions: int) -> list[float]:
    """The hit counts divided by the number of questions."""
    return [hits / n_questions for hits in top_k_hits] if n_questions else [0.0] * len(top_k_hits)


def format_validation_results(top_k_hits: Sequence[int], n_questions: int) -> str:
    """DPR's two raw log lines, then a table of top-1/5/20/50/100 accuracy (the k available)."""
    accuracy = top_k_accuracy(top_k_hits, n_questions)
    lines = [
        "Validation results: top k documents hits %s" % list(top_k_hits),
        "Validation results: top k documents hits accuracy %s" % accuracy,
        f"{'top-k':>6} | {'hits':>7} | {'accuracy':>8}   ({n_questions} questions)",
    ]
    lines += [
        f"{k:>6} | {top_k_hits[k - 1]:>7} | {100 * accuracy[k - 1]:>7.2f}%"
        for k in REPORT_TOP_KS
        if k <= len(top_k_hits)
    ]
    return "\n".join(lines)


def retrieval_results_records(
    questions: Sequence[str],
    answers: Sequence[Sequence[str]],
    passages: Mapping[object, tuple[Optional[str], Optional[str]]],
    closest_docs: Sequence[RetrievedDocs],
    questions_doc_hits: Sequence[Sequence[bool]],
) -> list[dict]:
    """The retriever results as DPR writes them: one record per question, ctxs best first, scores as strings."""
    records = []
    for question, question_answers, (doc_ids, scores), doc_hits in zip(
        questions, answers, closest_docs, questions_doc_hits
    ):
        ctxs = []
        for doc_id, score, hit in zip(doc_ids, scores, doc_hits):
            text, title = passages[doc_id]
            ctxs.append(
                {
                    "id": doc_id,
                    "title": title,
                    "text": text,
                    "score": str(np.float32(score)),  # DPR writes str() of the float32 FAISS score
                    "has_answer": bool(hit),
                }
            )
        records.append({"question": question, "answers": list(question_answers), "ctxs": ctxs})
    return records


def write_retrieval_results(path: PathLike, records: Sequence[dict]) -> None:
    """Write the records as DPR does: json.dumps(indent=4) plus a newline."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as writer:
        writer.write(json.dumps(records, indent=4) + "\n")
    logger.info("saved retrieval results of %d questions to %s", len(records), path)


def top_k_hits_from_results(path: PathLike) -> tuple[list[int], int]:
    """Recount (top_k_hits, number of questions) from the `has_answer` flags of a results JSON."""
    with open(path, encoding="utf-8") as reader:
        records = json.load(reader)
    questions_doc_hits = [[bool(ctx["has_answer"]) for ctx in record["ctxs"]] for record in records]
    n_docs = max((len(doc_hits) for doc_hits in questions_doc_hits), default=0)
    return cumulative_top_k_hits(questions_doc_hits, n_docs), len(records)


def top_k_accuracy_from_results(path: PathLike) -> list[float]:
    """Top-k accuracy (entry k-1 for top-k) recomputed from a results JSON."""
    top_k_hits, n_questions = top_k_hits_from_results(path)
    return top_k_accuracy(top_k_hits, n_questions)
