"""Other retrieval datasets' files, read as one shape for the converter (`convert_to_dpr.py`, `dpr.interop.convert`).

- ``beir``: a folder with ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``, ``text``;
  optional ``answers``, top level or in ``metadata``) and ``qrels/{split}.tsv`` (``query-id corpus-id score`` with a
  header); each qrels file is a split.
- ``msmarco``: a folder with ``collection.tsv`` (``pid \\t text``), ``queries.{split}.tsv`` (``qid \\t text``) and
  ``qrels.{split}.tsv`` (TREC: ``qid 0 pid grade``); each qrels file is a split (``dev.small`` too).
- ``pairs``: one file of query-positive rows: TSV ``query \\t positive [\\t negative ...]`` or JSON lines
  (``query``/``anchor``, ``positive``/``pos``, optional ``negative``/``neg``/``negatives``, strings or lists).
- ``tevatron``: one JSON-lines file, a query per line: ``query`` (and ``query_id``), ``pos`` or
  ``positive_passages``, ``neg`` or ``negative_passages``: strings (FlagEmbedding) or objects with ``text`` and
  optional ``docid`` and ``title`` (tevatron); optional ``answers``.

Passages without ids (pairs, FlagEmbedding's strings, tevatron objects without ``docid``) get the content id
:func:`content_id`: the same text always gets the same id, so repeated texts are one passage. Queries without ids
get the content id of their text, and the rows of one query text are one query with all their positives.

Every reader names the file and line of what it cannot read, and says which ``--format`` a file of another format
looks like. Passages are streamed; queries and judgements are held (ids and question texts only).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from dpr.data.data_files import DataFileError, open_text
from dpr.foundation.errors import UserInputError

FORMATS = ("beir", "msmarco", "pairs", "tevatron")


class SourceLayoutError(UserInputError):
    """An --input that is not a collection of the chosen --format (a missing file or split, another format)."""


@dataclass(frozen=True, slots=True)
class SourcePassage:
    id: str
    text: str
    title: str
    where: str  # "file, line N"


@dataclass(frozen=True, slots=True)
class SourceQuery:
    id: str
    question: str
    answers: list
    where: str


@dataclass(frozen=True, slots=True)
class Judgement:
    query_id: str
    passage_id: str
    grade: int
    where: str


def content_id(text: str) -> str:
    """A stable id for a text that has none: the first 8 bytes of its BLAKE2b hash, in hex (16 characters)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


def clean_text(text: str) -> str:
    """Tabs and line breaks would break the passages TSV's rows (one passage per line): they become spaces."""
    return text.replace("\t", " ").replace("\r", " ").replace("\n", " ").strip()


def _check_id(value: object, what: str, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataFileError(f"{where}: {what} must be a string or a number, found {value!r:.60}")
    text = str(value)
    if not text or any(c.isspace() for c in text):
        raise DataFileError(f"{where}: {what} {text!r} is empty or holds whitespace, which TREC qrels and runs "
                            "cannot hold: give ids without spaces")
    return text


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line without its end) of a text file. Only \\n ends a line: a bare \\r inside a text would
    end one in Python's universal newlines, cutting the row in two."""
    with open_text(path) as source:
        number, pending = 1, ""
        for piece in source:
            if not piece.endswith("\n"):
                pending += piece
                continue
            yield number, (pending + piece).rstrip("\r\n")
            number, pending = number + 1, ""
        if pending:
            yield number, pending.rstrip("\r")


def _json_lines(path: Path) -> Iterator[tuple[str, object]]:
    for number, line in _lines(path):
        if line.strip():
            where = f"{path}, line {number}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFileError(f"{where}: not valid JSON ({e.msg}); the file should be JSON lines, one object "
                                    "per line") from e


def _tsv_lines(path: Path) -> Iterator[tuple[str, list[str]]]:
    """(where, fields) of the non-blank lines of a tab-separated file (fields as written, no quoting)."""
    for number, line in _lines(path):
        if line.strip():
            yield f"{path}, line {number}", line.split("\t")


