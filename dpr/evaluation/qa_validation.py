"""Answer matching and top-k retrieval accuracy, as DPR validates a retriever.

`has_answer` follows DrQA's SimpleTokenizer semantics (NFD, uncased token-sequence match, or a regex search).

`calculate_matches` gives DPR's results but works passage by passage instead of question by question: each distinct
retrieved passage is normalized once and tested against every question that retrieved it, and is tokenized (the
costly step) only when all tokens of some answer occur in its lowercased text, a necessary condition for a token
match. Only one passage's tokens exist at a time, so the memory beyond the passage texts is a few integers per
retrieved (question, passage) pair. Worker processes get the questions' answers once, when they start, and every
distinct passage text once, so they work under the spawn start method too (DPR shares the documents through a
module global, which needs fork).

Answers that can never match are reported, not silently counted as misses: a question without answers, a regex
that does not compile (`match=regex`), an answer without a single token (`match=string`).
"""
import json
import logging
import multiprocessing
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import regex

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]
# One retrieval result per question: the passage ids best first, and their scores.
RetrievedDocs = tuple[Sequence[object], Sequence[float]]

MATCH_TYPES = ("string", "regex")
REPORT_TOP_KS = (1, 5, 20, 50, 100)
_PASSAGES_PER_TASK = 256
_REGEX_FLAGS = regex.IGNORECASE | regex.UNICODE | regex.MULTILINE


class SimpleTokenizer:
    """DrQA's SimpleTokenizer: runs of letters/digits/marks, or any single non-space character."""

    ALPHA_NUM = r"[\p{L}\p{N}\p{M}]+"
    NON_WS = r"[^\p{Z}\p{C}]"

    def __init__(self) -> None:
        # DrQA's pattern without its two groups: findall then returns the tokens themselves (faster than finditer).
        self._pattern = regex.compile(f"{self.ALPHA_NUM}|{self.NON_WS}", flags=_REGEX_FLAGS)

    def words(self, text: str, uncased: bool = False) -> list[str]:
        """The token strings of `text`, lowercased when `uncased`."""
        tokens = self._pattern.findall(text)
        return [token.lower() for token in tokens] if uncased else tokens


_TOKENIZER = SimpleTokenizer()


def _fold_sigma(lowercase_text: str) -> str:
    # str.lower is context free except for capital sigma, which becomes final 'ς' or 'σ' by its neighbours; with
    # both as 'σ', the lowercase form of a substring is a substring of the lowercase form of the whole.
    return lowercase_text.replace("ς", "σ")


def _nfd(text: str) -> str:
    return unicodedata.normalize("NFD", text)


def _key_from_nfd(nfd_text: str) -> str:
    # Lowercasing the joined tokens equals lowercasing each token: a space is neither cased nor case-ignorable, so
    # it ends the context that decides a capital sigma's form.
    return " " + " ".join(_TOKENIZER.words(nfd_text)).lower() + " "


def token_key(text: str) -> str:
    """The uncased tokens of NFD `text`, each between spaces: " may 18 , 2018 ".

    No token contains a space (\\p{Z}), so a token sequence occurs in a text exactly when the sequence's key is a
    substring of the text's key. A text without tokens has the key " ".
    """
    return _key_from_nfd(_nfd(text))


@dataclass(frozen=True)
class _StringAnswer:
    key: str  # token_key of the answer
    required: tuple[str, ...]  # its distinct sigma-folded tokens, longest first: each occurs in a matching text


def _string_answer(answer: str) -> Optional[_StringAnswer]:
    """None for an answer without tokens: it never matches (DPR's loop would match it everywhere)."""
    key = token_key(answer)
    tokens = {_fold_sigma(token) for token in key.split()}
    return _StringAnswer(key, tuple(sorted(tokens, key=len, reverse=True))) if tokens else None


def _compile_answer(answer: str):
    """The answer as a regex (NFD, DPR's flags); raises for a pattern that does not compile."""
    return regex.compile(_nfd(answer), flags=_REGEX_FLAGS)


def has_answer(answers: Sequence[str], text: str, match_type: str = "string") -> bool:
    """Whether any answer occurs in `text`: as a token sequence (`string`) or as a regex match (`regex`).

    An answer with no tokens, or a regex that does not compile, never matches (DPR counts the latter as no match).
    """
    if match_type not in MATCH_TYPES:
        raise ValueError(f"unknown match_type {match_type!r}; expected one of {MATCH_TYPES}")
    text = _nfd(text)
    if match_type == "regex":
        for answer in answers:
            try:
                pattern = _compile_answer(answer)
            except Exception:  # any pattern the regex module rejects, as DPR's bare except
                continue
            if pattern.search(text) is not None:
                return True
        return False
    text_key = _key_from_nfd(text)
    return any(
        parsed is not None and parsed.key in text_key for parsed in (_string_answer(answer) for answer in answers)
    )


