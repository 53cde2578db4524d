"""dense_retriever: end to end on a small fixture, results JSON, index round trips, GC flags and split, hybrid."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from dpr.data.embeddings_io import EmbeddingFiles, shard_path, write_embeddings
from dpr.data.passages import load_passages
from dpr.evaluation.qa_validation import top_k_hits_from_results
from dpr.indexing import exact_search, faiss_indexers
from dpr.indexing.configured_index import (
    IndexSettings,
    ShardSearchOptionError,
    create_configured_indexer,
    estimate_vector_count,
)
from dpr.indexing.dense_retriever import results_path, run_dense_retriever
from dpr.indexing.hybrid import fuse_scores, hybrid_results
from dpr.indexing.faiss_indexers import InsufficientMemoryError, create_indexer, index_exists
from dpr.indexing.generate_embeddings import generate_dense_embeddings
from dpr.indexing.shard_provenance import ShardProvenanceError
from dpr.options.legacy_flags import config_top_level_keys, translate_argv
from dpr.options.retriever_flags import DENSE_RETRIEVER_FLAGS, DENSE_RETRIEVER_GC_DEFAULTS
from dpr.foundation.errors import ConfigError
from tests.conftest import REPO_ROOT
from tests.fixtures import forbid_calls
from tests.retrieval_helpers import (
    embedded_tiny_collection,
    gen_embs_config,
    passages,
    retriever_config,
    tiny_model,
    write_passages_tsv,
)
from tests.training_helpers import CONF_DIR, compose_config

RAW_HITS = re.compile(r"^Validation results: top k documents hits (\[.*\])$", re.M)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny model, 23 passages embedded in 2 shards, 12 questions."""
    folder = tmp_path_factory.mktemp("retrieval")
    return embedded_tiny_collection(folder)


def run(data, out_file, **values):
    cfg = retriever_config(data["model"], data["qas"], data["psgs"], data["embs"], str(out_file), **values)
    return run_dense_retriever(cfg)


def test_end_to_end_table_equals_the_recount_from_each_results_json(data, tmp_path, capsys):
    out_file = tmp_path / "results.json"
    stats = run(data, out_file, retriever="[dense,bm25,hybrid]")
    printed = capsys.readouterr().out
    raw_hits = [json.loads(match) for match in RAW_HITS.findall(printed)]
    assert len(raw_hits) == 3
    for position, name in enumerate(["dense", "bm25", "hybrid"]):
        path = results_path(str(out_file), name, position == 0)
        recount, n_questions = top_k_hits_from_results(path)
        assert recount == raw_hits[position] == stats[name].top_k_hits and n_questions == 12
    assert re.search(r"^\s+bm25 \|\s+100\.00% \|", printed, re.M)  # every BM25 top-1 names the capital
    assert re.search(r"^\s+hybrid \|", printed, re.M) and re.search(r"^\s+dense \|", printed, re.M)


