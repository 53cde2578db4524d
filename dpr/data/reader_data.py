"""Reader data: DPR's `ReaderSample` / `ReaderPassage`, retriever results turned into reader samples, the
sample files, and the reader's batches.

Preprocessing (§6 of the spec): each retrieved passage becomes `[CLS] question [SEP] title [SEP] passage`, with the
answers found as exact token subsequences of the passage (inclusive `(start, end)` indices in the full sequence).
Training samples keep the passages the retriever marked `has_answer` that contain a span (only those of the gold
page when gold-passage info is given) and the first non-answer passages as negatives; evaluation samples keep the
first passages in retrieval order.

Files: `{prefix}.{k}.pkl` holds a pickled `list[ReaderSample]` as DPR writes it (the classes live at this module
path, with DPR's field names, so DPR's released reader files load). Pickles are read with an unpickler that
only admits these classes and numpy arrays, so a file from elsewhere cannot run code. `{prefix}.{k}.npz` holds
the same samples without pickle: the token ids in one int32 array and everything else as UTF-8 JSON.
"""
import glob
import io
import json
import logging
import math
import multiprocessing
import os
import pickle
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from dpr.data.data_files import DataFileError, expand_glob, open_text
from dpr.data.tensorizer import Tensorizer
from dpr.foundation.config_values import true_or_false, whole_number
from dpr.foundation.errors import UserInputError
from dpr.foundation.files import atomic_output, remove_stale_temporaries
from dpr.foundation.provenance import differing_field, full_identity
from dpr.foundation.safe_pickle import NUMPY_GLOBALS, restricted_load
from dpr.models.encoder_spec import EncoderSpec

logger = logging.getLogger(__name__)

Span = Tuple[int, int]
SAMPLE_FORMATS = ("pkl", "npz")
SAMPLES_RECORD_FORMAT = "dpr-reader-samples-provenance"
# the encoder settings preprocessing depends on (the tokenizer and the length passages are cut to)
TOKENIZATION_FIELDS = ("pretrained_model_cfg", "do_lower_case", "sequence_length")
NPZ_FORMAT_NAME = "dpr-reader-samples"


class SampleFileError(UserInputError, ValueError):
    """A reader sample file, or format, that cannot be used; the message names it."""


@dataclass(eq=False)
class ReaderPassage:
    """One retrieved passage as the reader sees it. The field names are DPR's: pickles store them."""

    id: Optional[str] = None
    passage_text: Optional[str] = None
    title: Optional[str] = None
    score: Optional[float] = None
    has_answer: Optional[bool] = None
    passage_token_ids: Optional[np.ndarray] = None
    # index of the first passage token in sequence_ids (the length of `[CLS] question [SEP] title [SEP]`)
    passage_offset: Optional[int] = None
    # answer occurrences as inclusive (start, end) indices into sequence_ids
    answers_spans: Optional[List[Span]] = None
    sequence_ids: Optional[np.ndarray] = None


@dataclass(eq=False)
class ReaderSample:
    """A question with its passages: positives and negatives for training, `passages` for evaluation."""

    question: str
    answers: List[str]
    positive_passages: List[ReaderPassage] = field(default_factory=list)
    negative_passages: List[ReaderPassage] = field(default_factory=list)
    passages: List[ReaderPassage] = field(default_factory=list)

    def all_passages(self) -> List[ReaderPassage]:
        return self.positive_passages + self.negative_passages + self.passages


@dataclass(frozen=True)
class ReaderPreprocessingCfg:
    """DPR's preprocessing defaults. Training negatives are the first
    min(max(10 x positives, negatives_floor), negatives_cap) non-answer passages (DPR names these two
    max_negatives=50 and min_negatives=150)."""

    use_tailing_sep: bool = False
    skip_no_positives: bool = True
    include_gold_passage: bool = False
    gold_page_only_positives: bool = True
    max_positives: int = 20
    negatives_floor: int = 50
    negatives_cap: int = 150
    max_retriever_passages: int = 200
    eval_passages: int = 100


@dataclass
class PreprocessingStats:
    questions: int = 0
    skipped_no_positive: int = 0
    positives_from_gold: int = 0
    positives_without_span: int = 0

    def add(self, other: "PreprocessingStats") -> None:
        self.questions += other.questions
        self.skipped_no_positive += other.skipped_no_positive
        self.positives_from_gold += other.positives_from_gold
        self.positives_without_span += other.positives_without_span


