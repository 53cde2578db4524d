"""encoder.pooling (cls | mean) and encoder.share_encoders: hand-computed vectors, padding invariance, the
checkpoint (one set of weights for shared towers, settings saved by the spec) and embedding from it."""
import os

import numpy as np
import pytest
import torch

from dpr.data.embeddings_io import read_embeddings
from dpr.data.tensorizer import Tensorizer
from dpr.foundation.checkpoints import CheckpointState, load_checkpoint, load_model_state, save_checkpoint
from dpr.indexing.generate_embeddings import generate_dense_embeddings
from dpr.models.biencoder import build_biencoder
from dpr.models.encoder_spec import EncoderConfigError, EncoderSpec
from dpr.models.hf_encoder import build_encoder, encode, first_token_last_layer
from dpr.models.loading import load_inference_encoder
from tests.retrieval_helpers import (
    encode_directly,
    gen_embs_config,
    passages,
    tiny_model,
    write_biencoder_checkpoint,
    write_passages_tsv,
)

TEXTS = ["paris is the capital of france", "who", "the river runs to the sea and the sea is blue"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("pooling") / "bert")


def test_mean_pooling_is_the_mean_of_the_unpadded_token_vectors(model_dir):
    torch.manual_seed(0)
    model = build_encoder(model_dir, projection_dim=8, dropout=0.0).eval()
    spec = EncoderSpec(model_dir, sequence_length=64, pooling="mean")
    tensorizer = Tensorizer.for_spec(spec)
    token_ids = tensorizer.token_ids(TEXTS)
    with torch.no_grad():
        # by hand: each text alone, no padding at all, every token averaged, then the projection
        expected = torch.stack([
            model.encode_proj(model(input_ids=torch.tensor([ids])).last_hidden_state[0].mean(dim=0))
            for ids in token_ids
        ])
        dynamic = encode(model, *tensorizer.pad(token_ids), pooling="mean")[1]
        fixed = encode(model, *Tensorizer(tensorizer.tokenizer, 64, pad_to_max=True).pad(token_ids), pooling="mean")[1]
        cls = encode(model, *tensorizer.pad(token_ids))[1]
    assert fixed.shape == (3, 8)
    torch.testing.assert_close(dynamic, expected, atol=2e-5, rtol=0)
    torch.testing.assert_close(fixed, expected, atol=2e-5, rtol=0)
    assert not torch.allclose(cls, expected, atol=1e-3)  # the default is DPR's [CLS], not the mean