@dataclass
class QAMatchStats:
    """`top_k_hits[k-1]`: questions with an answer in their top k; `questions_doc_hits[i][j]`: doc j of question i.

    `questions_without_answers`: questions whose answer list is empty (each counted as a miss);
    `invalid_answers`: answers that can never match (a regex that does not compile, or an answer without tokens).
    """

    top_k_hits: list[int]
    questions_doc_hits: list[list[bool]]
    questions_without_answers: int = 0
    invalid_answers: int = 0

    @classmethod
    def without_answers(cls, closest_docs: Sequence["RetrievedDocs"]) -> "QAMatchStats":
        """The statistics of questions that have no answers at all (a queries file judged by qrels): no passage
        holds one, and nothing is matched or warned about question by question."""
        hits = [[False] * len(ids) for ids, _scores in closest_docs]
        n_docs = max((len(ids) for ids, _scores in closest_docs), default=0)
        return cls(cumulative_top_k_hits(hits, n_docs), hits, len(closest_docs), 0)


class _AnswerMatcher:
    """Every question's parsed answers, and the test of one passage against the questions that retrieved it."""

    def __init__(self, match_type: str, question_answers: Sequence[tuple]) -> None:
        self.match_type = match_type
        self.question_answers = question_answers  # per question: _StringAnswer or compiled patterns

    def hits(self, text: str, questions: Sequence[int]) -> list[bool]:
        """For each question (an index; one per retrieval of this passage): does an answer occur in `text`?"""
        text = _nfd(text)
        if self.match_type == "regex":
            return [any(pattern.search(text) for pattern in self.question_answers[q]) for q in questions]
        folded = _fold_sigma(text.lower())
        text_key = None  # tokenized only when some answer passes the cheap test
        found = []
        for q in questions:
            candidates = [a.key for a in self.question_answers[q] if all(token in folded for token in a.required)]
            if candidates and text_key is None:
                text_key = _key_from_nfd(text)
            found.append(any(key in text_key for key in candidates))
        return found


def _parse_answers(answers: Sequence[Sequence[str]], match_type: str) -> tuple[_AnswerMatcher, int, int]:
    """The matcher, the number of questions without answers and the number of answers that can never match.

    Each such question and answer is named in one warning.
    """
    questions_without_answers = invalid_answers = 0
    parsed_questions = []
    for question, question_answers in enumerate(answers):
        if not question_answers:
            questions_without_answers += 1
            logger.warning("question %d (0-based) has no answers: counted as a miss", question)
        parsed = []
        for answer in dict.fromkeys(question_answers):  # a repeated answer is tested and reported once
            if match_type == "regex":
                try:
                    parsed.append(_compile_answer(answer))
                except Exception as error:
                    invalid_answers += 1
                    logger.warning("question %d (0-based): answer %r is not a valid regex (%s): it never matches",
                                   question, answer, error)
            else:
                string_answer = _string_answer(answer)
                if string_answer is None:
                    invalid_answers += 1
                    logger.warning("question %d (0-based): answer %r has no tokens: it never matches", question, answer)
                else:
                    parsed.append(string_answer)
        parsed_questions.append(tuple(parsed))
    return _AnswerMatcher(match_type, parsed_questions), questions_without_answers, invalid_answers


_WORKER_MATCHER: Optional[_AnswerMatcher] = None  # set once in each worker process by _start_worker

# A task: passages, each with the questions that retrieved it; its result: their hit flags, one flat list.
_Task = list[tuple[Optional[str], list[int]]]


def _start_worker(matcher: _AnswerMatcher) -> None:
    global _WORKER_MATCHER
    _WORKER_MATCHER = matcher


def _match_in_worker(task: _Task) -> list[bool]:
    return _match_task(_WORKER_MATCHER, task)


def _match_task(matcher: _AnswerMatcher, task: _Task) -> list[bool]:
    hits = []
    for text, questions in task:
        hits += [False] * len(questions) if text is None else matcher.hits(text, questions)
    return hits