# ---------------------------------------------------------------------------------------------- gold passages
@dataclass
class GoldPassages:
    """From a gold-info file (`{"data": [{question, question_tokens, title, context, example_id}]}`): the gold
    passage of each question (keyed by the question and by its tokenized form; title lowercased), and the
    original question of each tokenized form, which retriever results of NQ carry instead."""

    by_question: Dict[str, ReaderPassage]
    canonical_questions: Dict[str, str]

    def canonical(self, question: str) -> str:
        return self.canonical_questions.get(question, question)


def load_gold_passages(path: str) -> GoldPassages:
    records = _read_json(path)
    if not isinstance(records, dict) or not isinstance(records.get("data"), list):
        raise DataFileError(f"{path}: a gold passages file holds {{\"data\": [...]}}")
    records = records["data"]
    by_question: Dict[str, ReaderPassage] = {}
    canonical: Dict[str, str] = {}
    for index, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get("context"), str):
            raise DataFileError(f"{path}: data[{index}] is not a gold passage (an object with a 'context' text)")
        question = record.get("question") or record.get("query_text")
        passage = ReaderPassage(id=record.get("example_id"), passage_text=record["context"],
                                title=(record.get("title") or "").lower())
        by_question[question] = passage
        tokens = record.get("question_tokens")
        if tokens:
            by_question[tokens] = passage
            canonical[tokens] = question
    logger.info("Gold passages of %d questions from %s", len(records), path)
    return GoldPassages(by_question, canonical)


# ---------------------------------------------------------------------------------------------- preprocessing
def find_answer_spans(passage_ids: Sequence[int], answers_ids: Sequence[Sequence[int]]) -> List[Span]:
    """Every occurrence of every answer in the passage, as inclusive (start, end) token indices; duplicates
    (the same answer listed twice) are kept once."""
    passage_ids = list(passage_ids)
    spans: Dict[Span, None] = {}
    for answer in answers_ids:
        answer = list(answer)
        width = len(answer)
        if width == 0:
            continue
        for start in range(len(passage_ids) - width + 1):
            if passage_ids[start : start + width] == answer:
                spans[(start, start + width - 1)] = None
    return list(spans)


def _make_passages(question: str, ctxs: Sequence[dict], tensorizer: Tensorizer,
                   use_tailing_sep: bool) -> List[ReaderPassage]:
    """ReaderPassages with `[CLS] question [SEP] title [SEP] passage` sequences (titles and texts kept)."""
    if not ctxs:
        return []
    titles = [ctx.get("title") or "" for ctx in ctxs]
    texts = [ctx.get("text") or "" for ctx in ctxs]
    heads = tensorizer.token_ids(titles, titles=[question] * len(ctxs))
    bodies = tensorizer.token_ids(texts, add_special_tokens=False)
    tail = [tensorizer.tokenizer.sep_token_id] if use_tailing_sep else []
    passages = []
    for ctx, title, text, head, body in zip(ctxs, titles, texts, heads, bodies):
        if len(head) <= 1:
            raise ValueError(f"question and title of passage {ctx.get('id')} tokenize to {len(head)} tokens")
        passages.append(ReaderPassage(
            id=ctx.get("id"), passage_text=text, title=title, score=_score(ctx.get("score")),
            has_answer=bool(ctx.get("has_answer")), passage_token_ids=np.asarray(body, dtype=np.int64),
            passage_offset=len(head), sequence_ids=np.asarray(head + body + tail, dtype=np.int64),
        ))
    return passages


def _score(value) -> Optional[float]:
    """Retriever scores are strings in the results JSON (str of a float32)."""
    return None if value is None else float(value)


def _add_answer_spans(passages: Sequence[ReaderPassage], answers_ids: Sequence[Sequence[int]]) -> int:
    """Set each passage's answer spans (shifted into the full sequence); a passage where no answer occurs as
    tokens loses its has_answer mark. Returns how many lost it."""
    lost = 0
    for passage in passages:
        spans = find_answer_spans(passage.passage_token_ids, answers_ids)
        passage.answers_spans = [(s + passage.passage_offset, e + passage.passage_offset) for s, e in spans]
        if not spans:
            passage.has_answer = False
            lost += 1
    return lost


