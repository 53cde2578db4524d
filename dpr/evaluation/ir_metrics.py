"""Evaluation by relevance labels: nDCG@10, RR@10 (MRR@10 when averaged), Recall@20, Recall@100 and AP to the depth
retrieved (at most 1000), and rankings written as TREC runs.

- The metrics are ir-measures' pytrec_eval provider's, that is trec_eval's own code, asked for explicitly: the
  default pipeline of ir-measures 0.4 computes RR through its msmarco provider, which orders tied scores by another
  rule than trec_eval, so one run's metrics would mix two orders.
- trec_eval's reciprocal rank has no cutoff, and the provider, asked for RR@10, silently gives RR at the full
  depth (1/21 for a first relevant passage at rank 21). RR@k is therefore trec_eval's RR over each query's first
  k passages in trec_eval's order, what `trec_eval -M k -m recip_rank` computes.
- trec_eval ignores a run's rank column and orders each query's passages by score, descending, ties by docid,
  descending (strcmp). `trec_order` gives that order, so a written run's ranks say what trec_eval and the metrics
  see; scores are written with `repr` (exact: read back they are the same doubles).
- The metrics average over every judged query, as ir-measures does (trec_eval's `-c`): a judged query that was not
  asked, or got no passage, counts 0; an asked query without judgement cannot be scored and is left out. Both
  kinds are counted and named (`QueryCoverage`), never dropped silently.
"""
import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

from dpr.foundation.errors import UserInputError

Run = dict[str, dict[str, float]]  # qid -> docid -> score, the shape ir-measures and pytrec_eval take
RankedDocs = Sequence[tuple[str, float]]
MAX_AP_DEPTH = 1000
# (measure, cutoff) of the report; AP's cutoff is the depth retrieved (at most MAX_AP_DEPTH)
CUTOFF_MEASURES = (("nDCG", 10), ("RR", 10), ("R", 20), ("R", 100))
METRICS_EXTRA = "qrels metrics need the metrics extra (ir-measures, pytrec_eval-terrier): pip install -e '.[metrics]'"
NAMES_SHOWN = 5


class MetricsExtraMissing(UserInputError):
    """ir-measures or its pytrec_eval provider is not installed."""


class TrecRunError(UserInputError):
    """An id that a TREC run cannot hold."""


def report_measures(depth: int) -> list[str]:
    """The measures' names (ir-measures' syntax) for a run `depth` passages deep: those whose cutoff is deeper than
    the run are left out (Recall@100 of 20 passages is Recall@20), AP goes to the depth (at most 1000)."""
    names = [f"{measure}@{cutoff}" for measure, cutoff in CUTOFF_MEASURES if cutoff <= depth]
    return names + [f"AP@{min(depth, MAX_AP_DEPTH)}"]


def trec_eval_provider():
    """ir-measures' pytrec_eval provider, or one line naming the extra."""
    try:
        import ir_measures
        import pytrec_eval  # noqa: F401  (the provider's engine; ir-measures installs without it)
    except ImportError as error:
        raise MetricsExtraMissing(f"{METRICS_EXTRA} ({error})") from None
    return ir_measures.pytrec_eval


def compute_metrics(qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Mapping[str, float]],
                    measure_names: Sequence[str]) -> dict[str, float]:
    """The mean of each measure over the judged queries (ir-measures': those not in `run` count 0)."""
    import ir_measures

    provider = trec_eval_provider()
    measures = {name: ir_measures.parse_measure(name) for name in measure_names}
    supported = [measure for measure in measures.values() if provider.supports(measure)]
    computed = dict(provider.calc_aggregate(supported, qrels, run)) if supported else {}
    values = {}
    for name, measure in measures.items():
        if measure in computed:
            values[name] = computed[measure]
        elif measure.NAME == "RR" and measure["cutoff"] is not None:
            uncut = ir_measures.RR(**{k: v for k, v in measure.params.items() if k != "cutoff"})
            values[name] = provider.calc_aggregate([uncut], qrels, cut_run(run, measure["cutoff"]))[uncut]
        else:
            raise ValueError(f"trec_eval cannot compute {name}")
    return {name: float(value) for name, value in values.items()}


