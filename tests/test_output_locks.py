"""One embedding job per shard file and one retrieval per out_file (dpr/foundation/run_lock.py), and the temporaries a
killed retrieval left removed by the next one, as embedding removes its own."""
import os

import pytest

from dpr.data.embeddings_io import shard_path
from dpr.foundation.run_lock import OutputInUseError, lock_file_for, run_lock
from dpr.indexing.dense_retriever import results_path, run_dense_retriever
from dpr.indexing.generate_embeddings import generate_dense_embeddings
from tests.fixtures import forbid_calls
from tests.retrieval_helpers import gen_embs_config, retriever_config, tiny_model, write_passages_tsv, write_questions_csv


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("locks")
    model, psgs = tiny_model(folder / "bert"), write_passages_tsv(folder / "psgs.tsv")
    generate_dense_embeddings(gen_embs_config(model, psgs, folder / "embs" / "psgs", shard_id=0, num_shards=1))
    return {"model": model, "psgs": psgs, "qas": write_questions_csv(folder / "qas.csv"),
            "embs": str(folder / "embs" / "psgs_*")}


def retrieval(data, out_file, **values):
    return retriever_config(data["model"], data["qas"], data["psgs"], data["embs"], str(out_file), **values)


def test_a_killed_retrieval_leaves_temporaries_the_next_run_removes(data, tmp_path):
    """Every results file's temporary (one per retriever) goes; another out_file's stays."""
    out_file = tmp_path / "results.json"
    left = [tmp_path / f".{results_path(str(out_file), name, first).name}.abcd1234.tmp"
            for name, first in (("dense", True), ("bm25", False), ("hybrid", False))]
    others = tmp_path / ".results_other.json.abcd1234.tmp"
    for path in left + [others]:
        path.write_text("half a results file")
    run_dense_retriever(retrieval(data, out_file, retriever="[dense,bm25]"))
    assert not any(path.exists() for path in left) and others.exists()
    assert out_file.is_file() and not lock_file_for(out_file).exists()


def test_a_second_retrieval_into_one_out_file_is_refused_before_any_work(data, tmp_path, monkeypatch):
    out_file = tmp_path / "results.json"
    temporary = tmp_path / ".results.json.abcd1234.tmp"  # the first run's results, being written
    temporary.write_text("half")
    forbid_calls(monkeypatch, "dpr.indexing.retrieval_settings.QuestionSettings.load")
    with run_lock(out_file, "out_file"):
        with pytest.raises(OutputInUseError, match=rf"out_file={out_file} is in use by another run .*pid "
                                                   rf"{os.getpid()} on "):
            run_dense_retriever(retrieval(data, out_file))
    assert temporary.read_text() == "half" and not out_file.exists() and not lock_file_for(out_file).exists()


def test_one_embedding_job_per_shard_file(data, tmp_path, monkeypatch):
    """Two jobs of one shard (a sweep started twice) would remove each other's temporaries and write the shard
    twice: the second is refused; a job of another shard of the same out_file runs."""
    prefix = tmp_path / "embs" / "psgs"
    busy = shard_path(prefix, 0, "dpr")
    busy.parent.mkdir()
    temporary = busy.parent / f".{busy.name}.abcd1234.tmp"
    temporary.write_text("half a shard")
    with run_lock(busy, "out_file"):
        with pytest.raises(OutputInUseError, match=f"out_file={busy} is in use by another run"):
            generate_dense_embeddings(gen_embs_config(data["model"], data["psgs"], prefix, shard_id=0, num_shards=2))
        assert temporary.read_text() == "half a shard" and not busy.exists()
        other = generate_dense_embeddings(gen_embs_config(data["model"], data["psgs"], prefix, shard_id=1,
                                                          num_shards=2))
    assert other.is_file() and not lock_file_for(other).exists()
