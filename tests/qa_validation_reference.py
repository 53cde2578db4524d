"""DPR's answer validation computed the straightforward way, question by question, and real workloads for it.

`reference_calculate_matches` is the reference `dpr.evaluation.qa_validation.calculate_matches` must equal: for
every question, every retrieved passage is NFD-normalized and tokenized again and each answer slides over its tokens
(string) or is compiled and searched (regex), as in DPR. It differs from DPR in one documented point only: an
answer without tokens never matches (DPR's loop would match it in every passage). `bench/bench_retrieval.py` times
it as the "before".

The workloads are built from the real data of ../shared/data: squad_open dev questions with their BM25 top-k over
squad_open + WikiText passages, and NQ questions whose candidates are random passages plus passages with an answer
planted in some form (as written, uppercased, detokenized, glued to neighbouring letters).
"""
import random
import unicodedata
from pathlib import Path
from typing import Mapping, Optional, Sequence

import regex

from dpr.data.passages import iter_passages
from dpr.data.qa_data import read_qa_file
from dpr.indexing.bm25 import BM25Index, passage_text

_FLAGS = regex.IGNORECASE | regex.UNICODE | regex.MULTILINE
_DRQA_TOKEN = regex.compile(r"([\p{L}\p{N}\p{M}]+)|([^\p{Z}\p{C}])", flags=_FLAGS)

Passages = dict[str, tuple[Optional[str], Optional[str]]]
Workload = tuple[Passages, list[list[str]], list[tuple[list[str], list[float]]]]


def reference_words(text: str) -> list[str]:
    """DrQA SimpleTokenizer's words(uncased=True): the text of each match, lowercased."""
    return [match.group().lower() for match in _DRQA_TOKEN.finditer(text)]


def reference_has_answer(answers: Sequence[str], text: str, match_type: str) -> bool:
    text = unicodedata.normalize("NFD", text)
    if match_type == "string":
        text_tokens = reference_words(text)
        for answer in answers:
            answer_tokens = reference_words(unicodedata.normalize("NFD", answer))
            if not answer_tokens:
                continue
            for start in range(len(text_tokens) - len(answer_tokens) + 1):
                if answer_tokens == text_tokens[start : start + len(answer_tokens)]:
                    return True
        return False
    for answer in answers:
        try:
            pattern = regex.compile(unicodedata.normalize("NFD", answer), flags=_FLAGS)
        except Exception:
            continue
        if pattern.search(text) is not None:
            return True
    return False


def reference_calculate_matches(
    passages: Mapping[str, tuple[Optional[str], Optional[str]]],
    answers: Sequence[Sequence[str]],
    closest_docs: Sequence[tuple[Sequence[str], Sequence[float]]],
    match_type: str,
) -> tuple[list[int], list[list[bool]]]:
    """(top_k_hits, questions_doc_hits), question by question, every passage tokenized for every question."""
    questions_doc_hits = []
    for question_answers, (doc_ids, _scores) in zip(answers, closest_docs):
        texts = [passages[doc_id][0] for doc_id in doc_ids]
        questions_doc_hits.append(
            [text is not None and reference_has_answer(question_answers, text, match_type) for text in texts]
        )
    n_docs = max((len(doc_ids) for doc_ids, _scores in closest_docs), default=0)
    top_k_hits = [0] * n_docs
    for doc_hits in questions_doc_hits:
        if any(doc_hits):
            for k in range(doc_hits.index(True), n_docs):
                top_k_hits[k] += 1
    return top_k_hits, questions_doc_hits


def read_passages(path: Path) -> Passages:
    return {passage.id: (passage.text, passage.title) for passage in iter_passages(path)}


def squad_bm25_workload(data_dir: Path, n_questions: int, n_docs: int) -> Workload:
    """squad_open dev questions with their BM25 top `n_docs` over squad_open + WikiText (4,131 passages)."""
    passages = read_passages(data_dir / "squad_open" / "psgs_plus_wikitext2.tsv")
    samples = read_qa_file(data_dir / "squad_open" / "dev.qa.csv")[:n_questions]
    ids = list(passages)
    index = BM25Index.build(ids, [passage_text(title, text) for text, title in passages.values()])
    closest = [(list(doc_ids), scores.tolist()) for doc_ids, scores in
               index.search([sample.question for sample in samples], n_docs)]
    return passages, [sample.answers for sample in samples], closest


def _detokenized(answer: str) -> str:
    """DPR's tokenised answers ("May 18 , 2018") as running text would write them ("May 18, 2018")."""
    return regex.sub(r" ([,.;:!?%)'\]])", r"\1", regex.sub(r"([($\[]) ", r"\1", answer))


_PLANTED_FORMS = (
    lambda answer: answer,
    str.upper,
    _detokenized,
    lambda answer: "x" + answer + "s",  # glued to letters: a token match only when the answer's ends are symbols
    lambda answer: unicodedata.normalize("NFC", answer),
)


def nq_planted_workload(data_dir: Path, qas_file: str, n_questions: int, n_docs: int, seed: int = 0) -> Workload:
    """NQ questions' real answers; candidates: random squad_open passages and, for most questions, a few passages
    with one of the answers planted at a random word boundary in one of `_PLANTED_FORMS`."""
    rng = random.Random(seed)
    passages = read_passages(data_dir / "squad_open" / "psgs.tsv")
    ids = list(passages)
    samples = read_qa_file(data_dir / "qas" / qas_file)[:n_questions]
    closest = []
    for question, sample in enumerate(samples):
        doc_ids = rng.sample(ids, n_docs)
        for slot in rng.sample(range(n_docs), rng.choice((0, 1, 3))) if sample.answers else ():
            words = passages[rng.choice(ids)][0].split(" ")
            cut = rng.randrange(len(words) + 1)
            planted = rng.choice(_PLANTED_FORMS)(rng.choice(sample.answers))
            planted_id = f"planted:{question}:{slot}"
            passages[planted_id] = (" ".join(words[:cut] + [planted] + words[cut:]), "planted")
            doc_ids[slot] = planted_id
        closest.append((doc_ids, [0.0] * n_docs))
    return passages, [sample.answers for sample in samples], closest
