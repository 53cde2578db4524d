"""convert_dpr_checkpoint.py export-onnx: ONNX Runtime gives the repository's retrieval vectors (pooling and
normalisation inside the graph) within 1e-4, on the tiny BERT and on MiniLM; int8 copies load; bad inputs are one
line each and leave nothing written."""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer, DistilBertConfig, DistilBertModel, BertTokenizerFast

import convert_dpr_checkpoint
from dpr.data.tensorizer import Tensorizer
from dpr.foundation.checkpoints import CheckpointState, load_checkpoint, save_checkpoint
from dpr.foundation.files import atomic_output_directory
from dpr.foundation.precision import make_precision
from dpr.indexing.encoding import TorchVectors, encode_questions
from dpr.indexing.shard_provenance import model_record
from dpr.models import onnx_graph
from dpr.models.encoder_spec import EncoderConfigError, EncoderSpec
from dpr.models.hf_encoder import resolve_pretrained_path
from dpr.models.loading import load_checkpoint_biencoder, load_inference_encoder, weights_fingerprint
from dpr.models.onnx_graph import RECORD_NAME, OnnxVectors
from tests.retrieval_helpers import SEQUENCE_LENGTH, tiny_model, write_biencoder_checkpoint
from tests.tiny_models import tiny_bert_dir, write_vocab

# lengths that differ from the export's probe batch, one row padded far
TEXTS = ["paris is the capital of france", "who", "the river runs to the sea and the sea is blue and long", "a b c"]


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("towers")
    return tiny_model(folder / "q", seed=1), tiny_model(folder / "c", seed=2)


def export(checkpoint, out_dir, *flags) -> None:
    convert_dpr_checkpoint.main(["export-onnx", str(checkpoint), str(out_dir), *flags])


def torch_vectors(checkpoint, base_dir: str, encoder_type: str, texts=TEXTS) -> tuple[np.ndarray, tuple]:
    """The repository's search vectors of `texts` (as generate_dense_embeddings and dense_retriever make them)."""
    encoder = load_inference_encoder(EncoderSpec(base_dir), encoder_type, str(checkpoint))
    batch = encoder.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        vectors = encoder.search_vectors(batch["input_ids"], batch["attention_mask"]).numpy()
    return vectors, (batch["input_ids"], batch["attention_mask"])


def assert_graph_gives_torch_vectors(graph: Path, checkpoint, base_dir: str, encoder_type: str, normalised: bool):
    expected, inputs = torch_vectors(checkpoint, base_dir, encoder_type)
    got = OnnxVectors(str(graph), threads=1)(*inputs)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-4
    one_row = OnnxVectors(str(graph), threads=1)(inputs[0][1:2, :3], inputs[1][1:2, :3])  # batch 1, "[CLS] who [SEP]"
    assert np.abs(one_row - expected[1:2]).max() <= 1e-4
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5) == normalised


def test_separate_towers_cls_dot_with_int8_copies(towers, tmp_path):
    question_dir, ctx_dir = towers
    checkpoint = write_biencoder_checkpoint(tmp_path / "cp", question_dir, ctx_dir, pooling="cls", similarity="dot")
    out = tmp_path / "onnx"
    export(checkpoint, out, "--quantize", "int8")
    record = json.loads((out / RECORD_NAME).read_text())
    assert record["files"] == {
        "question_encoder.onnx": {"encoder_types": ["question"], "precision": "fp32"},
        "question_encoder.int8.onnx": {"encoder_types": ["question"], "precision": "int8"},
        "ctx_encoder.onnx": {"encoder_types": ["ctx"], "precision": "fp32"},
        "ctx_encoder.int8.onnx": {"encoder_types": ["ctx"], "precision": "int8"},
    }
    assert record["model"]["weights"] == weights_fingerprint(torch.load(checkpoint, weights_only=True)["model_dict"])
    assert record["model"]["encoder_params"]["encoder"]["pooling"] == "cls" and record["opset"] == 18
    assert AutoTokenizer.from_pretrained(str(out)).get_vocab() == AutoTokenizer.from_pretrained(ctx_dir).get_vocab()
    for encoder_type in ("question", "ctx"):
        assert_graph_gives_torch_vectors(out / f"{encoder_type}_encoder.onnx", checkpoint, ctx_dir, encoder_type,
                                         normalised=False)
    # the two towers are different models: the question graph does not give the ctx vectors
    ctx_vectors, inputs = torch_vectors(checkpoint, ctx_dir, "ctx")
    assert np.abs(OnnxVectors(str(out / "question_encoder.onnx"), 1)(*inputs) - ctx_vectors).max() > 1e-2
    int8 = out / "ctx_encoder.int8.onnx"
    assert int8.stat().st_size < (out / "ctx_encoder.onnx").stat().st_size
    quantized = OnnxVectors(str(int8), threads=1)(*inputs)
    cosines = (quantized * ctx_vectors).sum(1) / np.linalg.norm(quantized, axis=1) / np.linalg.norm(ctx_vectors, axis=1)
    assert quantized.shape == ctx_vectors.shape and cosines.min() > 0.95


