"""Convert a BEIR, MS MARCO, pairs or tevatron collection into DPR's files (`convert_to_dpr.py`).

Writes into `out_dir`:
- ``psgs.tsv``: DPR's passages TSV (``id\\ttext\\ttitle``, a header, csv quoting), every passage once, under the
  source's id (pairs and id-less passages: `formats.content_id`), in the source's order;
- ``{split}.queries.jsonl``: per judged query of the split one object ``{"id", "question", "answers"}``
  (``answers`` is [] where the source has none);
- ``{split}.qrels.tsv``: its judgements as TREC qrels, ``qid 0 docid grade`` (space separated);
- ``biencoder-{split}.json`` for the training splits (``biencoder_splits``, train and dev by default): DPR's
  retriever training JSON, a record per query with a positive (grade > 0), every positive listed (highest grade
  first), hard negatives from the file (pairs, tevatron) and/or mined (`negatives`), never one of the query's
  positives;
- ``conversion.json``: what was converted, from where, with which options, and the counts.

The whole folder appears at once (`atomic_output_directory`): it is built in a temporary folder beside
`out_dir` and renamed; a previous conversion there stays whole until then. Because the folder is replaced, an
existing `out_dir` must be empty or hold a previous conversion's files only.

Memory: the passages are streamed from the source into ``psgs.tsv``; held are the queries of the judged splits
(ids and texts), the judgements, an 8-byte hash per passage id (duplicate ids are found by sorting them at the
end; the source is read again only to name the lines of a repeated id) and, for the judged passages only, their
offset in ``psgs.tsv`` (their texts are read back from there for the training JSON). BM25 negatives hold the
bm25s index of the whole collection; dense ones the flat index of the dense retriever.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
from array import array
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Sequence

import numpy as np
from tqdm import tqdm

from dpr.data.biencoder_data import normalize_question
from dpr.data.data_files import DataFileError
from dpr.data.passages import iter_passages, passage_text_key
from dpr.foundation.errors import UserInputError
from dpr.foundation.files import atomic_output_directory, ensure_writable_directory, remove_stale_temporaries
from dpr.indexing.bm25 import BM25Index, passage_text
from dpr.interop.formats import Collection, SourceLayoutError, first_where, open_collection
from dpr.interop.negatives import (Candidate, NegativeOptions, NegativeStats, bm25_rankings, dense_rankings,
                                   select_negatives)

logger = logging.getLogger(__name__)

PASSAGES_FILE = "psgs.tsv"
MANIFEST_FILE = "conversion.json"


class ConvertOptionError(UserInputError, ValueError):
    """An option of convert_to_dpr.py that cannot work."""


@dataclass(frozen=True)
class ConvertOptions:
    format: str
    input: str
    out_dir: str
    splits: Optional[tuple]  # None: every split of the source
    biencoder_splits: tuple
    split: str  # the one split of a pairs or tevatron file
    skip_unknown_qrels: bool
    negatives: NegativeOptions
    model_file: Optional[str]
    dense_overrides: tuple
    dataset_name: str

    def check(self) -> None:
        n = self.negatives
        if n.kind not in ("none", "bm25", "dense"):
            raise ConvertOptionError(f"--negatives {n.kind} must be none, bm25 or dense")
        if n.count < 0:
            raise ConvertOptionError(f"--num_negatives {n.count} must be at least 0")
        if not 1 <= n.from_rank <= n.to_rank:
            raise ConvertOptionError(f"--negatives_from_rank {n.from_rank} and --negatives_to_rank {n.to_rank} must "
                                     "satisfy 1 <= from <= to (ranks are 1-based, inclusive)")
        if n.max_score_ratio is not None and not n.max_score_ratio > 0:
            raise ConvertOptionError(f"--max_negative_score_ratio {n.max_score_ratio} must be a positive fraction, "
                                     "e.g. 0.95")
        if n.kind == "dense":
            if not self.model_file:
                raise ConvertOptionError("--negatives dense needs --model_file, the trained bi-encoder checkpoint "
                                         "that ranks the passages")
            if not os.path.isfile(self.model_file):
                raise ConvertOptionError(f"--model_file {self.model_file} does not exist: give a bi-encoder "
                                         "checkpoint (dpr_biencoder.N)")
        for override in self.dense_overrides:
            if "=" not in override:
                raise ConvertOptionError(f"--dense_override {override!r} must be key=value (a key of "
                                         "conf/dense_retriever.yaml, e.g. batch_size=64)")


# ------------------------------------------------------------------------------------------------ the out_dir
def check_out_dir(out_dir: Path) -> None:
    """Before any work: `out_dir` can be replaced (new, empty or a previous conversion) and its parent written."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConvertOptionError(f"--out_dir {out_dir} is a file: give a folder")
    if out_dir.is_dir():
        names = sorted(p.name for p in out_dir.iterdir())
        listed = set()
        if (out_dir / MANIFEST_FILE).is_file():
            try:
                listed = set(json.loads((out_dir / MANIFEST_FILE).read_text(encoding="utf-8"))["files"])
            except (ValueError, KeyError, TypeError):
                listed = set()
            listed.add(MANIFEST_FILE)
        foreign = [name for name in names if name not in listed]
        if foreign:
            raise ConvertOptionError(f"--out_dir {out_dir} holds files a conversion did not write (e.g. {foreign[0]}); "
                                     "the folder is replaced as a whole when the conversion is done: give a new or "
                                     "empty --out_dir")
    ensure_writable_directory(out_dir.parent, "--out_dir's parent")


