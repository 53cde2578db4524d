"""Relevance labels (qrels) for evaluation by judged passages: TREC's four columns `qid 0 docid grade`
(whitespace separated, as trec_eval reads them) or BEIR's TSV with the header `query-id corpus-id score`; plain
or gzipped. Grades are whole numbers (0: judged not relevant). Ids are strings as written. Any line that cannot be
read ends the run in one line naming the file and line."""
import logging
from pathlib import Path
from typing import Union

from dpr.data.data_files import DataFileError, open_text

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]
Qrels = dict[str, dict[str, int]]  # qid -> docid -> grade, the shape ir-measures and pytrec_eval take
BEIR_HEADER = ("query-id", "corpus-id", "score")
EXPECTED = ("expected TREC qrels ('qid 0 docid grade') or BEIR's TSV (header 'query-id corpus-id score', then "
            "'qid<TAB>docid<TAB>grade')")


def read_qrels(path: PathLike) -> Qrels:
    """The qrels of `path`; a (qid, docid) pair judged twice, a grade that is not a whole number or a line of
    another shape is a DataFileError."""
    qrels: Qrels = {}
    columns = None  # 4 (TREC) or 3 (BEIR), fixed by the first line
    with open_text(path) as reader:
        for line_number, line in enumerate(reader, start=1):
            fields = line.split()
            if not fields:
                continue
            where = f"{path}, line {line_number}"
            if columns is None:
                if tuple(fields) == BEIR_HEADER:
                    columns = 3
                    continue
                columns = len(fields)
                if columns not in (3, 4):
                    raise DataFileError(f"{where}: {len(fields)} columns; {EXPECTED}")
                if columns == 3:
                    raise DataFileError(f"{where}: 3 columns without BEIR's header line 'query-id corpus-id score'; "
                                        f"{EXPECTED}")
            if len(fields) != columns:
                raise DataFileError(f"{where}: {len(fields)} columns where the file's first line has {columns}; "
                                    f"{EXPECTED}")
            qid, docid, grade = (fields[0], fields[2], fields[3]) if columns == 4 else fields
            try:
                value = int(grade)
            except ValueError:
                raise DataFileError(f"{where}: the grade {grade!r} is not a whole number; {EXPECTED}") from None
            judged = qrels.setdefault(qid, {})
            if docid in judged:
                raise DataFileError(f"{where}: query {qid} judges passage {docid} a second time; keep one line "
                                    "per pair")
            judged[docid] = value
    if not qrels:
        raise DataFileError(f"{path}: holds no judgement; {EXPECTED}")
    logger.info("read %d judgements of %d queries from %s", sum(map(len, qrels.values())), len(qrels), path)
    return qrels
