"""Hard negatives mined with a trained bi-encoder (`mine_hard_negatives.py`), as DPR's `nq-adv-hn-train`: retrieve
for every question of a DPR retriever training file and write the file again with `hard_negative_ctxs` taken from
the highest-ranked passages that do not hold an answer.

- Retrieval is the dense retriever's (`dpr.indexing.dense_retriever.retrieve`): the same checkpoint, embedding
  shards, index options and batch sizes; the depth is `mine_rank_to`.
- Answers are matched passage by passage as validation does (`calculate_matches`, `has_answer` semantics, `match`).
- Excluded: every passage with an answer, every positive passage (by id, without the source's id prefix, or by
  identical text), ranks outside [`mine_rank_from`, `mine_rank_to`] (the very top ranks hold most false
  negatives: passages that answer without the exact answer string).
- `keep_existing_hard_negatives`: the mined negatives come first, then the file's own (BM25) ones not already
  mined; otherwise the mined ones replace them. A question that gets no negative (none in the range, or no answer
  to exclude passages by) keeps its own, and is counted in the summary line.
- Records without a question or without positives (which training drops) pass through unchanged.
- The output is written atomically, a JSON list in DPR's format (ids written as in the input, without prefix).
"""
import json
import logging
import os
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from omegaconf import DictConfig

from dpr.data.biencoder_data import iter_json_records, normalize_question
from dpr.data.ctx_sources import CtxSource, load_passage_subset, resolve_ctx_sources
from dpr.data.data_files import DataFileError
from dpr.evaluation.qa_validation import MATCH_TYPES, calculate_matches, format_validation_results
from dpr.foundation.errors import UserInputError
from dpr.foundation.files import atomic_output
from dpr.indexing.dense_retriever import retrieve

logger = logging.getLogger(__name__)


class MiningConfigError(UserInputError, ValueError):
    """An option of mine_hard_negatives.py that cannot work; the message names it and what to set."""


@dataclass(frozen=True)
class MiningOptions:
    input_file: str
    out_file: str
    rank_from: int  # 1-based, inclusive
    rank_to: int  # inclusive; the retrieval depth
    num_hard_negatives: int
    keep_existing: bool
    match: str

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "MiningOptions":
        if not cfg.input_file:
            raise MiningConfigError("input_file is required: the DPR retriever training JSON to mine negatives for")
        if not cfg.out_file or not str(cfg.out_file).endswith(".json"):
            raise MiningConfigError(f"out_file={cfg.out_file} must name the .json file the mined training data "
                                    "is written to (a JSON list, as DPR's biencoder files)")
        if os.path.abspath(cfg.out_file) == os.path.abspath(cfg.input_file):
            raise MiningConfigError("out_file must differ from input_file: the input is read while mining")
        if not 1 <= cfg.mine_rank_from <= cfg.mine_rank_to:
            raise MiningConfigError(f"mine_rank_from={cfg.mine_rank_from} and mine_rank_to={cfg.mine_rank_to} must "
                                    "satisfy 1 <= mine_rank_from <= mine_rank_to (ranks are 1-based, inclusive)")
        if cfg.n_docs < cfg.mine_rank_to:
            raise MiningConfigError(f"n_docs={cfg.n_docs} retrieves fewer passages than mine_rank_to="
                                    f"{cfg.mine_rank_to}: leave n_docs unset (it follows mine_rank_to) or raise it")
        if cfg.num_hard_negatives < 1:
            raise MiningConfigError(f"num_hard_negatives={cfg.num_hard_negatives}: mine at least 1")
        if cfg.match not in MATCH_TYPES:
            raise MiningConfigError(f"match={cfg.match} must be one of {MATCH_TYPES}")
        if cfg.retriever != "dense" or cfg.qa_dataset or cfg.encode_q_and_save:
            raise MiningConfigError("mining retrieves densely for input_file's questions: leave retriever=dense, "
                                    "qa_dataset and encode_q_and_save unset")
        return cls(str(cfg.input_file), str(cfg.out_file), int(cfg.mine_rank_from), int(cfg.mine_rank_to),
                   int(cfg.num_hard_negatives), bool(cfg.keep_existing_hard_negatives), str(cfg.match))


@dataclass(frozen=True)
class Candidate:
    """A retrieved passage at its rank (1-based)."""

    rank: int
    passage_id: str  # without its source's id prefix, as the training files write ids
    title: Optional[str]
    text: str
    score: float
    has_answer: bool


@dataclass
class MiningSummary:
    records: int = 0
    mined_questions: int = 0  # questions given mined negatives
    mined_negatives: int = 0
    no_negative_in_range: int = 0  # kept their own negatives
    without_answers: int = 0  # kept their own negatives: no answer to tell negatives by
    passed_through: int = 0  # records without a question or positives, unchanged

    def line(self, options: MiningOptions) -> str:
        kept = self.no_negative_in_range + self.without_answers
        return (f"mined {self.mined_negatives} hard negatives for {self.mined_questions} of {self.records} records "
                f"(ranks {options.rank_from}-{options.rank_to}, at most {options.num_hard_negatives} each, "
                f"{'kept beside' if options.keep_existing else 'replacing'} the file's own); {kept} kept their "
                f"own hard negatives ({self.no_negative_in_range} without a negative in the ranks, "
                f"{self.without_answers} without answers); {self.passed_through} without a question or positives "
                f"passed through")


