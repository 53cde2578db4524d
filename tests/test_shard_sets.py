"""A shard set is searched whole, once, and only when consistent: one file per shard id, no id missing, no
record-less shard among recorded ones; a re-embed never leaves an old shard searchable; every output is checked
before the work and written atomically."""
import errno
import os
import pickle

import numpy as np
import pytest

from dpr.data import embeddings_io
from dpr.data.embeddings_io import shard_path
from dpr.foundation.files import OutputWriteError, UnwritableDirectoryError
from dpr.indexing import configured_index, faiss_indexers, generate_embeddings
from dpr.indexing.configured_index import ShardSearchOptionError
from dpr.indexing.shard_provenance import ShardProvenanceError, read_provenance, sidecar_path
from dpr.indexing.shard_search import search_shards
from dpr.data.embeddings_io import ShardFileError, write_embeddings
from tests.test_shard_provenance import _retrieve, data, embed  # noqa: F401  (the module's fixture)
from tests.fixtures import forbid_calls
from tests.retrieval_helpers import retriever_config
from dpr.indexing.dense_retriever import run_dense_retriever


def _retrieve_with(data, embeddings, tmp_path, **values):
    cfg = retriever_config(data["model"], data["qas"], data["psgs"], embeddings, str(tmp_path / "results.json"),
                           n_docs=5, **values)
    return run_dense_retriever(cfg)


def test_one_shard_in_two_formats_is_refused(data, tmp_path):
    embed(data, tmp_path / "emb")
    embed(data, tmp_path / "emb", out_format="npz")
    with pytest.raises(ShardProvenanceError, match=r"emb_0 and .*emb_0\.npz are both shard 0"):
        _retrieve(data, str(tmp_path / "emb_*"), tmp_path)


@pytest.mark.parametrize("shard_search", [False, True])
def test_a_missing_shard_is_refused(data, tmp_path, shard_search):
    for shard_id in range(3):
        embed(data, tmp_path / "emb", shard_id=shard_id, num_shards=3)
    os.unlink(tmp_path / "emb_1")
    with pytest.raises(ShardProvenanceError, match=r"lack shard\(s\) 1 of 3"):
        _retrieve_with(data, str(tmp_path / "emb_*"), tmp_path, shard_search=shard_search)


def test_a_record_less_shard_among_recorded_ones_is_refused(data, tmp_path):
    for shard_id in range(2):
        embed(data, tmp_path / "emb", shard_id=shard_id, num_shards=2)
    sidecar_path(tmp_path / "emb_0").unlink()
    with pytest.raises(ShardProvenanceError, match=r"emb_0 has no provenance record"):
        _retrieve(data, str(tmp_path / "emb_*"), tmp_path)


def test_an_interrupted_re_embed_leaves_no_stale_shard(data, tmp_path, monkeypatch):
    """Killed while the new model encodes: the old shard must not stay searchable without its record."""
    for shard_id in range(2):
        embed(data, tmp_path / "emb", shard_id=shard_id, num_shards=2)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(generate_embeddings, "encode_batches", killed)
    with pytest.raises(KeyboardInterrupt):
        embed(data, tmp_path / "emb", model=data["other_model"], shard_id=0, num_shards=2)
    shard = tmp_path / "emb_0"
    assert not shard.exists() or read_provenance(shard) is not None
    with pytest.raises(ShardProvenanceError, match=r"lack shard\(s\) 0 of 2"):
        _retrieve(data, str(tmp_path / "emb_*"), tmp_path)


def test_an_unwritable_out_file_fails_before_any_passage_is_read(data, tmp_path, monkeypatch):
    forbid_calls(monkeypatch, "dpr.indexing.generate_embeddings.resolve_ctx_source")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(UnwritableDirectoryError, match="out_file"):
        embed(data, blocker / "emb")


def test_a_killed_run_s_temporaries_are_removed_by_the_next(data, tmp_path):
    stale = [tmp_path / ".emb_0.abcd1234.tmp", tmp_path / "..emb_0.provenance.json.abcd1234.tmp"]
    other_shard = tmp_path / ".emb_01.abcd1234.tmp"  # shard 01's job may be writing it now
    for path in stale + [other_shard]:
        path.write_bytes(b"partial")
    embed(data, tmp_path / "emb")
    assert [path.exists() for path in stale] == [False, False] and other_shard.exists()


@pytest.mark.parametrize("out_format", ["dpr", "npz"])
def test_a_full_disk_while_writing_a_shard_is_one_line_naming_it(tmp_path, monkeypatch, out_format):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full_disk)
    monkeypatch.setattr(pickle, "dump", full_disk)
    path = shard_path(tmp_path / "emb", 0, out_format)
    with pytest.raises(OutputWriteError, match=str(path)):
        write_embeddings(path, ["1"], np.ones((1, 4), dtype=np.float32))
    assert os.listdir(tmp_path) == []


def test_a_full_disk_while_writing_an_index_is_one_line_naming_it(tmp_path, monkeypatch):
    def full_disk(index, name):
        raise RuntimeError(f"Error in ... fwrite: could not write {name}: No space left on device")

    indexer = faiss_indexers.create_indexer("flat")
    indexer.index_data([(["1", "2"], np.eye(2, 4, dtype=np.float32))])
    monkeypatch.setattr(faiss_indexers.faiss, "write_index", full_disk)
    with pytest.raises(OutputWriteError, match="index.dpr"):
        indexer.serialize(tmp_path / "index")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04truncated", "no_vectors"])
