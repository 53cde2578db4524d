"""convert_dpr_checkpoint.py export-st: the sentence-transformers folder gives the repository's question and passage
vectors (tiny BERT and MiniLM; both poolings, both similarities, shared and separate towers), ranks squad_open as
dense_retriever.py does, carries a model card, and refuses bad input in one line without writing anything."""
import dataclasses
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Normalize, Router
from transformers import AutoTokenizer, BertConfig, BertModel

import convert_dpr_checkpoint
from dpr.data.biencoder_data import normalize_question
from dpr.data.passages import iter_passages
from dpr.data.qa_data import read_qa_file
from dpr.data.tensorizer import Tensorizer
from dpr.evaluation.qa_validation import top_k_accuracy_from_results
from dpr.foundation.checkpoints import CheckpointState, load_checkpoint, save_checkpoint
from dpr.foundation.precision import make_precision
from dpr.indexing.dense_retriever import run_dense_retriever
from dpr.indexing.encoding import TorchVectors, encode_batches, encode_questions, padded_batches
from dpr.indexing.generate_embeddings import generate_dense_embeddings
from dpr.interop import hf_dpr, sentence_transformers_export
from dpr.interop.sentence_transformers_export import passage_inputs
from dpr.models.encoder_spec import EncoderSpec
from dpr.models.hf_encoder import TokenizerError, build_encoder, load_tokenizer, resolve_pretrained_path
from dpr.models.loading import load_inference_encoder
from dpr.training.trainer_base import RECORDS_FILE, RunRecord, StepRecord, ValidationRecord
from tests.fixtures import retriever_results
from tests.retrieval_helpers import gen_embs_config, retriever_config
from tests.tiny_models import tiny_bert_dir

QUESTIONS = ["What is the capital of France?", "who wrote the origin of species", "a question with 12 digits 3.5"]
# (title, text): a title pair, a text alone, and pairs longer than the sequence length (truncated, the longer part
# first), one of them with the longer title.
PASSAGES = [
    ("Paris", "Paris is the capital of France and its largest city."),
    ("", "the river runs to the sea"),
    ("Berlin", "Berlin is the capital of Germany on the river Spree; " * 8),
    ("a very long title that says a great deal about what is in the text " * 3, "short text"),
]
TINY_LENGTH = 64
MINILM_LENGTH = 32
CPU = torch.device("cpu")


def perturbed_encoder(base: str, projection_dim: int, seed: int, noise: float = 0.02):
    """The pretrained encoder moved off its weights (so the two towers differ), as training would."""
    torch.manual_seed(seed)
    model = build_encoder(base, projection_dim=projection_dim, dropout=0.0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * noise)
    return model.eval()


def write_checkpoint(path: Path, base: str, sequence_length: int, projection_dim: int = 0, noise: float = 0.02,
                     **spec_fields) -> str:
    """A bi-encoder checkpoint as the trainer writes it (`EncoderSpec.checkpoint_params`); shared towers hold one
    model's weights under both prefixes, as the BiEncoder's state dict does."""
    spec = EncoderSpec(base, sequence_length=sequence_length, projection_dim=projection_dim, **spec_fields)
    question = perturbed_encoder(base, projection_dim, 1, noise)
    ctx = question if spec.share_encoders else perturbed_encoder(base, projection_dim, 2, noise)
    model_dict = {f"question_model.{k}": v for k, v in question.state_dict().items()}
    model_dict.update({f"ctx_model.{k}": v for k, v in ctx.state_dict().items()})
    save_checkpoint(str(path), CheckpointState(model_dict, None, None, 0, 1, spec.checkpoint_params()))
    return str(path)


def export(checkpoint: str, out_dir: Path, *flags: str) -> SentenceTransformer:
    convert_dpr_checkpoint.main(["export-st", checkpoint, str(out_dir), *flags])
    return SentenceTransformer(str(out_dir), device="cpu", local_files_only=True)


def repository_encoders(checkpoint: str):
    """The checkpoint's question and ctx halves as dense_retriever.py and generate_dense_embeddings.py load them."""
    return tuple(load_inference_encoder(EncoderSpec("unused"), half, checkpoint) for half in ("question", "ctx"))


