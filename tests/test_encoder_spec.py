"""One encoder spec, honoured everywhere: resolved from the configuration and the checkpoint, and a model trained
with cosine similarity embedded, encoded and searched with cosine (normalised vectors, scores that are cosines)."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dpr.data.embeddings_io import read_embeddings
from dpr.foundation.checkpoints import CheckpointError, CheckpointState, save_checkpoint
from dpr.indexing.dense_retriever import run_dense_retriever
from dpr.indexing.generate_embeddings import generate_dense_embeddings
from dpr.models.encoder_spec import EncoderConfigError, EncoderSpec
from dpr.models.loading import load_inference_encoder, weights_fingerprint
from tests.fixtures import TOPICS
from tests.retrieval_helpers import (
    encode_directly,
    gen_embs_config,
    passages,
    retriever_config,
    tiny_model,
    write_biencoder_checkpoint,
    write_passages_tsv,
    write_questions_csv,
)


@pytest.fixture(scope="module")
def cosine(tmp_path_factory):
    """Two tiny towers in a checkpoint trained (as its encoder_params say) with cosine similarity."""
    folder = tmp_path_factory.mktemp("cosine")
    ctx_dir, question_dir = tiny_model(folder / "ctx", seed=0), tiny_model(folder / "question", seed=1)
    checkpoint = write_biencoder_checkpoint(folder / "dpr_biencoder.3", question_dir, ctx_dir,
                                            similarity="cosine", temperature=0.05)
    return {"ctx": ctx_dir, "question": question_dir, "checkpoint": checkpoint, "dir": folder,
            "psgs": write_passages_tsv(folder / "psgs.tsv"), "qas": write_questions_csv(folder / "qas.csv")}


def test_checkpoint_params_round_trip_and_override_the_configuration():
    trained = EncoderSpec("bert-base-uncased", projection_dim=128, pooling="mean", similarity="cosine",
                          temperature=0.05, share_encoders=True, do_lower_case=False)
    configured = EncoderSpec("bert-base-uncased", sequence_length=512)
    resolved = configured.with_checkpoint_params(trained.checkpoint_params())
    assert resolved == trained
    assert trained.vector_params() == {
        "encoder_model_type": "hf_bert", "projection_dim": 128, "sequence_length": 256, "token_type_ids": False,
        "pooling": "mean", "similarity": "cosine", "do_lower_case": False, "query_sequence_length": None,
        "query_prefix": "", "passage_prefix": "",
    }


def test_bad_settings_name_the_key():
    with pytest.raises(EncoderConfigError, match="encoder.pooling='max'"):
        EncoderSpec("m", pooling="max")
    with pytest.raises(EncoderConfigError, match="unknown key.*poolin"):
        EncoderSpec.from_config({"pretrained_model_cfg": "m", "poolin": "mean"})


def test_load_inference_encoder_returns_the_checkpoint_spec_and_half(cosine):
    configured = EncoderSpec("not-used", sequence_length=16)  # the checkpoint's values win, as in DPR
    encoder = load_inference_encoder(configured, "question", cosine["checkpoint"])
    assert (encoder.spec.similarity, encoder.spec.temperature, encoder.spec.sequence_length) == ("cosine", 0.05, 64)
    assert encoder.spec.pretrained_model_cfg == cosine["ctx"]
    ctx_encoder = load_inference_encoder(configured, "ctx", cosine["checkpoint"])
    assert encoder.weights == ctx_encoder.weights  # the fingerprint is the whole checkpoint's
    pretrained = load_inference_encoder(EncoderSpec(cosine["ctx"]))
    assert pretrained.spec == EncoderSpec(cosine["ctx"]) and pretrained.weights != encoder.weights
    assert pretrained.weights == weights_fingerprint(pretrained.model.state_dict())
    reader_like = str(cosine["dir"] / "reader.cp")
    save_checkpoint(reader_like, CheckpointState({"encoder.x": torch.zeros(1)}, None, None, 0, 0, {}))
    with pytest.raises(CheckpointError, match="no 'ctx_model"):
        load_inference_encoder(configured, "ctx", reader_like)


def _normalised(vectors: torch.Tensor) -> np.ndarray:
    return F.normalize(vectors, dim=-1).numpy()


def test_cosine_checkpoint_is_embedded_encoded_and_searched_with_cosine(cosine, tmp_path):
    # the configuration says dot (the default): the checkpoint's cosine must win everywhere
    gen_cfg = gen_embs_config("unused", cosine["psgs"], tmp_path / "emb", model_file=cosine["checkpoint"])
    assert gen_cfg.encoder.similarity == "dot"
    ids, passage_vectors = read_embeddings(generate_dense_embeddings(gen_cfg))
    rows = passages()
    expected_passages = _normalised(encode_directly(cosine["ctx"], [r[1] for r in rows], [r[2] for r in rows]))
    np.testing.assert_allclose(np.linalg.norm(passage_vectors, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(passage_vectors, expected_passages, atol=2e-5)

    q_path = tmp_path / "q.pt"
    out_file = tmp_path / "results.json"
    cfg = retriever_config("unused", cosine["qas"], cosine["psgs"], str(tmp_path / "emb_0"), str(out_file),
                           model_file=cosine["checkpoint"], q_encoding_path=str(q_path), n_docs=5)
    run_dense_retriever(cfg)
    questions = [f"what is the capital of {country}?" for _city, country, _text in TOPICS]
    expected_questions = _normalised(encode_directly(cosine["question"], questions))
    question_vectors = torch.load(q_path, weights_only=True).numpy()
    np.testing.assert_allclose(np.linalg.norm(question_vectors, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(question_vectors, expected_questions, atol=2e-5)

    row_of = {doc_id: row for row, doc_id in enumerate(ids)}
    records = json.loads(out_file.read_text(encoding="utf-8"))
    for question_row, record in enumerate(records):
        scores = [float(ctx["score"]) for ctx in record["ctxs"]]
        by_hand = [float(expected_passages[row_of[ctx["id"]]] @ expected_questions[question_row])
                   for ctx in record["ctxs"]]
        assert max(scores) <= 1.0 + 1e-6
        np.testing.assert_allclose(scores, by_hand, atol=2e-5)  # cosines, not divided by the temperature
        assert by_hand == sorted(by_hand, reverse=True)
