"""Convert SQuAD-format JSON into DPR's retriever files (spec §1.6).

Writes, into one output folder:

- ``psgs.tsv``: every paragraph as a passage (``id\\ttext\\ttitle`` with a header; ids ``1..n``);
- ``biencoder-{split}.json``: per question the gold paragraph as ``positive_ctxs``, the top BM25 passages (over all
  paragraphs) without an answer as ``hard_negative_ctxs``, and seeded random passages without an answer as
  ``negative_ctxs``;
- ``{split}.qa.csv``: ``question\\t['answer', ...]`` lines, readable with ``ast.literal_eval``.

"Without an answer" is DPR's ``has_answer`` string test (uncased SimpleTokenizer token sequence, on the text).
With ``dev_fraction`` the articles are split (seeded) into ``train`` and ``dev``; no article is in both.
"""
from __future__ import annotations

import csv
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from dpr.data.data_files import DataFileError, open_text
from dpr.data.resources import resolve_data_path
from dpr.evaluation.qa_validation import token_key
from dpr.indexing.bm25 import BM25Index, passage_text

logger = logging.getLogger(__name__)

PASSAGES_FILE = "psgs.tsv"


@dataclass(frozen=True)
class Paragraph:
    passage_id: str
    title: str
    text: str
    article: int


@dataclass(frozen=True)
class Question:
    question: str
    answers: list[str]
    paragraph: int  # index into the paragraph list


def clean_text(text: str) -> str:
    """Tabs and line breaks would break the TSV/CSV rows; replace them with spaces."""
    return text.replace("\t", " ").replace("\r", " ").replace("\n", " ").strip()