def strip_source_prefix(passage_id: str, sources: Sequence[CtxSource]) -> str:
    for source in sources:
        if source.id_prefix and passage_id.startswith(source.id_prefix):
            return passage_id[len(source.id_prefix):]
    return passage_id


def select_hard_negatives(candidates: Iterable[Candidate], positives: Sequence[dict],
                          options: MiningOptions) -> list[Candidate]:
    """The first `num_hard_negatives` candidates in the rank range that hold no answer and are no positive."""
    positive_ids = {str(ctx["passage_id"]) for ctx in positives if ctx.get("passage_id") is not None}
    positive_texts = {ctx.get("text") for ctx in positives}
    selected = []
    for candidate in candidates:
        if len(selected) == options.num_hard_negatives:
            break
        if not options.rank_from <= candidate.rank <= options.rank_to or candidate.has_answer:
            continue
        if candidate.passage_id in positive_ids or candidate.text in positive_texts:
            continue
        selected.append(candidate)
    return selected


def hard_negative_ctxs(mined: Sequence[Candidate], existing: Sequence[dict], keep_existing: bool) -> list[dict]:
    """The record's new `hard_negative_ctxs`: the mined passages in DPR's format, then (when kept) the existing ones
    that were not mined again."""
    ctxs = [{"title": c.title, "text": c.text, "score": c.score, "passage_id": c.passage_id} for c in mined]
    if keep_existing:
        mined_ids = {c.passage_id for c in mined}
        ctxs += [ctx for ctx in existing if ctx.get("passage_id") is None or str(ctx["passage_id"]) not in mined_ids]
    return ctxs


def _minable(record: object) -> bool:
    return (isinstance(record, dict) and isinstance(record.get("question"), str) and bool(record["question"].strip())
            and isinstance(record.get("positive_ctxs"), list) and bool(record["positive_ctxs"]))


def read_records(path: str) -> list[dict]:
    records = []
    for location, record in iter_json_records(path):
        if not isinstance(record, dict):
            raise DataFileError(f"{path}: {location}: expected a JSON object, found {type(record).__name__}")
        records.append(record)
    return records


def mine_hard_negatives(cfg: DictConfig) -> MiningSummary:
    """The whole run: retrieve for input_file's questions, write out_file, print the summary line."""
    options = MiningOptions.from_config(cfg)
    sources = resolve_ctx_sources(cfg.ctx_datatsets, cfg)
    if not sources:
        raise MiningConfigError("ctx_datatsets is required: the passages' texts are needed to match answers")
    records = read_records(options.input_file)
    summary = MiningSummary(records=len(records))
    minable = [i for i, record in enumerate(records) if _minable(record)]
    summary.passed_through = len(records) - len(minable)
    questions = [normalize_question(records[i]["question"]) for i in minable]
    answers = [list(records[i].get("answers") or []) for i in minable]
    retrieved = retrieve(cfg, ["dense"], questions, sources)["dense"] if minable else []
    passages = load_passage_subset(sources, {doc_id for ids, _ in retrieved for doc_id in ids})
    workers = max(1, min(cfg.validation_workers, os.cpu_count() or 1))
    stats = calculate_matches(passages, answers, retrieved, workers, options.match)
    logger.info("retrieval of the mined questions:\n%s", format_validation_results(stats.top_k_hits, len(minable)))

    mined_records = list(records)
    for position, index in enumerate(minable):
        record = records[index]
        if not answers[position]:
            summary.without_answers += 1
            continue
        ids, scores = retrieved[position]
        candidates = (
            Candidate(rank, strip_source_prefix(str(doc_id), sources), passages[doc_id][1], passages[doc_id][0],
                      float(score), hit)
            for rank, (doc_id, score, hit) in enumerate(zip(ids, scores, stats.questions_doc_hits[position]), 1)
        )
        mined = select_hard_negatives(candidates, record["positive_ctxs"], options)
        if not mined:
            summary.no_negative_in_range += 1
            continue
        summary.mined_questions += 1
        summary.mined_negatives += len(mined)
        existing = record.get("hard_negative_ctxs") or []
        mined_records[index] = {**record, "hard_negative_ctxs": hard_negative_ctxs(mined, existing,
                                                                                   options.keep_existing)}
    with atomic_output(options.out_file) as temporary:
        with open(temporary, "w", encoding="utf-8") as writer:
            json.dump(mined_records, writer, ensure_ascii=False, indent=2)
            writer.write("\n")
    print(summary.line(options), flush=True)
    logger.info("wrote %s", options.out_file)
    return summary
