"""encoder.query_sequence_length, encoder.query_prefix and encoder.passage_prefix: each changes only what it says,
travels in the checkpoint's spec (old checkpoints and shard records, without the fields, read as the defaults),
and a wrong value is refused in one line."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dpr.data.biencoder_batch import make_biencoder_batch
from dpr.data.biencoder_data import load_biencoder_samples
from dpr.data.tensorizer import Tensorizer
from dpr.foundation.precision import make_precision
from dpr.indexing.encoding import TorchVectors, encode_questions
from dpr.indexing.shard_provenance import ShardProvenanceError, check_question_encoder, model_record
from dpr.models.biencoder import build_biencoder
from dpr.models.encoder_spec import EncoderConfigError, EncoderSpec
from dpr.models.loading import load_inference_encoder
from tests.fixtures import write_retriever_json
from tests.tiny_models import tiny_bert_dir

LENGTH = 48


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qlen")
    return tiny_bert_dir(folder / "bert", dropout=0.1), load_biencoder_samples([write_retriever_json(folder / "t.json", 6)])


def batch_of(model_dir, samples, **fields):
    tensorizer = Tensorizer.for_biencoder(EncoderSpec(model_dir, sequence_length=LENGTH, **fields))
    return tensorizer, make_biencoder_batch(samples, range(6), tensorizer, 1, 0, shuffle=False)


def rows(ids, mask):
    return [row[: int(m.sum())].tolist() for row, m in zip(ids, mask)]


def test_query_sequence_length_truncates_questions_only(setup):
    model_dir, samples = setup
    tensorizer, plain = batch_of(model_dir, samples)
    _, short = batch_of(model_dir, samples, query_sequence_length=6)
    sep = tensorizer.tokenizer.sep_token_id
    assert all(len(r) > 6 for r in rows(plain.question_ids, plain.question_mask))  # it would cut every question
    assert rows(short.question_ids, short.question_mask) == [r[:5] + [sep] for r in rows(plain.question_ids, plain.question_mask)]
    assert torch.equal(short.context_ids, plain.context_ids) and torch.equal(short.context_mask, plain.context_mask)


def test_prefixes_go_before_questions_and_passages_titles_only_where_said(setup):
    model_dir, samples = setup
    tensorizer, plain = batch_of(model_dir, samples)
    _, queried = batch_of(model_dir, samples, query_prefix="query: ")
    _, passaged = batch_of(model_dir, samples, passage_prefix="passage: ")
    tokenize = tensorizer.tokenizer
    question = samples[0].question
    assert rows(queried.question_ids, queried.question_mask)[0] == tokenize("query: " + question.strip())["input_ids"]
    assert torch.equal(queried.context_ids, plain.context_ids)
    positive = samples[0].positive_passages[0]
    assert rows(passaged.context_ids, passaged.context_mask)[int(plain.positive_indices[0])] == tokenize(
        "passage: " + positive.title, positive.text, truncation=True, max_length=LENGTH)["input_ids"]
    assert torch.equal(passaged.question_ids, plain.question_ids)
    untitled = Tensorizer(tokenize, LENGTH, prefix="passage: ").token_ids(["some text"], [""])
    assert untitled == [tokenize("passage: some text")["input_ids"]]


def test_retrieval_encodes_questions_at_their_length_and_with_their_prefix(setup):
    model_dir, samples = setup
    questions = [s.question for s in samples]
    cpu = torch.device("cpu")

    def vectors(**fields):
        encoder = load_inference_encoder(EncoderSpec(model_dir, sequence_length=LENGTH, **fields))
        return encode_questions(encoder, TorchVectors(encoder, cpu, make_precision(cpu)), questions, 4)

    plain, short = vectors(), vectors(query_sequence_length=6)
    expected = load_inference_encoder(EncoderSpec(model_dir, sequence_length=6))  # questions cut at 6 tokens
    np.testing.assert_allclose(short, encode_questions(expected, TorchVectors(expected, cpu, make_precision(cpu)),
                                                       questions, 4), rtol=1e-5, atol=1e-6)
    assert not np.allclose(short, plain)
    assert not np.allclose(vectors(query_prefix="query: "), plain)
    np.testing.assert_allclose(vectors(passage_prefix="passage: "), plain, rtol=1e-5, atol=1e-6)


def test_the_spec_round_trips_and_old_checkpoints_read_as_the_defaults():
    spec = EncoderSpec("m", sequence_length=64, query_sequence_length=16, query_prefix="query: ",
                       passage_prefix="passage: ")
    assert EncoderSpec("m").with_checkpoint_params(spec.checkpoint_params()) == spec
    default_params = EncoderSpec("m").checkpoint_params()["encoder"]
    assert not {"query_sequence_length", "query_prefix", "passage_prefix"} & set(default_params)  # as before them
    old = EncoderSpec("m", query_sequence_length=16, query_prefix="q").with_checkpoint_params(
        {"do_lower_case": True, "encoder": default_params})
    assert (old.query_sequence_length, old.query_prefix, old.passage_prefix) == (16, "q", "")  # configured kept
    assert EncoderSpec("m", sequence_length=64).question_length == 64


@pytest.mark.parametrize("fields,message", [
    ({"query_sequence_length": 2}, "encoder.query_sequence_length=2 leaves no room for text after [CLS] and [SEP]"),
    ({"query_prefix": 5}, "encoder.query_prefix=5 must be text"),
])
def test_wrong_values_are_refused_in_one_line(fields, message):
    with pytest.raises(EncoderConfigError, match="^" + message.replace("[", r"\[").replace("]", r"\]")) as error:
        EncoderSpec("m", **fields)
    assert "\n" not in str(error.value)


def test_a_question_length_beyond_the_models_positions_is_refused(setup):
    model_dir, _ = setup  # max_position_embeddings 128
    spec = EncoderSpec(model_dir, sequence_length=LENGTH, query_sequence_length=129)
    for build in (build_biencoder, load_inference_encoder):
        with pytest.raises(EncoderConfigError, match=r"^encoder.query_sequence_length=129 is above the model's "
                                                     r"max_position_embeddings=128: use at most 128$"):
            build(spec)
    build_biencoder(EncoderSpec(model_dir, sequence_length=LENGTH, query_sequence_length=128))


def shard_record(spec: EncoderSpec) -> dict:
    return {"model": model_record(stand_in_encoder(spec))}


def stand_in_encoder(spec: EncoderSpec) -> SimpleNamespace:
    """What model_record reads of an encoder; records of older versions lack the full digest and tokenizer."""
    return SimpleNamespace(spec=spec, weights="blake2b:0", weights_sha256=None, tokenizer_identity=None)


@pytest.mark.parametrize("field", ["query_prefix", "passage_prefix"])
def test_shards_of_another_prefix_are_refused_and_old_records_still_match(tmp_path, field):
    spec = EncoderSpec("m")
    encoder = stand_in_encoder(EncoderSpec("m", **{field: "x: "}))
    with pytest.raises(ShardProvenanceError, match=f"encoder_params.encoder.{field}"):
        check_question_encoder(encoder, (tmp_path / "shard_0", shard_record(spec)))
    old_record = shard_record(spec)  # written before the fields existed: they are absent
    assert field not in old_record["model"]["encoder_params"]["encoder"]
    check_question_encoder(stand_in_encoder(spec), (tmp_path / "shard_0", old_record))


def test_training_saves_them_and_retrieval_reads_them_from_the_checkpoint(setup, tmp_path):
    from tests.training_helpers import compose_config, run_trainer, tiny_overrides

    model_dir, _ = setup
    train = write_retriever_json(tmp_path / "train.json", 8)
    cfg = compose_config(tiny_overrides(model_dir, train, train, str(tmp_path / "out"), **{
        "encoder__query_sequence_length": 8, "encoder__query_prefix": "'query: '",
        "encoder__passage_prefix": "'passage: '"}))
    trainer, _ = run_trainer(cfg)
    assert (trainer.tensorizer.questions.max_length, trainer.tensorizer.questions.prefix) == (8, "query: ")
    assert (trainer.tensorizer.max_length, trainer.tensorizer.prefix) == (LENGTH, "passage: ")
    encoder = load_inference_encoder(EncoderSpec(model_dir), "question", str(tmp_path / "out" / "dpr_biencoder.0"))
    assert (encoder.spec.question_length, encoder.spec.query_prefix, encoder.spec.passage_prefix) == (
        8, "query: ", "passage: ")


@pytest.mark.parametrize("override", ["encoder.query_sequence_length=16", "encoder.query_prefix='q: '",
                                      "encoder.passage_prefix='p: '"])
def test_the_reader_refuses_the_bi_encoder_settings_before_reading_data(setup, tmp_path, override):
    from dpr.foundation.errors import ConfigError
    from dpr.training.reader_trainer import ReaderTrainer
    from tests.training_helpers import compose_config

    model_dir, _ = setup
    cfg = compose_config([f"encoder.pretrained_model_cfg={model_dir}", f"output_dir={tmp_path}",
                          f"train_files={tmp_path / 'missing.pkl'}", override], "extractive_reader_train_cfg")
    with pytest.raises(ConfigError, match=r"^encoder\.\w+=.* is a bi-encoder setting: the reader reads question and "
                                          r"passage as one sequence"):
        ReaderTrainer(cfg)
