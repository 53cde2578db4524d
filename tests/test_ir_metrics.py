"""Evaluation by relevance labels: qrels read in both dialects, trec_eval's tie order, metrics equal to ir-measures
on the written run file and to values computed by hand, the queries of one file only counted and named, every
retriever judged end to end, and DPR's results JSON converted to a TREC run."""
import json
import math
import subprocess
import sys

import ir_measures
import pytest
from ir_measures import AP, R, RR, nDCG

from dpr.data.data_files import DataFileError
from dpr.data.qa_data import read_qa_file
from dpr.data.qrels import read_qrels
from dpr.evaluation.ir_metrics import (
    MetricsExtraMissing,
    QueryCoverage,
    TrecRunError,
    as_run,
    compute_metrics,
    report_measures,
    run_lines,
    trec_eval_provider,
    trec_order,
)
from dpr.foundation.errors import ConfigError
from dpr.indexing.dense_retriever import results_path, run_dense_retriever
from dpr.indexing.generate_embeddings import generate_dense_embeddings
from dpr.interop.results_to_trec import convert_results_to_trec
from tests.conftest import REPO_ROOT
from tests.fixtures import TOPICS, forbid_calls, retriever_results
from tests.retrieval_helpers import gen_embs_config, retriever_config, tiny_model, write_passages_tsv

# qid -> docid -> grade; q5 is judged but never asked
QRELS = {"q1": {"d1": 1, "d3": 2, "d5": 0}, "q2": {"d2": 1}, "q3": {"d9": 1}, "q5": {"d1": 1}}
# retrieved order (as a retriever gives it: d1 before d2 at the same score); q4 is asked but never judged
RANKINGS = {
    "q1": [("d1", 0.9), ("d2", 0.9), ("d3", 0.5), ("d4", 0.5), ("d5", 0.1)],
    "q2": [("d2", 1.0), ("d7", 1.0)],
    "q3": [("d1", 0.3)],
    "q4": [("d1", 0.2)],
}


def write_qrels_trec(path, qrels=QRELS):
    path.write_text("".join(f"{q} 0 {d} {g}\n" for q, docs in qrels.items() for d, g in docs.items()))
    return str(path)


def write_run(path, rankings=RANKINGS, tag="test"):
    path.write_text("".join(run_lines(list(rankings), list(rankings.values()), tag)))
    return str(path)


def test_trec_order_is_score_descending_then_docid_descending():
    assert trec_order([("d1", 0.9), ("d2", 0.9), ("d10", 0.9), ("d3", 0.5)]) == [
        ("d2", 0.9), ("d10", 0.9), ("d1", 0.9), ("d3", 0.5)]  # docids compare as strings, as trec_eval's strcmp


def test_the_written_run_ranks_as_trec_eval_reads_it(tmp_path):
    lines = [line.split() for line in open(write_run(tmp_path / "run.trec"))]
    assert [(q, d, int(rank)) for q, _, d, rank, _, _ in lines if q == "q1"] == [
        ("q1", "d2", 1), ("q1", "d1", 2), ("q1", "d4", 3), ("q1", "d3", 4), ("q1", "d5", 5)]
    assert all(len(line) == 6 and line[1] == "Q0" and line[5] == "test" for line in lines)


def test_metrics_equal_hand_computed_values_with_ties():
    """trec_eval's definitions: gains are the grades (not 2^g - 1), discount log2(rank + 1), relevant means
    grade >= 1, ties by docid descending. q1 ranks d2 d1 d4 d3 d5 (grades 0 1 0 2 0); q2 ranks d7 d2 (0 1); q3 finds
    nothing; q5 is judged but not asked (0, as ir-measures and trec_eval -c count it); q4 is not judged (left
    out): the mean is over q1, q2, q3 and q5."""
    log2 = math.log2
    ndcg_q1 = (1 / log2(3) + 2 / log2(5)) / (2 / log2(2) + 1 / log2(3))
    ndcg_q2 = (1 / log2(3)) / 1
    expected = {
        "nDCG@10": (ndcg_q1 + ndcg_q2 + 0 + 0) / 4,
        "RR@10": (1 / 2 + 1 / 2 + 0 + 0) / 4,
        "R@20": (1 + 1 + 0 + 0) / 4,
        "R@100": (1 + 1 + 0 + 0) / 4,
        "AP@100": ((1 / 2 + 2 / 4) / 2 + (1 / 2) / 1 + 0 + 0) / 4,
    }
    metrics = compute_metrics(QRELS, as_run(list(RANKINGS), list(RANKINGS.values())), report_measures(100))
    assert metrics.keys() == expected.keys()
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, abs=1e-12), name