def _strip_texts(passages: Sequence[ReaderPassage]) -> None:
    """What DPR keeps in its files: ids, scores, spans and sequence ids, not the texts."""
    for passage in passages:
        passage.passage_text = passage.title = passage.passage_token_ids = None


def _select_positives(positives: List[ReaderPassage], gold: Optional[ReaderPassage],
                      cfg: ReaderPreprocessingCfg) -> Tuple[List[ReaderPassage], bool]:
    """(positives to train on, whether they came from the gold page). Gold-page positives are not capped;
    otherwise the first max_positives passages with a span."""
    with_spans = [p for p in positives if p.answers_spans]
    if gold is not None and cfg.gold_page_only_positives:
        on_gold_page = [p for p in with_spans if (p.title or "").lower() == gold.title]
        if on_gold_page:
            return on_gold_page, True
    return with_spans[: cfg.max_positives], False


def preprocess_sample(
    sample: dict, tensorizer: Tensorizer, is_train: bool, cfg: ReaderPreprocessingCfg,
    gold_passages: Optional[GoldPassages] = None,
) -> Tuple[Optional[ReaderSample], PreprocessingStats]:
    """One retriever-results record as a ReaderSample (None: a training question without a usable positive,
    skipped when cfg.skip_no_positives)."""
    stats = PreprocessingStats(questions=1)
    question = sample["question"]
    if gold_passages is not None:
        question = gold_passages.canonical(question)
    answers = list(sample.get("answers") or [])
    ctxs = list(sample.get("ctxs") or [])[: cfg.max_retriever_passages]
    if not is_train:
        passages = _make_passages(question, ctxs[: cfg.eval_passages], tensorizer, cfg.use_tailing_sep)
        _strip_texts(passages)
        return ReaderSample(question, answers, passages=passages), stats

    answers_ids = tensorizer.token_ids(answers, add_special_tokens=False) if answers else []
    positives = _make_passages(question, [c for c in ctxs if c.get("has_answer")], tensorizer, cfg.use_tailing_sep)
    stats.positives_without_span = _add_answer_spans(positives, answers_ids)
    gold = gold_passages.by_question.get(question) if gold_passages is not None else None
    selected, from_gold = _select_positives(positives, gold, cfg)
    stats.positives_from_gold = int(from_gold)
    if cfg.include_gold_passage and gold is not None:
        selected += _gold_positive(question, gold, answers_ids, tensorizer, cfg)

    if not selected and cfg.skip_no_positives:
        stats.skipped_no_positive = 1
        return None, stats
    n_negatives = min(max(10 * len(selected), cfg.negatives_floor), cfg.negatives_cap)
    negative_ctxs = [c for c in ctxs if not c.get("has_answer")][:n_negatives]
    negatives = _make_passages(question, negative_ctxs, tensorizer, cfg.use_tailing_sep)
    _strip_texts(selected + negatives)
    return ReaderSample(question, answers, positive_passages=selected, negative_passages=negatives), stats


def _gold_positive(question: str, gold: ReaderPassage, answers_ids, tensorizer: Tensorizer,
                   cfg: ReaderPreprocessingCfg) -> List[ReaderPassage]:
    """The gold context itself as a positive, when an answer occurs in it."""
    ctx = {"id": gold.id, "title": gold.title, "text": gold.passage_text, "has_answer": True}
    passage = _make_passages(question, [ctx], tensorizer, cfg.use_tailing_sep)[0]
    _add_answer_spans([passage], answers_ids)
    return [passage] if passage.answers_spans else []


def preprocess_samples(samples: Sequence[dict], tensorizer: Tensorizer, is_train: bool, cfg: ReaderPreprocessingCfg,
                       gold_passages: Optional[GoldPassages] = None) -> Tuple[List[ReaderSample], PreprocessingStats]:
    out, stats = [], PreprocessingStats()
    for sample in samples:
        reader_sample, sample_stats = preprocess_sample(sample, tensorizer, is_train, cfg, gold_passages)
        stats.add(sample_stats)
        if reader_sample is not None:
            out.append(reader_sample)
    return out, stats


