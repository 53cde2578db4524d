"""Hard negatives mined with a trained bi-encoder (`mine_hard_negatives.py`), as DPR's `nq-adv-hn-train`: retrieve
for every question of a DPR retriever training file and write the file again with `hard_negative_ctxs` taken from
the highest-ranked passages that do not hold an answer.

- Retrieval is the dense retriever's (`dpr.indexing.dense_retriever.retrieve`): the same checkpoint, embedding
  shards, index options and batch sizes; the depth is `mine_rank_to`.
- Answers are matched passage by passage as validation does (`calculate_matches`, `has_answer` semantics, `match`).
- Excluded: every passage with an answer, every positive passage (by id, without the source's id prefix, or by
  its text up to whitespace, case and Unicode normal form), ranks outside [`mine_rank_from`, `mine_rank_to`] (the
  very top ranks hold most false negatives: passages that answer without the exact answer string).
- `keep_existing_hard_negatives`: the mined negatives come first, then the file's own (BM25) ones not already
  mined; otherwise the mined ones replace them. A question that gets no negative (none in the range, or no answer
  to exclude passages by) keeps its own, and is counted in the summary line.
- Records without a question or without positives (which training drops) pass through unchanged.
- Every option, input_file's existence and out_file's folder are checked before any work; each record is checked as
  it is read, before retrieval.
- The output is written atomically (temporaries of a killed run are removed by the next), a JSON list in DPR's
  format (ids written as in the input, without prefix).
"""
import json
import logging
import os
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from omegaconf import DictConfig

from dpr.data.biencoder_data import iter_json_records, normalize_question
from dpr.data.ctx_sources import CtxSource, load_passage_subset, strip_source_prefix
from dpr.data.data_files import DataFileError
from dpr.data.passages import passage_text_key
from dpr.evaluation.qa_validation import MATCH_TYPES, calculate_matches, format_validation_results
from dpr.foundation.config_values import existing_file, true_or_false, whole_number
from dpr.foundation.errors import UserInputError
from dpr.foundation.files import atomic_output, ensure_writable_output, remove_stale_temporaries
from dpr.indexing.dense_retriever import retrieve
from dpr.indexing.retrieval_settings import RetrievalSettings

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
        """The options, each checked; also that input_file exists and out_file can be written, so that a mistake
        ends the run before any file is read or model loaded."""
        rank_from = whole_number("mine_rank_from", cfg.mine_rank_from, 1, error=MiningConfigError)
        rank_to = whole_number("mine_rank_to", cfg.mine_rank_to, 1, error=MiningConfigError)
        if rank_from > rank_to:
            raise MiningConfigError(f"mine_rank_from={rank_from} and mine_rank_to={rank_to} must satisfy "
                                    "1 <= mine_rank_from <= mine_rank_to (ranks are 1-based, inclusive)")
        n_docs = whole_number("n_docs", cfg.n_docs, 1, error=MiningConfigError)
        if n_docs < rank_to:
            raise MiningConfigError(f"n_docs={n_docs} retrieves fewer passages than mine_rank_to={rank_to}: leave "
                                    "n_docs unset (it follows mine_rank_to) or raise it")
        num_hard_negatives = whole_number("num_hard_negatives", cfg.num_hard_negatives, 1, "mine at least 1",
                                          MiningConfigError)
        whole_number("validation_workers", cfg.validation_workers, 1, error=MiningConfigError)
        keep_existing = true_or_false("keep_existing_hard_negatives", cfg.keep_existing_hard_negatives,
                                      MiningConfigError)
        if not isinstance(cfg.match, str) or cfg.match not in MATCH_TYPES:
            raise MiningConfigError(f"match={cfg.match} must be one of {MATCH_TYPES}")
        if cfg.retriever != "dense" or cfg.qa_dataset or cfg.encode_q_and_save:
            raise MiningConfigError("mining retrieves densely for input_file's questions: leave retriever=dense, "
                                    "qa_dataset and encode_q_and_save unset")
        input_file = existing_file("input_file", cfg.input_file, "the DPR retriever training JSON to mine negatives "
                                   "for", MiningConfigError)
        if not cfg.out_file or not str(cfg.out_file).endswith(".json"):
            raise MiningConfigError(f"out_file={cfg.out_file} must name the .json file the mined training data "
                                    "is written to (a JSON list, as DPR's biencoder files)")
        out_file = str(cfg.out_file)
        if os.path.abspath(out_file) == os.path.abspath(input_file):
            raise MiningConfigError("out_file must differ from input_file: the input is read while mining")
        ensure_writable_output(out_file, "out_file")
        return cls(input_file, out_file, rank_from, rank_to, num_hard_negatives, keep_existing, str(cfg.match))


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