def test_metrics_equal_ir_measures_on_the_written_files(tmp_path):
    run_file, qrels_file = write_run(tmp_path / "run.trec"), write_qrels_trec(tmp_path / "qrels.txt")
    ours = compute_metrics(read_qrels(qrels_file), as_run(list(RANKINGS), list(RANKINGS.values())),
                           report_measures(1000))
    measures = [nDCG @ 10, RR @ 10, R @ 20, R @ 100, AP @ 1000]
    direct = trec_eval_on_files(measures, qrels_file, run_file)
    assert list(ours) == [str(measure) for measure in measures]
    for measure in measures:
        assert abs(ours[str(measure)] - direct[measure]) < 1e-9


def trec_eval_on_files(measures, qrels_file, run_file) -> dict:
    """trec_eval (ir-measures' pytrec_eval provider) on the files as written. Its recip_rank has no cutoff, so
    RR@k is recip_rank on each query's lines of rank <= k (the file's ranks are trec_eval's order): what
    `trec_eval -M k -m recip_rank` computes."""
    qrels = list(ir_measures.read_trec_qrels(str(qrels_file)))
    direct = {}
    for measure in measures:
        lines = list(map(str.split, open(run_file)))
        if measure.NAME == "RR" and measure["cutoff"] is not None:
            lines, measure_asked = [line for line in lines if int(line[3]) <= measure["cutoff"]], RR
        else:
            measure_asked = measure
        run = [ir_measures.ScoredDoc(q, d, float(score)) for q, _, d, _, score, _ in lines]
        direct[measure] = ir_measures.pytrec_eval.calc_aggregate([measure_asked], qrels, run)[measure_asked]
    return direct


def test_rr_at_10_is_zero_beyond_rank_10_and_ties_are_cut_in_trec_eval_order():
    """ir-measures' pytrec_eval provider, asked for RR@10, gives RR at the full depth (trec_eval has no RR
    cutoff): a first relevant passage at rank 21 must count 0, not 1/21. At the cut, tied scores are ordered as
    trec_eval orders them (docid descending), so which tied passage makes the first 10 is trec_eval's choice."""
    qrels = {"deep": {"d21": 1}, "tied": {"a": 1}}
    run = {"deep": {f"d{i:02d}": 100.0 - i for i in range(1, 30)},
           # 9 passages above, then a and b tied at the 10th place: trec_eval puts b (docid descending) 10th
           "tied": {**{f"x{i}": 10.0 + i for i in range(9)}, "a": 1.0, "b": 1.0}}
    assert compute_metrics(qrels, run, ["RR@10"]) == {"RR@10": 0.0}
    run["tied"]["a"] = 1.5  # a alone at the 10th place
    assert compute_metrics(qrels, run, ["RR@10"]) == {"RR@10": (0 + 1 / 10) / 2}
    assert ir_measures.calc_aggregate([RR @ 10], qrels, run)[RR @ 10] == (0 + 1 / 10) / 2


def test_an_id_a_run_cannot_hold_is_one_line():
    with pytest.raises(TrecRunError, match="the query id 'a b' is empty or holds whitespace"):
        list(run_lines(["a b"], [[("d1", 1.0)]], "tag"))
    with pytest.raises(TrecRunError, match="the passage id ''"):
        list(run_lines(["q"], [[("", 1.0)]], "tag"))


def test_measures_deeper_than_the_run_are_left_out_and_ap_goes_to_the_depth():
    assert report_measures(5) == ["AP@5"]
    assert report_measures(20) == ["nDCG@10", "RR@10", "R@20", "AP@20"]
    assert report_measures(5000) == ["nDCG@10", "RR@10", "R@20", "R@100", "AP@1000"]


def test_beir_and_trec_qrels_read_the_same(tmp_path):
    beir = tmp_path / "test.tsv"
    beir.write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q}\t{d}\t{g}\n" for q, docs in QRELS.items() for d, g in docs.items()))
    assert read_qrels(beir) == read_qrels(write_qrels_trec(tmp_path / "qrels.txt")) == QRELS