def _object(record: object, where: str, hint: str) -> dict:
    if not isinstance(record, dict):
        raise DataFileError(f"{where}: expected a JSON object, found {type(record).__name__}{hint}")
    return record


def _string_field(record: dict, keys: tuple[str, ...], where: str, hint: str = "") -> str:
    for key in keys:
        if key in record:
            value = record[key]
            if not isinstance(value, str):
                raise DataFileError(f"{where}: '{key}' must be a string, found {value!r:.60}")
            return value
    raise DataFileError(f"{where}: no {' or '.join(repr(k) for k in keys)} field{hint}")


def _answers(value: object, where: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise DataFileError(f"{where}: answers must be a list of strings, found {value!r:.60}")
    return list(value)


def _grade(value: str, where: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataFileError(f"{where}: the relevance grade {value!r} is not a whole number") from None


def _other_format(folder: Path) -> str:
    """The --format a folder's files look like, as advice."""
    if (folder / "corpus.jsonl").exists() or (folder / "corpus.jsonl.gz").exists():
        return "; it holds corpus.jsonl, which is BEIR's: use --format beir"
    if (folder / "collection.tsv").exists() or (folder / "collection.tsv.gz").exists():
        return "; it holds collection.tsv, which is MS MARCO's: use --format msmarco"
    if (folder / "psgs.tsv").exists():
        return "; it holds psgs.tsv: it is DPR's files already"
    return ""


def _file_in(folder: Path, name: str, fmt: str) -> Path:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise SourceLayoutError(f"--input {folder} has no {name} (nor {name}.gz), which --format {fmt} needs"
                            f"{_other_format(folder)}")


def _folder(path: Path, fmt: str, what: str) -> Path:
    if not path.exists():
        raise SourceLayoutError(f"--input {path} does not exist: give the folder of {what}")
    if not path.is_dir():
        raise SourceLayoutError(f"--input {path} is a file, but --format {fmt} reads a folder ({what}); for a file "
                                "of query-passage rows use --format pairs or --format tevatron")
    return path


class Collection:
    """A collection in another format: its splits, queries and judgements (held), its passages (streamed)."""

    format: str
    location: Path  # the --input
    # passages may repeat in the stream under one content id (rows of pairs files): kept once, not refused
    repeats_passages = False

    def splits(self) -> list[str]:
        raise NotImplementedError

    def queries(self, split: str) -> Iterator[SourceQuery]:
        raise NotImplementedError

    def judgements(self, split: str) -> Iterator[Judgement]:
        raise NotImplementedError

    def queries_file(self, split: str) -> str:
        raise NotImplementedError

    def passages(self) -> Iterator[SourcePassage]:
        raise NotImplementedError

    def given_negatives(self, split: str) -> dict[str, list[str]]:
        """The negatives the file itself lists, by query id (pairs and tevatron files)."""
        return {}


class BeirCollection(Collection):
    format = "beir"

    def __init__(self, path: Path):
        folder = self.location = _folder(path, "beir", "corpus.jsonl, queries.jsonl and qrels/")
        self.corpus = _file_in(folder, "corpus.jsonl", "beir")
        self.queries_path = _file_in(folder, "queries.jsonl", "beir")
        self.qrels_dir = folder / "qrels"
        if not self.qrels_dir.is_dir():
            raise SourceLayoutError(f"--input {folder} has no qrels/ folder (qrels/{{split}}.tsv), which --format "
                                    f"beir needs{_other_format(folder)}")
        self._splits = sorted(p.name[:-len(".tsv")] for p in self.qrels_dir.glob("*.tsv"))
        if not self._splits:
            raise SourceLayoutError(f"{self.qrels_dir} holds no {{split}}.tsv qrels file")

    def splits(self) -> list[str]:
        return self._splits

    def queries_file(self, split: str) -> str:
        return str(self.queries_path)

    def queries(self, split: str) -> Iterator[SourceQuery]:
        hint = "; BEIR's queries.jsonl has objects with '_id' and 'text'"
        for where, record in _json_lines(self.queries_path):
            record = _object(record, where, hint)
            if "_id" not in record:
                raise DataFileError(f"{where}: no '_id' field{hint}")
            metadata = record.get("metadata") if isinstance(record.get("metadata"), dict) else {}
            answers = record["answers"] if "answers" in record else metadata.get("answers")
            yield SourceQuery(_check_id(record["_id"], "query id", where), clean_text(_string_field(record, ("text",),
                              where, hint)), _answers(answers, where), where)

    def judgements(self, split: str) -> Iterator[Judgement]:
        path = self.qrels_dir / f"{split}.tsv"
        for position, (where, fields) in enumerate(_tsv_lines(path)):
            if position == 0 and fields[0] == "query-id":
                continue  # the header
            if len(fields) != 3:
                hint = ("; it has TREC's four columns: MS MARCO's qrels are read by --format msmarco"
                        if len(" ".join(fields).split()) == 4 else "")
                raise DataFileError(f"{where}: expected 3 tab-separated columns 'query-id corpus-id score', got "
                                    f"{len(fields)}{hint}")
            yield Judgement(_check_id(fields[0], "query id", where), _check_id(fields[1], "passage id", where),
                            _grade(fields[2], where), where)

    def passages(self) -> Iterator[SourcePassage]:
        hint = "; BEIR's corpus.jsonl has objects with '_id', 'title' and 'text'"
        for where, record in _json_lines(self.corpus):
            record = _object(record, where, hint)
            if "_id" not in record:
                raise DataFileError(f"{where}: no '_id' field{hint}")
            title = record.get("title") or ""
            if not isinstance(title, str):
                raise DataFileError(f"{where}: 'title' must be a string, found {title!r:.60}")
            yield SourcePassage(_check_id(record["_id"], "passage id", where),
                                clean_text(_string_field(record, ("text",), where, hint)), clean_text(title), where)


class MsMarcoCollection(Collection):
    format = "msmarco"

    def __init__(self, path: Path):
        folder = _folder(path, "msmarco", "collection.tsv, queries.{split}.tsv and qrels.{split}.tsv")
        self.folder = self.location = folder
        self.collection = _file_in(folder, "collection.tsv", "msmarco")
        qrels = sorted(p.name for p in folder.iterdir() if p.name.startswith("qrels.") and p.name.endswith(".tsv"))
        self._splits = [name[len("qrels."):-len(".tsv")] for name in qrels]
        if not self._splits:
            raise SourceLayoutError(f"--input {folder} has no qrels.{{split}}.tsv file, which --format msmarco "
                                    f"needs{_other_format(folder)}")

    def splits(self) -> list[str]:
        return self._splits

    def queries_file(self, split: str) -> str:
        path = self.folder / f"queries.{split}.tsv"
        if not path.is_file():
            raise SourceLayoutError(f"{path} does not exist: --format msmarco needs the queries of split {split!r} "
                                    f"beside {self.folder / f'qrels.{split}.tsv'}")
        return str(path)

    def queries(self, split: str) -> Iterator[SourceQuery]:
        for where, fields in _tsv_lines(Path(self.queries_file(split))):
            if len(fields) != 2:
                raise DataFileError(f"{where}: expected 2 tab-separated columns 'qid text', got {len(fields)}")
            yield SourceQuery(_check_id(fields[0], "query id", where), clean_text(fields[1]), [], where)

    def judgements(self, split: str) -> Iterator[Judgement]:
        for where, line in _tsv_lines(self.folder / f"qrels.{split}.tsv"):
            fields = " ".join(line).split()  # TREC qrels: tabs or spaces
            if len(fields) != 4:
                hint = ("; BEIR's three-column qrels are read by --format beir" if len(fields) == 3 else "")
                raise DataFileError(f"{where}: expected TREC qrels' 4 columns 'qid 0 pid grade', got "
                                    f"{len(fields)}{hint}")
            yield Judgement(_check_id(fields[0], "query id", where), _check_id(fields[2], "passage id", where),
                            _grade(fields[3], where), where)

    def passages(self) -> Iterator[SourcePassage]:
        for where, fields in _tsv_lines(self.collection):
            if len(fields) != 2:
                hint = ("; a header 'id text title' is DPR's passages TSV, already converted"
                        if fields[:3] == ["id", "text", "title"] else "")
                raise DataFileError(f"{where}: expected 2 tab-separated columns 'pid text', got {len(fields)}{hint}")
            yield SourcePassage(_check_id(fields[0], "passage id", where), clean_text(fields[1]), "", where)


@dataclass
class _HeldQuery:
    question: str
    answers: list
    where: str
    positives: list = field(default_factory=list)
    negatives: list = field(default_factory=list)


class RowsCollection(Collection):
    """A file of query rows that carry their passages' texts (pairs, tevatron): one split (`split`). The file is
    read twice: once for the queries (ids only for passages), once streaming the passages."""

    repeats_passages = True

    def __init__(self, path: Path, split: str):
        if not path.exists():
            raise SourceLayoutError(f"--input {path} does not exist: give the {self.format} file")
        if path.is_dir():
            raise SourceLayoutError(f"--input {path} is a folder, but --format {self.format} reads one file"
                                    f"{_other_format(path)}")
        self.path = self.location = path
        self.split = split
        self._queries: dict[str, _HeldQuery] = {}
        for where, query, positives, negatives in self._rows():
            query_id, question, answers = query
            held = self._queries.get(query_id)
            if held is None:
                held = self._queries[query_id] = _HeldQuery(question, answers, where)
            held.positives += [p.id for p in positives if p.id not in held.positives]
            held.negatives += [p.id for p in negatives if p.id not in held.negatives]

    def _rows(self) -> Iterator[tuple[str, tuple[str, str, list], list[SourcePassage], list[SourcePassage]]]:
        raise NotImplementedError

    def splits(self) -> list[str]:
        return [self.split]

    def queries_file(self, split: str) -> str:
        return str(self.path)

    def queries(self, split: str) -> Iterator[SourceQuery]:
        for query_id, held in self._queries.items():
            yield SourceQuery(query_id, held.question, held.answers, held.where)

    def judgements(self, split: str) -> Iterator[Judgement]:
        for query_id, held in self._queries.items():
            for passage_id in held.positives:
                yield Judgement(query_id, passage_id, 1, held.where)

    def given_negatives(self, split: str) -> dict[str, list[str]]:
        return {query_id: held.negatives for query_id, held in self._queries.items() if held.negatives}

    def passages(self) -> Iterator[SourcePassage]:
        for _, _, positives, negatives in self._rows():
            yield from positives
            yield from negatives


def _is_json_lines(path: Path) -> bool:
    with open_text(path) as source:
        for line in source:
            if line.strip():
                return line.lstrip().startswith("{")
    return False


def _text_passage(text: str, where: str) -> SourcePassage:
    text = clean_text(text)
    if not text:
        raise DataFileError(f"{where}: an empty passage text")
    return SourcePassage(content_id(text), text, "", where)


class PairsCollection(RowsCollection):
    format = "pairs"

    def _rows(self):
        json_lines = _is_json_lines(self.path)
        rows = _json_lines(self.path) if json_lines else _tsv_lines(self.path)
        hint = ("; pairs JSON lines have 'query' (or 'anchor') and 'positive' (or 'pos'), and optionally 'negative'"
                " (or 'neg', 'negatives')")
        for where, row in rows:
            if json_lines:
                record = _object(row, where, hint)
                if "positive_passages" in record:
                    raise DataFileError(f"{where}: 'positive_passages' is tevatron's field: use --format tevatron")
                query = _string_field(record, ("query", "anchor"), where, hint)
                positives = self._texts(record, ("positive", "pos"), where, hint, required=True)
                negatives = self._texts(record, ("negative", "neg", "negatives"), where, hint, required=False)
            else:
                if len(row) < 2:
                    raise DataFileError(f"{where}: expected 'query<TAB>positive[<TAB>negative ...]', got "
                                        f"{len(row)} column(s)")
                query, positives, negatives = row[0], [row[1]], row[2:]
            question = clean_text(query)
            if not question:
                raise DataFileError(f"{where}: an empty query")
            yield (where, (content_id(question), question, []), [_text_passage(t, where) for t in positives],
                   [_text_passage(t, where) for t in negatives if t.strip()])

    @staticmethod
    def _texts(record: dict, keys: tuple[str, ...], where: str, hint: str, required: bool) -> list[str]:
        for key in keys:
            if key in record:
                value = record[key]
                values = [value] if isinstance(value, str) else value
                if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                    raise DataFileError(f"{where}: '{key}' must be a string or a list of strings, found "
                                        f"{value!r:.60}")
                return values
        if required:
            raise DataFileError(f"{where}: no {' or '.join(repr(k) for k in keys)} field{hint}")
        return []


class TevatronCollection(RowsCollection):
    format = "tevatron"

    def _rows(self):
        hint = ("; tevatron/FlagEmbedding lines have 'query' and 'pos' or 'positive_passages' (and 'neg' or "
                "'negative_passages')")
        if not _is_json_lines(self.path):
            raise DataFileError(f"{self.path}: not JSON lines; a TSV of query-passage rows is read by --format pairs")
        for where, record in _json_lines(self.path):
            record = _object(record, where, hint)
            question = clean_text(_string_field(record, ("query",), where, hint))
            if not question:
                raise DataFileError(f"{where}: an empty query")
            query_id = (_check_id(record["query_id"], "query id", where) if record.get("query_id") is not None
                        else content_id(question))
            positives = self._passages(record, ("pos", "positive_passages"), where, hint, required=True)
            negatives = self._passages(record, ("neg", "negative_passages"), where, hint, required=False)
            yield where, (query_id, question, _answers(record.get("answers"), where)), positives, negatives

    @staticmethod
    def _passages(record: dict, keys: tuple[str, ...], where: str, hint: str, required: bool) -> list[SourcePassage]:
        for key in keys:
            if key not in record:
                continue
            values = record[key]
            if not isinstance(values, list):
                raise DataFileError(f"{where}: '{key}' must be a list, found {values!r:.60}")
            passages = []
            for value in values:
                if isinstance(value, str):
                    passages.append(_text_passage(value, where))
                elif isinstance(value, dict) and isinstance(value.get("text"), str):
                    text = clean_text(value["text"])
                    title = value.get("title") or ""
                    if not isinstance(title, str):
                        raise DataFileError(f"{where}: a passage's 'title' must be a string, found {title!r:.60}")
                    passage_id = (_check_id(value["docid"], "docid", where) if value.get("docid") is not None
                                  else content_id(text))
                    passages.append(SourcePassage(passage_id, text, clean_text(title), where))
                else:
                    raise DataFileError(f"{where}: each of '{key}' must be a text or an object with 'text', found "
                                        f"{value!r:.60}")
            return passages
        if required:
            raise DataFileError(f"{where}: no {' or '.join(repr(k) for k in keys)} field{hint}")
        return []


def open_collection(fmt: str, path: str | os.PathLike, split: str = "train") -> Collection:
    """The collection at `path` read as `fmt`; `split` names the one split of a pairs or tevatron file."""
    path = Path(path)
    if fmt == "beir":
        return BeirCollection(path)
    if fmt == "msmarco":
        return MsMarcoCollection(path)
    if fmt == "pairs":
        return PairsCollection(path, split)
    if fmt == "tevatron":
        return TevatronCollection(path, split)
    raise SourceLayoutError(f"--format {fmt} is not one of {', '.join(FORMATS)}")


def first_where(items: Iterator, predicate) -> Optional[str]:
    """The `where` of the first item for which `predicate` holds (to name a line once a check has failed)."""
    return next((item.where for item in items if predicate(item)), None)