def test_shared_encoder_mean_cosine_is_one_graph(towers, tmp_path):
    _, ctx_dir = towers
    checkpoint = write_biencoder_checkpoint(tmp_path / "cp", ctx_dir, ctx_dir, pooling="mean", similarity="cosine",
                                            share_encoders=True)
    out = tmp_path / "onnx"
    export(checkpoint, out)
    assert sorted(p.name for p in out.glob("*.onnx")) == ["encoder.onnx"]
    record = json.loads((out / RECORD_NAME).read_text())
    assert record["files"] == {"encoder.onnx": {"encoder_types": ["question", "ctx"], "precision": "fp32"}}
    for encoder_type in ("question", "ctx"):
        assert_graph_gives_torch_vectors(out / "encoder.onnx", checkpoint, ctx_dir, encoder_type, normalised=True)


def test_minilm_cls_cosine(tmp_path):
    """The real pretrained model, with [CLS] pooling: the graph whose last layer computes the [CLS] position only,
    as the torch path does (mean pooling runs the whole model, covered on the tiny BERT)."""
    minilm = resolve_pretrained_path("minilm")
    checkpoint = write_biencoder_checkpoint(tmp_path / "cp", minilm, minilm, pooling="cls", similarity="cosine",
                                            share_encoders=True)
    export(checkpoint, tmp_path / "onnx")
    assert_graph_gives_torch_vectors(tmp_path / "onnx" / "encoder.onnx", checkpoint, minilm, "ctx", normalised=True)


QUERY_LENGTH = 12
PREFIXED = dict(query_prefix="query: ", passage_prefix="passage: ", query_sequence_length=QUERY_LENGTH)
# (title, text); the question longer than QUERY_LENGTH tokens, shorter than the passage length
PASSAGES = [("paris", "paris is the capital of france"), ("river", "the river runs to the sea and the sea is blue")]
QUESTIONS = ["who", "who was the one of the two in the tower and what is it to the sea"]