def cumulative_top_k_hits(questions_doc_hits: Sequence[Sequence[bool]], n_docs: int) -> list[int]:
    """Per k, the number of questions whose first hit lies within the top k."""
    top_k_hits = [0] * n_docs
    for doc_hits in questions_doc_hits:
        first_hit = next((rank for rank, hit in enumerate(doc_hits) if hit), None)
        if first_hit is not None:
            for k in range(first_hit, n_docs):
                top_k_hits[k] += 1
    return top_k_hits


@dataclass
class _PassageGroups:
    """The retrievals grouped by passage. Flat positions number the (question, rank) pairs question by question:
    question i's lie from offsets[i] to offsets[i+1]. order[starts[g]:starts[g+1]] are passage g's positions."""

    doc_ids: list[object]
    order: np.ndarray
    starts: np.ndarray
    offsets: np.ndarray

    @classmethod
    def of(cls, closest_docs: Sequence[RetrievedDocs]) -> "_PassageGroups":
        codes: dict[object, int] = {}
        flat_codes = np.fromiter(
            (codes.setdefault(doc_id, len(codes)) for doc_ids, _scores in closest_docs for doc_id in doc_ids),
            dtype=np.int64,
        )
        offsets = np.zeros(len(closest_docs) + 1, dtype=np.int64)
        np.cumsum([len(doc_ids) for doc_ids, _scores in closest_docs], out=offsets[1:])
        order = np.argsort(flat_codes, kind="stable")
        starts = np.searchsorted(flat_codes[order], np.arange(len(codes) + 1))
        return cls(list(codes), order, starts, offsets)


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
    matcher, questions_without_answers, invalid_answers = _parse_answers(answers, match_type)
    groups = _PassageGroups.of(closest_docs)
    texts = [passages[doc_id][0] for doc_id in groups.doc_ids]  # only the text is searched, not the title (as DPR)
    for doc_id, text in zip(groups.doc_ids, texts):
        if text is None:
            logger.warning("no text for passage %s: counted as a miss", doc_id)
    questions_in_order = np.repeat(np.arange(len(closest_docs)), np.diff(groups.offsets))[groups.order]
    task_bounds = [(first, min(first + _PASSAGES_PER_TASK, len(texts)))
                   for first in range(0, len(texts), _PASSAGES_PER_TASK)]

    def tasks() -> Iterator[_Task]:
        for first, end in task_bounds:
            yield [(texts[g], questions_in_order[groups.starts[g] : groups.starts[g + 1]].tolist())
                   for g in range(first, end)]

    logger.info("matching answers in %d questions' passages (%d distinct) with %d workers",
                len(closest_docs), len(texts), max(workers, 1))
    flat_hits = np.zeros(int(groups.offsets[-1]), dtype=bool)

    def store(task_results: Iterator[list[bool]]) -> None:
        for (first, end), hits in zip(task_bounds, task_results):
            flat_hits[groups.order[groups.starts[first] : groups.starts[end]]] = hits

    if workers <= 1:
        store(_match_task(matcher, task) for task in tasks())
    else:
        with multiprocessing.get_context(start_method).Pool(workers, _start_worker, (matcher,)) as pool:
            store(pool.imap(_match_in_worker, tasks()))
    questions_doc_hits = [flat_hits[groups.offsets[i] : groups.offsets[i + 1]].tolist()
                          for i in range(len(closest_docs))]
    if questions_without_answers or invalid_answers:
        logger.warning("%d of %d questions have no answers (counted as misses); %d answers can never match",
                       questions_without_answers, len(closest_docs), invalid_answers)
    n_docs = max((len(ids) for ids, _scores in closest_docs), default=0)
    return QAMatchStats(cumulative_top_k_hits(questions_doc_hits, n_docs), questions_doc_hits,
                        questions_without_answers, invalid_answers)


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
    question_ids: Optional[Sequence[Optional[str]]] = None,
) -> list[dict]:
    """The retriever results as DPR writes them: one record per question, ctxs best first, scores as strings; a
    question that has an id (a queries file's) also gets it, first, so that its results convert to a TREC run."""
    records = []
    ids = question_ids if question_ids is not None else [None] * len(questions)
    for question_id, question, question_answers, (doc_ids, scores), doc_hits in zip(
        ids, questions, answers, closest_docs, questions_doc_hits
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
        record = {} if question_id is None else {"id": question_id}
        records.append({**record, "question": question, "answers": list(question_answers), "ctxs": ctxs})
    return records


def write_retrieval_results(path: PathLike, records: Sequence[dict]) -> None:
    """Write the records as DPR does: json.dumps(indent=4) plus a newline. `path` is usually a temporary of
    `atomic_output`, so the caller names the final file in the log."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as writer:
        writer.write(json.dumps(records, indent=4) + "\n")


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