@pytest.mark.parametrize("texts", [TEXTS, TEXTS[:1]], ids=["padded", "no padding"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_first_token_last_layer_gives_the_cls_vector_of_the_whole_model(model_dir, texts, attention):
    model = build_encoder(model_dir, projection_dim=8, dropout=0.0).eval()
    model.config._attn_implementation = attention
    tensorizer = Tensorizer.for_spec(EncoderSpec(model_dir, sequence_length=64))
    ids, mask = tensorizer.pad(tensorizer.token_ids(texts))
    with torch.no_grad():
        full_sequence, full_cls = encode(model, ids, mask)
        with first_token_last_layer(model) as applied:
            sequence, cls = encode(model, ids, mask)
        after = encode(model, ids, mask)[0]
    assert applied and sequence.shape == (len(texts), 1, 32) and full_sequence.shape[1] > 1
    torch.testing.assert_close(cls, full_cls, atol=1e-5, rtol=1e-5)
    assert after.shape == full_sequence.shape  # the whole last layer once the context ends


def test_first_token_last_layer_leaves_other_architectures_whole(model_dir):
    model = build_encoder(model_dir, dropout=0.0).eval()
    model.config.model_type = "some-other-model"
    with first_token_last_layer(model) as applied:
        assert not applied
        assert "forward" not in vars(model.encoder.layer[-1])


def test_inference_encoder_trims_the_last_layer_for_cls_only(model_dir):
    ids, mask = Tensorizer.for_spec(EncoderSpec(model_dir)).tensorize(TEXTS)
    for pooling in ("cls", "mean"):
        encoder = load_inference_encoder(EncoderSpec(model_dir, pooling=pooling))
        seen = []
        hook = encoder.model.encoder.register_forward_hook(lambda m, i, out: seen.append(out.last_hidden_state.shape))
        with torch.no_grad():
            vectors = encoder.search_vectors(ids, mask)
            expected = encode(encoder.model, ids, mask, pooling=pooling)[1]
        hook.remove()
        torch.testing.assert_close(vectors, expected, atol=1e-5, rtol=1e-5)
        assert seen[0][1] == (1 if pooling == "cls" else ids.shape[1])


def test_biencoder_encodes_with_the_spec_pooling(model_dir):
    biencoder = build_biencoder(EncoderSpec(model_dir, sequence_length=64, dropout=0.0, pooling="mean")).eval()
    ids, mask = Tensorizer(Tensorizer.for_spec(EncoderSpec(model_dir)).tokenizer, 64).tensorize(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(biencoder.encode_questions(ids, mask),
                                   encode(biencoder.question_model, ids, mask, pooling="mean")[1])
        torch.testing.assert_close(biencoder.encode_contexts(ids, mask),
                                   encode(biencoder.ctx_model, ids, mask, pooling="mean")[1])


def _perturbed(biencoder, seed: int):
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in biencoder.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return biencoder.eval()


def _save(model, spec: EncoderSpec, path) -> str:
    """As the trainer saves: the BiEncoder's state dict and the spec's checkpoint params."""
    return save_checkpoint(str(path), CheckpointState(model.state_dict(), None, None, 0, 0, spec.checkpoint_params()))


def test_shared_towers_load_back_shared_from_dpr_layout(model_dir, tmp_path):
    shared_spec = EncoderSpec(model_dir, sequence_length=64, dropout=0.0, share_encoders=True)
    shared = _perturbed(build_biencoder(shared_spec), seed=1)
    assert shared.question_model is shared.ctx_model and shared.shares_encoders
    ckpt = load_checkpoint(_save(shared, shared_spec, tmp_path / "shared.cp"))
    # DPR's layout: both prefixes, so DPR's loaders (two towers) read it too
    assert {key.split(".")[0] for key in ckpt.model_dict} == {"question_model", "ctx_model"}

    spec = EncoderSpec(model_dir).with_checkpoint_params(ckpt.encoder_params)
    assert spec.share_encoders and spec.sequence_length == 64
    loaded = build_biencoder(spec)
    load_model_state(loaded, ckpt.model_dict)
    loaded.eval()
    assert loaded.question_model is loaded.ctx_model
    ids, mask = Tensorizer.for_spec(spec).tensorize(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_questions(ids, mask), shared.encode_questions(ids, mask))
        torch.testing.assert_close(loaded.encode_contexts(ids, mask), shared.encode_questions(ids, mask))


def test_a_shared_tower_checkpoint_stores_one_model(model_dir, tmp_path):
    shared_spec = EncoderSpec(model_dir, sequence_length=64, dropout=0.0, share_encoders=True)
    two_spec = EncoderSpec(model_dir, sequence_length=64, dropout=0.0)
    shared = _save(build_biencoder(shared_spec), shared_spec, tmp_path / "shared.cp")
    two = _save(build_biencoder(two_spec), two_spec, tmp_path / "two.cp")
    # torch.save writes a storage that several tensors share once
    assert os.path.getsize(shared) < 0.6 * os.path.getsize(two)


def test_shared_towers_cannot_fix_the_ctx_encoder(model_dir):
    with pytest.raises(EncoderConfigError, match="share_encoders=true with encoder.fix_ctx_encoder=true"):
        EncoderSpec(model_dir, share_encoders=True, fix_ctx_encoder=True)


def test_mean_pooling_round_trips_through_the_checkpoint_into_the_embeddings(model_dir, tmp_path):
    """The checkpoint says mean pooling; the configuration (cls, the default) is overridden by it, as in DPR."""
    question_dir = tiny_model(tmp_path / "question", seed=3)
    checkpoint = write_biencoder_checkpoint(tmp_path / "dpr_biencoder.0", question_dir, model_dir, pooling="mean")
    assert load_checkpoint(checkpoint).encoder_params["encoder"]["pooling"] == "mean"
    psgs = write_passages_tsv(tmp_path / "psgs.tsv")
    cfg = gen_embs_config("unused", psgs, tmp_path / "emb", model_file=checkpoint)
    assert cfg.encoder.pooling == "cls"
    ids, vectors = read_embeddings(generate_dense_embeddings(cfg))
    rows = passages()
    expected = encode_directly(model_dir, [r[1] for r in rows], [r[2] for r in rows], pooling="mean").numpy()
    assert ids == [r[0] for r in rows]
    np.testing.assert_allclose(vectors, expected, atol=2e-5)