def repository_question_vectors(encoder, questions) -> torch.Tensor:
    """dense_retriever.py's question vectors: encode_questions."""
    vectors_of = TorchVectors(encoder, CPU, make_precision(CPU))
    return torch.from_numpy(encode_questions(encoder, vectors_of, list(questions), 2))


def repository_passage_vectors(encoder, titles, texts) -> torch.Tensor:
    """generate_dense_embeddings.py's passage vectors: title/text token ids (passage prefix before the title),
    length-sorted batches."""
    tensorizer = Tensorizer.for_biencoder(encoder.spec, encoder.tokenizer)
    batches = padded_batches(tensorizer, tensorizer.token_ids(list(texts), list(titles)), 2, sort_by_length=True)
    return torch.from_numpy(encode_batches(TorchVectors(encoder, CPU, make_precision(CPU)), batches, len(texts)))


def st_vectors(model: SentenceTransformer, role: str, inputs) -> torch.Tensor:
    encode = model.encode_query if role == "query" else model.encode_document
    return encode(inputs, convert_to_tensor=True, show_progress_bar=False, batch_size=3).float()


def assert_same_vectors(model: SentenceTransformer, checkpoint: str, sequence_length: int, spec_fields: dict) -> None:
    titles, texts = [t for t, _ in PASSAGES], [p for _, p in PASSAGES]
    question_encoder, ctx_encoder = repository_encoders(checkpoint)
    ours_q = repository_question_vectors(question_encoder, QUESTIONS)
    ours_p = repository_passage_vectors(ctx_encoder, titles, texts)
    theirs_q = st_vectors(model, "query", QUESTIONS)
    theirs_p = st_vectors(model, "document", passage_inputs(titles, texts))
    assert (theirs_q - ours_q).abs().max() <= 1e-5
    assert (theirs_p - ours_p).abs().max() <= 1e-5
    # model.similarity gives the retriever's index scores (inner products of its search vectors), so it ranks alike
    torch.testing.assert_close(model.similarity(theirs_q, theirs_p), ours_q @ ours_p.T, atol=1e-5, rtol=0)

    # the folder is what the spec says, not only numerically close on these texts
    shared = spec_fields.get("share_encoders", False)
    assert isinstance(model[0], Router) is not shared
    assert any(isinstance(m, Normalize) for m in model.modules()) is (spec_fields["similarity"] == "cosine")
    assert model.similarity_fn_name == spec_fields["similarity"]
    assert model.max_seq_length == sequence_length
    if shared:
        torch.testing.assert_close(st_vectors(model, "query", texts), st_vectors(model, "document", texts))

    # "title [SEP] text" as one string: the same vectors wherever the pair is not truncated
    tokenizer = ctx_encoder.tokenizer
    fits = [i for i, (title, text) in enumerate(PASSAGES)
            if title and len(tokenizer(title, text)["input_ids"]) <= sequence_length]
    assert fits, "no untruncated title pair among the test passages"
    joined = st_vectors(model, "document", [f"{PASSAGES[i][0]} [SEP] {PASSAGES[i][1]}" for i in fits])
    assert (joined - ours_p[fits]).abs().max() <= 1e-5


SPEC_CASES = [
    pytest.param(dict(pooling=pooling, similarity=similarity, share_encoders=shared, temperature=0.05),
                 id=f"{pooling}-{similarity}-{'shared' if shared else 'two_towers'}")
    for pooling in ("cls", "mean") for similarity in ("dot", "cosine") for shared in (False, True)
]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> str:
    return tiny_bert_dir(tmp_path_factory.mktemp("tiny_bert"), dropout=0.0)


@pytest.mark.parametrize("spec_fields", SPEC_CASES)
def test_exported_folder_gives_the_repository_vectors_tiny_bert(tmp_path, tiny_base, spec_fields):
    projection_dim = 8 if spec_fields["pooling"] == "mean" and not spec_fields["share_encoders"] else 0
    checkpoint = write_checkpoint(tmp_path / "dpr_biencoder.1", tiny_base, TINY_LENGTH, projection_dim, **spec_fields)
    model = export(checkpoint, tmp_path / "st")
    assert model.get_embedding_dimension() == (projection_dim or 32)
    assert_same_vectors(model, checkpoint, TINY_LENGTH, spec_fields)


