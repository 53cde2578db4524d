import os
import pickle

import numpy as np
import pytest

from dpr.data import embeddings_io
from dpr.data.embeddings_io import (
    EmbeddingFiles,
    expand_embedding_paths,
    is_shard_complete,
    iter_embedding_blocks,
    read_embeddings,
    shard_path,
    write_embeddings,
)


def random_block(n, dim=8, seed=0, start=1):
    rng = np.random.default_rng(seed)
    return [str(i) for i in range(start, start + n)], rng.standard_normal((n, dim)).astype(np.float32)


def test_shard_paths_follow_dpr_and_gc_names(tmp_path):
    out = tmp_path / "emb" / "wiki"
    assert shard_path(out, 3, "dpr") == tmp_path / "emb" / "wiki_3"
    assert shard_path(out, 3, "gc") == tmp_path / "emb" / "wiki_3.pkl"
    assert shard_path(out, 3) == tmp_path / "emb" / "wiki_3.npz"
    with pytest.raises(ValueError):
        shard_path(out, 0, "hdf5")


@pytest.mark.parametrize("fmt", ["dpr", "gc", "npz"])
def test_round_trip_each_format(tmp_path, fmt):
    ids, vectors = random_block(5)
    path = write_embeddings(shard_path(tmp_path / "out" / "emb", 0, fmt), ids, vectors)
    read_ids, read_vectors = read_embeddings(path)
    assert read_ids == ids
    assert read_vectors.dtype == np.float32
    np.testing.assert_array_equal(read_vectors, vectors)
    assert is_shard_complete(path)


def test_pickle_is_dpr_list_of_tuples(tmp_path):
    ids, vectors = random_block(3)
    path = write_embeddings(tmp_path / "emb_0", ids, vectors)
    with open(path, "rb") as file:
        records = pickle.load(file)
    assert isinstance(records, list) and len(records) == 3
    assert records[1][0] == "2" and records[1][1].dtype == np.float32 and records[1][1].shape == (8,)


def test_npz_needs_no_pickle(tmp_path):
    ids, vectors = random_block(4)
    path = write_embeddings(tmp_path / "emb_0.npz", ids, vectors)
    with np.load(path, allow_pickle=False) as shard:
        assert shard["ids"].tolist() == ids
        assert shard["vectors"].shape == (4, 8)


def test_released_pickle_with_extra_fields_and_int_ids(tmp_path):
    ids, vectors = random_block(2)
    path = tmp_path / "wikipedia_passages_0.pkl"
    with open(path, "wb") as file:
        pickle.dump([(int(i), v, "extra") for i, v in zip(ids, vectors)], file)
    read_ids, read_vectors = read_embeddings(path, id_prefix="wiki:")
    assert read_ids == ["wiki:1", "wiki:2"]
    np.testing.assert_array_equal(read_vectors, vectors)


def test_id_prefix_added_only_where_missing(tmp_path):
    path = write_embeddings(tmp_path / "e_0.npz", ["wiki:1", "2"], np.zeros((2, 3)))
    assert read_embeddings(path, "wiki:")[0] == ["wiki:1", "wiki:2"]


def test_write_rejects_mismatched_shapes(tmp_path):
    with pytest.raises(ValueError):
        write_embeddings(tmp_path / "e_0.npz", ["1", "2"], np.zeros((3, 4)))


@pytest.mark.parametrize("name", ["emb_0", "emb_0.npz"])
def test_failed_write_leaves_no_file(tmp_path, monkeypatch, name):
    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(embeddings_io.pickle, "dump", explode)
    monkeypatch.setattr(embeddings_io.np, "savez", explode)
    with pytest.raises(OSError, match="disk full"):
        write_embeddings(tmp_path / name, *random_block(3))
    assert os.listdir(tmp_path) == []
    assert not is_shard_complete(tmp_path / name)


def test_rewrite_replaces_whole_file(tmp_path):
    path = tmp_path / "emb_0"
    write_embeddings(path, *random_block(50))
    write_embeddings(path, *random_block(2, seed=1))
    assert len(read_embeddings(path)[0]) == 2
    assert os.listdir(tmp_path) == ["emb_0"]


def test_incomplete_files_are_detected(tmp_path):
    path = write_embeddings(tmp_path / "emb_0", *random_block(10))
    truncated = tmp_path / "emb_1"
    truncated.write_bytes(path.read_bytes()[:-7])
    bad_npz = tmp_path / "emb_2.npz"
    bad_npz.write_bytes(b"PK\x03\x04 not really a zip")
    (tmp_path / "emb_3").touch()
    assert is_shard_complete(path)
    assert not is_shard_complete(truncated)
    assert not is_shard_complete(bad_npz)
    assert not is_shard_complete(tmp_path / "emb_3")
    assert not is_shard_complete(tmp_path / "missing_0")


def test_glob_skips_index_and_temp_files_and_sorts_naturally(tmp_path):
    for shard_id in (10, 2, 0, 1):
        write_embeddings(shard_path(tmp_path / "emb", shard_id, "dpr"), *random_block(1, start=shard_id))
    for junk in ["emb.index.dpr", "emb.index_meta.dpr", "index.dpr", "index_meta.dpr", "emb_5.tmp", ".emb_4.x.tmp"]:
        (tmp_path / junk).write_bytes(b"junk")
    (tmp_path / "emb_dir").mkdir()
    paths = expand_embedding_paths(str(tmp_path / "*"))
    assert [path.name for path in paths] == ["emb_0", "emb_1", "emb_2", "emb_10"]


def test_missing_inputs_raise(tmp_path):
    with pytest.raises(FileNotFoundError):
        expand_embedding_paths(str(tmp_path / "nothing_*"))
    with pytest.raises(FileNotFoundError):
        expand_embedding_paths(tmp_path / "absent.npz")


def test_blocks_stream_mixed_formats_one_file_at_a_time(tmp_path, monkeypatch):
    write_embeddings(tmp_path / "a_0", *random_block(3, start=1))
    write_embeddings(tmp_path / "a_1.npz", *random_block(2, start=4))
    write_embeddings(tmp_path / "b_0.pkl", *random_block(1, start=6))
    reads = []
    original_read = embeddings_io.read_embeddings

    def counting_read(path, id_prefix=""):
        reads.append(path.name)
        return original_read(path, id_prefix)

    monkeypatch.setattr(embeddings_io, "read_embeddings", counting_read)
    blocks = iter_embedding_blocks([str(tmp_path / "a_*"), tmp_path / "b_0.pkl"], id_prefix="wiki:")
    first_ids, _ = next(blocks)
    assert reads == ["a_0"]  # nothing beyond the first file is loaded yet
    rest = list(blocks)
    assert first_ids == ["wiki:1", "wiki:2", "wiki:3"]
    assert [ids for ids, _ in rest] == [["wiki:4", "wiki:5"], ["wiki:6"]]


def test_embedding_files_is_reiterable(tmp_path):
    write_embeddings(tmp_path / "e_0.npz", *random_block(3))
    files = EmbeddingFiles(str(tmp_path / "e_*"))
    assert len(files) == 1
    first = [ids for ids, _ in files]
    assert first == [ids for ids, _ in files] == [["1", "2", "3"]]