def read_squad(path: str | Path) -> tuple[list[Paragraph], list[Question]]:
    """Paragraphs (ids 1..n in file order) and their questions; titles get spaces for underscores."""
    with open_text(path) as source:
        try:
            squad = json.load(source)
        except json.JSONDecodeError as e:
            raise DataFileError(f"{path}: not valid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    if not isinstance(squad, dict) or not isinstance(squad.get("data"), list):
        raise DataFileError(f"{path}: not a SQuAD file (expected {{\"data\": [articles]}})")
    articles = squad["data"]
    paragraphs: list[Paragraph] = []
    questions: list[Question] = []
    for article_index, article in enumerate(articles):
        title = clean_text(article["title"].replace("_", " "))
        for paragraph in article["paragraphs"]:
            paragraphs.append(Paragraph(str(len(paragraphs) + 1), title, clean_text(paragraph["context"]),
                                        article_index))
            for qa in paragraph["qas"]:
                answers = list(dict.fromkeys(clean_text(answer["text"]) for answer in qa["answers"]))
                questions.append(Question(clean_text(qa["question"]), answers, len(paragraphs) - 1))
    return paragraphs, questions


def split_articles(n_articles: int, dev_fraction: float, seed: int) -> set[int]:
    """The (seeded, random) articles of the dev split: at least one, and never all of them."""
    if not 0 < dev_fraction < 1 or n_articles < 2:
        raise ValueError(f"cannot split {n_articles} article(s) with dev_fraction={dev_fraction}")
    n_dev = min(n_articles - 1, max(1, round(dev_fraction * n_articles)))
    return set(random.Random(seed).sample(range(n_articles), n_dev))


class AnswerMatcher:
    """DPR's ``has_answer`` (string mode) against pre-tokenised passages: fast over many candidate passages."""

    def __init__(self, texts: list[str]):
        # Space-delimited tokens: a token-sequence match becomes a substring test.
        self._passage_keys = [token_key(text) for text in texts]

    def answer_keys(self, answers: list[str]) -> list[str]:
        return [key for key in (token_key(answer) for answer in answers) if key.strip()]

    def contains(self, passage: int, answer_keys: list[str]) -> bool:
        return any(key in self._passage_keys[passage] for key in answer_keys)


def ctx_record(paragraph: Paragraph, score: float) -> dict:
    # title_score is unused by DPR (spec §1.6); no separate title BM25 is computed here.
    return {"title": paragraph.title, "text": paragraph.text, "score": round(float(score), 4), "title_score": 0,
            "passage_id": paragraph.passage_id}


def top_scored_without_answer(scores: np.ndarray, wanted: int, excluded: Callable[[int], bool]) -> list[int]:
    """Up to ``wanted`` passages by decreasing positive score, skipping excluded ones."""
    pool = min(len(scores), 2 * wanted + 20)
    while True:
        top = np.argpartition(-scores, pool - 1)[:pool] if pool < len(scores) else np.arange(len(scores))
        ranked = top[np.argsort(-scores[top], kind="stable")]
        chosen = [int(i) for i in ranked if scores[i] > 0 and not excluded(int(i))][:wanted]
        if len(chosen) == wanted or pool == len(scores) or scores[ranked[-1]] <= 0:
            return chosen
        pool = min(len(scores), pool * 4)


def random_without_answer(n_passages: int, wanted: int, excluded: Callable[[int], bool],
                          rng: random.Random) -> list[int]:
    candidates = rng.sample(range(n_passages), min(n_passages, 3 * wanted + 10))
    return [i for i in candidates if not excluded(i)][:wanted]


def biencoder_sample(question: Question, paragraphs: list[Paragraph], index: BM25Index, matcher: AnswerMatcher,
                     dataset: str, num_hard_negatives: int, num_negatives: int, rng: random.Random) -> dict:
    scores = index.scores(question.question)
    answer_keys = matcher.answer_keys(question.answers)

    def excluded(passage: int) -> bool:
        return passage == question.paragraph or matcher.contains(passage, answer_keys)

    hard = top_scored_without_answer(scores, num_hard_negatives, excluded)
    negatives = random_without_answer(len(paragraphs), num_negatives, excluded, rng)
    return {
        "dataset": dataset,
        "question": question.question,
        "answers": question.answers,
        "positive_ctxs": [ctx_record(paragraphs[question.paragraph], scores[question.paragraph])],
        "negative_ctxs": [ctx_record(paragraphs[i], scores[i]) for i in negatives],
        "hard_negative_ctxs": [ctx_record(paragraphs[i], scores[i]) for i in hard],
    }


def write_passages_tsv(path: Path, paragraphs: list[Paragraph]) -> None:
    # csv quoting doubles inner quotes, as in psgs_w100.tsv, so csv.reader(delimiter="\t") reads it back.
    with open(path, "w", encoding="utf-8", newline="") as sink:
        writer = csv.writer(sink, delimiter="\t", lineterminator="\n")
        writer.writerow(["id", "text", "title"])
        writer.writerows((p.passage_id, p.text, p.title) for p in paragraphs)


def write_qas_csv(path: Path, questions: list[Question]) -> None:
    with open(path, "w", encoding="utf-8") as sink:
        sink.writelines(f"{q.question}\t{q.answers!r}\n" for q in questions)


def write_biencoder_json(path: Path, samples: Iterable[dict]) -> None:
    """Stream the JSON list one sample at a time: a full SQuAD train split is gigabytes of contexts."""
    with open(path, "w", encoding="utf-8") as sink:
        sink.write("[")
        for position, sample in enumerate(samples):
            sink.write((", " if position else "") + json.dumps(sample, ensure_ascii=False))
        sink.write("]")


@dataclass
class NegativeCounts:
    """Per-question numbers of hard and random negatives, gathered as samples stream past."""

    hard: list[int] = field(default_factory=list)
    random: list[int] = field(default_factory=list)

    def track(self, samples: Iterable[dict]) -> Iterator[dict]:
        for sample in samples:
            self.hard.append(len(sample["hard_negative_ctxs"]))
            self.random.append(len(sample["negative_ctxs"]))
            yield sample

    def log(self, split: str, wanted_hard: int) -> None:
        logger.info("%s: %d questions; hard negatives per question: mean %.1f, %d with fewer than %d; "
                    "random negatives per question: mean %.1f", split, len(self.hard),
                    float(np.mean(self.hard)) if self.hard else 0.0, sum(n < wanted_hard for n in self.hard),
                    wanted_hard, float(np.mean(self.random)) if self.random else 0.0)


def split_questions(paragraphs: list[Paragraph], questions: list[Question], split_name: str, dev_fraction: float,
                    seed: int) -> dict[str, list[Question]]:
    if not dev_fraction:
        return {split_name: questions}
    dev_articles = split_articles(paragraphs[-1].article + 1, dev_fraction, seed)
    is_dev = [paragraphs[q.paragraph].article in dev_articles for q in questions]
    logger.info("Split by article: %d train, %d dev articles", paragraphs[-1].article + 1 - len(dev_articles),
                len(dev_articles))
    return {"train": [q for q, dev in zip(questions, is_dev) if not dev],
            "dev": [q for q, dev in zip(questions, is_dev) if dev]}


def convert_squad(squad_file: str, output_dir: str | Path, split_name: str = "train", dev_fraction: float = 0.0,
                  dataset: str = "squad1", num_hard_negatives: int = 30, num_negatives: int = 30,
                  seed: int = 0) -> dict[str, Path]:
    """Write the passages TSV and per-split biencoder JSON and qas CSV; return the written files by name.

    ``squad_file`` may be a path or a resource key such as ``data.squad1.dev``. Without ``dev_fraction`` every
    question goes to ``split_name``; with it, articles are split into ``train`` and ``dev``.
    """
    [squad_path] = resolve_data_path(squad_file)
    paragraphs, questions = read_squad(squad_path)
    if not paragraphs:
        raise DataFileError(f"{squad_path} holds no paragraphs")
    logger.info("Read %d questions over %d paragraphs from %s", len(questions), len(paragraphs), squad_path)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    written = {PASSAGES_FILE: output / PASSAGES_FILE}
    write_passages_tsv(written[PASSAGES_FILE], paragraphs)
    index = BM25Index.build([p.passage_id for p in paragraphs], [passage_text(p.title, p.text) for p in paragraphs])
    matcher = AnswerMatcher([p.text for p in paragraphs])
    rng = random.Random(seed)
    for split, split_qs in split_questions(paragraphs, questions, split_name, dev_fraction, seed).items():
        samples = (biencoder_sample(q, paragraphs, index, matcher, dataset, num_hard_negatives, num_negatives, rng)
                   for q in split_qs)
        counts = NegativeCounts()
        written[f"biencoder-{split}.json"] = output / f"biencoder-{split}.json"
        written[f"{split}.qa.csv"] = output / f"{split}.qa.csv"
        write_biencoder_json(written[f"biencoder-{split}.json"], counts.track(samples))
        write_qas_csv(written[f"{split}.qa.csv"], split_qs)
        counts.log(split, num_hard_negatives)
    logger.info("Wrote %s", ", ".join(str(path) for path in written.values()))
    return written

