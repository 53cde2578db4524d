"""Retrieval judged by relevance labels (`qrels=`), beside DPR's answer-string table: each retriever's ranking
written as a TREC run (`trec_run_file=`) and its nDCG@10, RR@10, R@20, R@100 and AP (`dpr.evaluation.ir_metrics`)
printed and written as JSON (`metrics_file=`).

A query's id is its question's `id` (a queries file's, or a qas CSV's `id_col`), else its 0-based position in the
question files (only without qrels: qrels judge by id). Passage ids are written without their source's
`id_prefix` (`wiki:`), as the passages file and qrels name them.
"""
import json
import logging
from dataclasses import dataclass
from typing import Optional, Sequence

from dpr.data.ctx_sources import CtxSource, strip_source_prefix
from dpr.data.data_files import DataFileError
from dpr.data.qa_data import QASample
from dpr.data.qrels import Qrels, read_qrels
from dpr.evaluation.ir_metrics import (
    QueryCoverage,
    as_run,
    compute_metrics,
    format_metrics,
    report_measures,
    run_lines,
    trec_eval_provider,
)
from dpr.evaluation.qa_validation import RetrievedDocs
from dpr.foundation.files import atomic_output

logger = logging.getLogger(__name__)


def query_ids(samples: Sequence[QASample], files: Sequence[str], ids_needed: bool) -> list[str]:
    """Each question's id, else (`ids_needed` false) its position; ids must be unique."""
    if ids_needed:
        missing = [position for position, sample in enumerate(samples) if sample.id is None]
        if missing:
            raise DataFileError(
                f"qrels judge queries by id, but {len(missing)} of the {len(samples)} questions of {', '.join(files)} "
                f"have none (the first: {samples[missing[0]].question!r:.80}): give a queries file with ids "
                "(JSON lines with 'id' and 'question', as convert_to_dpr.py writes) or a dataset entry with id_col")
    ids = [sample.id if sample.id is not None else str(position) for position, sample in enumerate(samples)]
    seen: set[str] = set()
    for qid in ids:
        if qid in seen:
            raise DataFileError(f"{', '.join(files)}: the query id {qid!r} is given to two questions; ids must be "
                                "unique for the TREC run and the qrels metrics")
        seen.add(qid)
    return ids


@dataclass
class JudgedEvaluation:
    """What the judged evaluation of one run needs, prepared before any retrieval (a bad qrels file or a missing
    extra ends the run at its start)."""

    query_ids: list[str]
    qrels: Optional[Qrels]
    qrels_path: Optional[str]
    coverage: Optional[QueryCoverage]

    @classmethod
    def prepare(cls, samples: Sequence[QASample], question_files: Sequence[str], qrels_path: Optional[str]
                ) -> "JudgedEvaluation":
        if qrels_path:
            trec_eval_provider()  # the extra, before hours of retrieval
        ids = query_ids(samples, question_files, ids_needed=bool(qrels_path))
        if not qrels_path:
            return cls(ids, None, None, None)
        qrels = read_qrels(qrels_path)
        coverage = QueryCoverage.of(ids, qrels)
        line = coverage.line(qrels_path, ", ".join(question_files))
        if line:
            print(line, flush=True)
        if len(coverage.judged_not_asked) == len(qrels):
            raise DataFileError(f"no query of {', '.join(question_files)} is judged in qrels={qrels_path}: the ids "
                                f"differ (queries {ids[:3]}..., qrels {list(qrels)[:3]}...)")
        return cls(ids, qrels, qrels_path, coverage)

    def rankings(self, results: Sequence[RetrievedDocs], sources: Sequence[CtxSource]) -> list[list[tuple]]:
        return [[(strip_source_prefix(str(doc_id), sources), float(score)) for doc_id, score in zip(ids, scores)]
                for ids, scores in results]

    def write_run(self, path: str, rankings: Sequence[Sequence[tuple]], tag: str) -> None:
        with atomic_output(path) as temporary:
            with open(temporary, "w", encoding="utf-8") as writer:
                writer.writelines(run_lines(self.query_ids, rankings, tag))
        logger.info("wrote the TREC run %s", path)

    def metrics(self, rankings: Sequence[Sequence[tuple]], depth: int) -> dict[str, float]:
        return compute_metrics(self.qrels, as_run(self.query_ids, rankings), report_measures(depth))

    def report(self, metrics: dict[str, dict[str, float]], depth: int, metrics_file: Optional[str]) -> dict:
        """Print the metrics table; write it as JSON when `metrics_file` is set."""
        print(format_metrics(metrics, self.coverage.evaluated), flush=True)
        report = {
            "qrels": self.qrels_path,
            "measures": report_measures(depth),
            "depth": depth,
            "queries": len(self.query_ids),
            "judged_queries": len(self.qrels),
            "evaluated_queries": self.coverage.evaluated,
            "judged_not_in_queries": self.coverage.judged_not_asked,
            "queries_not_judged": self.coverage.asked_not_judged,
            "library": "ir-measures (pytrec_eval provider: trec_eval's measures and tie order)",
            "retrievers": metrics,
        }
        if metrics_file:
            with atomic_output(metrics_file) as temporary:
                with open(temporary, "w", encoding="utf-8") as writer:
                    json.dump(report, writer, indent=2)
                    writer.write("\n")
        return report