@pytest.mark.parametrize("spec_fields", [
    pytest.param(dict(pooling="cls", similarity="dot", share_encoders=False), id="cls-dot-two_towers"),
    pytest.param(dict(pooling="mean", similarity="cosine", share_encoders=True, temperature=0.05),
                 id="mean-cosine-shared"),
])
def test_exported_folder_gives_the_repository_vectors_minilm(tmp_path, spec_fields):
    checkpoint = write_checkpoint(tmp_path / "dpr_biencoder.1", "minilm", MINILM_LENGTH, **spec_fields)
    model = export(checkpoint, tmp_path / "st")
    assert_same_vectors(model, checkpoint, MINILM_LENGTH, spec_fields)
    card = (tmp_path / "st" / "README.md").read_text()
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in card


def test_released_dpr_checkpoint_exports_with_pretrained_model_cfg(tmp_path, tiny_base):
    """DPR's / GC-DPR's released files: flat encoder_params naming bert-base-uncased (not here offline),
    position_ids saved; --pretrained_model_cfg names the local model of the same architecture."""
    model_dict = {}
    for half, seed in (("question_model", 3), ("ctx_model", 4)):
        encoder = perturbed_encoder(tiny_base, 0, seed)
        model_dict.update({f"{half}.{k}": v for k, v in encoder.state_dict().items()})
        model_dict[f"{half}.embeddings.position_ids"] = torch.arange(128).unsqueeze(0)
    legacy = {
        "model_dict": model_dict, "optimizer_dict": {}, "scheduler_dict": {"last_epoch": 100}, "offset": 0,
        "epoch": 39, "encoder_params": {
            "do_lower_case": True, "pretrained_model_cfg": "bert-base-uncased", "encoder_model_type": "hf_bert",
            "pretrained_file": None, "projection_dim": 0, "sequence_length": TINY_LENGTH,
        },
    }
    checkpoint = tmp_path / "hf_bert_base.cp"
    torch.save(legacy, checkpoint)
    model = export(str(checkpoint), tmp_path / "st", "--pretrained_model_cfg", tiny_base)
    titles, texts = [t for t, _ in PASSAGES], [p for _, p in PASSAGES]
    loaded = sentence_transformers_export.load_checkpoint_biencoder(str(checkpoint), tiny_base)
    ours_q = sentence_transformers_export.repository_vectors(loaded, QUESTIONS)
    ours_p = sentence_transformers_export.repository_vectors(loaded, texts, titles, role="ctx")
    assert (st_vectors(model, "query", QUESTIONS) - ours_q).abs().max() <= 1e-5
    assert (st_vectors(model, "document", passage_inputs(titles, texts)) - ours_p).abs().max() <= 1e-5
    assert f"| base model | `{tiny_base}` |" in (tmp_path / "st" / "README.md").read_text()


def test_transformers_dpr_folders_export_after_import_biencoder(tmp_path, tiny_base):
    """transformers' DPRQuestionEncoder/DPRContextEncoder folders -> import-biencoder -> export-st: the vectors of
    the checkpoint they came from."""
    original = write_checkpoint(tmp_path / "dpr_biencoder.1", tiny_base, TINY_LENGTH, projection_dim=8,
                                pooling="cls", similarity="dot")
    hf_dpr.export_biencoder(original, str(tmp_path / "hf"))
    imported = tmp_path / "imported.cp"
    convert_dpr_checkpoint.main(["import-biencoder", "--question_dir", str(tmp_path / "hf" / "question_encoder"),
                                 "--ctx_dir", str(tmp_path / "hf" / "ctx_encoder"), str(imported),
                                 "--sequence_length", str(TINY_LENGTH)])
    model = export(str(imported), tmp_path / "st")
    titles, texts = [t for t, _ in PASSAGES], [p for _, p in PASSAGES]
    question_encoder, ctx_encoder = repository_encoders(original)
    assert (st_vectors(model, "query", QUESTIONS) - repository_question_vectors(question_encoder, QUESTIONS)).abs().max() <= 1e-5
    assert (st_vectors(model, "document", passage_inputs(titles, texts))
            - repository_passage_vectors(ctx_encoder, titles, texts)).abs().max() <= 1e-5


# ---------------------------------------------------------------- prefixes and the question length (issue 27)

QUERY_LENGTH = 12
PREFIXED = dict(query_prefix="query: ", passage_prefix="passage: ", query_sequence_length=QUERY_LENGTH)
# fits the passage length, not the question length: only a question length of its own cuts it
LONG_QUESTION = "who was the one of the two in the tower and what is it to the sea"