def test_results_json_is_dpr_format(data, tmp_path):
    out_file = tmp_path / "results.json"
    run(data, out_file, n_docs=5)
    text = out_file.read_text(encoding="utf-8")
    records = json.loads(text)
    assert text == json.dumps(records, indent=4) + "\n"
    assert records[0]["question"] == "what is the capital of france?" and records[0]["answers"] == ["paris"]
    passages = load_passages(data["psgs"])
    for ctx in records[0]["ctxs"]:
        assert set(ctx) == {"id", "title", "text", "score", "has_answer"}
        assert isinstance(ctx["score"], str) and isinstance(ctx["has_answer"], bool)
        assert (ctx["text"], ctx["title"]) == passages[ctx["id"]]
    scores = [float(ctx["score"]) for ctx in records[0]["ctxs"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == 5  # inner products, best first
    # the answers are plain words, so matching them as regexes marks the same passages
    run(data, tmp_path / "regex.json", n_docs=5, match="regex")
    regex_records = json.loads((tmp_path / "regex.json").read_text(encoding="utf-8"))
    assert [[c["has_answer"] for c in r["ctxs"]] for r in regex_records] == [
        [c["has_answer"] for c in r["ctxs"]] for r in records]


def test_the_log_names_the_results_file_not_its_temporary(data, tmp_path, caplog):
    out_file = tmp_path / "results.json"
    with caplog.at_level("INFO"):
        run(data, out_file, n_docs=3)
    assert f"saved retrieval results of 12 questions to {out_file}" in caplog.messages
    assert not [message for message in caplog.messages if ".tmp" in message]


@pytest.mark.parametrize("indexer,location", [("flat", "dir/"), ("hnsw", "prefix"), ("hnsw_sq", "dir/"),
                                              ("factory", "prefix")])
def test_index_saved_by_one_run_gives_the_same_results_when_loaded(data, tmp_path, indexer, location):
    index_path = str(tmp_path / location)
    extra = {"indexer": indexer, "index_path": index_path, "n_docs": 10}
    if indexer == "factory":
        extra["index_factory"] = "'IVF2,Flat'"  # quoted: hydra reads a bare comma as a sweep
        extra["index_search_params"] = "'nprobe=2'"
    run(data, tmp_path / "built.json", **extra)
    assert index_exists(index_path)
    # the second run has no embedding files at all: it can only use the saved index
    run(data, tmp_path / "loaded.json", encoded_ctx_files="[]", **extra)
    assert (tmp_path / "built.json").read_text() == (tmp_path / "loaded.json").read_text()


@pytest.mark.parametrize("factory, reason", [("Bogus", "could not parse index string Bogus"),
                                             ("'IVF2,PQ7'", "should be a multiple of the number of subquantizers")])
def test_an_index_factory_string_faiss_refuses_is_one_line(data, tmp_path, factory, reason, monkeypatch):
    forbid_calls(monkeypatch, "dpr.indexing.faiss_indexers.DenseIndexer.index_data")
    with pytest.raises(ConfigError, match=rf"^index_factory='[^']+' is refused by FAISS for \d+-dimensional vectors "
                                          rf"\(.*{reason}.*\); give a FAISS index_factory string"):
        run(data, tmp_path / "out.json", indexer="factory", index_factory=factory)


def test_flat_and_hnsw_agree_on_the_top_passage(data, tmp_path):
    """On well-separated random vectors (the tiny model's vectors nearly tie), fed in as saved embeddings."""
    rng = np.random.default_rng(0)
    vectors = (rng.standard_normal((23, 32)) * rng.uniform(0.5, 1.5, (23, 1))).astype(np.float32)
    ids = [str(i) for i in range(1, 24)]
    for shard_id, rows in enumerate((slice(0, 12), slice(12, 23))):
        write_embeddings(shard_path(tmp_path / "emb", shard_id, "npz"), ids[rows], vectors[rows])
    torch.save(torch.from_numpy(rng.standard_normal((12, 32)).astype(np.float32)), tmp_path / "q.pt")
    common = {"encoded_ctx_files": f"['{tmp_path / 'emb_*'}']", "q_encoding_path": str(tmp_path / "q.pt")}
    run(data, tmp_path / "flat.json", **common)
    run(data, tmp_path / "hnsw.json", indexer="hnsw", **common)
    flat, hnsw = (json.loads((tmp_path / name).read_text()) for name in ("flat.json", "hnsw.json"))
    assert [[c["id"] for c in r["ctxs"]] for r in flat] == [[c["id"] for c in r["ctxs"]] for r in hnsw]


def test_hnsw_settings_reach_the_indexer():
    cfg = compose_config(["indexer=hnsw_sq", "hnsw_store_n=16", "hnsw_ef_search=300"], "dense_retriever")
    indexer = create_configured_indexer(IndexSettings.from_config(cfg))
    assert (indexer.kind, indexer.store_n, indexer.ef_search, indexer.ef_construction) == ("hnsw_sq", 16, 300, 200)


def test_memory_is_checked_once_with_the_configured_indexer_settings(data, tmp_path, monkeypatch):
    checks = []
    monkeypatch.setattr(faiss_indexers, "ensure_memory", lambda required, what, available=None: checks.append(
        (required, what)))
    run(data, tmp_path / "default.json", indexer="hnsw")
    run(data, tmp_path / "small.json", indexer="hnsw", hnsw_store_n=8)
    assert len(checks) == 2 and all("hnsw index of" in what for _, what in checks)  # one check per build
    (default, _), (small, _) = checks
    count, dim = estimate_vector_count(EmbeddingFiles(data["embs"]).paths)
    assert (count, dim) == (23, 32)
    assert default == create_indexer("hnsw").estimate_memory(count, dim)
    assert small == create_indexer("hnsw", store_n=8).estimate_memory(count, dim) < default


def test_gc_query_split_encodes_once_then_searches_without_the_model(data, tmp_path):
    q_path = str(tmp_path / "q.pt")
    assert run(data, tmp_path / "none.json", encode_q_and_save=True, q_encoding_path=q_path) == {}
    assert not (tmp_path / "none.json").exists()
    run(data, tmp_path / "direct.json")
    # a model path that does not exist proves the saved encodings are used
    cfg = retriever_config("/nonexistent/model", data["qas"], data["psgs"], data["embs"],
                           str(tmp_path / "loaded.json"), q_encoding_path=q_path)
    run_dense_retriever(cfg)
    assert (tmp_path / "direct.json").read_text() == (tmp_path / "loaded.json").read_text()


def test_shard_wise_search_gives_the_flat_index_results(data, tmp_path, monkeypatch):
    """Tiles of 4 rows: the 2 shards (12 and 11 passages) are searched in 6 tiles, one spanning both; n_docs above
    a shard's size. Also through GC-DPR's split: questions encoded and saved once, searched without the model."""
    monkeypatch.setattr(exact_search, "TILE_ROWS", 4)
    run(data, tmp_path / "flat.json")
    run(data, tmp_path / "shards.json", shard_search=True)
    run(data, tmp_path / "grouped.json", shard_search=True, shard_search_memory_gb=1)
    flat = (tmp_path / "flat.json").read_text()
    assert (tmp_path / "shards.json").read_text() == flat == (tmp_path / "grouped.json").read_text()
    q_path = str(tmp_path / "q.pt")
    run(data, tmp_path / "none.json", encode_q_and_save=True, q_encoding_path=q_path)
    cfg = retriever_config("/nonexistent/model", data["qas"], data["psgs"], data["embs"],
                           str(tmp_path / "split.json"), q_encoding_path=q_path, shard_search=True)
    run_dense_retriever(cfg)
    assert (tmp_path / "split.json").read_text() == flat


@pytest.mark.parametrize("options,message", [
    ({"indexer": "hnsw"}, "indexer=hnsw was asked"),
    ({"index_path": "somewhere/"}, "no index to save or load"),
    ({"shard_search_memory_gb": 0}, "positive number of GiB"),
])
def test_shard_search_refuses_options_it_cannot_honour(data, tmp_path, options, message):
    with pytest.raises(ShardSearchOptionError, match=message):
        run(data, tmp_path / "results.json", shard_search=True, **options)


def test_shard_wise_search_checks_shard_provenance(data, tmp_path):
    for shard_id, num_shards in ((0, 2), (2, 3)):
        generate_dense_embeddings(gen_embs_config(data["model"], data["psgs"], tmp_path / "emb", shard_id=shard_id,
                                                  num_shards=num_shards))
    with pytest.raises(ShardProvenanceError, match="num_shards differs"):
        run(data, tmp_path / "results.json", shard_search=True, encoded_ctx_files=f"['{tmp_path / 'emb_*'}']")


def test_index_too_large_for_the_machine_fails_before_building(data, tmp_path, monkeypatch):
    monkeypatch.setattr(faiss_indexers, "available_memory_bytes", lambda: (1024, "a test's limit"))
    with pytest.raises(InsufficientMemoryError, match="a test's limit"):
        run(data, tmp_path / "results.json")


def test_hybrid_fusion_on_a_hand_checked_case():
    dense = (["a", "b", "c"], np.array([10.0, 8.0, 6.0]))  # normalised 1, .5, 0
    bm25 = (["c", "d", "a"], np.array([20.0, 15.0, 10.0]))  # normalised 1, .5, 0
    ids, scores = fuse_scores(dense, bm25, alpha=0.6, k=4)
    # a: .6*1 + .4*0 = .6; c: .6*0 + .4*1 = .4; b: .6*.5 = .3; d: .4*.5 = .2
    assert ids == ["a", "c", "b", "d"]
    np.testing.assert_allclose(scores, [0.6, 0.4, 0.3, 0.2], rtol=1e-6)
    # L2 distances (lower is better) normalise like the inner products they stand for
    l2 = (["a", "b", "c"], np.array([1.0, 2.0, 3.0]))
    assert fuse_scores(l2, bm25, 0.6, 4, dense_higher_is_better=False)[0] == ids
    assert fuse_scores(dense, bm25, 1.0, 2)[0] == ["a", "b"] and fuse_scores(dense, bm25, 0.0, 2)[0] == ["c", "d"]
    # ties keep the dense order; a list of equal scores normalises to 1
    assert fuse_scores((["x", "y"], np.array([5.0, 5.0])), ([], np.array([])), 0.5, 2)[0] == ["x", "y"]
    with pytest.raises(ValueError):
        hybrid_results([dense], [bm25], alpha=1.5, k=2)


def test_gc_flags_map_onto_the_config():
    argv = ["--model_file", "cp", "--qa_file", "nq-test.qa.csv", "--ctx_file", "psgs_w100.tsv",
            "--encoded_ctx_file", "embs/wiki_*.pkl", "--out_file", "out.json", "--match", "regex", "--n-docs", "50",
            "--validation_workers", "4", "--batch_size", "64", "--index_buffer", "1000", "--hnsw_index",
            "--save_or_load_index", "--encode_q_and_save", "--q_encoding_path", "q.pt", "--re_encode_q"]
    keys = config_top_level_keys(CONF_DIR, "dense_retriever")
    cfg = compose_config(translate_argv(argv, DENSE_RETRIEVER_FLAGS, DENSE_RETRIEVER_GC_DEFAULTS, keys),
                         "dense_retriever")
    assert (cfg.qa_dataset, list(cfg.ctx_datatsets), list(cfg.encoded_ctx_files)) == (
        "nq-test.qa.csv", ["psgs_w100.tsv"], ["embs/wiki_*.pkl"])
    assert (cfg.match, cfg.n_docs, cfg.validation_workers, cfg.batch_size, cfg.index_buffer) == (
        "regex", 50, 4, 64, 1000)
    assert cfg.hnsw_index and cfg.save_or_load_index and cfg.encode_q_and_save and cfg.re_encode_q
    assert cfg.q_encoding_path == "q.pt" and cfg.encoder.sequence_length == 512
    defaults = translate_argv(["--qa_file", "q.csv"], DENSE_RETRIEVER_FLAGS, DENSE_RETRIEVER_GC_DEFAULTS, keys)
    gc_cfg = compose_config(defaults, "dense_retriever")
    assert (gc_cfg.n_docs, gc_cfg.batch_size) == (200, 32)  # GC-DPR's defaults


def test_script_with_gc_flags_derives_and_reuses_the_index(data, tmp_path):
    command = [sys.executable, str(REPO_ROOT / "dense_retriever.py"), "--pretrained_model_cfg", data["model"],
               "--sequence_length", "64", "--do_lower_case", "--qa_file", data["qas"], "--ctx_file", data["psgs"],
               "--encoded_ctx_file", data["embs"], "--out_file", str(tmp_path / "out.json"), "--n-docs", "20",
               "--validation_workers", "2", "--hnsw_index", "--save_or_load_index"]
    completed = subprocess.run(command, check=True, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert "Validation results: top k documents hits accuracy" in completed.stdout
    assert re.search(r"^\s+20 \|\s+\d+ \|", completed.stdout, re.M)
    assert index_exists(str(data["dir"] / "embs" / "psgs"))  # GC-DPR's prefix: embs/psgs_0 -> embs/psgs


def test_bm25_on_squad_open(shared_data, tmp_path, capsys):
    """The real collection with BM25 alone (no model): top-5 as data/README.md reports, about 93%."""
    squad = shared_data / "squad_open"
    cfg = compose_config([f"qa_dataset={squad / 'dev.qa.csv'}", f"ctx_datatsets=[{squad / 'psgs.tsv'}]",
                          "retriever=bm25", "n_docs=5", "validation_workers=2",
                          f"out_file={tmp_path / 'bm25.json'}"], "dense_retriever")
    stats = run_dense_retriever(cfg)["bm25"]
    accuracy = [hits / 1427 for hits in stats.top_k_hits]
    assert 0.75 < accuracy[0] < 0.85 and 0.9 < accuracy[4] < 0.96
    assert top_k_hits_from_results(tmp_path / "bm25.json") == (stats.top_k_hits, 1427)


def test_saved_index_refuses_the_questions_of_another_model(data, tmp_path):
    """A saved index keeps its shards' provenance: retrieving from it with a retrained model fails in one line
    instead of searching the old model's vectors (the index would otherwise be loaded as it is)."""
    index_path = str(tmp_path / "index") + "/"
    run(data, tmp_path / "built.json", index_path=index_path)
    assert index_exists(index_path)
    other_model = tiny_model(tmp_path / "other_bert", seed=1)
    cfg = retriever_config(other_model, data["qas"], data["psgs"], data["embs"], str(tmp_path / "stale.json"),
                           index_path=index_path)
    with pytest.raises(ShardProvenanceError, match="the saved index .* holds: model.weights"):
        run_dense_retriever(cfg)
    run(data, tmp_path / "loaded.json", index_path=index_path)  # the model it was built with still loads it
    assert (tmp_path / "built.json").read_text() == (tmp_path / "loaded.json").read_text()


def test_index_saved_beside_shards_refuses_shards_of_another_model(data, tmp_path):
    """GC-DPR's save_or_load_index keeps the index beside the shards: re-embedding the shards with another model
    must not leave the old index in use."""
    shards = tmp_path / "embs" / "psgs"
    generate_dense_embeddings(gen_embs_config(data["model"], data["psgs"], shards))
    embs = str(shards) + "_*"
    run(data, tmp_path / "built.json", encoded_ctx_files=f"['{embs}']", save_or_load_index=True)
    other_model = tiny_model(tmp_path / "other_bert", seed=1)
    generate_dense_embeddings(gen_embs_config(other_model, data["psgs"], shards))  # the shards now hold new vectors
    cfg = retriever_config(other_model, data["qas"], data["psgs"], embs, str(tmp_path / "stale.json"),
                           save_or_load_index=True)
    with pytest.raises(ShardProvenanceError, match="holds another model's vectors than the shards"):
        run_dense_retriever(cfg)


def _rewrite_texts_behind_the_same_ids(path):
    """Other texts under the same ids, the file keeping its size (only the content fingerprint can tell)."""
    rows = [(pid, text[::-1], title) for pid, text, title in passages()]
    write_passages_tsv(path, rows)


@pytest.mark.parametrize("indexing", [{}, {"shard_search": True}, {"index_path": "saved"}])
def test_passages_changed_after_embedding_are_refused(data, tmp_path, indexing):
    """Texts changed behind the same ids after embedding: retrieval refused, naming the passages file and a shard
    (it searched the old vectors and showed the new texts: top-20 59.1% -> 45.5%, exit 0)."""
    psgs = tmp_path / "psgs.tsv"
    psgs.write_bytes(open(data["psgs"], "rb").read())  # the same content elsewhere, another mtime: accepted
    if "index_path" in indexing:
        indexing = {"index_path": str(tmp_path / "index") + "/"}
        run(data, tmp_path / "build.json", **indexing)
    cfg = retriever_config(data["model"], data["qas"], str(psgs), data["embs"], str(tmp_path / "ok.json"), **indexing)
    run_dense_retriever(cfg)
    _rewrite_texts_behind_the_same_ids(psgs)
    cfg = retriever_config(data["model"], data["qas"], str(psgs), data["embs"], str(tmp_path / "stale.json"),
                           **indexing)
    with pytest.raises(ShardProvenanceError, match=rf"passages file {re.escape(str(psgs))} is not the one .*"
                                                   r"(psgs_\d|index).* passages.sample_hash"):
        run_dense_retriever(cfg)
    assert not (tmp_path / "stale.json").exists()


def test_each_shard_set_is_checked_against_its_own_passages_file(data, tmp_path):
    """Two sources: the pairing encoded_ctx_files[i] <-> ctx_datatsets[i] is what is checked, so the same files
    given in the other order are refused."""
    other = tmp_path / "other.tsv"
    rows = [(str(100 + int(pid)), text, title) for pid, text, title in passages()]
    write_passages_tsv(other, rows)
    generate_dense_embeddings(gen_embs_config(data["model"], str(other), tmp_path / "embs" / "other"))
    other_embs = str(tmp_path / "embs" / "other_*")
    both = f"[{data['psgs']},{other}]"
    cfg = retriever_config(data["model"], data["qas"], data["psgs"], data["embs"], str(tmp_path / "ok.json"),
                           ctx_datatsets=both, encoded_ctx_files=f"['{data['embs']}','{other_embs}']")
    run_dense_retriever(cfg)
    cfg = retriever_config(data["model"], data["qas"], data["psgs"], data["embs"], str(tmp_path / "swapped.json"),
                           ctx_datatsets=both, encoded_ctx_files=f"['{other_embs}','{data['embs']}']")
    with pytest.raises(ShardProvenanceError, match=rf"passages file {re.escape(data['psgs'])} is not the one"):
        run_dense_retriever(cfg)