@pytest.mark.parametrize("content, message", [
    ("q1 0 d1\n", r"line 1: 3 columns without BEIR's header"),
    ("q1 0 d1 1\nq1 d2 1\n", r"line 2: 3 columns where the file's first line has 4"),
    ("q1 0 d1 high\n", r"line 1: the grade 'high' is not a whole number"),
    ("q1 0 d1 1\nq1 0 d1 2\n", r"line 2: query q1 judges passage d1 a second time"),
    ("q1 d1\n", r"line 1: 2 columns"),
    ("\n", r"holds no judgement"),
])
def test_a_bad_qrels_file_is_one_line_naming_file_and_line(tmp_path, content, message):
    path = tmp_path / "qrels.txt"
    path.write_text(content)
    with pytest.raises(DataFileError, match=message) as error:
        read_qrels(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_queries_of_one_file_only_are_counted_and_named():
    coverage = QueryCoverage.of(list(RANKINGS), QRELS)
    assert (coverage.evaluated, coverage.judged_not_asked, coverage.asked_not_judged) == (4, ["q5"], ["q4"])
    line = coverage.line("qrels.txt", "queries.jsonl")
    assert line == ("1 queries of qrels=qrels.txt are not in queries.jsonl (q5): they count 0; 1 queries of "
                    "queries.jsonl have no judgement in the qrels (q4): they are left out; the qrels metrics average "
                    "over the 4 judged queries")
    many = QueryCoverage.of([], [f"q{i}" for i in range(8)])
    assert "8 queries of qrels=a are not in b (q0, q1, q2, q3, q4, ... (3 more))" in many.line("a", "b")
    assert QueryCoverage.of(["q1"], {"q1": {}}).line("a", "b") is None


def test_a_missing_metrics_extra_is_one_line_naming_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "pytrec_eval", None)
    with pytest.raises(MetricsExtraMissing, match=r"pip install -e '\.\[metrics\]'"):
        trec_eval_provider()


def test_a_queries_file_may_leave_out_answers_when_it_gives_ids(tmp_path):
    path = tmp_path / "test.queries.jsonl"
    path.write_text('{"id": "q1", "question": "a?", "answers": []}\n{"id": 7, "question": "b?"}\n')
    samples = read_qa_file(path)
    assert [(s.id, s.question, s.answers) for s in samples] == [("q1", "a?", []), ("7", "b?", [])]
    path.write_text('{"question": "a?"}\n')
    with pytest.raises(DataFileError, match="line 1: no 'answer' key"):
        read_qa_file(path)


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The retrieval fixture's 23 passages embedded by a tiny model; its 12 capital questions as a queries file
    with ids (answers for half of them), and qrels judging each capital's passage, plus one query never asked."""
    folder = tmp_path_factory.mktemp("judged")
    model = tiny_model(folder / "bert")
    psgs = write_passages_tsv(folder / "psgs.tsv")
    generate_dense_embeddings(gen_embs_config(model, psgs, folder / "embs" / "psgs"))
    queries = folder / "test.queries.jsonl"
    queries.write_text("".join(json.dumps({"id": f"q{i}", "question": f"what is the capital of {country}?",
                                           "answers": [city] if i % 2 == 0 else []}) + "\n"
                               for i, (city, country, _) in enumerate(TOPICS)))
    qrels = folder / "test.qrels.tsv"
    qrels.write_text("".join(f"q{i}\t0\t{i + 1}\t1\n" for i in range(len(TOPICS))) + "lost\t0\t3\t1\n")
    return {"model": model, "psgs": psgs, "queries": str(queries), "qrels": str(qrels),
            "embs": str(folder / "embs" / "psgs_*")}


def run(data, tmp_path, **values):
    cfg = retriever_config(data["model"], data["queries"], data["psgs"], data["embs"], str(tmp_path / "res.json"),
                           **values)
    return run_dense_retriever(cfg)


def test_every_retriever_is_judged_and_its_metrics_equal_ir_measures_on_its_run_file(data, tmp_path, capsys):
    metrics_file, run_file = tmp_path / "metrics.json", tmp_path / "run.trec"
    stats = run(data, tmp_path, retriever="[dense,bm25,hybrid]", qrels=data["qrels"], metrics_file=metrics_file,
                trec_run_file=run_file, n_docs=20)
    printed = capsys.readouterr().out
    report = json.loads(metrics_file.read_text())
    assert list(report["retrievers"]) == list(stats) == ["dense", "bm25", "hybrid"]  # answer table kept beside
    assert report["measures"] == ["nDCG@10", "RR@10", "R@20", "AP@20"]
    assert (report["evaluated_queries"], report["judged_not_in_queries"], report["queries_not_judged"]) == (
        13, ["lost"], [])
    assert "1 queries of qrels=" in printed and "(lost)" in printed
    measures = [ir_measures.parse_measure(name) for name in report["measures"]]
    for position, name in enumerate(["dense", "bm25", "hybrid"]):
        path = str(results_path(str(run_file), name, position == 0))
        direct = trec_eval_on_files(measures, data["qrels"], path)
        for measure in measures:
            assert abs(report["retrievers"][name][str(measure)] - direct[measure]) < 1e-9, (name, measure)
        lines = [line.split() for line in open(path)]
        assert len(lines) == 12 * 20 and {line[5] for line in lines} == {name}
    assert report["retrievers"]["bm25"]["RR@10"] == 12 / 13  # every capital's passage first; "lost" counts 0
    # the results JSON carries the ids, and converted it ranks as the TREC run written beside it
    converted = tmp_path / "converted.trec"
    convert_results_to_trec(results_path(str(tmp_path / "res.json"), "bm25", False), converted, "bm25")
    ranks = [[line.split()[:4] for line in open(path)] for path in (converted, tmp_path / "run.bm25.trec")]
    assert ranks[0] == ranks[1] and ranks[0][0][0] == "q0"


