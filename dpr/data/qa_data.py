"""Question files for retrieval evaluation: DPR's qas CSV and JSON lines, plain or gzipped.

The qas CSV is tab separated without a header: `question \t ['answer', ...]`. DPR parses the answers column with
`eval`; here it is `ast.literal_eval`, so a file can hold data but never run code. A question with no answer can
never be matched, so each one is warned about (file and line) and counted; a file with no question is an error.

A queries file (`convert_to_dpr.py`'s `{split}.queries.jsonl`: `id`, `question`, `answers` where known) is JSON
lines too: a record with an `id` may have no or empty answers (it is evaluated by qrels), and is only counted.
"""
import ast
import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from dpr.data.data_files import DataFileError, open_text, without_gz

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]


@dataclass(frozen=True)
class QASample:
    question: str
    answers: list[str]
    id: Optional[str] = None


def _parse_answers(value: object, where: str) -> list[str]:
    """Answers as a list of strings; a single string is one answer."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(answer, str) for answer in value):
        return list(value)
    raise DataFileError(f"{where}: answers must be a string or a list of strings, got {value!r:.100}")


def _csv_sample(row: list[str], question_col: int, answers_col: int, id_col: int, where: str) -> QASample:
    needed = max(question_col, answers_col, id_col) + 1
    if len(row) < needed:
        raise DataFileError(f"{where}: expected at least {needed} tab-separated columns, got {len(row)}")
    try:
        answers = ast.literal_eval(row[answers_col])
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as error:
        raise DataFileError(f"{where}: answers column is not a Python literal: {row[answers_col]!r:.100}") from error
    sample_id = row[id_col] if id_col >= 0 else None
    return QASample(row[question_col], _parse_answers(answers, where), sample_id)


def _warn_if_unanswerable(sample: QASample, where: str) -> bool:
    """Warn about a question whose answers list is empty (it counts as a miss at every k); True if it is."""
    if sample.answers:
        return False
    logger.warning("%s: the question %r has no answer, so it can never be found", where, sample.question[:100])
    return True


def read_qa_csv(
    path: PathLike,
    question_col: int = 0,
    answers_col: int = 1,
    id_col: int = -1,
) -> list[QASample]:
    """DPR's qas CSV (tab separated, no header); `id_col=-1` means the file has no id column."""
    samples, unanswerable = [], 0
    with open_text(path) as reader:
        rows = csv.reader(reader, delimiter="\t")
        for row in rows:
            if row:
                where = f"{path}, line {rows.line_num}"
                samples.append(_csv_sample(row, question_col, answers_col, id_col, where))
                unanswerable += _warn_if_unanswerable(samples[-1], where)
    _log_unanswerable(path, unanswerable, len(samples))
    return samples


def read_qa_jsonl(path: PathLike) -> list[QASample]:
    """JSON lines of `{"question": str, "answer": str | [str], "id"?: ...}` (`answers` is accepted too; a record with
    an id may leave them out: a queries file's record, evaluated by qrels)."""
    samples, unanswerable = [], 0
    with open_text(path) as reader:
        for line_number, line in enumerate(reader, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataFileError(f"{where}: not valid JSON ({error.msg})") from error
            if not isinstance(record, dict) or "question" not in record:
                raise DataFileError(f"{where}: expected an object with a 'question' key")
            answers = record.get("answer", record.get("answers"))
            sample_id = None if record.get("id") is None else str(record["id"])
            if answers is None and sample_id is None:
                raise DataFileError(f"{where}: no 'answer' key (and no 'id', by which qrels could judge it)")
            samples.append(QASample(record["question"], [] if answers is None else _parse_answers(answers, where),
                                    sample_id))
            if sample_id is None:
                unanswerable += _warn_if_unanswerable(samples[-1], where)
            else:
                unanswerable += not samples[-1].answers
    _log_unanswerable(path, unanswerable, len(samples))
    return samples


def _log_unanswerable(path: PathLike, unanswerable: int, total: int) -> None:
    if unanswerable:
        logger.warning("%s: %d of %d questions have no answer; they count as misses", path, unanswerable, total)


def read_qa_file(path: PathLike, question_col: int = 0, answers_col: int = 1, id_col: int = -1) -> list[QASample]:
    """Read questions from a `.jsonl`/`.json` lines file or a qas CSV (either may end in `.gz`); a file without
    any question is a DataFileError."""
    if without_gz(path).endswith((".jsonl", ".json")):
        samples = read_qa_jsonl(path)
    else:
        samples = read_qa_csv(path, question_col, answers_col, id_col)
    if not samples:
        raise DataFileError(f"{path}: no questions in the file; expected 'question<TAB>[answers]' rows (qas CSV) or "
                            f"JSON lines with 'question' and 'answer'")
    logger.info("read %d questions from %s", len(samples), path)
    return samples