@pytest.mark.parametrize("shared", [False, True], ids=["two_towers", "shared"])
def test_the_folder_says_how_to_tokenize_and_the_documented_recipe_gives_the_repository_vectors(towers, tmp_path,
                                                                                               shared):
    """onnx_export.json's `tokenization` holds the prefixes and both lengths; docs/interop.md's ONNX Runtime recipe,
    reading them from there, gives the vectors of the repository's question and passage encoding (1e-4)."""
    question_dir, ctx_dir = towers
    checkpoint = write_biencoder_checkpoint(tmp_path / "cp", ctx_dir if shared else question_dir, ctx_dir,
                                            share_encoders=shared, pooling="mean", **PREFIXED)
    out = tmp_path / "onnx"
    export(checkpoint, out)
    settings = json.loads((out / RECORD_NAME).read_text())["tokenization"]
    assert settings == {"query_prefix": "query: ", "passage_prefix": "passage: ", "query_sequence_length": QUERY_LENGTH,
                        "sequence_length": SEQUENCE_LENGTH, "do_lower_case": True}

    # the recipe of docs/interop.md ("Using it elsewhere"), reading the settings from the folder
    import onnxruntime
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    question_graph = onnxruntime.InferenceSession(str(out / ("encoder.onnx" if shared else "question_encoder.onnx")))
    ctx_graph = onnxruntime.InferenceSession(str(out / ("encoder.onnx" if shared else "ctx_encoder.onnx")))
    q = tokenizer([settings["query_prefix"] + question for question in QUESTIONS], padding=True, truncation=True,
                  max_length=settings["query_sequence_length"], return_tensors="np")
    p = tokenizer([settings["passage_prefix"] + title for title, _ in PASSAGES], [text for _, text in PASSAGES],
                  padding=True, truncation=True, max_length=settings["sequence_length"], return_tensors="np")
    question_vectors = question_graph.run(["vectors"], {"input_ids": q["input_ids"],
                                                        "attention_mask": q["attention_mask"]})[0]
    passage_vectors = ctx_graph.run(["vectors"], {"input_ids": p["input_ids"], "attention_mask": p["attention_mask"]})[0]

    cpu = torch.device("cpu")
    encoders = {half: load_inference_encoder(EncoderSpec(ctx_dir), half, checkpoint) for half in ("question", "ctx")}
    assert len(tokenizer(settings["query_prefix"] + QUESTIONS[1])["input_ids"]) > QUERY_LENGTH  # it is cut
    ours_q = encode_questions(encoders["question"], TorchVectors(encoders["question"], cpu, make_precision(cpu)),
                              QUESTIONS, 2)
    tensorizer = Tensorizer.for_biencoder(encoders["ctx"].spec, encoders["ctx"].tokenizer)
    ids, mask = tensorizer.tensorize([text for _, text in PASSAGES], [title for title, _ in PASSAGES])
    with torch.inference_mode():
        ours_p = encoders["ctx"].search_vectors(ids, mask).numpy()
    assert np.abs(question_vectors - ours_q).max() <= 1e-4 and np.abs(passage_vectors - ours_p).max() <= 1e-4
    # the settings matter: the same texts without the prefix are other vectors
    plain = tokenizer(QUESTIONS, padding=True, truncation=True, max_length=QUERY_LENGTH, return_tensors="np")
    unprefixed = question_graph.run(["vectors"], {"input_ids": plain["input_ids"],
                                                  "attention_mask": plain["attention_mask"]})[0]
    assert np.abs(unprefixed - ours_q).max() > 1e-3


def test_export_and_embedding_read_a_checkpoint_alike(towers, tmp_path):
    """export-onnx reads the checkpoint with load_checkpoint_biencoder, embedding and retrieval with
    load_inference_encoder: the same model record (fingerprints, spec, tokenizer) for each half, and weights that
    do not fit the named model refused in one line by both, each naming its own way out."""
    question_dir, ctx_dir = towers
    checkpoint = write_biencoder_checkpoint(tmp_path / "cp", question_dir, ctx_dir, **PREFIXED)
    encoders = load_checkpoint_biencoder(checkpoint).inference_encoders()
    for half in ("question", "ctx"):
        assert model_record(encoders[half], checkpoint) == model_record(
            load_inference_encoder(EncoderSpec(ctx_dir), half, checkpoint), checkpoint)
    other = tiny_bert_dir(tmp_path / "wider", dropout=0.0, hidden=48)
    message = one_line_error(checkpoint, tmp_path / "out", "--pretrained_model_cfg", other)
    assert f"the question weights of {checkpoint} do not fit '{other}'" in message
    assert "give --pretrained_model_cfg, the model it was trained from" in message
    assert not (tmp_path / "out").exists()
    state = load_checkpoint(checkpoint)
    state.encoder_params["encoder"]["pretrained_model_cfg"] = other  # names a model its weights do not fit
    save_checkpoint(checkpoint, state)
    with pytest.raises(EncoderConfigError, match=r"^the ctx weights of .* do not fit .*: give "
                                                 r"encoder.pretrained_model_cfg, the model it was trained from$"):
        load_inference_encoder(EncoderSpec(ctx_dir), "ctx", checkpoint)


