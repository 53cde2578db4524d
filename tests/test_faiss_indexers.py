import json
import pickle

import faiss
import numpy as np
import pytest

from dpr.data.embeddings_io import EmbeddingFiles, shard_path, write_embeddings
from dpr.indexing import faiss_indexers
from dpr.indexing.faiss_indexers import (
    DenseFactoryIndexer,
    DenseFlatIndexer,
    DenseHNSWFlatIndexer,
    DenseHNSWSQIndexer,
    InsufficientMemoryError,
    available_memory_bytes,
    create_indexer,
    index_exists,
    index_file_paths,
    scan_blocks,
)

N, DIM = 3000, 32


@pytest.fixture(scope="module", autouse=True)
def single_faiss_thread():
    """The test machines share two cores; FAISS's OpenMP threads only contend there."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    scales = rng.uniform(0.5, 1.5, (N, 1))  # varied norms, so inner product and L2 orders differ
    vectors = (rng.standard_normal((N, DIM)) * scales).astype(np.float32)
    ids = [f"wiki:{i}" for i in range(N)]
    blocks = [(ids[start : start + 700], vectors[start : start + 700]) for start in range(0, N, 700)]
    queries = rng.standard_normal((300, DIM)).astype(np.float32)
    return ids, vectors, blocks, queries


@pytest.fixture(scope="module")
def flat_results(data):
    _, _, blocks, queries = data
    indexer = DenseFlatIndexer(buffer_size=1000)
    indexer.index_data(blocks)
    return indexer.search_knn(queries, 10)


INDEXER_FACTORIES = {
    "flat": lambda: DenseFlatIndexer(buffer_size=1000),
    "hnsw": lambda: DenseHNSWFlatIndexer(buffer_size=1000),
    "hnsw_sq": lambda: DenseHNSWSQIndexer(buffer_size=1000),
    "ivf_pq": lambda: DenseFactoryIndexer("IVF16,PQ8x4", buffer_size=1000, train_sample_size=1000),
    "ivf_sq": lambda: DenseFactoryIndexer("IVF16,SQ8", buffer_size=1000, search_params="nprobe=16"),
}


def test_flat_scores_are_exact_inner_products(data, flat_results):
    ids, vectors, _, queries = data
    inner_products = queries @ vectors.T
    for query_ips, (doc_ids, scores) in zip(inner_products, flat_results):
        best = np.argsort(-query_ips)[:10]
        assert doc_ids == [ids[i] for i in best]
        np.testing.assert_allclose(scores, query_ips[best], rtol=1e-5, atol=1e-5)


def test_flat_adds_in_buffer_size_chunks(data):
    ids, vectors, _, _ = data
    chunk_sizes = []

    class RecordingFlatIndexer(DenseFlatIndexer):
        def _add_chunk(self, chunk_ids, chunk_vectors):
            chunk_sizes.append(len(chunk_ids))
            super()._add_chunk(chunk_ids, chunk_vectors)

    indexer = RecordingFlatIndexer(buffer_size=100)
    indexer.index_data(iter([(ids[:250], vectors[:250]), ([], np.empty((0, 0))), (ids[250:300], vectors[250:300])]))
    assert chunk_sizes == [100, 100, 50, 50]
    assert indexer.index.ntotal == 300 and indexer.index_id_to_db_id == ids[:300]


def test_hnsw_agrees_with_flat_on_top1(data, flat_results):
    _, vectors, blocks, queries = data
    indexer = DenseHNSWFlatIndexer(buffer_size=1000)
    indexer.index_data(blocks)
    hnsw_results = indexer.search_knn(queries, 10)
    agreement = np.mean([flat[0][0] == hnsw[0][0] for flat, hnsw in zip(flat_results, hnsw_results)])
    assert agreement >= 0.99
    # Scores are squared L2 distances in the augmented space: phi + |q|^2 - 2 q.v, ascending.
    doc_ids, scores = hnsw_results[0]
    assert np.all(np.diff(scores) >= 0)
    positions = [int(doc_id.split(":")[1]) for doc_id in doc_ids]
    expected = indexer.phi + queries[0] @ queries[0] - 2 * vectors[positions] @ queries[0]
    np.testing.assert_allclose(scores, expected, rtol=1e-4)


def test_hnsw_phi_is_max_over_all_blocks_and_extra_dim(data):
    ids, vectors, _, _ = data
    boosted = vectors[:20].copy()
    boosted[-1] *= 10  # the largest norm sits in the last block
    indexer = DenseHNSWFlatIndexer(buffer_size=8, store_n=16)
    indexer.index_data([(ids[:10], boosted[:10]), (ids[10:20], boosted[10:])])
    squared_norms = (boosted.astype(np.float64) ** 2).sum(axis=1)
    assert indexer.phi == pytest.approx(squared_norms.max(), rel=1e-6)
    stored = faiss.downcast_index(indexer.index).storage.reconstruct_n(0, 20)
    np.testing.assert_allclose(stored[:, :DIM], boosted)
    # |v|^2 + extra^2 = phi for every vector (the extra coordinate itself is ~0 for the largest vector).
    np.testing.assert_allclose(squared_norms + stored[:, DIM].astype(np.float64) ** 2, indexer.phi, rtol=1e-5)
    assert indexer.index.hnsw.efSearch == 128 and indexer.index.hnsw.efConstruction == 200


def test_hnsw_rejects_vectors_beyond_phi(data):
    ids, vectors, _, _ = data
    indexer = DenseHNSWFlatIndexer(store_n=16)
    indexer.index_data([(ids[:10], vectors[:10])])
    with pytest.raises(ValueError, match="phi"):
        indexer.index_data([(["big"], vectors[:1] * 100)])


def test_two_pass_indexers_need_a_reiterable(data):
    ids, vectors, _, _ = data
    with pytest.raises(TypeError, match="re-iterable"):
        DenseHNSWFlatIndexer().index_data(iter([(ids[:5], vectors[:5])]))


def test_sq_trained_on_extremes_equals_training_on_all_data(data):
    _, vectors, blocks, _ = data
    indexer = DenseHNSWSQIndexer(buffer_size=1000, store_n=16)
    indexer.index_data(blocks)
    reference = faiss.IndexHNSWSQ(DIM + 1, faiss.ScalarQuantizer.QT_8bit, 16)
    reference.train(indexer._to_index_space(vectors))
    trained = faiss.vector_to_array(faiss.downcast_index(indexer.index.storage).sq.trained)
    expected = faiss.vector_to_array(faiss.downcast_index(reference.storage).sq.trained)
    np.testing.assert_array_equal(trained, expected)


@pytest.mark.parametrize("kind", ["hnsw_sq", "ivf_sq"])
def test_quantized_indexes_mostly_agree_with_flat(data, flat_results, kind):
    _, _, blocks, queries = data
    indexer = INDEXER_FACTORIES[kind]()
    indexer.index_data(blocks)
    results = indexer.search_knn(queries, 10)
    top10_recall = np.mean([flat[0][0] in found[0] for flat, found in zip(flat_results, results)])
    assert top10_recall >= 0.95


def test_factory_trains_on_a_uniform_sample(data):
    _, vectors, blocks, _ = data
    stats = scan_blocks(blocks, sample_size=1000, seed=3)
    assert stats.count == N and stats.dim == DIM and stats.sample.shape == (1000, DIM)
    rows = {row.tobytes(): i for i, row in enumerate(vectors)}
    sampled = [rows[row.tobytes()] for row in stats.sample]
    assert len(set(sampled)) == 1000  # drawn without repeats
    assert {i // 700 for i in sampled} == set(range(5))  # from every block
    np.testing.assert_array_equal(stats.sample, scan_blocks(blocks, sample_size=1000, seed=3).sample)
    indexer = INDEXER_FACTORIES["ivf_pq"]()
    indexer.index_data(blocks)
    assert indexer.index.is_trained and indexer.index.ntotal == N


def test_factory_drops_empty_result_slots(data):
    ids, _, blocks, queries = data
    indexer = DenseFactoryIndexer("IVF16,Flat", search_params="nprobe=1")
    indexer.index_data(blocks)
    doc_ids, scores = indexer.search_knn(queries[:1], N)[0]
    assert 0 < len(doc_ids) == len(scores) < N  # one inverted list holds only part of the collection
    assert len(set(doc_ids)) == len(doc_ids) and np.all(np.diff(scores) <= 0)


@pytest.mark.parametrize("kind", sorted(INDEXER_FACTORIES))
def test_round_trip_through_directory_and_prefix(tmp_path, data, kind):
    _, _, blocks, queries = data
    indexer = INDEXER_FACTORIES[kind]()
    indexer.index_data(blocks)
    expected = indexer.search_knn(queries[:50], 5)

    directory = tmp_path / "index_dir"
    directory.mkdir()
    prefix = tmp_path / "out" / "nq_index"
    for path in (directory, prefix):
        assert not index_exists(path)
        indexer.serialize(path)
        assert index_exists(path)
        loaded = INDEXER_FACTORIES[kind]()
        loaded.deserialize(path)
        for (ids_a, scores_a), (ids_b, scores_b) in zip(expected, loaded.search_knn(queries[:50], 5)):
            assert ids_a == ids_b
            np.testing.assert_array_equal(scores_a, scores_b)
    assert sorted(p.name for p in directory.iterdir()) == ["index.dpr", "index_meta.dpr"]
    assert sorted(p.name for p in prefix.parent.iterdir()) == ["nq_index.index.dpr", "nq_index.index_meta.dpr"]


def test_meta_is_json_with_ids_and_phi(tmp_path, data):
    ids, vectors, _, _ = data
    indexer = DenseHNSWFlatIndexer(store_n=16)
    indexer.index_data([(ids[:30], vectors[:30])])
    indexer.serialize(tmp_path / "idx")
    _, meta_file = index_file_paths(tmp_path / "idx")
    meta = json.loads(meta_file.read_text())
    assert meta["ids"] == ids[:30] and meta["indexer"] == "hnsw" and meta["phi"] == pytest.approx(indexer.phi)
    loaded = DenseHNSWFlatIndexer(store_n=16)
    loaded.deserialize(tmp_path / "idx")
    loaded.index_data([(["extra"], vectors[30:31] * 0.1)])  # phi is restored, so adding still works
    assert loaded.index.ntotal == 31 and loaded.index_id_to_db_id[-1] == "extra"


def test_deserialize_checks_id_count_and_type(tmp_path, data):
    ids, vectors, _, _ = data
    indexer = DenseFlatIndexer()
    indexer.index_data([(ids[:10], vectors[:10])])
    indexer.serialize(tmp_path / "idx")
    with pytest.raises(ValueError, match="not hnsw"):
        DenseHNSWFlatIndexer().deserialize(tmp_path / "idx")
    _, meta_file = index_file_paths(tmp_path / "idx")
    meta = json.loads(meta_file.read_text())
    meta["ids"] = meta["ids"][:-1]
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="9 ids for an index of 10"):
        DenseFlatIndexer().deserialize(tmp_path / "idx")
    with pytest.raises(FileNotFoundError):
        DenseFlatIndexer().deserialize(tmp_path / "absent")


def test_reads_dpr_released_pickled_meta(tmp_path, data):
    ids, vectors, _, queries = data
    hnsw = DenseHNSWFlatIndexer(store_n=16)
    hnsw.index_data([(ids[:100], vectors[:100])])
    faiss.write_index(hnsw.index, str(tmp_path / "released.index.dpr"))
    with open(tmp_path / "released.index_meta.dpr", "wb") as file:
        pickle.dump(ids[:100], file)
    loaded = DenseHNSWFlatIndexer(store_n=16)
    loaded.deserialize(tmp_path / "released")
    assert loaded.search_knn(queries[:3], 4)[0][0] == hnsw.search_knn(queries[:3], 4)[0][0]
    with pytest.raises(ValueError, match="phi is unknown"):
        loaded.index_data([(["new"], vectors[:1])])  # DPR's files do not record phi


def test_index_from_shard_files_beside_an_index(tmp_path, data, flat_results):
    ids, vectors, _, queries = data
    for shard_id, start in enumerate(range(0, N, 1000)):
        bare_ids = [doc_id.split(":")[1] for doc_id in ids[start : start + 1000]]  # released shards lack the prefix
        write_embeddings(shard_path(tmp_path / "emb", shard_id, "dpr"), bare_ids, vectors[start : start + 1000])
    first = DenseHNSWFlatIndexer()
    first.index_data(EmbeddingFiles(str(tmp_path / "emb_*"), id_prefix="wiki:"))
    first.serialize(tmp_path / "emb")  # emb.index.dpr and emb.index_meta.dpr now match the glob too
    again = DenseHNSWFlatIndexer()
    again.index_data(EmbeddingFiles(str(tmp_path / "emb_*"), id_prefix="wiki:"))
    assert again.index_id_to_db_id == ids
    agreement = np.mean([flat[0][0] == found[0][0] for flat, found in zip(flat_results, again.search_knn(queries, 1))])
    assert agreement >= 0.99


def test_dimension_mismatch_is_an_error(data):
    ids, vectors, _, queries = data
    indexer = DenseFlatIndexer()
    indexer.index_data([(ids[:5], vectors[:5])])
    with pytest.raises(ValueError, match="dimension"):
        indexer.search_knn(queries[:, :16], 3)
    with pytest.raises(ValueError, match="dimension"):
        indexer.index_data([(["x"], np.ones((1, 8), np.float32))])
    with pytest.raises(ValueError, match="empty"):
        DenseFlatIndexer().search_knn(queries, 3)


def test_memory_estimates_rank_index_types():
    n, dim = 21_015_324, 768
    flat = create_indexer("flat").estimate_memory(n, dim)
    assert 60e9 < flat < 70e9  # the ~65 GB of raw float32 vectors (plus ids)
    hnsw = create_indexer("hnsw").estimate_memory(n, dim)
    assert 140e9 < hnsw < 220e9  # DPR reports 160-200 GB
    hnsw_sq = create_indexer("hnsw_sq").estimate_memory(n, dim)
    ivf_pq = create_indexer("factory", factory_string="IVF65536,PQ64").estimate_memory(n, dim)
    assert ivf_pq < hnsw_sq < flat < hnsw
    # an indexer's own settings shape its estimate: fewer HNSW links, less memory
    assert create_indexer("hnsw", store_n=16).estimate_memory(n, dim) < hnsw


def test_memory_check_error_names_estimate_and_machine():
    available, source = available_memory_bytes()
    assert available > 0 and source
    with pytest.raises(InsufficientMemoryError, match=r"needs about .* GiB .* this machine has .* GiB available"):
        DenseFlatIndexer().ensure_fits(10**12, 768)
    with pytest.raises(InsufficientMemoryError, match=r"0\.00 GiB available \(a test figure\)"):
        DenseHNSWFlatIndexer().ensure_fits(1000, 32, available=(1000, "a test figure"))
    assert DenseFlatIndexer().ensure_fits(1000, 32, available=(10**9, "a test figure")) == 1000 * (32 * 4 + 80)


def test_first_pass_refuses_index_that_does_not_fit(data, monkeypatch):
    ids, vectors, _, _ = data
    monkeypatch.setattr(faiss_indexers, "available_memory_bytes", lambda: (4096, "a test figure"))
    with pytest.raises(InsufficientMemoryError, match="hnsw index of 10 vectors of dimension 32"):
        DenseHNSWFlatIndexer().index_data([(ids[:10], vectors[:10])])
    unchecked = DenseHNSWFlatIndexer(store_n=16, check_memory=False)
    unchecked.index_data([(ids[:10], vectors[:10])])
    assert unchecked.index.ntotal == 10


def test_create_indexer_by_name():
    assert isinstance(create_indexer("hnsw_sq"), DenseHNSWSQIndexer)
    assert create_indexer("hnsw").store_n == 512 and create_indexer("hnsw_sq").store_n == 128
    assert create_indexer("factory", factory_string="IVF256,PQ16").factory_string == "IVF256,PQ16"
    with pytest.raises(ValueError, match="unknown indexer"):
        create_indexer("annoy")