def select_hard_negatives(candidates: Iterable[Candidate], positives: Sequence[dict], options: MiningOptions,
                          sources: Sequence[CtxSource] = ()) -> list[Candidate]:
    """The first `num_hard_negatives` candidates in the rank range that hold no answer and are no positive: not
    by id (a positive's id may carry its source's prefix) nor by text (`passage_text_key`)."""
    positive_ids = {strip_source_prefix(str(ctx["passage_id"]), sources) for ctx in positives
                    if ctx.get("passage_id") is not None}
    positive_texts = {passage_text_key(ctx.get("text")) for ctx in positives} - {""}
    selected = []
    for candidate in candidates:
        if len(selected) == options.num_hard_negatives:
            break
        if not options.rank_from <= candidate.rank <= options.rank_to or candidate.has_answer:
            continue
        if candidate.passage_id in positive_ids or passage_text_key(candidate.text) in positive_texts:
            continue
        selected.append(candidate)
    return selected


def hard_negative_ctxs(mined: Sequence[Candidate], existing: Sequence[dict], keep_existing: bool) -> list[dict]:
    """The record's new `hard_negative_ctxs`: the mined passages in DPR's format, then (when kept) the existing ones
    that were not mined again (by id or by text, as positives are matched)."""
    ctxs = [{"title": c.title, "text": c.text, "score": c.score, "passage_id": c.passage_id} for c in mined]
    if keep_existing:
        mined_ids = {c.passage_id for c in mined}
        mined_texts = {passage_text_key(c.text) for c in mined}
        ctxs += [ctx for ctx in existing
                 if (ctx.get("passage_id") is None or str(ctx["passage_id"]) not in mined_ids)
                 and passage_text_key(ctx.get("text")) not in mined_texts]
    return ctxs


def _minable(record: object) -> bool:
    return (isinstance(record, dict) and isinstance(record.get("question"), str) and bool(record["question"].strip())
            and isinstance(record.get("positive_ctxs"), list) and bool(record["positive_ctxs"]))


def read_records(path: str) -> list[dict]:
    """The training file's records, each checked where mining reads it (an answer given as a string would be
    matched character by character)."""
    records = []
    for location, record in iter_json_records(path):
        if not isinstance(record, dict):
            raise DataFileError(f"{path}: {location}: expected a JSON object, found {type(record).__name__}")
        answers = record.get("answers")
        if answers is not None and (not isinstance(answers, list) or not all(isinstance(a, str) for a in answers)):
            raise DataFileError(f"{path}: {location}: answers must be a list of strings, found {answers!r:.80}")
        for key in ("positive_ctxs", "negative_ctxs", "hard_negative_ctxs"):
            ctxs = record.get(key)
            if ctxs is not None and (not isinstance(ctxs, list) or not all(isinstance(c, dict) for c in ctxs)):
                raise DataFileError(f"{path}: {location}: {key} must be a list of objects (passages), found "
                                    f"{ctxs!r:.80}")
        records.append(record)
    return records


def mine_hard_negatives(cfg: DictConfig) -> MiningSummary:
    """The whole run: retrieve for input_file's questions, write out_file, print the summary line."""
    options = MiningOptions.from_config(cfg)
    removed, _ = remove_stale_temporaries(os.path.dirname(os.path.abspath(options.out_file)),
                                          os.path.basename(options.out_file))
    if removed:
        logger.info("removed %d temporary file(s) of an interrupted write of %s", removed, options.out_file)
    if not cfg.ctx_datatsets:
        raise MiningConfigError("ctx_datatsets is required: the passages' texts are needed to match answers")
    records = read_records(options.input_file)
    if not records:
        raise DataFileError(f"{options.input_file}: holds no records: give a DPR retriever training JSON")
    settings = RetrievalSettings.from_config(cfg)
    sources = settings.sources
    summary = MiningSummary(records=len(records))
    minable = [i for i, record in enumerate(records) if _minable(record)]
    summary.passed_through = len(records) - len(minable)
    questions = [normalize_question(records[i]["question"]) for i in minable]
    answers = [list(records[i].get("answers") or []) for i in minable]
    retrieved = retrieve(settings, ["dense"], questions, sources)["dense"] if minable else []
    passages = load_passage_subset(sources, {doc_id for ids, _ in retrieved for doc_id in ids})
    workers = max(1, min(settings.validation_workers, os.cpu_count() or 1))
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
        mined = select_hard_negatives(candidates, record["positive_ctxs"], options, sources)
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