@dataclass
class _ChunkTask:
    chunk_id: int
    samples: List[dict]
    out_file: str
    formats: Tuple[str, ...]
    tensorizer: Tensorizer
    is_train: bool
    cfg: ReaderPreprocessingCfg
    gold_passages: Optional[GoldPassages]


def _process_chunk(task: _ChunkTask) -> Tuple[List[str], PreprocessingStats]:
    samples, stats = preprocess_samples(task.samples, task.tensorizer, task.is_train, task.cfg, task.gold_passages)
    paths = [write_samples(f"{task.out_file}.{task.chunk_id}.{fmt}", samples) for fmt in task.formats]
    return paths, stats


def convert_retriever_results(
    is_train: bool,
    retriever_results: str,
    out_file: str,
    tensorizer: Tensorizer,
    gold_passages_src: Optional[str] = None,
    num_workers: int = 16,
    formats: Sequence[str] = SAMPLE_FORMATS,
    cfg: ReaderPreprocessingCfg = ReaderPreprocessingCfg(),
    records: Optional[List[dict]] = None,
) -> List[str]:
    """Preprocess a retriever-results JSON into `{out_file}.{k}.{format}` files, k < num_workers, with
    ceil(N / num_workers) questions each, in up to num_workers processes. Returns the files written. `records`:
    the file's records when already read (`read_retriever_results`)."""
    unknown = set(formats) - set(SAMPLE_FORMATS)
    if unknown or not formats:
        raise SampleFileError(f"sample file formats must be among {SAMPLE_FORMATS}, got {list(formats)}")
    samples = read_retriever_results(retriever_results) if records is None else records
    gold = load_gold_passages(gold_passages_src) if gold_passages_src else None
    chunk_size = max(1, math.ceil(len(samples) / max(1, num_workers)))
    tasks = [
        _ChunkTask(k, samples[start : start + chunk_size], out_file, tuple(formats), tensorizer, is_train, cfg, gold)
        for k, start in enumerate(range(0, len(samples), chunk_size))
    ]
    logger.info("Preprocessing %d %s questions of %s in %d chunks", len(samples),
                "training" if is_train else "evaluation", retriever_results, len(tasks))
    processes = min(len(tasks), num_workers, os.cpu_count() or 1)
    if processes > 1:
        # spawn: the tokenizer's threads and torch's do not survive a fork safely
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            results = pool.map(_process_chunk, tasks)
    else:
        results = [_process_chunk(task) for task in tasks]
    stats = PreprocessingStats()
    paths: List[str] = []
    for chunk_paths, chunk_stats in results:
        paths += chunk_paths
        stats.add(chunk_stats)
    _log_stats(stats, is_train)
    return paths