# ------------------------------------------------------------------------------------------------ passages
class PassageTable:
    """Writes ``psgs.tsv`` row by row; keeps each id's hash (duplicate check) and, for the `wanted` ids only,
    the row's byte offset (to read its text back) and, with `record_positions`, position (its index in a BM25
    index of the file)."""

    def __init__(self, path: Path, wanted: set, repeats_allowed: bool, record_positions: bool):
        self.record_positions = record_positions
        self.wanted = wanted
        self.offsets: dict[str, int] = {}
        self.positions: dict[str, int] = {}
        self.hashes = array("q")
        # pairs-like sources list a passage once per row that holds it: id -> hash of its text, to keep it once
        self.seen_texts: Optional[dict] = {} if repeats_allowed else None
        self._buffer = io.StringIO()
        self._writer = csv.writer(self._buffer, delimiter="\t", lineterminator="\n")
        self._sink = open(path, "wb")
        self._offset = 0
        self._write(["id", "text", "title"])

    def _write(self, row: list) -> None:
        self._buffer.seek(0)
        self._buffer.truncate()
        self._writer.writerow(row)
        data = self._buffer.getvalue().encode("utf-8")
        self._sink.write(data)
        self._offset += len(data)

    def add(self, passage) -> None:
        if self.seen_texts is not None:
            text_hash = hash((passage.text, passage.title))
            previous = self.seen_texts.get(passage.id)
            if previous is not None:
                if previous != text_hash:
                    raise DataFileError(f"{passage.where}: passage id {passage.id!r} is given with two different "
                                        "texts: ids must be unique (give each passage its own id)")
                return
            self.seen_texts[passage.id] = text_hash
        if passage.id in self.wanted:
            if passage.id in self.offsets:  # named now; other repeats are found at the end
                raise DataFileError(f"{passage.where}: passage id {passage.id!r} is used a second time; ids must be "
                                    "unique: remove or renumber one of them")
            self.offsets[passage.id] = self._offset
            if self.record_positions:
                self.positions[passage.id] = len(self.hashes)
        self.hashes.append(hash(passage.id))
        self._write([passage.id, passage.text, passage.title])

    def close(self) -> None:
        self._sink.close()

    def __len__(self) -> int:
        return len(self.hashes)

    def check_unique(self, collection: Collection) -> None:
        ordered = np.sort(np.frombuffer(self.hashes, dtype=np.int64))
        repeated = set(ordered[1:][ordered[1:] == ordered[:-1]].tolist())
        if not repeated or self.seen_texts is not None:
            return
        seen: dict[str, str] = {}
        for passage in collection.passages():
            if hash(passage.id) in repeated:
                if passage.id in seen:
                    raise DataFileError(f"{passage.where}: passage id {passage.id!r} is already used at "
                                        f"{seen[passage.id]}; ids must be unique: remove or renumber one of them")
                seen[passage.id] = passage.where


class PassageReader:
    """The texts of written passages, by their offsets in ``psgs.tsv``; texts as DPR's reader gives them."""

    def __init__(self, path: Path, offsets: dict):
        self.offsets = offsets
        self._source = open(path, "rb")

    def __call__(self, passage_id: str) -> tuple[str, str]:
        self._source.seek(self.offsets[passage_id])
        [row] = csv.reader([self._source.readline().decode("utf-8")], delimiter="\t")
        return row[1].strip('"'), row[2]

    def close(self) -> None:
        self._source.close()


# ------------------------------------------------------------------------------------------------ splits
class QueryText(NamedTuple):
    """A query as held (its id is its key): no more than is written, for MS MARCO's half million."""

    question: str
    answers: tuple