# ------------------------------------------------------------------------------------------------ bad inputs
def one_line_error(*argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        convert_dpr_checkpoint.main(["export-onnx", *map(str, argv)])
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_non_empty_out_dir_is_refused_unless_overwrite(towers, tmp_path):
    question_dir, ctx_dir = towers
    checkpoint = write_biencoder_checkpoint(tmp_path / "cp", ctx_dir, ctx_dir, share_encoders=True)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    message = one_line_error(checkpoint, out)
    assert "not empty" in message and "--overwrite" in message
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    export(checkpoint, out, "--overwrite")
    assert (out / "encoder.onnx").is_file() and (out / RECORD_NAME).is_file()
    assert not (out / "notes.txt").exists() and not list(tmp_path.glob(".*.tmp"))


def test_unsupported_encoder_is_refused_before_anything_is_written(tmp_path):
    base = tmp_path / "distilbert"
    base.mkdir()
    tokenizer = BertTokenizerFast(vocab=str(write_vocab(base)), do_lower_case=True)
    tokenizer.save_pretrained(base)
    config = DistilBertConfig(vocab_size=len(tokenizer.get_vocab()), dim=32, n_layers=1, n_heads=4, hidden_dim=64,
                              max_position_embeddings=128)
    DistilBertModel(config).save_pretrained(base)
    weights = AutoModel.from_pretrained(base).state_dict()
    state = {f"{prefix}{key}": value for prefix in ("question_model.", "ctx_model.") for key, value in weights.items()}
    save_checkpoint(str(tmp_path / "cp"), CheckpointState(state, None, None, 0, 0, EncoderSpec(str(base)).checkpoint_params()))
    message = one_line_error(tmp_path / "cp", tmp_path / "out")
    assert "distilbert" in message and "BERT" in message
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*.tmp"))


def test_missing_tokenizer_is_one_line(towers, tmp_path):
    _, ctx_dir = towers
    base = tmp_path / "no_tokenizer"
    base.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(Path(ctx_dir) / name, base / name)
    checkpoint = write_biencoder_checkpoint(tmp_path / "cp", str(base), str(base), share_encoders=True)
    message = one_line_error(checkpoint, tmp_path / "out")
    assert "lacks its tokenizer files" in message and str(base) in message
    assert not (tmp_path / "out").exists()


def test_missing_onnxruntime_names_the_extra(towers, tmp_path, monkeypatch):
    _, ctx_dir = towers
    checkpoint = write_biencoder_checkpoint(tmp_path / "cp", ctx_dir, ctx_dir, share_encoders=True)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    message = one_line_error(checkpoint, tmp_path / "out")
    assert "onnx extra" in message and "pip install -e '.[onnx]'" in message and "onnxruntime" in message
    assert not (tmp_path / "out").exists()


def test_a_failure_during_export_leaves_nothing_written(towers, tmp_path, monkeypatch):
    _, ctx_dir = towers
    checkpoint = write_biencoder_checkpoint(tmp_path / "cp", ctx_dir, ctx_dir, share_encoders=True)

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_graph, "quantize_int8", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export(checkpoint, tmp_path / "out", "--quantize", "int8")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_a_cache_folder_completed_by_another_process_is_kept(tmp_path):
    """Two shard jobs exporting the same graph at once: the first rename wins, the second copy is discarded."""
    target = tmp_path / "entry"
    with atomic_output_directory(target, keep_existing=True) as mine:
        (Path(mine) / "graph").write_text("mine")
        with atomic_output_directory(target, keep_existing=True) as theirs:
            (Path(theirs) / "graph").write_text("theirs")
    assert (target / "graph").read_text() == "theirs" and not list(tmp_path.glob(".entry.*"))
