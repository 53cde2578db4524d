"""DPR's retriever results JSON (`question`, `answers`, `ctxs` with `id` and `score`, as DPR and dense_retriever.py
write it) as a TREC run, `qid Q0 docid rank score tag`, each question's passages in trec_eval's order (score
descending, ties by docid descending). The qid is the record's `id` when it has one, else its 0-based position in
the file (the line of the qas file it was retrieved for). Passage ids are written as the file holds them."""
import logging
from pathlib import Path
from typing import Union

from dpr.data.biencoder_data import iter_json_records
from dpr.data.data_files import DataFileError
from dpr.evaluation.ir_metrics import TrecRunError, run_lines
from dpr.foundation.files import atomic_output, ensure_writable_output

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]


def _ranking(record: object, where: str) -> list[tuple[str, float]]:
    if not isinstance(record, dict) or not isinstance(record.get("ctxs"), list):
        raise DataFileError(f"{where}: expected an object with 'ctxs', a list of passages (DPR's results JSON)")
    ranking = []
    for position, ctx in enumerate(record["ctxs"]):
        try:
            ranking.append((str(ctx["id"]), float(ctx["score"])))
        except (TypeError, KeyError, ValueError) as error:
            raise DataFileError(f"{where}, ctxs[{position}]: a passage needs an 'id' and a numeric 'score' "
                                f"({type(error).__name__}: {error})") from None
    return ranking


def convert_results_to_trec(results_file: PathLike, run_file: PathLike, tag: str) -> tuple[int, int]:
    """Write `run_file` from `results_file`; returns (queries, lines) written."""
    ensure_writable_output(run_file, "the run file")
    queries = lines = 0
    with atomic_output(run_file) as temporary:
        with open(temporary, "w", encoding="utf-8") as writer:
            for position, (location, record) in enumerate(iter_json_records(str(results_file))):
                where = f"{results_file}: {location}"
                ranking = _ranking(record, where)
                qid = str(record["id"]) if record.get("id") is not None else str(position)
                try:
                    written = list(run_lines([qid], [ranking], tag))
                except TrecRunError as error:
                    raise DataFileError(f"{where}: {error}") from None
                writer.writelines(written)
                queries, lines = queries + 1, lines + len(written)
    if not queries:
        raise DataFileError(f"{results_file}: holds no results record")
    logger.info("wrote %d lines for %d queries to %s", lines, queries, run_file)
    return queries, lines