@dataclass
class SplitData:
    name: str
    queries: dict  # id -> QueryText, in the queries file's order
    qrels: dict  # query id -> [(passage id, grade)], in the qrels file's order (a list: lighter than a dict)
    unknown_queries: int = 0  # qrels lines skipped (--skip_unknown_qrels)
    unknown_passages: int = 0
    unjudged_queries: int = 0  # queries of the file without a judgement: not written


@dataclass
class SplitReport:
    queries: int
    judgements: int
    unknown_qrels_skipped: int
    unjudged_queries: int
    training_records: Optional[int] = None
    without_positive_skipped: Optional[int] = None
    stats: Optional[NegativeStats] = None


def choose_splits(collection: Collection, wanted: Optional[Sequence[str]]) -> list[str]:
    present = collection.splits()
    if wanted is None:
        return present
    missing = [split for split in wanted if split not in present]
    if missing:
        raise SourceLayoutError(f"split {missing[0]!r} is not in --input {collection.location}: it has "
                                f"{', '.join(present)} (--splits chooses among them)")
    return list(wanted)


def read_split(collection: Collection, split: str, skip_unknown: bool) -> SplitData:
    qrels: dict[str, list] = {}
    for judgement in collection.judgements(split):
        judged = qrels.get(judgement.query_id)
        if judged is None:
            judged = qrels[judgement.query_id] = []
        elif any(passage_id == judgement.passage_id for passage_id, _ in judged):
            raise DataFileError(f"{judgement.where}: query {judgement.query_id!r} and passage "
                                f"{judgement.passage_id!r} are judged a second time: keep one line per pair")
        judged.append((judgement.passage_id, judgement.grade))
    queries: dict[str, QueryText] = {}
    unjudged = 0
    for query in collection.queries(split):
        if query.id not in qrels:
            unjudged += 1
            continue
        if query.id in queries:
            first = first_where(collection.queries(split), lambda q, query_id=query.id: q.id == query_id)
            raise DataFileError(f"{query.where}: query id {query.id!r} is used a second time (first at {first}); "
                                "ids must be unique")
        queries[query.id] = QueryText(query.question, tuple(query.answers))
    data = SplitData(split, {}, {}, unjudged_queries=unjudged)
    unknown = [query_id for query_id in qrels if query_id not in queries]
    if unknown and not skip_unknown:
        where = first_where(collection.judgements(split), lambda j: j.query_id not in queries)
        raise DataFileError(f"{where}: query {unknown[0]!r} is not in {collection.queries_file(split)}; "
                            f"{sum(len(qrels[q]) for q in unknown)} qrels line(s) name unknown queries. Fix the "
                            "files, or skip such lines with --skip_unknown_qrels")
    data.unknown_queries = sum(len(qrels.pop(query_id)) for query_id in unknown)
    # queries in the queries file's order, judgements in the qrels file's
    data.queries = queries
    data.qrels = {query_id: qrels[query_id] for query_id in queries}
    return data


def drop_unknown_passages(collection: Collection, data: SplitData, known: dict, skip_unknown: bool) -> None:
    for query_id, judged in data.qrels.items():
        unknown = [passage_id for passage_id, _ in judged if passage_id not in known]
        if unknown and not skip_unknown:
            where = first_where(collection.judgements(data.name), lambda j: j.passage_id not in known)
            raise DataFileError(f"{where}: passage {unknown[0]!r} is not in the collection's passages. Fix the "
                                "files, or skip such lines with --skip_unknown_qrels")
        if unknown:
            judged[:] = [(passage_id, grade) for passage_id, grade in judged if passage_id in known]
            data.unknown_passages += len(unknown)


# ------------------------------------------------------------------------------------------------ writing
def write_queries(path: Path, data: SplitData) -> None:
    with open(path, "w", encoding="utf-8") as sink:
        for query_id in data.qrels:
            query = data.queries[query_id]
            sink.write(json.dumps({"id": query_id, "question": query.question, "answers": list(query.answers)},
                                  ensure_ascii=False) + "\n")


def write_qrels(path: Path, data: SplitData) -> int:
    lines = 0
    with open(path, "w", encoding="utf-8") as sink:
        for query_id, judged in data.qrels.items():
            for passage_id, grade in judged:
                sink.write(f"{query_id} 0 {passage_id} {grade}\n")
                lines += 1
    return lines


def ctx_record(passage_id: str, text_title: tuple[str, str], score: float) -> dict:
    return {"title": text_title[1], "text": text_title[0], "score": round(float(score), 4), "title_score": 0,
            "passage_id": passage_id}