@pytest.mark.parametrize("shared, pooling", [(False, "cls"), (True, "mean")], ids=["two_towers", "shared"])
def test_prefixes_and_question_length_need_nothing_from_the_user(tmp_path, tiny_base, shared, pooling):
    """A checkpoint trained with encoder.query_prefix, passage_prefix and a shorter query_sequence_length:
    encode_query / encode_document with no argument but the texts give the repository's vectors (the prompts
    and the question length are the folder's own); a shared encoder stays one set of weights."""
    spec_fields = dict(pooling=pooling, similarity="cosine", share_encoders=shared, **PREFIXED)
    checkpoint = write_checkpoint(tmp_path / "dpr_biencoder.1", tiny_base, TINY_LENGTH, **spec_fields)
    model = export(checkpoint, tmp_path / "st")
    question_encoder, ctx_encoder = repository_encoders(checkpoint)
    questions = QUESTIONS + [LONG_QUESTION]
    long_ids = question_encoder.tokenizer("query: " + LONG_QUESTION)["input_ids"]
    assert QUERY_LENGTH < len(long_ids) <= TINY_LENGTH  # cut by the question length only
    titles, texts = [t for t, _ in PASSAGES], [p for _, p in PASSAGES]
    ours_q = repository_question_vectors(question_encoder, questions)
    ours_p = repository_passage_vectors(ctx_encoder, titles, texts)
    documents = passage_inputs(titles, texts)
    quiet = dict(convert_to_tensor=True, show_progress_bar=False)
    assert (model.encode_query(questions, **quiet) - ours_q).abs().max() <= 1e-5
    assert (model.encode_document(documents, **quiet) - ours_p).abs().max() <= 1e-5
    assert (model.encode(documents, **quiet) - ours_p).abs().max() <= 1e-5  # no task: as a document
    # the prefixes matter here: without them the vectors are others
    assert (model.encode_query(questions, prompt="", **quiet) - ours_q).abs().max() > 1e-3
    assert (model.encode_document(documents, prompt="", **quiet) - ours_p).abs().max() > 1e-3

    config = json.loads((tmp_path / "st" / "config_sentence_transformers.json").read_text())
    assert config["prompts"] == {"query": "query: ", "document": "passage: "}
    if shared:
        assert not isinstance(model[0], Router) and model[0].query_length == QUERY_LENGTH
        assert model.max_seq_length == TINY_LENGTH
        assert len(list((tmp_path / "st").rglob("*.safetensors"))) == 1  # one set of weights
    else:
        lengths = {route: modules[0].max_seq_length for route, modules in model[0].sub_modules.items()}
        assert lengths == {"query": QUERY_LENGTH, "document": TINY_LENGTH}
    card = (tmp_path / "st" / "README.md").read_text()
    for row in (f"| max sequence length | {TINY_LENGTH} tokens", f"| question length | {QUERY_LENGTH} tokens",
                "| question prefix | `'query: '`", "| passage prefix | `'passage: '`"):
        assert row in card, row


# ---------------------------------------------------------------- squad_open: the same top-20 as dense_retriever.py

SQUAD_QUESTIONS = 100
SQUAD_LENGTH = 64
TIE = 1e-4  # scores (about 16 here) closer than this are float noise apart: their order is the index's choice


def minilm_first_layer(folder: Path) -> str:
    """MiniLM cut to its first layer: real tokenization and a real (if weaker) ranking of the real texts, at a
    sixth of MiniLM's encoding cost."""
    path = resolve_pretrained_path("minilm")
    BertModel.from_pretrained(path, num_hidden_layers=1).save_pretrained(folder)
    AutoTokenizer.from_pretrained(path).save_pretrained(folder)
    return str(folder)


def untied_ranks(scores: list) -> list:
    """Ranks whose score is more than TIE from both neighbours' in a descending list."""
    return [r for r in range(len(scores))
            if (r == 0 or scores[r - 1] - scores[r] > TIE) and (r == len(scores) - 1 or scores[r] - scores[r + 1] > TIE)]