def cut_run(run: Mapping[str, Mapping[str, float]], depth: int) -> Run:
    """Each query's first `depth` passages in trec_eval's order."""
    return {qid: dict(trec_order(docs.items())[:depth]) for qid, docs in run.items()}


def trec_order(ranked: Iterable[tuple[str, float]]) -> list[tuple[str, float]]:
    """(docid, score) in trec_eval's order: score descending, then docid descending."""
    return sorted(ranked, key=lambda pair: (pair[1], pair[0]), reverse=True)


def _check_id(value: str, what: str) -> str:
    if not value or any(character.isspace() for character in value):
        raise TrecRunError(f"the {what} {value!r} is empty or holds whitespace, which a TREC run's columns cannot "
                           "hold: give ids without spaces")
    return value


def run_lines(qids: Sequence[str], rankings: Sequence[RankedDocs], tag: str) -> Iterable[str]:
    """`qid Q0 docid rank score tag` lines, each query's passages in trec_eval's order, ranks from 1."""
    _check_id(tag, "run tag")
    for qid, ranked in zip(qids, rankings):
        _check_id(qid, "query id")
        for rank, (docid, score) in enumerate(trec_order(ranked), start=1):
            yield f"{qid} Q0 {_check_id(docid, 'passage id')} {rank} {float(score)!r} {tag}\n"


def as_run(qids: Sequence[str], rankings: Sequence[RankedDocs]) -> Run:
    return {qid: {docid: float(score) for docid, score in ranked} for qid, ranked in zip(qids, rankings)}


def _some(names: Sequence[str]) -> str:
    shown = ", ".join(names[:NAMES_SHOWN])
    return shown + (f", ... ({len(names) - NAMES_SHOWN} more)" if len(names) > NAMES_SHOWN else "")


@dataclass(frozen=True)
class QueryCoverage:
    """The queries the metrics average over (every judged one) and those in one file only."""

    evaluated: int
    judged_not_asked: list[str] = field(default_factory=list)  # in the qrels, not in the queries file
    asked_not_judged: list[str] = field(default_factory=list)  # in the queries file, not in the qrels

    @classmethod
    def of(cls, query_ids: Sequence[str], judged: Iterable[str]) -> "QueryCoverage":
        asked, judged = list(dict.fromkeys(query_ids)), list(dict.fromkeys(judged))
        asked_set, judged_set = set(asked), set(judged)
        return cls(len(judged), [q for q in judged if q not in asked_set], [q for q in asked if q not in judged_set])

    def line(self, qrels_path: str, queries_path: str) -> Optional[str]:
        """One line counting and naming the queries left out, or None when both files hold the same queries."""
        parts = []
        if self.judged_not_asked:
            parts.append(f"{len(self.judged_not_asked)} queries of qrels={qrels_path} are not in {queries_path} "
                         f"({_some(self.judged_not_asked)}): they count 0")
        if self.asked_not_judged:
            parts.append(f"{len(self.asked_not_judged)} queries of {queries_path} have no judgement in the qrels "
                         f"({_some(self.asked_not_judged)}): they are left out")
        if not parts:
            return None
        return "; ".join(parts) + f"; the qrels metrics average over the {self.evaluated} judged queries"


def format_metrics(metrics: Mapping[str, Mapping[str, float]], evaluated: int) -> str:
    """One row per retriever, one column per measure."""
    names = list(next(iter(metrics.values())))
    lines = [f"{'retriever':>10} | " + " | ".join(f"{name:>8}" for name in names)
             + f"   ({evaluated} judged queries)"]
    for retriever, values in metrics.items():
        lines.append(f"{retriever:>10} | " + " | ".join(
            f"{values[name]:>8.4f}" if not math.isnan(values[name]) else f"{'nan':>8}" for name in names))
    return "\n".join(lines)