def _read_json(path: str):
    with open_text(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise DataFileError(f"{path}: not valid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e


def read_retriever_results(path: str) -> List[dict]:
    """The records of a retriever-results JSON, each checked where preprocessing reads it (answers given as a
    string would be matched character by character)."""
    records = _read_json(path)
    if not isinstance(records, list):
        raise DataFileError(f"{path}: expected a JSON list of retriever results, found {type(records).__name__}")
    if not records:
        raise DataFileError(f"{path}: holds no retriever results (an empty list): give dense_retriever.py's out_file")
    for index, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get("question"), str):
            raise DataFileError(f"{path}: record {index} is not a retriever result (an object with a 'question')")
        answers, ctxs = record.get("answers"), record.get("ctxs")
        if answers is not None and (not isinstance(answers, list) or not all(isinstance(a, str) for a in answers)):
            raise DataFileError(f"{path}: record {index}: answers must be a list of strings, found {answers!r:.80}")
        if ctxs is not None and (not isinstance(ctxs, list) or not all(isinstance(c, dict) for c in ctxs)):
            raise DataFileError(f"{path}: record {index}: ctxs must be a list of objects (retrieved passages), "
                                f"found {ctxs!r:.80}")
        for position, ctx in enumerate(ctxs or ()):
            # a string "false" would be true: every passage a positive
            if not isinstance(ctx.get("has_answer", False), bool):
                raise DataFileError(f"{path}: record {index}, ctxs[{position}]: has_answer must be true or false, "
                                    f"found {ctx['has_answer']!r:.40}")
    return records


@dataclass(frozen=True)
class SampleFileOptions:
    """The configuration that shapes reader sample files, read from the same keys by train_reader.py (which
    preprocesses a results JSON on first use) and preprocess_reader_data.py (whose configuration extends
    train_reader's), so that both tokenize alike: the tokenizer, the sequence length, the gold passages files
    (of training sets, of evaluation sets), the processes and the file formats."""

    encoder: EncoderSpec
    gold_passages_src: Optional[str]
    gold_passages_src_dev: Optional[str]
    num_workers: int
    formats: Tuple[str, ...]

    @classmethod
    def from_config(cls, cfg) -> "SampleFileOptions":
        formats = cfg.sample_formats
        formats = (formats,) if isinstance(formats, str) else tuple(formats or ())
        if not formats:
            raise SampleFileError(f"sample_formats={list(formats)} must name at least one of "
                                  f"{', '.join(SAMPLE_FORMATS)}")
        for fmt in formats:
            if fmt not in SAMPLE_FORMATS:
                raise SampleFileError(f"sample_formats={list(formats)}: {fmt} is not one of "
                                      f"{', '.join(SAMPLE_FORMATS)}")
        return cls(
            encoder=EncoderSpec.from_config(cfg.encoder, true_or_false("do_lower_case", cfg.do_lower_case,
                                                                       SampleFileError)),
            gold_passages_src=cfg.gold_passages_src or None,
            gold_passages_src_dev=cfg.gold_passages_src_dev or None,
            num_workers=whole_number("num_workers", cfg.num_workers, 1, error=SampleFileError),
            formats=formats,
        )

    def gold_passages(self, is_train: bool) -> Optional[str]:
        return self.gold_passages_src if is_train else self.gold_passages_src_dev


def preprocess_retriever_results(retriever_results: str, out_file: str, is_train: bool,
                                 options: SampleFileOptions) -> List[str]:
    """convert_retriever_results with the tokenizer, length and gold passages the options name, writing a record
    of what the files were made from beside them. Each file is written atomically; the record is replaced first
    by one saying that a run is under way and last by one listing the files written, so that the files of a
    killed run are never taken for a complete set (`stale_samples_reason`). Sample files an earlier run left
    under the same prefix and this one did not write are removed at the end (a chunk more than this run writes
    would otherwise be read with them), temporaries of killed runs at the start."""
    folder, name = os.path.split(os.path.abspath(out_file))
    removed = remove_stale_temporaries(folder, f"{name}.")[0] + remove_stale_temporaries(
        folder, os.path.basename(samples_record_path(name)))[0]
    if removed:
        logger.info("Removed %d temporary file(s) of an interrupted preprocessing into %s", removed, out_file)
    samples = read_retriever_results(retriever_results)
    record = samples_record(retriever_results, is_train, options)
    _write_samples_record(out_file, {**record, "files": None})
    tensorizer = Tensorizer.for_spec(options.encoder)
    paths = convert_retriever_results(is_train, retriever_results, out_file, tensorizer,
                                      options.gold_passages(is_train), options.num_workers, options.formats,
                                      records=samples)
    for stale in set(cached_sample_files(out_file, formats=SAMPLE_FORMATS)) - set(paths):
        os.remove(stale)
    _write_samples_record(out_file, {**record, "files": sorted(os.path.basename(path) for path in paths)})
    return paths


_RECORDED_FILES = ("retriever_results", "gold_passages")
_STAT_FIELDS = ("device", "inode", "ctime_ns")


def _write_samples_record(prefix: str, record: dict) -> None:
    with atomic_output(samples_record_path(prefix)) as temp_name, open(temp_name, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)


def samples_record_path(prefix: str) -> str:
    """Beside the sample files, hidden (`{dir}/.{name}.samples.json`), so that no sample glob takes it."""
    folder, name = os.path.split(prefix)
    return os.path.join(folder, f".{name}.samples.json")


def samples_record(retriever_results: str, is_train: bool, options: SampleFileOptions,
                   earlier: Optional[dict] = None) -> dict:
    """What sample files are made from: the retriever results, the gold passages (each with the sha256 of its every
    byte: `earlier`'s, a saved record, when the file is the very one untouched since, else read), the tokenizer and
    length."""
    gold = options.gold_passages(is_train)
    earlier = earlier or {}
    return {
        "format": SAMPLES_RECORD_FORMAT,
        "version": 2,
        "is_train": is_train,
        "retriever_results": full_identity(retriever_results, earlier.get("retriever_results")),
        "gold_passages": full_identity(gold, earlier.get("gold_passages")) if gold else None,
        "encoder": {key: getattr(options.encoder, key) for key in TOKENIZATION_FIELDS},
    }


def stale_samples_reason(retriever_results: str, prefix: str, is_train: bool,
                         options: SampleFileOptions) -> Optional[str]:
    """Why the sample files of `prefix` may not stand for `retriever_results` preprocessed with `options`, or
    None when they may. With their record: the run that wrote them was interrupted, a file it wrote is missing
    or one it did not write is there, or the first field that differs. Without one (DPR's files, or files of an
    older version): they may when none is older than the retriever results, as make decides."""
    try:
        with open(samples_record_path(prefix), encoding="utf-8") as f:
            saved = json.load(f)
    except FileNotFoundError:
        results_mtime = os.stat(retriever_results).st_mtime_ns
        older = [path for path in cached_sample_files(prefix) if os.stat(path).st_mtime_ns < results_mtime]
        return f"{older[0]} is older than {retriever_results} and has no record" if older else None
    except (OSError, ValueError) as e:
        return f"its record {samples_record_path(prefix)} is unreadable ({e})"
    if not isinstance(saved, dict):
        return f"its record {samples_record_path(prefix)} is not one"
    written = saved.pop("files", None)
    # the files' stat (inode, ctime) only tells whether their sha256 must be read again; records of older versions
    # have no sha256
    changed = differing_field(saved, samples_record(retriever_results, is_train, options, saved),
                              ignore=[f"{name}.stat.{key}" for name in _RECORDED_FILES for key in _STAT_FIELDS],
                              when_both=[f"{name}.sha256" for name in _RECORDED_FILES])
    if changed is not None:
        return f"{changed.field} differs ({changed.first!r} -> {changed.second!r})"
    if written is None:
        return "the preprocessing that wrote them was interrupted"
    present = {os.path.basename(path) for path in cached_sample_files(prefix, formats=SAMPLE_FORMATS)}
    if present != set(written):
        missing, extra = sorted(set(written) - present), sorted(present - set(written))
        return f"{', '.join(missing)} missing" if missing else f"{', '.join(extra)} not written with them"
    return None


def _log_stats(stats: PreprocessingStats, is_train: bool) -> None:
    if not is_train:
        logger.info("Preprocessed %d evaluation questions", stats.questions)
        return
    logger.info(
        "Preprocessed %d training questions: %d skipped with no usable positive passage (no positive passages "
        "samples), %d with positives from the gold page (positive passages from gold samples)",
        stats.questions, stats.skipped_no_positive, stats.positives_from_gold,
    )
    if stats.positives_without_span:
        logger.warning("%d passages marked has_answer contain no answer as tokens; they are not used as positives",
                       stats.positives_without_span)


# ---------------------------------------------------------------------------------------------- sample files
def write_samples(path: str, samples: Sequence[ReaderSample]) -> str:
    """Write samples as .pkl (DPR's pickle) or .npz (no pickle), atomically."""
    fmt = _sample_format(path)
    with atomic_output(path) as temp_name, open(temp_name, "wb") as f:
        if fmt == "pkl":
            pickle.dump(list(samples), f, protocol=pickle.HIGHEST_PROTOCOL)
        else:
            _write_npz(f, samples)
    logger.info("Wrote %d reader samples to %s", len(samples), path)
    return path


def read_samples(path: str) -> List[ReaderSample]:
    """Samples from a .npz file or a .pkl file (ours or DPR's), without running code from the file."""
    with open(path, "rb") as f:
        if _sample_format(path) == "npz":
            return _read_npz(f)
        samples = restricted_load(f, _SAMPLE_GLOBALS, "DPR reader sample file")
    for sample in samples:
        for passage in sample.all_passages():
            passage.sequence_ids = np.asarray(passage.sequence_ids, dtype=np.int64)
            passage.answers_spans = [tuple(s) for s in passage.answers_spans or []]
    return samples


def load_samples(paths: Sequence[str]) -> List[ReaderSample]:
    samples: List[ReaderSample] = []
    for path in paths:
        samples += read_samples(path)
    logger.info("Loaded %d reader samples from %d files", len(samples), len(paths))
    return samples


def _sample_format(path: str) -> str:
    fmt = path.rsplit(".", 1)[-1]
    if fmt not in SAMPLE_FORMATS:
        raise SampleFileError(f"{path}: reader sample files end in .pkl or .npz")
    return fmt


def sample_files(paths: Sequence[str]) -> List[str]:
    """The sample files among `paths`, one per chunk: where a chunk has both, the .npz (no unpickling)."""
    by_chunk: Dict[str, str] = {}
    for path in sorted(paths, key=_chunk_order):
        stem, _, ext = path.rpartition(".")
        if ext in SAMPLE_FORMATS and (stem not in by_chunk or ext == "npz"):
            by_chunk[stem] = path
    return list(by_chunk.values())


def cached_sample_files(prefix: str, formats: Sequence[str] = ()) -> List[str]:
    """The files a preprocessing run with this out_file prefix wrote, if any: one per chunk, or with `formats`
    every file of those formats."""
    pattern = glob.escape(prefix) + ".*"
    written = [p for p in expand_glob(pattern) if p[len(prefix) + 1 :].split(".")[0].isdigit()]
    if formats:
        return [p for p in written if p.rsplit(".", 1)[-1] in formats]
    return sample_files(written)


def _chunk_order(path: str):
    """Chunk files in numeric order ({prefix}.10 after {prefix}.9)."""
    stem = path.rpartition(".")[0]
    prefix, _, k = stem.rpartition(".")
    return (prefix, int(k)) if k.isdigit() else (stem, -1)


_PASSAGE_GROUPS = ("positive_passages", "negative_passages", "passages")


def _write_npz(f, samples: Sequence[ReaderSample]) -> None:
    records, sequences = [], []
    for sample in samples:
        record = {"question": sample.question, "answers": list(sample.answers)}
        for group in _PASSAGE_GROUPS:
            record[group] = []
            for p in getattr(sample, group):
                record[group].append({"id": p.id, "score": p.score, "has_answer": p.has_answer,
                                      "passage_offset": p.passage_offset,
                                      "answers_spans": [list(s) for s in p.answers_spans or []]})
                sequences.append(np.asarray(p.sequence_ids, dtype=np.int32))
        records.append(record)
    meta = json.dumps({"format": NPZ_FORMAT_NAME, "version": 1, "samples": records}, ensure_ascii=False)
    np.savez_compressed(
        f,
        meta=np.frombuffer(meta.encode("utf-8"), dtype=np.uint8),
        lengths=np.asarray([len(s) for s in sequences], dtype=np.int64),
        tokens=np.concatenate(sequences) if sequences else np.zeros(0, dtype=np.int32),
    )


def _read_npz(f) -> List[ReaderSample]:
    with np.load(io.BytesIO(f.read()), allow_pickle=False) as data:
        meta = json.loads(data["meta"].tobytes().decode("utf-8"))
        lengths, tokens = data["lengths"], data["tokens"].astype(np.int64)
    if meta.get("format") != NPZ_FORMAT_NAME:
        raise SampleFileError(f"not a reader samples file (format {meta.get('format')!r})")
    ends = np.cumsum(lengths)
    row = 0
    samples = []
    for record in meta["samples"]:
        groups = {}
        for group in _PASSAGE_GROUPS:
            groups[group] = []
            for p in record[group]:
                groups[group].append(ReaderPassage(
                    id=p["id"], score=p["score"], has_answer=p["has_answer"], passage_offset=p["passage_offset"],
                    answers_spans=[tuple(s) for s in p["answers_spans"]],
                    sequence_ids=tokens[ends[row] - lengths[row] : ends[row]],
                ))
                row += 1
        samples.append(ReaderSample(record["question"], record["answers"], **groups))
    return samples


_SAMPLE_GLOBALS = NUMPY_GLOBALS | {
    ("dpr.data.reader_data", "ReaderSample"), ("dpr.data.reader_data", "ReaderPassage"),
    ("copyreg", "_reconstructor"), ("builtins", "object"),
}


# ---------------------------------------------------------------------------------------------- batches
@dataclass
class ReaderBatch:
    """input_ids [N, M, T]; for training also start/end positions and the answers mask [N, M, A], filled in
    passage row 0 (the positive) only. `questions` are the sample indices the N rows belong to."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    questions: List[int]
    start_positions: Optional[torch.Tensor] = None
    end_positions: Optional[torch.Tensor] = None
    answers_mask: Optional[torch.Tensor] = None

    def to(self, device: torch.device) -> "ReaderBatch":
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()}
        return ReaderBatch(**moved)


def spans_within(passage: ReaderPassage, max_length: int) -> List[Span]:
    return [(s, e) for s, e in passage.answers_spans or [] if s < max_length and e < max_length]


def choose_positive(sample: ReaderSample, rng: np.random.Generator, max_length: int) -> Optional[ReaderPassage]:
    """A random positive; if its answers all lie past max_length, the first positive with an answer inside;
    None when there is none (the question is left out of the batch; DPR crashed on no positives, DPR #25)."""
    positives = sample.positive_passages
    if not positives:
        return None
    pick = positives[int(rng.integers(len(positives)))]
    if spans_within(pick, max_length):
        return pick
    return next((p for p in positives if spans_within(p, max_length)), None)


def _stack_rows(rows: List[List[np.ndarray]], tensorizer: Tensorizer, passages_per_question: int):
    """[N, M, T] ids and mask from N lists of up to M sequences; missing passages are all-PAD rows."""
    flat = []
    for question_rows in rows:
        flat += [seq[: tensorizer.max_length].tolist() for seq in question_rows]
        flat += [[] for _ in range(passages_per_question - len(question_rows))]
    ids, mask = tensorizer.pad(flat)
    shape = (len(rows), passages_per_question, ids.shape[-1])
    return ids.view(shape), mask.view(shape)


def make_train_batch(samples: Sequence[ReaderSample], indices: Sequence[int], tensorizer: Tensorizer,
                     passages_per_question: int, max_n_answers: int,
                     rngs: Sequence[np.random.Generator]) -> Optional[ReaderBatch]:
    """Per question: a positive (row 0) with up to max_n_answers spans, then passages_per_question - 1
    negatives in random order. Questions without a usable positive are dropped; None if none is left."""
    max_length = tensorizer.max_length
    rows, starts, ends, kept = [], [], [], []
    for index, rng in zip(indices, rngs):
        sample = samples[index]
        positive = choose_positive(sample, rng, max_length)
        if positive is None:
            continue
        spans = spans_within(positive, max_length)[:max_n_answers]
        negatives = sample.negative_passages
        order = rng.permutation(len(negatives))[: passages_per_question - 1]
        rows.append([positive.sequence_ids] + [negatives[i].sequence_ids for i in order])
        starts.append([s for s, _ in spans])
        ends.append([e for _, e in spans])
        kept.append(int(index))
    if not rows:
        return None
    ids, mask = _stack_rows(rows, tensorizer, passages_per_question)
    shape = (len(rows), passages_per_question, max_n_answers)
    start_positions = torch.zeros(shape, dtype=torch.long)
    end_positions = torch.zeros(shape, dtype=torch.long)
    answers_mask = torch.zeros(shape, dtype=torch.long)
    for n, (s, e) in enumerate(zip(starts, ends)):
        start_positions[n, 0, : len(s)] = torch.tensor(s, dtype=torch.long)
        end_positions[n, 0, : len(e)] = torch.tensor(e, dtype=torch.long)
        answers_mask[n, 0, : len(s)] = 1
    return ReaderBatch(ids, mask, kept, start_positions, end_positions, answers_mask)


def make_eval_batch(samples: Sequence[ReaderSample], indices: Sequence[int], tensorizer: Tensorizer,
                    passages_per_question: int) -> ReaderBatch:
    """The first passages_per_question passages of each question, in retrieval order."""
    rows = [[p.sequence_ids for p in samples[i].passages[:passages_per_question]] for i in indices]
    ids, mask = _stack_rows(rows, tensorizer, passages_per_question)
    return ReaderBatch(ids, mask, [int(i) for i in indices])