def test_a_queries_file_without_answers_gets_the_metrics_alone(data, tmp_path, capsys):
    queries = tmp_path / "test.queries.jsonl"
    queries.write_text("".join(json.dumps({"id": f"q{i}", "question": f"what is the capital of {country}?"}) + "\n"
                               for i, (_, country, _) in enumerate(TOPICS)))
    cfg = retriever_config(data["model"], str(queries), data["psgs"], data["embs"], str(tmp_path / "res.json"),
                           retriever="bm25", qrels=data["qrels"], metrics_file=tmp_path / "m.json")
    stats = run_dense_retriever(cfg)
    printed = capsys.readouterr().out
    assert stats["bm25"].questions_without_answers == 12 and stats["bm25"].top_k_hits == [0] * 20
    assert "Validation results" not in printed and "nDCG@10" in printed
    assert json.loads((tmp_path / "m.json").read_text())["retrievers"]["bm25"]["RR@10"] == 12 / 13


def test_bad_qrels_end_the_run_before_any_retrieval(data, tmp_path, monkeypatch):
    forbid_calls(monkeypatch, "dpr.indexing.dense_retriever.retrieve")
    bad = tmp_path / "qrels.txt"
    bad.write_text("q0 0 1 yes\n")
    with pytest.raises(DataFileError, match=r"line 1: the grade 'yes' is not a whole number"):
        run(data, tmp_path, qrels=bad)
    with pytest.raises(ConfigError, match="^metrics_file needs qrels"):
        run(data, tmp_path, metrics_file=tmp_path / "m.json")


def test_qrels_that_judge_none_of_the_queries_end_the_run(data, tmp_path, monkeypatch):
    forbid_calls(monkeypatch, "dpr.indexing.dense_retriever.retrieve")
    other = tmp_path / "other.qrels"
    other.write_text("x 0 1 1\n")
    with pytest.raises(DataFileError, match=r"no query of .* is judged in qrels=.*: the ids differ"):
        run(data, tmp_path, qrels=other)


def test_qrels_need_question_ids(data, tmp_path):
    qas = tmp_path / "qas.csv"
    qas.write_text("what is the capital of france?\t['paris']\n")
    cfg = retriever_config(data["model"], str(qas), data["psgs"], data["embs"], str(tmp_path / "res.json"),
                           qrels=data["qrels"])
    with pytest.raises(DataFileError, match="qrels judge queries by id, but 1 of the 1 questions"):
        run_dense_retriever(cfg)


# ------------------------------------------------------------------------------------------------ results to run
def test_a_dpr_results_json_becomes_a_trec_run(tmp_path):
    records = retriever_results(3, passages_per_question=4)
    records[1]["ctxs"][1]["score"] = records[1]["ctxs"][0]["score"]  # a tie: trec_eval's order decides
    records[2]["id"] = "last"
    results = tmp_path / "results.json"
    results.write_text(json.dumps(records))
    written = convert_results_to_trec(results, tmp_path / "run.trec", "dpr")
    lines = [line.split() for line in open(tmp_path / "run.trec")]
    assert written == (3, 12) and len(lines) == 12
    assert [line[0] for line in lines[::4]] == ["0", "1", "last"]  # the record's id, else its position
    tied = [line for line in lines if line[0] == "1"][:2]
    first, second = sorted([records[1]["ctxs"][0]["id"], records[1]["ctxs"][1]["id"]], reverse=True)
    assert [(line[2], line[3]) for line in tied] == [(first, "1"), (second, "2")]
    assert all(line[1] == "Q0" and line[5] == "dpr" for line in lines)


def test_a_results_file_of_another_shape_is_one_line(tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"question": "q", "ctxs": [{"id": "1"}]}]))
    with pytest.raises(DataFileError, match=r"record 0, ctxs\[0\]: .*'score'"):
        convert_results_to_trec(results, tmp_path / "run.trec", "dpr")


def test_the_converter_script_writes_the_run_and_says_a_bad_file_in_one_line(tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps(retriever_results(2, passages_per_question=3)))
    script = [sys.executable, str(REPO_ROOT / "convert_results_to_trec.py"), "--output", str(tmp_path / "run.trec")]
    done = subprocess.run(script + ["--input", str(results)], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0 and len((tmp_path / "run.trec").read_text().splitlines()) == 6
    results.write_text('{"question": "q"}')
    failed = subprocess.run(script + ["--input", str(results)], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert failed.returncode == 1 and failed.stderr.strip().splitlines() == [
        f"error: {results}: expected a JSON list of samples, found dict"]
