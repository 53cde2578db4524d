"""encoder_backend=onnx|onnx_int8 in generate_dense_embeddings and dense_retriever: the same shards (vectors within
1e-4), the same retrieval, provenance that records the backend; int8 kept apart from fp32 vectors; the graph read
from onnx_dir (checked against the model) or exported once into the cache."""
import json
import shutil

import numpy as np
import pytest
import torch

import convert_dpr_checkpoint
from dpr.data.embeddings_io import read_embeddings
from dpr.foundation.errors import ConfigError
from dpr.foundation.precision import make_precision
from dpr.indexing.dense_retriever import run_dense_retriever
from dpr.indexing.encoder_backend import EncoderBackend, batch_encoder
from dpr.indexing.encoding import TorchVectors, encode_questions
from dpr.indexing.generate_embeddings import generate_dense_embeddings
from dpr.indexing.shard_provenance import ShardProvenanceError, check_shard_sets, read_provenance, sidecar_path
from dpr.models.encoder_spec import EncoderSpec
from dpr.models.loading import load_inference_encoder
from dpr.models.onnx_graph import RECORD_NAME, OnnxExportError
from tests.fixtures import forbid_calls
from tests.retrieval_helpers import (
    gen_embs_config,
    retriever_config,
    tiny_model,
    write_biencoder_checkpoint,
    write_passages_tsv,
    write_questions_csv,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A two-tower checkpoint of tiny models, its export-onnx folder (with int8), 23 passages embedded by torch in
    two shards, 12 questions."""
    folder = tmp_path_factory.mktemp("onnx_backend")
    ctx_dir = tiny_model(folder / "c", seed=2)
    checkpoint = write_biencoder_checkpoint(folder / "cp", tiny_model(folder / "q", seed=1), ctx_dir)
    onnx_dir = folder / "onnx"
    convert_dpr_checkpoint.main(["export-onnx", checkpoint, str(onnx_dir), "--quantize", "int8"])
    data = {"ctx_dir": ctx_dir, "cp": checkpoint, "onnx_dir": str(onnx_dir), "dir": folder,
            "psgs": write_passages_tsv(folder / "psgs.tsv"), "qas": write_questions_csv(folder / "qas.csv")}
    data["torch_shards"] = embed(data, folder / "torch" / "emb", "torch")
    return data


def embed(data, out_file, backend, num_shards=2, shard_ids=None, **values):
    return [generate_dense_embeddings(gen_embs_config(
        data["ctx_dir"], data["psgs"], out_file, model_file=data["cp"], encoder_backend=backend, shard_id=shard_id,
        num_shards=num_shards, **values)) for shard_id in (shard_ids if shard_ids is not None else range(num_shards))]


def retrieve(data, shards_glob, out_file, backend, **values):
    cfg = retriever_config(data["ctx_dir"], data["qas"], data["psgs"], shards_glob, str(out_file),
                           model_file=data["cp"], encoder_backend=backend, **values)
    run_dense_retriever(cfg)
    return [[ctx["id"] for ctx in record["ctxs"]] for record in json.loads(out_file.read_text())]


def test_onnx_shards_equal_torch_shards_and_retrieve_the_same(data, tmp_path):
    onnx_shards = embed(data, tmp_path / "onnx" / "emb", "onnx", onnx_dir=data["onnx_dir"])
    for torch_shard, onnx_shard in zip(data["torch_shards"], onnx_shards):
        torch_ids, torch_vectors = read_embeddings(torch_shard)
        onnx_ids, onnx_vectors = read_embeddings(onnx_shard)
        assert onnx_ids == torch_ids and onnx_vectors.dtype == np.float32
        assert np.abs(onnx_vectors - torch_vectors).max() <= 1e-4
        record = read_provenance(onnx_shard)
        assert record["encoder_backend"] == "onnx" and "quantization" not in record["model"]
        assert read_provenance(torch_shard)["encoder_backend"] == "torch"
    # an ONNX shard beside a torch shard of the same model is accepted (fp32 vectors agree within 1e-4)
    assert check_shard_sets([[data["torch_shards"][0], onnx_shards[1]]]) is not None
    by_torch = retrieve(data, str(data["dir"] / "torch" / "emb_*"), tmp_path / "torch.json", "torch")
    by_onnx = retrieve(data, str(tmp_path / "onnx" / "emb_*"), tmp_path / "onnx.json", "onnx",
                       onnx_dir=data["onnx_dir"])
    assert by_onnx == by_torch and len(by_torch) == 12 and all(len(ids) == 20 for ids in by_torch)


def test_int8_shards_are_kept_apart_from_fp32_vectors(data, tmp_path):
    [int8_shard] = embed(data, tmp_path / "int8" / "emb", "onnx_int8", shard_ids=[1], onnx_dir=data["onnx_dir"])
    record = read_provenance(int8_shard)
    assert record["encoder_backend"] == "onnx_int8" and record["model"]["quantization"] == "int8"
    ids, vectors = read_embeddings(int8_shard)
    torch_ids, torch_vectors = read_embeddings(data["torch_shards"][1])
    assert ids == torch_ids and vectors.shape == torch_vectors.shape
    with pytest.raises(ShardProvenanceError, match="model.quantization"):
        check_shard_sets([[data["torch_shards"][0], int8_shard]])
    embed(data, tmp_path / "int8" / "emb", "onnx_int8", shard_ids=[0], onnx_dir=data["onnx_dir"])
    with pytest.raises(ShardProvenanceError, match="quantization"):  # fp32 questions against int8 passages
        retrieve(data, str(tmp_path / "int8" / "emb_*"), tmp_path / "r.json", "torch")
    assert len(retrieve(data, str(tmp_path / "int8" / "emb_*"), tmp_path / "r.json", "onnx_int8",
                        onnx_dir=data["onnx_dir"])) == 12


def test_a_complete_torch_shard_is_reused_by_onnx_and_re_embedded_by_int8(data, tmp_path, monkeypatch):
    torch_shard = data["torch_shards"][0]
    for source in (torch_shard, sidecar_path(torch_shard)):
        shutil.copy(source, tmp_path / source.name)
    before = (tmp_path / torch_shard.name).stat().st_mtime_ns
    with monkeypatch.context() as patch:
        forbid_calls(patch, "dpr.indexing.generate_embeddings.encode_batches")
        embed(data, tmp_path / "emb", "onnx", shard_ids=[0], onnx_dir=data["onnx_dir"])
    assert (tmp_path / torch_shard.name).stat().st_mtime_ns == before
    [shard] = embed(data, tmp_path / "emb", "onnx_int8", shard_ids=[0], onnx_dir=data["onnx_dir"])
    assert read_provenance(shard)["model"]["quantization"] == "int8"


def test_graph_exported_once_into_the_cache(data, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    [first] = embed(data, tmp_path / "cached" / "emb", "onnx", shard_ids=[0], onnx_cache_dir=cache)
    [entry] = list(cache.iterdir())
    assert (entry / RECORD_NAME).is_file() and (entry / "ctx_encoder.onnx").is_file()
    assert np.abs(read_embeddings(first)[1] - read_embeddings(data["torch_shards"][0])[1]).max() <= 1e-4
    forbid_calls(monkeypatch, "dpr.indexing.encoder_backend.export_folder")
    [second] = embed(data, tmp_path / "cached" / "emb", "onnx", shard_ids=[1], onnx_cache_dir=cache)
    assert np.abs(read_embeddings(second)[1] - read_embeddings(data["torch_shards"][1])[1]).max() <= 1e-4
    # the cache entry holds the fp32 ctx graph only: asked for as onnx_dir with int8, it says so
    with pytest.raises(OnnxExportError, match="no int8 graph of the ctx encoder"):
        embed(data, tmp_path / "x" / "emb", "onnx_int8", shard_ids=[0], onnx_dir=entry)


def test_onnx_dir_of_another_model_is_refused_before_embedding(data, tmp_path, monkeypatch):
    forbid_calls(monkeypatch, "dpr.indexing.generate_embeddings.encode_batches")
    other = write_biencoder_checkpoint(tmp_path / "other", data["ctx_dir"], data["ctx_dir"])
    cfg = gen_embs_config(data["ctx_dir"], data["psgs"], tmp_path / "emb", model_file=other, encoder_backend="onnx",
                          onnx_dir=data["onnx_dir"])
    with pytest.raises(OnnxExportError, match="another model .*model.weights"):
        generate_dense_embeddings(cfg)
    cfg = gen_embs_config(data["ctx_dir"], data["psgs"], tmp_path / "emb", model_file=data["cp"],
                          encoder_backend="onnx", onnx_dir=tmp_path)
    with pytest.raises(OnnxExportError, match=f"onnx_dir={tmp_path} has no {RECORD_NAME}"):
        generate_dense_embeddings(cfg)


PREFIXED = dict(query_prefix="query: ", passage_prefix="passage: ", query_sequence_length=12)
LONG_QUESTION = "who was the one of the two in the tower and what is it to the sea"  # over 12 tokens


def test_a_prefixed_checkpoint_gives_the_torch_vectors_and_another_tokenization_is_refused(data, tmp_path, monkeypatch):
    """The same two towers trained with prefixes and a shorter question length: its export-onnx folder, run by
    encoder_backend=onnx, gives torch's passage shards and question vectors (1e-4); the folder of the
    unprefixed checkpoint (the same weights) is refused in one line naming the setting that differs."""
    checkpoint = write_biencoder_checkpoint(tmp_path / "cp", str(data["dir"] / "q"), data["ctx_dir"], **PREFIXED)
    onnx_dir = tmp_path / "onnx"
    convert_dpr_checkpoint.main(["export-onnx", checkpoint, str(onnx_dir)])
    prefixed = dict(data, cp=checkpoint)
    [torch_shard] = embed(prefixed, tmp_path / "torch" / "emb", "torch", num_shards=1)
    [onnx_shard] = embed(prefixed, tmp_path / "onnx_emb" / "emb", "onnx", num_shards=1, onnx_dir=onnx_dir)
    (ids, torch_vectors), (onnx_ids, onnx_vectors) = read_embeddings(torch_shard), read_embeddings(onnx_shard)
    assert onnx_ids == ids and np.abs(onnx_vectors - torch_vectors).max() <= 1e-4
    unprefixed_ids, unprefixed = read_embeddings(data["torch_shards"][0])  # the same weights, no passage prefix
    assert np.abs(torch_vectors[[ids.index(i) for i in unprefixed_ids]] - unprefixed).max() > 1e-3

    cpu = torch.device("cpu")
    encoder = load_inference_encoder(EncoderSpec(data["ctx_dir"]), "question", checkpoint)
    assert len(encoder.tokenizer("query: " + LONG_QUESTION)["input_ids"]) > encoder.spec.question_length == 12
    questions = ["what is the capital of france?", LONG_QUESTION]
    backend = EncoderBackend("onnx", onnx_dir=str(onnx_dir))
    by_onnx = encode_questions(encoder, batch_encoder(encoder, backend, "question", checkpoint, cpu,
                                                      make_precision(cpu)), questions, 2)
    by_torch = encode_questions(encoder, TorchVectors(encoder, cpu, make_precision(cpu)), questions, 2)
    assert np.abs(by_onnx - by_torch).max() <= 1e-4

    forbid_calls(monkeypatch, "dpr.indexing.generate_embeddings.encode_batches")
    with pytest.raises(OnnxExportError, match=r"^onnx_dir=.* was exported to tokenize with query_prefix='', but the "
                                              r"model's encoder spec \(model_file and encoder settings\) says "
                                              r"query_prefix='query: ': give the folder exported from this checkpoint"):
        embed(prefixed, tmp_path / "x" / "emb", "onnx", num_shards=1, onnx_dir=data["onnx_dir"])


@pytest.mark.parametrize("values, message", [
    ({"encoder_backend": "tensorrt"}, "choose one of torch, onnx, onnx_int8"),
    ({"encoder_backend": "onnx", "bf16": True}, "drop fp16/bf16"),
    ({"encoder_backend": "torch", "onnx_dir": "somewhere"}, "read by encoder_backend=onnx or onnx_int8 only"),
])
def test_backend_options_are_checked_before_any_work(data, tmp_path, monkeypatch, values, message):
    forbid_calls(monkeypatch, "dpr.indexing.encoding.EncoderSettings.load")
    cfg = gen_embs_config(data["ctx_dir"], data["psgs"], tmp_path / "emb", model_file=data["cp"], **values)
    with pytest.raises(ConfigError, match=message):
        generate_dense_embeddings(cfg)
    with pytest.raises(ConfigError, match=message):
        run_dense_retriever(retriever_config(data["ctx_dir"], data["qas"], data["psgs"], str(tmp_path / "none_*"),
                                             str(tmp_path / "r.json"), model_file=data["cp"], **values))
