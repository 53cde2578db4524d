"""BM25Index: ranking, parameters, stopwords, persistence, quietness, and accuracy on the real SQuAD-open data."""
import ast
import csv

import numpy as np
import pytest

from dpr.evaluation.qa_validation import has_answer
from dpr.indexing.bm25 import BM25Index, passage_text

PASSAGES = {
    "1": ("Denver Broncos", "The Broncos won Super Bowl 50 against the Carolina Panthers."),
    "2": ("Warsaw", "Warsaw is the capital and largest city of Poland."),
    "3": ("Oxygen", "Oxygen is a chemical element with symbol O and atomic number 8."),
    "4": ("Normans", "The Normans gave their name to Normandy, a region in France."),
}


@pytest.fixture(scope="module")
def index() -> BM25Index:
    return BM25Index.build(list(PASSAGES), [passage_text(title, text) for title, text in PASSAGES.values()])


def test_defaults_follow_the_dpr_paper(index):
    assert (index.model.k1, index.model.b) == (0.9, 0.4)
    assert index.remove_stopwords


def test_search_ranks_the_matching_passage_first(index):
    results = index.search(["capital of Poland", "which element has atomic number 8"], k=3)
    assert [ids[0] for ids, _ in results] == ["2", "3"]
    for ids, scores in results:
        assert len(ids) == 3 and scores.shape == (3,) and scores.dtype == np.float32
        assert np.all(np.diff(scores) <= 0)


def test_title_is_indexed(index):
    [(ids, scores)] = index.search(["Normans"], k=1)
    assert ids == ["4"] and scores[0] > 0


def test_k_is_capped_at_the_corpus_size(index):
    [(ids, scores)] = index.search(["Warsaw"], k=100)
    assert sorted(ids) == sorted(PASSAGES) and scores.shape == (len(PASSAGES),)
    assert index.search([], k=5) == []


def test_scores_agree_with_search(index):
    [(ids, scores)] = index.search(["Super Bowl Broncos"], k=4)
    all_scores = index.scores("Super Bowl Broncos")
    np.testing.assert_allclose([all_scores[index.ids.index(i)] for i in ids], scores, rtol=1e-6)
    assert not index.scores("unknownword").any()


def test_stopwords_are_optional():
    texts = ["the cat", "a dog"]
    assert not BM25Index.build(["a", "b"], texts).scores("the").any()
    assert BM25Index.build(["a", "b"], texts, remove_stopwords=False).scores("the")[0] > 0


def test_build_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="2 ids for 1 texts"):
        BM25Index.build(["a", "b"], ["only one"])


def test_save_load_round_trip_is_quiet(index, tmp_path, capsys):
    index.save(tmp_path / "bm25")
    loaded = BM25Index.load(tmp_path / "bm25")
    queries = ["capital of Poland", "Normandy region"]
    for (ids, scores), (loaded_ids, loaded_scores) in zip(index.search(queries, 4), loaded.search(queries, 4)):
        assert ids == loaded_ids
        np.testing.assert_array_equal(scores, loaded_scores)
    assert loaded.remove_stopwords == index.remove_stopwords
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_top20_accuracy_on_squad_open(shared_data):
    with open(shared_data / "squad_open" / "psgs.tsv", encoding="utf-8", newline="") as source:
        rows = list(csv.reader(source, delimiter="\t"))[1:]
    texts = {pid: text for pid, text, _ in rows}
    index = BM25Index.build([pid for pid, _, _ in rows], [passage_text(title, text) for _, text, title in rows])
    with open(shared_data / "squad_open" / "dev.qa.csv", encoding="utf-8", newline="") as source:
        qas = [(question, ast.literal_eval(answers)) for question, answers in csv.reader(source, delimiter="\t")][:300]
    results = index.search([question for question, _ in qas], k=20)
    hits = [any(has_answer(answers, texts[pid]) for pid in ids) for (_, answers), (ids, _) in zip(qas, results)]
    assert sum(hits) / len(hits) > 0.95  # the data README reports about 97% top-20 for BM25
