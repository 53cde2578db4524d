"""BM25Index: ranking, parameters, stopwords, persistence, quietness, and accuracy on the real SQuAD-open data."""
import ast
import csv
import errno
import os

import bm25s
import numpy as np
import pytest

from dpr.evaluation.qa_validation import has_answer
from dpr.foundation.errors import UserInputError
from dpr.foundation.files import OutputWriteError
from dpr.indexing.bm25 import IDS_FILE, BM25Index, check_index_location, passage_text

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


# ------------------------------------------------------------------------------------------------ whole indexes
def interrupted_save(monkeypatch, error):
    """bm25s's save, stopped by `error` after its first file."""
    original = bm25s.BM25.save

    def save(self, directory, **kwargs):
        original(self, directory, **kwargs)
        first = sorted(os.listdir(directory))[0]
        for name in os.listdir(directory):
            if name != first:
                os.remove(os.path.join(directory, name))
        raise error

    monkeypatch.setattr(bm25s.BM25, "save", save)


def test_a_killed_save_leaves_no_index_under_its_name_and_the_next_clears_its_temporaries(index, tmp_path,
                                                                                           monkeypatch):
    """A partial index folder under bm25_index_path was loaded by every later run (or failed in bm25s's code)."""
    interrupted_save(monkeypatch, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        index.save(tmp_path / "bm25")
    assert not (tmp_path / "bm25").exists()
    monkeypatch.undo()
    for leftover in list(tmp_path.iterdir()):  # as a kill -9 leaves it: the temporary folder stays
        assert leftover.name.startswith(".bm25.") and leftover.name.endswith(".tmp")
    (tmp_path / ".bm25.k1ll3d00.tmp").mkdir()
    (tmp_path / ".bm25.k1ll3d00.tmp" / "vocab.index.json").write_text("partial")
    index.save(tmp_path / "bm25")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bm25"]
    assert BM25Index.load(tmp_path / "bm25").search(["Warsaw"], 1)[0][0] == ["2"]


def test_a_full_disk_names_the_index_and_keeps_the_previous_one(index, tmp_path, monkeypatch):
    BM25Index.build(["x"], ["a previous index"]).save(tmp_path / "bm25")
    interrupted_save(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    with pytest.raises(OutputWriteError, match=f"^could not write {tmp_path / 'bm25'}: no space left on device"):
        index.save(tmp_path / "bm25")
    assert BM25Index.load(tmp_path / "bm25").ids == ["x"] and sorted(os.listdir(tmp_path)) == ["bm25"]


def test_saving_over_a_previous_index_replaces_it_whole(index, tmp_path):
    BM25Index.build(["x"], ["a previous index"]).save(tmp_path / "bm25")
    index.save(tmp_path / "bm25")
    assert BM25Index.load(tmp_path / "bm25").ids == index.ids and sorted(os.listdir(tmp_path)) == ["bm25"]


def test_an_incomplete_index_folder_is_one_line_naming_it(index, tmp_path):
    index.save(tmp_path / "bm25")
    os.remove(tmp_path / "bm25" / IDS_FILE)
    with pytest.raises(UserInputError, match=f"^{tmp_path / 'bm25'} is not a complete BM25 index .*{IDS_FILE}"):
        BM25Index.load(tmp_path / "bm25")


def test_the_index_location_is_checked_before_the_work(index, tmp_path):
    check_index_location(tmp_path / "new" / "bm25", "bm25_index_path")  # to be built: its folder can take it
    index.save(tmp_path / "saved")
    check_index_location(tmp_path / "saved", "bm25_index_path")  # to be loaded
    with pytest.raises(UserInputError, match="^bm25_index_path=/proc/nope/bm25: its folder /proc/nope is not one"):
        check_index_location("/proc/nope/bm25", "bm25_index_path")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserInputError, match=f"^bm25_index_path={tmp_path / 'a_file'} is a file, not a BM25 index"):
        check_index_location(tmp_path / "a_file", "bm25_index_path")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match=f"^bm25_index_path={tmp_path / 'empty'}: {tmp_path / 'empty'} is not a "
                                             "complete BM25 index"):
        check_index_location(tmp_path / "empty", "bm25_index_path")