def test_squad_open_top20_lists_equal_dense_retriever(shared_data, tmp_path):
    """100 dev questions over all 2,067 passages: dense_retriever.py (passages embedded by
    generate_dense_embeddings.py, a faiss index) and the exported folder (encode_query / encode_document,
    model.similarity) return the same 20 passages in the same order with the same scores."""
    squad = shared_data / "squad_open"
    psgs = str(squad / "psgs.tsv")
    qas = tmp_path / "dev100.qa.csv"
    qas.write_text("".join((squad / "dev.qa.csv").read_text(encoding="utf-8").splitlines(keepends=True)
                           [:SQUAD_QUESTIONS]), encoding="utf-8")
    base = minilm_first_layer(tmp_path / "minilm_1_layer")
    checkpoint = write_checkpoint(tmp_path / "dpr_biencoder.1", base, SQUAD_LENGTH, pooling="mean", similarity="dot",
                                  noise=1e-3)

    generate_dense_embeddings(gen_embs_config(base, psgs, tmp_path / "embs" / "psgs", model_file=checkpoint,
                                              batch_size=128, tokenize_chunk=2048))
    results = tmp_path / "dense.json"
    run_dense_retriever(retriever_config(base, str(qas), psgs, str(tmp_path / "embs" / "psgs_*"), str(results),
                                         model_file=checkpoint, batch_size=100, validation_workers=1))
    records = json.loads(results.read_text())

    model = export(checkpoint, tmp_path / "st")
    passages = list(iter_passages(psgs))
    documents = model.encode_document(passage_inputs([p.title for p in passages], [p.text for p in passages]),
                                      convert_to_tensor=True, batch_size=128, show_progress_bar=False)
    questions = [normalize_question(sample.question) for sample in read_qa_file(str(qas))]
    top20 = model.similarity(st_vectors(model, "query", questions), documents).topk(20, dim=1)

    assert len(records) == SQUAD_QUESTIONS
    untied = 0
    for record, values, indices in zip(records, top20.values.tolist(), top20.indices.tolist()):
        theirs = [passages[i].id for i in indices]
        ours = [ctx["id"] for ctx in record["ctxs"]]
        assert [float(ctx["score"]) for ctx in record["ctxs"]] == pytest.approx(values, rel=1e-5, abs=1e-5)
        ranks = untied_ranks(values)
        assert [ours[r] for r in ranks] == [theirs[r] for r in ranks] and set(ours) <= set(theirs) | set(ours[-1:])
        untied += len(ranks)
    assert untied >= 0.98 * 20 * SQUAD_QUESTIONS  # ties are rare: the lists are compared, not excused


# ---------------------------------------------------------------- model card


def write_training_records(output_dir: Path, checkpoint: str) -> None:
    """training_records.jsonl as the trainer writes it: the run's recipe, its steps, a validation."""
    run = RunRecord(processes=4, global_batch=128, gradient_accumulation_steps=1, num_train_epochs=40,
                    total_steps=2400, learning_rate=2e-5, warmup_steps=1237, precision="bf16",
                    details={"grad_cache": True, "q_chunk_size": 8, "ctx_chunk_size": 16, "hard_negatives": 1,
                             "other_negatives": 0, "similarity": "dot", "temperature": 1.0, "share_encoders": False})
    step = StepRecord(epoch=0, step=2400, total_steps=2400, loss=0.1234, lr=0.0, grad_norm=1.0, questions_per_s=9.0,
                      seconds=1.0, tflops=0.1, mfu=None)
    validation = ValidationRecord(epoch=0, offset=0, step=2400, metric="nll_loss", value=0.4567, seconds=1.0,
                                  checkpoint=checkpoint, best=True)
    lines = [json.dumps({"kind": kind, **dataclasses.asdict(record)})
             for kind, record in (("run", run), ("step", step), ("validation", validation))]
    (output_dir / RECORDS_FILE).write_text("\n".join(lines) + "\n")


