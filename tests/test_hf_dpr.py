"""Round trips between DPR-format checkpoints and transformers' DPR classes, with a tiny random BERT."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertModel,
    BertTokenizer,
    DPRContextEncoder,
    DPRQuestionEncoder,
    DPRReader,
)

import convert_dpr_checkpoint
from dpr.interop import hf_dpr
from dpr.models import reader as reader_module
from dpr.models.hf_encoder import build_encoder
from dpr.models.encoder_spec import EncoderSpec
from dpr.models.loading import load_inference_encoder
from dpr.foundation.checkpoints import CheckpointState, load_checkpoint, save_checkpoint

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "who", "is", "the", "cat", "dog", "capital", "of", "france",
         "paris", "city", "a", "?", ".", "##s", "in"]
TEXTS = ["who is the cat?", "paris is the capital of france.", "a dog in a city"]
SEQUENCE_LENGTH = 16


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> str:
    """A tiny random BERT with its tokenizer, saved as a pretrained model directory."""
    path = tmp_path_factory.mktemp("tiny_bert")
    (path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizer.from_pretrained(str(path)).save_pretrained(str(path))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=SEQUENCE_LENGTH * 2,
    )
    BertModel(config).save_pretrained(str(path))
    return str(path)


def inputs(base_dir: str):
    batch = AutoTokenizer.from_pretrained(base_dir)(TEXTS, padding=True, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def random_encoder(base_dir: str, projection_dim: int, seed: int):
    torch.manual_seed(seed)
    model = build_encoder(base_dir, projection_dim=projection_dim, dropout=0.0)
    with torch.no_grad():  # move every weight away from the pretrained one, the (frozen) pooler included
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


def make_biencoder_checkpoint(path: Path, base_dir: str, projection_dim: int = 0) -> Path:
    question_model = random_encoder(base_dir, projection_dim, seed=1)
    ctx_model = random_encoder(base_dir, projection_dim, seed=2)
    model_dict = {f"question_model.{k}": v for k, v in question_model.state_dict().items()}
    model_dict.update({f"ctx_model.{k}": v for k, v in ctx_model.state_dict().items()})
    encoder_params = {
        "do_lower_case": True,
        "encoder": {
            "pretrained_model_cfg": base_dir, "projection_dim": projection_dim, "sequence_length": SEQUENCE_LENGTH
        },
    }
    save_checkpoint(str(path), CheckpointState(model_dict, None, None, 0, 1, encoder_params))
    return path


def checkpoint_vectors(checkpoint: Path, base_dir: str, pretrained_model_cfg=None):
    biencoder, _ = hf_dpr.load_biencoder(str(checkpoint), pretrained_model_cfg)
    ids, mask = inputs(base_dir)
    with torch.no_grad():
        return biencoder.encode_questions(ids, mask), biencoder.encode_contexts(ids, mask)


def transformers_vectors(out_dir: Path, base_dir: str):
    ids, mask = inputs(base_dir)
    question = DPRQuestionEncoder.from_pretrained(str(out_dir / "question_encoder")).eval()
    ctx = DPRContextEncoder.from_pretrained(str(out_dir / "ctx_encoder")).eval()
    with torch.no_grad():
        return question(ids, attention_mask=mask).pooler_output, ctx(ids, attention_mask=mask).pooler_output


@pytest.mark.parametrize("projection_dim", [0, 8])
def test_exported_biencoder_gives_this_repository_vectors(tmp_path, base_dir, projection_dim):
    checkpoint = make_biencoder_checkpoint(tmp_path / "dpr_biencoder.1", base_dir, projection_dim)
    report = hf_dpr.export_biencoder(str(checkpoint), str(tmp_path / "hf"))

    ours = checkpoint_vectors(checkpoint, base_dir)
    theirs = transformers_vectors(tmp_path / "hf", base_dir)
    for own, exported in zip(ours, theirs):
        assert own.shape == (len(TEXTS), projection_dim or 16)
        torch.testing.assert_close(exported, own, atol=1e-5, rtol=0)
    assert sorted(report.dropped) == sorted(
        f"{half}_model.pooler.dense.{p} (no such weight in transformers' DPR)" for half in ("question", "ctx")
        for p in ("weight", "bias")
    )
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "hf" / "question_encoder"))
    assert type(tokenizer).__name__.startswith("DPRQuestionEncoderTokenizer")
    assert tokenizer(TEXTS)["input_ids"] == AutoTokenizer.from_pretrained(base_dir)(TEXTS)["input_ids"]


def test_export_refuses_a_model_pooled_otherwise_than_by_cls(tmp_path, base_dir):
    checkpoint = make_biencoder_checkpoint(tmp_path / "dpr_biencoder.1", base_dir)
    ckpt = load_checkpoint(str(checkpoint))
    ckpt.encoder_params["encoder"]["pooling"] = "mean"
    save_checkpoint(str(checkpoint), ckpt)
    with pytest.raises(hf_dpr.ExportError, match=r"pooling=mean.*\[CLS\] vector only"):
        hf_dpr.export_biencoder(str(checkpoint), str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()


def test_export_warns_of_prefixes_and_a_question_length_the_exported_tokenizers_do_not_apply(tmp_path, base_dir,
                                                                                             caplog):
    checkpoint = make_biencoder_checkpoint(tmp_path / "dpr_biencoder.1", base_dir)
    ckpt = load_checkpoint(str(checkpoint))
    ckpt.encoder_params["encoder"].update(query_prefix="query: ", query_sequence_length=32)
    save_checkpoint(str(checkpoint), ckpt)
    with caplog.at_level("WARNING", logger="dpr.interop.hf_dpr"):
        hf_dpr.export_biencoder(str(checkpoint), str(tmp_path / "hf"))
    warned = [r.getMessage() for r in caplog.records if "texts prepared the same way" in r.getMessage()]
    assert len(warned) == 1 and "encoder.query_prefix='query: '" in warned[0]
    assert "encoder.query_sequence_length=32" in warned[0] and "passage_prefix" not in warned[0]


def test_export_warns_of_exactly_what_is_lost(tmp_path, base_dir, caplog):
    """A passage prefix is named with where it goes; a question length equal to the passage length loses nothing
    and is not named; a checkpoint without these settings exports without the warning."""
    checkpoint = make_biencoder_checkpoint(tmp_path / "dpr_biencoder.1", base_dir)
    with caplog.at_level("WARNING", logger="dpr.interop.hf_dpr"):
        hf_dpr.export_biencoder(str(checkpoint), str(tmp_path / "plain"))
    assert not [r for r in caplog.records if "texts prepared the same way" in r.getMessage()]
    ckpt = load_checkpoint(str(checkpoint))
    ckpt.encoder_params["encoder"].update(passage_prefix="passage: ", query_sequence_length=SEQUENCE_LENGTH)
    save_checkpoint(str(checkpoint), ckpt)
    with caplog.at_level("WARNING", logger="dpr.interop.hf_dpr"):
        hf_dpr.export_biencoder(str(checkpoint), str(tmp_path / "hf"))
    [warned] = [r.getMessage() for r in caplog.records if "texts prepared the same way" in r.getMessage()]
    assert "encoder.passage_prefix='passage: ' (put it before each passage's title, or its text" in warned
    assert "query_sequence_length" not in warned and "query_prefix" not in warned


def test_export_import_round_trip_keeps_weights(tmp_path, base_dir):
    checkpoint = make_biencoder_checkpoint(tmp_path / "dpr_biencoder.1", base_dir, projection_dim=8)
    hf_dpr.export_biencoder(str(checkpoint), str(tmp_path / "hf"))
    imported = tmp_path / "imported.cp"
    report = hf_dpr.import_biencoder(
        str(tmp_path / "hf" / "question_encoder"), str(tmp_path / "hf" / "ctx_encoder"), str(imported), SEQUENCE_LENGTH
    )

    original, again = load_checkpoint(str(checkpoint)).model_dict, load_checkpoint(str(imported)).model_dict
    assert set(again) == set(original)
    for key, value in original.items():
        expected = torch.zeros_like(value) if ".pooler." in key else value
        assert torch.equal(again[key], expected), key
    assert len(report.added) == 4 and all(".pooler.dense." in a for a in report.added)
    params = load_checkpoint(str(imported)).encoder_params
    assert params["encoder"]["projection_dim"] == 8 and params["encoder"]["pretrained"] is False

    # The imported checkpoint serves this repository's loaders and exports to the same transformers weights.
    question_encoder = load_inference_encoder(EncoderSpec("unused"), "question", str(imported))
    assert question_encoder.spec.projection_dim == 8 and question_encoder.spec.pretrained is False
    ids, mask = inputs(base_dir)
    with torch.no_grad():
        torch.testing.assert_close(question_encoder.search_vectors(ids, mask), checkpoint_vectors(checkpoint, base_dir)[0])
    hf_dpr.export_biencoder(str(imported), str(tmp_path / "hf_again"))
    for subdir in ("question_encoder", "ctx_encoder"):
        first = load_file(str(tmp_path / "hf" / subdir / "model.safetensors"))
        second = load_file(str(tmp_path / "hf_again" / subdir / "model.safetensors"))
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_released_old_dpr_checkpoint_loads_and_exports(tmp_path, base_dir):
    """Flat encoder_params naming bert-base-uncased (not here: overridden), position_ids and pooler present."""
    question_model, ctx_model = random_encoder(base_dir, 0, 3), random_encoder(base_dir, 0, 4)
    position_ids = torch.arange(SEQUENCE_LENGTH * 2).unsqueeze(0)
    model_dict = {}
    for half, model in (("question_model", question_model), ("ctx_model", ctx_model)):
        model_dict.update({f"{half}.{k}": v for k, v in model.state_dict().items()})
        model_dict[f"{half}.embeddings.position_ids"] = position_ids
    legacy = {
        "model_dict": model_dict, "optimizer_dict": {}, "scheduler_dict": {"last_epoch": 100}, "offset": 0, "epoch": 39,
        "encoder_params": {
            "do_lower_case": True, "pretrained_model_cfg": "bert-base-uncased", "encoder_model_type": "hf_bert",
            "pretrained_file": None, "projection_dim": 0, "sequence_length": 256,
        },
    }
    checkpoint = tmp_path / "hf_bert_base.cp"
    torch.save(legacy, checkpoint)

    biencoder, _ = hf_dpr.load_biencoder(str(checkpoint), pretrained_model_cfg=base_dir)
    assert biencoder.sequence_length == 256
    assert torch.equal(biencoder.ctx_model.pooler.dense.weight, model_dict["ctx_model.pooler.dense.weight"])
    hf_dpr.export_biencoder(str(checkpoint), str(tmp_path / "hf"), pretrained_model_cfg=base_dir)
    ours = checkpoint_vectors(checkpoint, base_dir, base_dir)
    for own, exported in zip(ours, transformers_vectors(tmp_path / "hf", base_dir)):
        torch.testing.assert_close(exported, own, atol=1e-5, rtol=0)


def test_import_refuses_a_directory_of_the_other_role(tmp_path, base_dir):
    checkpoint = make_biencoder_checkpoint(tmp_path / "dpr_biencoder.1", base_dir)
    hf_dpr.export_biencoder(str(checkpoint), str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="not a DPRQuestionEncoder"):
        hf_dpr.import_encoder(str(tmp_path / "hf" / "ctx_encoder"), "question")


def make_reader_checkpoint(path: Path, base_dir: str) -> Path:
    encoder = random_encoder(base_dir, 0, 5)
    torch.manual_seed(6)
    model_dict = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    model_dict.update({
        "qa_outputs.weight": torch.randn(2, 16), "qa_outputs.bias": torch.randn(2),
        "qa_classifier.weight": torch.randn(1, 16), "qa_classifier.bias": torch.randn(1),
    })
    encoder_params = {"do_lower_case": True, "encoder": {"pretrained_model_cfg": base_dir, "sequence_length": 350}}
    save_checkpoint(str(path), CheckpointState(model_dict, None, None, 0, 1, encoder_params))
    return path


def test_exported_reader_gives_this_repository_logits(tmp_path, base_dir):
    checkpoint = make_reader_checkpoint(tmp_path / "dpr_reader.1", base_dir)
    report = hf_dpr.export_reader(str(checkpoint), str(tmp_path / "hf_reader"))
    assert sorted(report.dropped) == ["encoder.pooler.dense.bias (no such weight in transformers' DPR)",
                                      "encoder.pooler.dense.weight (no such weight in transformers' DPR)"]

    # Without token type ids, as DPRReader and the released reader checkpoint.
    reader = reader_module.Reader(build_encoder(base_dir, dropout=0.0, pretrained=False), 16, sep_token_id=None)
    reader.load_state_dict(load_checkpoint(str(checkpoint)).model_dict)
    ids, mask = inputs(base_dir)
    exported = DPRReader.from_pretrained(str(tmp_path / "hf_reader")).eval()
    with torch.no_grad():
        ours = reader.eval()(ids.unsqueeze(0), mask.unsqueeze(0))
        theirs = exported(input_ids=ids, attention_mask=mask)
    for own, exported_logits in zip(ours, (theirs.start_logits, theirs.end_logits, theirs.relevance_logits)):
        torch.testing.assert_close(exported_logits, own.squeeze(0), atol=1e-5, rtol=0)


def test_reader_export_import_round_trip(tmp_path, base_dir):
    checkpoint = make_reader_checkpoint(tmp_path / "dpr_reader.1", base_dir)
    hf_dpr.export_reader(str(checkpoint), str(tmp_path / "hf_reader"))
    imported = tmp_path / "reader_imported.cp"
    report = hf_dpr.import_reader(str(tmp_path / "hf_reader"), str(imported))

    original, again = load_checkpoint(str(checkpoint)), load_checkpoint(str(imported))
    assert set(again.model_dict) == set(original.model_dict)
    for key, value in original.model_dict.items():
        expected = torch.zeros_like(value) if key.startswith("encoder.pooler.") else value
        assert torch.equal(again.model_dict[key], expected), key
    assert report.added == [f"encoder.pooler.dense.{p} (zeros: unused, DPR represents by the [CLS] state)"
                            for p in ("weight", "bias")]
    assert again.encoder_params["encoder"]["sequence_length"] == 350


def test_command_line_export_prints_what_it_wrote(tmp_path, base_dir, capsys):
    checkpoint = make_biencoder_checkpoint(tmp_path / "dpr_biencoder.1", base_dir)
    convert_dpr_checkpoint.main(["export-biencoder", str(checkpoint), str(tmp_path / "hf")])
    printed = capsys.readouterr().out.splitlines()
    assert printed[:2] == [f"wrote {tmp_path / 'hf' / 'question_encoder'}", f"wrote {tmp_path / 'hf' / 'ctx_encoder'}"]
    assert len(printed) == 6 and all(line.startswith("dropped ") for line in printed[2:])
