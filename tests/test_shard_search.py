"""Exact search in pieces: the tiled top-k equals its definition, and the shard-wise search equals one flat index
over all the shards (ids, scores, ties), for any shard sizes and grouping, also on squad_open with MiniLM."""
import itertools

import numpy as np
import pytest

from dpr.data.biencoder_data import normalize_question
from dpr.data.embeddings_io import shard_path, write_embeddings
from dpr.data.passages import iter_passages
from dpr.indexing import exact_search
from dpr.indexing.dense_retriever import retrieve, run_dense_retriever
from dpr.indexing.retrieval_settings import RetrievalSettings
from dpr.indexing.exact_search import ExactTopK, search_results
from dpr.indexing.faiss_indexers import DenseFlatIndexer, InsufficientMemoryError
from dpr.indexing.generate_embeddings import generate_dense_embeddings
from dpr.indexing.shard_search import ShardSearchBudgetError, describe_shards, plan_groups, search_shards
from tests.retrieval_helpers import write_passages_tsv
from tests.training_helpers import compose_config

DIM = 16


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 8 rows and batches of 5 queries, so that tiles span shards and queries span batches."""
    monkeypatch.setattr(exact_search, "TILE_ROWS", 8)
    monkeypatch.setattr(exact_search, "QUERY_BATCH", 5)


def definition(queries: np.ndarray, vectors: np.ndarray, k: int) -> list[list[int]]:
    """Positions of the k best per query: score descending, equal scores by position (a stable sort)."""
    return [np.argsort(-row, kind="stable")[:k].tolist() for row in queries @ vectors.T]


def integer_vectors(rng, n: int, distinct: int) -> np.ndarray:
    """Small integer coordinates, drawn from `distinct` rows: products are exact in float32, so equal rows tie
    exactly, in any summation order."""
    return rng.integers(-3, 4, (distinct, DIM)).astype(np.float32)[rng.integers(0, distinct, n)]


def exact_top_k(queries, pieces, k):
    search = ExactTopK(queries, k)
    for piece in pieces:
        search.add(piece)
    return search.finish()


@pytest.mark.parametrize("k", [1, 3, 8, 20, 60])  # 60: more than all the vectors
def test_tiled_top_k_is_the_definition_with_ties_for_any_split(small_tiles, k):
    rng = np.random.default_rng(k)
    vectors = integer_vectors(rng, 47, distinct=6)  # every score shared by ~8 vectors, across tiles and pieces
    queries = rng.integers(-3, 4, (12, DIM)).astype(np.float32)
    expected = definition(queries, vectors, k)
    all_scores = queries @ vectors.T
    for cuts in ([47], [1, 7, 8, 9, 0, 22], [3] * 15 + [2], [30, 17]):
        pieces = np.split(vectors, np.cumsum(cuts)[:-1])
        scores, positions = exact_top_k(queries, pieces, k)
        assert positions.tolist() == expected
        np.testing.assert_array_equal(scores, np.take_along_axis(all_scores, positions, axis=1))


def test_tiled_scores_are_bit_identical_for_any_split_of_real_sized_vectors():
    """768-d float vectors over several default-sized tiles: a split at odd places changes no bit."""
    rng = np.random.default_rng(1)
    n = 2 * exact_search.TILE_ROWS + 1234
    vectors = rng.standard_normal((n, 768)).astype(np.float32)
    queries = rng.standard_normal((exact_search.QUERY_BATCH + 3, 768)).astype(np.float32)
    whole = exact_top_k(queries, [vectors], 50)
    split = exact_top_k(queries, np.split(vectors, [5, 9000, 20000, 20001, n - 7]), 50)
    np.testing.assert_array_equal(whole[0], split[0])
    np.testing.assert_array_equal(whole[1], split[1])
    assert whole[1].tolist() == definition(queries, vectors, 50)  # no near-ties here: the same passages


def write_shards(folder, vectors, sizes, pickle_from=None):
    """Shards of the given sizes (ids p0, p1, ...), .npz, or DPR pickles from shard `pickle_from` on."""
    ids = [f"p{i}" for i in range(len(vectors))]
    start = 0
    for shard_id, size in enumerate(sizes):
        fmt = "dpr" if pickle_from is not None and shard_id >= pickle_from else "npz"
        write_embeddings(shard_path(folder / "emb", shard_id, fmt), ids[start : start + size],
                         vectors[start : start + size])
        start += size
    return sorted(folder.glob("emb_*"), key=lambda path: int(path.name.split("_")[1].split(".")[0])), ids


def flat_index_results(ids, vectors, queries, k):
    indexer = DenseFlatIndexer(buffer_size=10)
    indexer.index_data([(ids, vectors)])
    return indexer.search_knn(queries, k)


def assert_same_results(found, expected):
    assert [ids for ids, _ in found] == [ids for ids, _ in expected]
    for (_, found_scores), (_, expected_scores) in zip(found, expected):
        np.testing.assert_array_equal(found_scores, expected_scores)


@pytest.mark.parametrize("budget_vectors,groups", [(None, [1] * 6), (20, [4, 1, 1]), (45, [6])])
def test_shard_wise_search_equals_one_flat_index(small_tiles, tmp_path, budget_vectors, groups):
    rng = np.random.default_rng(0)
    vectors = integer_vectors(rng, 61, distinct=9)
    queries = rng.integers(-3, 4, (11, DIM)).astype(np.float32)
    paths, ids = write_shards(tmp_path, vectors, [13, 0, 1, 20, 9, 18], pickle_from=4)  # unequal, one empty
    working = exact_search.working_memory_bytes(len(queries), 100, DIM)
    budget = None if budget_vectors is None else working + budget_vectors * (8 * DIM + 300)
    assert [len(group) for group in plan_groups(describe_shards([(paths, "")]), budget, working)] == groups
    for k in (4, 25, 100):  # 25: more than any shard; 100: more than all
        found = search_shards([(paths, "")], queries, k, budget)
        assert_same_results(found, flat_index_results(ids, vectors, queries, k))
        assert [doc_ids for doc_ids, _ in found] == [[ids[p] for p in row] for row in definition(queries, vectors, k)]


def test_shard_sets_keep_their_order_and_id_prefix(tmp_path):
    rng = np.random.default_rng(2)
    vectors = rng.standard_normal((30, DIM)).astype(np.float32)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    paths_a, ids_a = write_shards(tmp_path / "a", vectors[:12], [5, 7])
    paths_b, ids_b = write_shards(tmp_path / "b", vectors[12:], [18])
    queries = rng.standard_normal((4, DIM)).astype(np.float32)
    found = search_shards([(paths_a, "wiki:"), (paths_b, "other:")], queries, 30)
    all_ids = [f"wiki:{i}" for i in ids_a] + [f"other:{i}" for i in ids_b]
    assert_same_results(found, flat_index_results(all_ids, vectors, queries, 30))


def test_groups_follow_the_budget_and_a_shard_too_large_is_refused(tmp_path):
    vectors = np.ones((40, DIM), dtype=np.float32)
    paths, _ = write_shards(tmp_path, vectors, [10, 10, 20])
    shards = describe_shards([(paths, "")])
    assert [shard.vectors for shard in shards] == [10, 10, 20]
    working = exact_search.working_memory_bytes(1, 5, DIM)
    one_shard = shards[0].memory_bytes
    with pytest.raises(ShardSearchBudgetError, match=r"emb_2\.npz needs about .* raise shard_search_memory_gb"):
        search_shards([(paths, "")], vectors[:1], 5, working + 2 * one_shard - 1)
    assert len(search_shards([(paths, "")], vectors[:1], 5, working + 2 * one_shard)[0][0]) == 5


def test_search_that_does_not_fit_the_machine_fails_before_reading(tmp_path):
    paths, _ = write_shards(tmp_path, np.ones((10, DIM), dtype=np.float32), [10])
    with pytest.raises(InsufficientMemoryError, match="a test's limit"):
        search_shards([(paths, "")], np.ones((1, DIM), np.float32), 5, available=(1024, "a test's limit"))


def test_search_results_drop_empty_slots():
    scores = np.array([[3.0, -np.inf]], dtype=np.float32)
    positions = np.array([[1, exact_search.MISSING]])
    assert search_results(scores, positions, ["a", "b"].__getitem__)[0][0] == ["b"]


def test_shard_wise_search_equals_the_flat_index_on_squad_open(shared_data, tmp_path, monkeypatch):
    """The real collection's first 240 passages (real ids and texts) embedded by the untrained MiniLM in 3 shards,
    the 1,427 dev questions encoded once (GC-DPR's split), 100 passages each: shard-wise = flat, scores too."""
    squad = shared_data / "squad_open"
    rows = [(p.id, p.text, p.title) for p in itertools.islice(iter_passages(str(squad / "psgs.tsv")), 240)]
    psgs = write_passages_tsv(tmp_path / "psgs.tsv", rows)
    for shard_id in range(3):
        generate_dense_embeddings(compose_config([
            "encoder=minilm", f"ctx_src={psgs}", f"out_file={tmp_path / 'emb'}", "out_format=npz", "num_workers=0",
            f"shard_id={shard_id}", "num_shards=3", "batch_size=32", "bf16=true"], "gen_embs"))
    common = ["encoder=minilm", f"qa_dataset={squad / 'dev.qa.csv'}", f"ctx_datatsets=[{psgs}]",
              f"encoded_ctx_files=['{tmp_path / 'emb_*'}']", f"q_encoding_path={tmp_path / 'q.pt'}", "n_docs=100",
              "bf16=true"]
    assert run_dense_retriever(compose_config(common + ["encode_q_and_save=true"], "dense_retriever")) == {}
    monkeypatch.setattr(exact_search, "TILE_ROWS", 64)  # tiles across the shards of 80 passages
    results = {}
    for shard_search in (False, True):
        settings = RetrievalSettings.from_config(
            compose_config(common + [f"shard_search={shard_search}"], "dense_retriever"))
        questions = [normalize_question(sample.question) for sample in settings.questions.load()]
        results[shard_search] = retrieve(settings, ["dense"], questions, settings.sources)
    assert len(results[True]["dense"]) == 1427 and all(len(ids) == 100 for ids, _ in results[True]["dense"])
    assert_same_results(results[True]["dense"], results[False]["dense"])