def test_model_card_reports_spec_recipe_and_metrics(tmp_path, tiny_base):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    checkpoint = write_checkpoint(run_dir / "dpr_biencoder.1", tiny_base, TINY_LENGTH, pooling="mean",
                                  similarity="cosine", temperature=0.05)
    write_training_records(run_dir, checkpoint)
    results = tmp_path / "results.json"
    results.write_text(json.dumps(retriever_results(6, 20)))
    export(checkpoint, tmp_path / "st", "--metrics", str(results))
    card = (tmp_path / "st" / "README.md").read_text()
    accuracy = top_k_accuracy_from_results(results)
    for row in ("| pooling | the mean of the non-padding last-layer token vectors |", "| temperature | 0.05 ",
                f"| max sequence length | {TINY_LENGTH} tokens", "| questions per optimizer step | 128 |",
                "| epochs | 40 |", "| precision | bf16 |", "| gradient cache | True |", "| question chunk | 8 |",
                "| passage chunk | 16 |", "| hard negatives per question | 1 |", "nll_loss = 0.4567",
                f"| top-20 accuracy | {accuracy[19]:.4f} |", f"| top-1 accuracy | {accuracy[0]:.4f} |"):
        assert row in card, row
    assert "cosine" in card and "library_name: sentence-transformers" in card

    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"nDCG@10": 0.4321, "dense": {"top20": 0.75}, "note": "text"}))
    export(checkpoint, tmp_path / "st2", "--metrics", str(metrics))
    card = (tmp_path / "st2" / "README.md").read_text()
    assert "| nDCG@10 | 0.4321 |" in card and "| dense/top20 | 0.7500 |" in card


def test_model_card_without_training_records_says_so(tmp_path, tiny_base):
    checkpoint = write_checkpoint(tmp_path / "dpr_biencoder.1", tiny_base, TINY_LENGTH, pooling="cls", similarity="dot")
    export(checkpoint, tmp_path / "st")
    assert "the recipe is not known here" in (tmp_path / "st" / "README.md").read_text()


# ---------------------------------------------------------------- bad input: one line, nothing written


def one_line_error(argv) -> str:
    with pytest.raises(SystemExit) as excinfo:
        convert_dpr_checkpoint.main(argv)
    message = str(excinfo.value)
    assert message.startswith("error: ") and "\n" not in message
    return message


@pytest.fixture
def checkpoint(tmp_path, tiny_base) -> str:
    return write_checkpoint(tmp_path / "dpr_biencoder.1", tiny_base, TINY_LENGTH, pooling="cls", similarity="dot")


def test_non_empty_out_dir_is_refused_unless_overwrite(tmp_path, checkpoint):
    out = tmp_path / "st"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert "exists and is not empty" in one_line_error(["export-st", checkpoint, str(out)])
    assert os.listdir(out) == ["mine.txt"]
    export(checkpoint, out, "--overwrite")
    assert "mine.txt" not in os.listdir(out) and (out / "modules.json").is_file()
    (tmp_path / "empty").mkdir()
    export(checkpoint, tmp_path / "empty")  # an empty folder is no one's work


def test_out_dir_that_cannot_be_written_is_refused_before_any_work(tmp_path, checkpoint, monkeypatch):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr(sentence_transformers_export, "load_checkpoint_biencoder",
                        lambda *a, **k: pytest.fail("the model was loaded before OUT_DIR was checked"))
    message = one_line_error(["export-st", checkpoint, str(tmp_path / "a_file" / "st")])
    assert "its parent folder cannot be written to" in message
    assert "is a file: name a folder" in one_line_error(["export-st", checkpoint, str(tmp_path / "a_file")])


def test_missing_sentence_transformers_names_the_extra(tmp_path, checkpoint, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # import fails as if not installed
    message = one_line_error(["export-st", checkpoint, str(tmp_path / "st")])
    assert message == f"error: {sentence_transformers_export.EXTRA_MISSING}" and "pip install -e '.[st]'" in message
    assert not (tmp_path / "st").exists()


def test_missing_tokenizer_is_one_line(tmp_path):
    base = tmp_path / "no_tokenizer"
    BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)).save_pretrained(base)
    torch.manual_seed(0)
    state = {f"{half}.{k}": v for half in ("question_model", "ctx_model")
             for k, v in BertModel.from_pretrained(base).state_dict().items()}
    spec = EncoderSpec(str(base), sequence_length=32)
    save_checkpoint(str(tmp_path / "ckpt"), CheckpointState(state, None, None, 0, 0, spec.checkpoint_params()))
    message = one_line_error(["export-st", str(tmp_path / "ckpt"), str(tmp_path / "st")])
    assert "has no tokenizer" in message and "--pretrained_model_cfg" in message
    assert not (tmp_path / "st").exists()


