"""Stale shards are never reused: a shard is skipped only when its provenance record matches exactly, and the
retriever refuses shards (or a question encoder) of different provenance."""
import json
import os
import shutil

import numpy as np
import pytest

from dpr.data.embeddings_io import read_embeddings, shard_path
from dpr.indexing import generate_embeddings
from dpr.indexing.dense_retriever import run_dense_retriever
from dpr.indexing.generate_embeddings import generate_dense_embeddings
from dpr.indexing.shard_provenance import ShardProvenanceError, read_provenance, sidecar_path
from tests.retrieval_helpers import (
    gen_embs_config,
    passages,
    retriever_config,
    tiny_model,
    write_passages_tsv,
    write_questions_csv,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("provenance")
    rows = passages()
    return {
        "model": tiny_model(folder / "bert", seed=0),
        "other_model": tiny_model(folder / "other", seed=5),
        "psgs": write_passages_tsv(folder / "psgs.tsv"),
        # the same passages, one text changed: same ids, same count
        "other_psgs": write_passages_tsv(folder / "other.tsv", rows[:-1] + [(rows[-1][0], "a changed text", "x")]),
        "qas": write_questions_csv(folder / "qas.csv"),
    }


def embed(data, out_file, model=None, psgs=None, **values):
    cfg = gen_embs_config(model or data["model"], psgs or data["psgs"], out_file, **values)
    return generate_dense_embeddings(cfg)


class EmbeddingCounter:
    """Counts the shards actually embedded (not skipped)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = generate_embeddings.encode_batches

        def counting(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(generate_embeddings, "encode_batches", counting)


def test_the_record_says_what_made_the_shard(data, tmp_path):
    path = embed(data, tmp_path / "emb", shard_id=1, num_shards=2)
    record = read_provenance(path)
    assert sidecar_path(path).name == ".emb_1.provenance.json"  # hidden: an emb_* glob never takes it
    assert (record["shard_id"], record["num_shards"], record["encoder_type"]) == (1, 2, "ctx")
    assert record["model"]["checkpoint"] is None and record["model"]["weights"].startswith("blake2b:")
    assert record["model"]["encoder_params"]["encoder"]["pretrained_model_cfg"] == data["model"]
    assert record["passages"]["size"] == os.path.getsize(data["psgs"])
    assert record["passages"]["path"].endswith("psgs.tsv")


def test_an_identical_rerun_is_skipped(data, tmp_path, monkeypatch):
    path = embed(data, tmp_path / "emb", num_shards=2)
    counter = EmbeddingCounter(monkeypatch)
    assert embed(data, tmp_path / "emb", num_shards=2) == path and counter.calls == 0


@pytest.mark.parametrize("change", ["model", "passages", "num_shards", "pooling", "no record"])
def test_a_shard_of_other_inputs_is_re_embedded(data, tmp_path, monkeypatch, change):
    path = embed(data, tmp_path / "emb", num_shards=2)
    before = read_embeddings(path)
    counter = EmbeddingCounter(monkeypatch)
    values = {"num_shards": 2}
    if change == "model":
        values["model"] = data["other_model"]
    elif change == "passages":
        values["psgs"] = data["other_psgs"]
    elif change == "num_shards":
        values["num_shards"] = 3
    elif change == "pooling":
        values["encoder__pooling"] = "mean"
    else:
        sidecar_path(path).unlink()
    assert embed(data, tmp_path / "emb", **values) == path and counter.calls == 1
    after = read_embeddings(path)
    if change == "num_shards":
        assert (len(before[0]), len(after[0])) == (12, 8)  # ceil(23/2), ceil(23/3)
    elif change in ("model", "pooling"):
        assert not np.allclose(before[1], after[1], atol=1e-4)
    record = read_provenance(path)
    assert record["num_shards"] == values["num_shards"]
    assert record["passages"]["path"].endswith("other.tsv" if change == "passages" else "psgs.tsv")


def _retrieve(data, embeddings, tmp_path, model=None):
    cfg = retriever_config(model or data["model"], data["qas"], data["psgs"], embeddings,
                           str(tmp_path / "results.json"), n_docs=5)
    return run_dense_retriever(cfg)


def test_shards_of_different_models_are_not_mixed(data, tmp_path):
    embed(data, tmp_path / "emb", shard_id=0, num_shards=2)
    embed(data, tmp_path / "emb", model=data["other_model"], shard_id=1, num_shards=2)
    with pytest.raises(ShardProvenanceError) as refused:
        _retrieve(data, str(tmp_path / "emb_*"), tmp_path)
    message = str(refused.value)
    assert "emb_0" in message and "emb_1" in message and "model.weights differs" in message


def test_shards_of_different_shard_counts_are_not_mixed(data, tmp_path):
    """The index of 3,100 vectors for 2,067 passages: emb_0 and emb_1 of a 2-shard run, emb_2 of a 3-shard run."""
    for shard_id in range(2):
        embed(data, tmp_path / "emb", shard_id=shard_id, num_shards=2)
    embed(data, tmp_path / "emb", shard_id=2, num_shards=3)
    with pytest.raises(ShardProvenanceError, match=r"emb_0 and .*emb_2 were made differently: num_shards differs"):
        _retrieve(data, str(tmp_path / "emb_*"), tmp_path)


def test_questions_of_another_model_are_refused(data, tmp_path):
    embed(data, tmp_path / "emb")
    with pytest.raises(ShardProvenanceError, match="question encoder is not the model that embedded.*model.weights"):
        _retrieve(data, str(tmp_path / "emb_0"), tmp_path, model=data["other_model"])


def test_shards_without_records_are_used_as_they_are(data, tmp_path):
    """DPR's released shards have no record: accepted, whatever model encodes the questions."""
    for shard_id in range(2):
        path = embed(data, tmp_path / "emb", shard_id=shard_id, num_shards=2)
        sidecar_path(path).unlink()
    stats = _retrieve(data, str(tmp_path / "emb_*"), tmp_path, model=data["other_model"])
    assert len(stats["dense"].top_k_hits) == 5


def test_shards_copied_to_another_place_still_agree(data, tmp_path):
    """Paths and mtimes differ between machines of a sweep; only the content is compared when mixing."""
    embed(data, tmp_path / "a" / "emb", shard_id=0, num_shards=2)
    copy = tmp_path / "copy.tsv"
    shutil.copy(data["psgs"], copy)
    embed(data, tmp_path / "b" / "emb", psgs=str(copy), shard_id=1, num_shards=2)
    (tmp_path / "b" / "emb_1").rename(tmp_path / "a" / "emb_1")
    sidecar_path(tmp_path / "b" / "emb_1").rename(sidecar_path(tmp_path / "a" / "emb_1"))
    assert json.loads(sidecar_path(tmp_path / "a" / "emb_1").read_text())["passages"]["path"] == str(copy)
    stats = _retrieve(data, str(tmp_path / "a" / "emb_*"), tmp_path)
    assert len(stats["dense"].top_k_hits) == 5
    assert shard_path(tmp_path / "a" / "emb", 1, "dpr").is_file()