@dataclass
class TrainingQuery:
    query_id: str
    query: QueryText
    positives: list  # passage ids, highest grade first
    given_negatives: list


def training_queries(data: SplitData, given: dict) -> tuple[list[TrainingQuery], int]:
    """The split's queries with a positive (grade > 0), and the number without one."""
    queries, without = [], 0
    for query_id, judged in data.qrels.items():
        positives = [p for p, grade in sorted(judged, key=lambda item: -item[1]) if grade > 0]  # stable
        if not positives:
            without += 1
            continue
        queries.append(TrainingQuery(query_id, data.queries[query_id], positives, given.get(query_id, [])))
    return queries, without


class Miner:
    """The rankings negatives are taken from: BM25 over the written passages, or the dense retriever."""

    def __init__(self, options: ConvertOptions, passages_file: Path, table: PassageTable, work_dir: Path):
        self.options = options
        self.passages_file = passages_file
        self.work_dir = work_dir
        self.table = table
        self.bm25: Optional[BM25Index] = None
        self.texts: list = []
        self.titles: list = []

    def rankings(self, queries: list[TrainingQuery]) -> Iterator[tuple[list, Optional[float]]]:
        """Per query: its ranking [(id, score, text)] and its lowest positive score."""
        negatives = self.options.negatives
        depth = negatives.to_rank
        questions = [q.query.question for q in queries]
        if negatives.kind == "bm25":
            if self.bm25 is None:
                ids, index_texts = [], []
                for passage in iter_passages(self.passages_file):
                    ids.append(passage.id)
                    index_texts.append(passage_text(passage.title, passage.text))
                    self.texts.append(passage.text)
                    self.titles.append(passage.title)
                self.bm25 = BM25Index.build(ids, index_texts)
                del index_texts
            positions = [[self.table.positions[p] for p in q.positives] for q in queries]
            for top, scores, positive_scores in tqdm(bm25_rankings(self.bm25, questions, positions, depth),
                                                     total=len(queries), desc="bm25 negatives", unit=" queries",
                                                     mininterval=2):
                ranking = [Candidate(self.bm25.ids[p], float(s), self.texts[p], self.titles[p])
                           for p, s in zip(top, scores)]
                yield ranking, float(positive_scores.min())
            return
        from dpr.data.ctx_sources import CtxSource, load_passage_subset

        results = dense_rankings(self.options.model_file, self.passages_file,
                                 [normalize_question(q) for q in questions], [q.positives for q in queries], depth,
                                 self.options.dense_overrides, self.work_dir)
        texts = load_passage_subset([CtxSource(str(self.passages_file))], {i for ids, _, _ in results for i in ids})
        for ids, scores, positive_scores in results:
            yield [Candidate(i, float(s), *texts[i]) for i, s in zip(ids, scores)], float(positive_scores.min())


def training_records(queries: list[TrainingQuery], reader: PassageReader, miner: Optional[Miner],
                     options: ConvertOptions, stats: NegativeStats) -> Iterator[dict]:
    rankings = miner.rankings(queries) if miner is not None else iter(())
    for item in queries:
        positives = {p: reader(p) for p in item.positives}
        positive_texts = {passage_text_key(text) for text, _ in positives.values()}
        hard = []
        for passage_id in item.given_negatives:
            text_title = reader(passage_id)
            if passage_id in positives or passage_text_key(text_title[0]) in positive_texts:
                stats.dropped_given_positive += 1
                continue
            hard.append(ctx_record(passage_id, text_title, 0))
        stats.given += len(hard)
        positive_scores = {}
        if miner is not None:
            ranking, lowest = next(rankings)
            positive_scores = {c.id: c.score for c in ranking if c.id in positives}
            listed = {ctx["passage_id"] for ctx in hard}
            mined = [c for c in select_negatives(ranking, set(positives), positive_texts, lowest, options.negatives,
                                                 item.query_id, stats) if c.id not in listed]
            stats.found.append(len(mined))
            hard += [ctx_record(c.id, (c.text, c.title), c.score) for c in mined]
        stats.queries += 1
        stats.positives.append(len(positives))
        yield {"dataset": options.dataset_name, "question": item.query.question,
               "answers": list(item.query.answers),
               "positive_ctxs": [ctx_record(p, positives[p], positive_scores.get(p, 0)) for p in item.positives],
               "negative_ctxs": [], "hard_negative_ctxs": hard}