def nothing_written(folder: Path) -> bool:
    """Neither OUT_DIR (`st`) nor a temporary folder beside it (`.st.*.tmp`)."""
    return not [name for name in os.listdir(folder) if name.startswith(("st", ".st"))]


def test_encoder_type_that_cannot_be_exported_is_one_line(tmp_path, checkpoint):
    """DPR's fairseq RoBERTa encoder type: no transformers model to carry it."""
    state = load_checkpoint(checkpoint)
    state.encoder_params["encoder"]["encoder_model_type"] = "fairseq_roberta"
    save_checkpoint(checkpoint, state)
    assert "encoder_model_type=fairseq_roberta: only hf_bert encoders" in one_line_error(
        ["export-st", checkpoint, str(tmp_path / "st")])
    assert nothing_written(tmp_path)


def test_reader_checkpoint_is_not_a_biencoder(tmp_path, tiny_base):
    encoder = perturbed_encoder(tiny_base, 0, 5)
    state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    spec = EncoderSpec(tiny_base, sequence_length=TINY_LENGTH)
    save_checkpoint(str(tmp_path / "dpr_reader.1"), CheckpointState(state, None, None, 0, 1, spec.checkpoint_params()))
    assert "has no 'question_model.*' weights: is it a bi-encoder checkpoint?" in one_line_error(
        ["export-st", str(tmp_path / "dpr_reader.1"), str(tmp_path / "st")])
    assert nothing_written(tmp_path)


def test_decoder_model_cannot_be_exported_is_one_line(tmp_path, tiny_base):
    """A BERT configured as a decoder: not an encoder whose pooled last hidden state is the vector."""
    base = tmp_path / "decoder_bert"
    BertModel(BertConfig.from_pretrained(tiny_base, is_decoder=True)).save_pretrained(base)
    AutoTokenizer.from_pretrained(tiny_base).save_pretrained(base)
    checkpoint = write_checkpoint(tmp_path / "ckpt", str(base), TINY_LENGTH)
    assert "holds a bert decoder model" in one_line_error(["export-st", checkpoint, str(tmp_path / "st")])
    assert nothing_written(tmp_path)


@pytest.mark.parametrize("content, expected", [
    ("top-20: 0.8", "is not JSON"), ('{"run": "dev", "ok": true}', "holds no numbers"), (None, "does not exist"),
])
def test_unusable_metrics_file_is_refused_before_any_work(tmp_path, checkpoint, monkeypatch, content, expected):
    metrics = tmp_path / "metrics.json"
    if content is not None:
        metrics.write_text(content)
    monkeypatch.setattr(sentence_transformers_export, "load_checkpoint_biencoder",
                        lambda *a, **k: pytest.fail("the model was loaded before the metrics file was checked"))
    assert expected in one_line_error(["export-st", checkpoint, str(tmp_path / "st"), "--metrics", str(metrics)])
    assert nothing_written(tmp_path)


def test_model_directory_without_tokenizer_files_is_refused(tmp_path):
    """transformers would make a BERT tokenizer of its special tokens alone (every word [UNK]), for training and
    embedding too: load_tokenizer refuses it."""
    BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path)
    with pytest.raises(TokenizerError, match="cannot tokenize ordinary text"):
        load_tokenizer(str(tmp_path))


def test_a_failure_while_writing_leaves_nothing_half_written(tmp_path, checkpoint, monkeypatch):
    """A crash after the model files are saved (here: in the card) leaves neither a partial OUT_DIR nor a
    temporary folder; with --overwrite the previous folder stays whole."""
    def broken_card(*args, **kwargs):
        raise RuntimeError("disk gone")

    out = tmp_path / "st"
    monkeypatch.setattr(sentence_transformers_export, "model_card", broken_card)
    with pytest.raises(RuntimeError, match="disk gone"):  # not the user's mistake: a traceback
        convert_dpr_checkpoint.main(["export-st", checkpoint, str(out)])
    assert nothing_written(tmp_path)
    monkeypatch.undo()
    export(checkpoint, out)
    before = sorted(os.listdir(out))
    monkeypatch.setattr(sentence_transformers_export, "model_card", broken_card)
    with pytest.raises(RuntimeError, match="disk gone"):
        convert_dpr_checkpoint.main(["export-st", checkpoint, str(out), "--overwrite"])
    assert sorted(os.listdir(out)) == before and (out / "README.md").is_file()