def test_a_broken_npz_shard_is_one_line_naming_it_in_the_shard_wise_search(tmp_path, content):
    path = tmp_path / "emb_0.npz"
    if content == "no_vectors":
        np.savez(path, ids=np.array(["1"]))
    else:
        path.write_bytes(content)
    with pytest.raises(ShardFileError, match="emb_0.npz"):
        search_shards([([path], "")], np.ones((1, 4), dtype=np.float32), 1)


def test_record_less_shards_of_different_dimensions_are_one_line_naming_the_shard(tmp_path):
    write_embeddings(tmp_path / "emb_0", ["1"], np.ones((1, 4), dtype=np.float32))
    write_embeddings(tmp_path / "emb_1", ["2"], np.ones((1, 6), dtype=np.float32))
    with pytest.raises(ShardFileError, match="emb_1"):
        search_shards([([tmp_path / "emb_0", tmp_path / "emb_1"], "")], np.ones((1, 4), dtype=np.float32), 1)
    with pytest.raises(ShardFileError, match="emb_1"):
        faiss_indexers.create_indexer("flat").index_data(embeddings_io.EmbeddingFiles(str(tmp_path / "emb_*")))


def test_a_non_numeric_memory_budget_is_one_line_naming_the_key(data, tmp_path):
    embed(data, tmp_path / "emb")
    with pytest.raises(ShardSearchOptionError, match="shard_search_memory_gb"):
        _retrieve_with(data, str(tmp_path / "emb_*"), tmp_path, shard_search=True, shard_search_memory_gb="abc")


@pytest.mark.parametrize("option", ["index_path", "save_or_load_index"])
def test_an_unwritable_index_location_fails_before_indexing(data, tmp_path, monkeypatch, option):
    # neither the index built nor the questions encoded (hours on NQ) before the location is checked
    forbid_calls(monkeypatch, "dpr.indexing.configured_index.estimate_vector_count",
                 "dpr.indexing.dense_retriever.question_vectors")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    embed(data, tmp_path / "emb")
    if option == "index_path":
        values = {"index_path": str(blocker / "index")}
    else:  # GC-DPR saves beside the shards (emb_0 -> emb.index.dpr), here taken by a folder
        (tmp_path / "emb.index.dpr").mkdir()
        values = {"save_or_load_index": True}
    with pytest.raises(UnwritableDirectoryError, match=option):
        _retrieve_with(data, str(tmp_path / "emb_*"), tmp_path, **values)


def test_a_killed_index_save_s_temporaries_are_removed_by_the_next(data, tmp_path):
    embed(data, tmp_path / "emb")
    stale = [tmp_path / ".idx.index.dpr.abcd1234.tmp", tmp_path / ".idx.index_meta.dpr.abcd1234.tmp"]
    for path in stale:
        path.write_bytes(b"partial")
    _retrieve_with(data, str(tmp_path / "emb_*"), tmp_path, index_path=str(tmp_path / "idx"))
    assert [path.exists() for path in stale] == [False, False]
    assert (tmp_path / "idx.index.dpr").is_file()


def test_an_unwritable_bm25_index_path_fails_before_any_encoding(data, tmp_path, monkeypatch):
    forbid_calls(monkeypatch, "dpr.indexing.dense_retriever.question_vectors")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    embed(data, tmp_path / "emb")
    with pytest.raises(UnwritableDirectoryError, match="bm25_index_path"):
        _retrieve_with(data, str(tmp_path / "emb_*"), tmp_path, retriever="hybrid",
                       bm25_index_path=str(blocker / "bm25"))


def test_a_saved_bm25_index_of_other_passages_is_refused(data, tmp_path):
    """A BM25 index saved by an earlier run over other texts behind the same ids would rank by those texts."""
    bm25_path = str(tmp_path / "bm25")
    first = _retrieve_with(data, "", tmp_path, retriever="bm25", bm25_index_path=bm25_path)
    copy = tmp_path / "copy.tsv"  # the same content elsewhere, as on another machine: the index is reused
    copy.write_bytes(open(data["psgs"], "rb").read())
    again = _retrieve_with({**data, "psgs": str(copy)}, "", tmp_path, retriever="bm25", bm25_index_path=bm25_path)
    assert again["bm25"].top_k_hits == first["bm25"].top_k_hits
    rows = copy.read_text(encoding="utf-8").splitlines()
    copy.write_text("\n".join(rows[:1] + [row[::-1] if i % 2 else row for i, row in enumerate(rows[1:])]) + "\n",
                    encoding="utf-8")
    with pytest.raises(configured_index.BM25IndexError, match=r"bm25_index_path=.*bm25 was built from other passages"):
        _retrieve_with({**data, "psgs": str(copy)}, "", tmp_path, retriever="bm25", bm25_index_path=bm25_path)
    with pytest.raises(configured_index.BM25IndexError, match=r"k1 differs \(0\.9 vs 1\.2\)"):
        _retrieve_with(data, "", tmp_path, retriever="bm25", bm25_index_path=bm25_path, bm25_k1=1.2)