def write_json_list(path: Path, records: Iterator[dict]) -> int:
    """Stream a JSON list, one record at a time."""
    count = 0
    with open(path, "w", encoding="utf-8") as sink:
        sink.write("[")
        for record in records:
            sink.write((",\n" if count else "\n") + json.dumps(record, ensure_ascii=False))
            count += 1
        sink.write("\n]\n")
    return count


# ------------------------------------------------------------------------------------------------ the run
def convert(options: ConvertOptions) -> dict[str, SplitReport]:
    """The whole conversion; prints the statistics table; returns each split's report."""
    options.check()
    out_dir = Path(options.out_dir)
    check_out_dir(out_dir)
    collection = open_collection(options.format, options.input, options.split)
    splits = {split: read_split(collection, split, options.skip_unknown_qrels)
              for split in choose_splits(collection, options.splits)}
    given = {split: collection.given_negatives(split) for split in splits}
    # the judged passages (and those the file gives as negatives): their offsets are kept, to read them back
    wanted = {p for data in splits.values() for judged in data.qrels.values() for p, _ in judged}
    wanted |= {p for negatives in given.values() for ids in negatives.values() for p in ids}
    removed, _ = remove_stale_temporaries(out_dir.parent, out_dir.name)
    if removed:
        logger.info("removed %d temporary folder(s) of interrupted conversions into %s", removed, out_dir)
    reports: dict[str, SplitReport] = {}
    with atomic_output_directory(out_dir) as temporary:
        temporary = Path(temporary)
        passages_file = temporary / PASSAGES_FILE
        table = PassageTable(passages_file, wanted, collection.repeats_passages, options.negatives.kind == "bm25")
        try:
            for passage in tqdm(collection.passages(), desc=PASSAGES_FILE, unit=" passages", mininterval=2):
                table.add(passage)
        finally:
            table.close()
        table.check_unique(collection)
        if not len(table):
            raise DataFileError(f"--input {options.input} holds no passages")
        table.wanted = set()  # the ids are in the offsets now
        for data in splits.values():  # every split checked before any is written
            drop_unknown_passages(collection, data, table.offsets, options.skip_unknown_qrels)
            data.qrels = {q: judged for q, judged in data.qrels.items() if judged}
        files = [PASSAGES_FILE]
        reader = PassageReader(passages_file, table.offsets)
        work_dir = temporary / ".negatives"  # dense: embeddings and question vectors, removed before the rename
        miner = Miner(options, passages_file, table, work_dir) if options.negatives.kind != "none" else None
        try:
            for split, data in splits.items():
                write_queries(temporary / f"{split}.queries.jsonl", data)
                lines = write_qrels(temporary / f"{split}.qrels.tsv", data)
                files += [f"{split}.queries.jsonl", f"{split}.qrels.tsv"]
                report = SplitReport(len(data.qrels), lines, data.unknown_queries + data.unknown_passages,
                                     data.unjudged_queries)
                if split in options.biencoder_splits:
                    queries, report.without_positive_skipped = training_queries(data, given[split])
                    report.stats = NegativeStats()
                    name = f"biencoder-{split}.json"
                    report.training_records = write_json_list(
                        temporary / name, training_records(queries, reader, miner, options, report.stats))
                    files.append(name)
                reports[split] = report
        finally:
            reader.close()
            shutil.rmtree(work_dir, ignore_errors=True)
        manifest = {"format": options.format, "input": os.path.abspath(options.input), "files": files,
                    "passages": len(table), "options": {k: v for k, v in asdict(options).items()},
                    "splits": {split: {k: v for k, v in asdict(r).items() if k != "stats"}
                               for split, r in reports.items()}}
        (temporary / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    print(summary(options, out_dir, len(table), reports), flush=True)
    return reports


def summary(options: ConvertOptions, out_dir: Path, passages: int, reports: dict[str, SplitReport]) -> str:
    lines = [f"wrote {out_dir}: {passages} passages ({PASSAGES_FILE})"]
    for split, report in reports.items():
        rows = [("queries written", f"{report.queries} ({split}.queries.jsonl)"),
                ("qrels lines written", f"{report.judgements} ({split}.qrels.tsv)"),
                ("qrels lines naming an unknown query or passage, skipped", f"{report.unknown_qrels_skipped}"),
                ("queries of the queries file not judged in this split, not written", f"{report.unjudged_queries}")]
        if report.stats is not None:
            rows += [("training records written", f"{report.training_records} (biencoder-{split}.json)"),
                     ("queries without a positive, skipped", f"{report.without_positive_skipped}")]
            rows += report.stats.rows(options.negatives)
        width = max(len(name) for name, _ in rows)
        lines.append(f"split {split}:")
        lines += [f"  {name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)
