"""Export a bi-encoder checkpoint as a sentence-transformers folder (`convert_dpr_checkpoint.py export-st`) whose
`encode_query` / `encode_document` give this repository's question and passage vectors (docs/interop.md).

What the repository computes, and the module that computes it in the folder:

    tokens      `[CLS] question [SEP]`; passages `[CLS] title [SEP] text [SEP]`,     Transformer (the checkpoint's
                truncated to encoder.sequence_length (longest first for the pair),   weights, its tokenizer with
                token type ids all 0 (the bi-encoder never passes them)              model_max_length = sequence
                                                                                     length; no token type ids)
    pooling     last-layer [CLS] vector, or the mean over non-padding tokens         Pooling (cls / mean)
    projection  encode_proj, when encoder.projection_dim > 0                         Dense (no activation)
    similarity  dot product; cosine: L2-normalised vectors, inner product            Normalize; similarity_fn_name
    prefixes    encoder.query_prefix before each question, encoder.passage_prefix    the folder's prompts "query"
                before each passage's title (its text when it has none)              and "document"
    lengths     questions cut at encoder.query_sequence_length, passages at          each tower's max_seq_length;
                encoder.sequence_length                                              a shared encoder's query_length

Two towers become one model through a `Router` (the question encoder on the "query" route, the context encoder
on the "document" route); a checkpoint trained with encoder.share_encoders=true is one plain module chain, whose
Transformer cuts `encode_query`'s texts at its `query_length` (sentence-transformers' per-task length) when the
question length differs. A passage goes in as the pair `[title, text]`, which the tokenizer joins exactly as the
tensorizer does; a prompt goes before a pair's first text, where the tensorizer puts the passage prefix.
"""
import copy
import datetime
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from transformers import AutoModel, PreTrainedModel, PreTrainedTokenizerBase

from dpr.data.tensorizer import Tensorizer
from dpr.evaluation.qa_validation import top_k_accuracy_from_results
from dpr.foundation.errors import UserInputError
from dpr.foundation.files import UnwritableDirectoryError, atomic_output_directory, ensure_writable_directory
from dpr.interop.hf_dpr import ConversionReport
from dpr.models.biencoder import search_vectors
from dpr.models.encoder_spec import EncoderSpec
from dpr.models.hf_encoder import MINILM_ALIASES, encode
from dpr.models.loading import CheckpointBiEncoder, load_checkpoint_biencoder
from dpr.training.trainer_base import RECORDS_FILE

logger = logging.getLogger(__name__)

EXTRA_MISSING = "sentence-transformers export needs the st extra: pip install -e '.[st]'"
# The repository's bi-encoder calls the model without token type ids (all 0); the tokenizer would give the
# passage's text segment type 1, so the folder's Transformer asks it for none.
PROCESSING_KWARGS = {"text": {"return_token_type_ids": False}}
# Texts the export encodes both ways before it finishes: a mismatch is a bug, not a folder to hand out.
PROBE_QUESTIONS = ["who wrote the origin of species?", "what is the capital of france",
                   "which " + "very " * 120 + "long question is cut at the question length?"]
PROBE_PASSAGES = [("Charles Darwin", "darwin published on the origin of species."),
                  ("", "paris is the capital and largest city of france.")]
PROBE_TOLERANCE = 1e-4
TOP_K_REPORTED = (1, 5, 20, 100)


class StExportError(UserInputError):
    """A checkpoint or an output folder that `export-st` cannot use, named with the way out."""


@dataclass
class ModelCardInputs:
    """What the model card says beyond the spec: where the model came from and how it did."""

    checkpoint: str
    epoch: int
    offset: int
    training_records: List[dict] = field(default_factory=list)
    metrics_file: Optional[str] = None
    metrics: Dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------- checks done before any work


def require_sentence_transformers():
    """The sentence_transformers module, or the one line naming the extra."""
    try:
        import sentence_transformers
    except ImportError as e:
        raise StExportError(EXTRA_MISSING) from e
    return sentence_transformers


def check_out_dir(out_dir: str, overwrite: bool) -> None:
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise StExportError(f"OUT_DIR {out_dir} is a file: name a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise StExportError(f"OUT_DIR {out_dir} exists and is not empty: name another folder, or give --overwrite "
                            "to replace it (it is replaced only once the new folder is complete)")
    try:  # the folder is built beside OUT_DIR, so its parent must take files
        ensure_writable_directory(path.absolute().parent, "OUT_DIR's parent")
    except UnwritableDirectoryError as e:
        raise StExportError(f"OUT_DIR {out_dir}: its parent folder cannot be written to ({e.__cause__}): name "
                            "another OUT_DIR") from e


def check_exportable(loaded: CheckpointBiEncoder, checkpoint_path: str) -> None:
    """The folder's Transformer module pools transformers' `last_hidden_state` of an encoder, as the repository's
    hf_bert encoder does (other encoder types are refused when the checkpoint loads); encoder-decoder and decoder
    models have no such module."""
    config = loaded.question_model.config
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "is_decoder", False):
        kind = "encoder-decoder" if getattr(config, "is_encoder_decoder", False) else "decoder"
        raise StExportError(
            f"{checkpoint_path} holds a {config.model_type} {kind} model: only encoder models like BERT "
            "(represented by a pooled last hidden state) export to sentence-transformers")


def read_training_records(checkpoint_path: str) -> List[dict]:
    """The records of the run that wrote the checkpoint (`training_records.jsonl` beside it), if there; a line
    that is not JSON (a record cut short by a kill) is skipped with a warning."""
    path = Path(checkpoint_path).resolve().parent / RECORDS_FILE
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s line %d is not JSON: left out of the model card", path, number)
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def read_metrics(path: str) -> Dict[str, float]:
    """Retrieval numbers for the card: a results JSON of dense_retriever.py (its top-k accuracy is recomputed) or
    a JSON object of named numbers (e.g. {"nDCG@10": 0.41, "top20": 0.78}; nested objects name their keys
    `outer/inner`)."""
    if not os.path.isfile(path):
        raise StExportError(f"--metrics {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StExportError(f"--metrics {path} is not JSON ({e}): give a results JSON of dense_retriever.py or a "
                            "JSON object of metric names and numbers") from e
    if isinstance(data, list):
        try:
            accuracy = top_k_accuracy_from_results(path)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise StExportError(f"--metrics {path} is a JSON list but not dense_retriever.py's results (each "
                                "question with its ctxs and has_answer)") from e
        return {f"top-{k} accuracy": accuracy[k - 1] for k in TOP_K_REPORTED if k <= len(accuracy)}
    if isinstance(data, dict):
        numbers = _numbers(data, "")
        if numbers:
            return numbers
    raise StExportError(f"--metrics {path} holds no numbers: give a results JSON of dense_retriever.py or a JSON "
                        "object of metric names and numbers")


def _numbers(data: dict, prefix: str) -> Dict[str, float]:
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[name] = float(value)
        elif isinstance(value, dict):
            out.update(_numbers(value, name + "/"))
    return out


# ---------------------------------------------------------------- the folder


def tower_modules(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, spec: EncoderSpec, staging: str,
                  max_length: int, query_length: Optional[int] = None):
    """Transformer, Pooling, [Dense], [Normalize] computing `model`'s search vectors. The Transformer is read
    from `staging`, where the plain transformers model (the checkpoint's weights without encode_proj, which
    becomes the Dense) and the tokenizer (its model_max_length `max_length`) are saved first; `query_length`
    cuts the texts of `encode_query` at another length."""
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer

    plain = AutoModel.from_config(copy.deepcopy(model.config))
    weights = {key: value for key, value in model.state_dict().items() if not key.startswith("encode_proj.")}
    plain.load_state_dict(weights, strict=True)
    plain.save_pretrained(staging)
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(staging)
    transformer = Transformer(staging, processing_kwargs=copy.deepcopy(PROCESSING_KWARGS), query_length=query_length)
    hidden = transformer.get_embedding_dimension()
    modules = [transformer, Pooling(hidden, pooling_mode=spec.pooling)]
    projection = getattr(model, "encode_proj", None)
    if projection is not None:
        modules.append(Dense(hidden, projection.out_features, activation_function=None,
                             init_weight=projection.weight.detach().clone(), init_bias=projection.bias.detach().clone()))
    if spec.similarity == "cosine":
        modules.append(Normalize())
    return modules


def st_prompts(spec: EncoderSpec) -> dict:
    """The folder's prompts: `encode_query` puts the "query" prompt before each text, `encode_document` the
    "document" prompt (before a pair's first text, the title), both without being asked."""
    return {"query": spec.query_prefix, "document": spec.passage_prefix}


def build_sentence_transformer(loaded: CheckpointBiEncoder, staging: str):
    """The SentenceTransformer of a loaded checkpoint: one chain for a shared encoder (its Transformer's
    query_length the question length, when that differs), else a Router with the question encoder (cut at the
    question length) on the query route and the context encoder on the document route. `encode` without a task
    takes the document route and, through default_prompt_name, the passage prefix."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Router

    spec = loaded.spec

    def chain(model: PreTrainedModel, name: str, max_length: int, query_length: Optional[int] = None):
        return tower_modules(model, loaded.tokenizer, spec, os.path.join(staging, name), max_length, query_length)

    if loaded.shares_encoders:
        query_length = spec.question_length if spec.question_length != spec.sequence_length else None
        modules = chain(loaded.question_model, "shared", spec.sequence_length, query_length)
    else:
        modules = [Router.for_query_document(
            query_modules=chain(loaded.question_model, "question", spec.question_length),
            document_modules=chain(loaded.ctx_model, "ctx", spec.sequence_length))]
    return SentenceTransformer(modules=modules, device="cpu", similarity_fn_name=spec.similarity, prompts=st_prompts(spec),
                               default_prompt_name="document" if spec.passage_prefix else None)


def repository_vectors(loaded: CheckpointBiEncoder, texts: Sequence[str], titles=None, role: str = "question"):
    """float32 search vectors of the repository's encoding path (the bi-encoder's tensorizer: the question one for
    `role="question"`, encode, search_vectors)."""
    tensorizer = Tensorizer.for_biencoder(loaded.spec, loaded.tokenizer)
    if role == "question":
        tensorizer = tensorizer.questions
    ids, mask = tensorizer.tensorize(list(texts), titles)
    model = loaded.question_model if role == "question" else loaded.ctx_model
    with torch.inference_mode():
        _, pooled = encode(model, ids, mask, pooling=loaded.spec.pooling)
    return search_vectors(pooled.float(), loaded.spec.similarity)


def passage_inputs(titles: Sequence[str], texts: Sequence[str]) -> list:
    """What `encode_document` takes for passages as the repository encodes them: [title, text] pairs, the text
    alone where the title is empty."""
    return [[title, text] if title else text for title, text in zip(titles, texts)]


def probe_difference(loaded: CheckpointBiEncoder, folder: str) -> float:
    """The largest difference between the saved folder's vectors and the repository's on a few texts."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(folder, device="cpu", local_files_only=True)
    titles, texts = [t for t, _ in PROBE_PASSAGES], [p for _, p in PROBE_PASSAGES]
    quiet = dict(convert_to_tensor=True, show_progress_bar=False)
    pairs = (
        (model.encode_query(PROBE_QUESTIONS, **quiet), repository_vectors(loaded, PROBE_QUESTIONS)),
        (model.encode_document(passage_inputs(titles, texts), **quiet),
         repository_vectors(loaded, texts, titles, role="ctx")),
    )
    return max(float((exported.float() - ours).abs().max()) for exported, ours in pairs)


def export_sentence_transformers(
    checkpoint_path: str,
    out_dir: str,
    pretrained_model_cfg: Optional[str] = None,
    metrics_file: Optional[str] = None,
    overwrite: bool = False,
    trust_checkpoint: bool = False,
) -> ConversionReport:
    """A bi-encoder checkpoint -> a sentence-transformers folder with a model card. Everything the user can get
    wrong is checked before the model is built; the folder appears under `out_dir` only when complete."""
    require_sentence_transformers()
    check_out_dir(out_dir, overwrite)
    card = ModelCardInputs(checkpoint_path, 0, 0)
    if metrics_file:
        card.metrics_file, card.metrics = metrics_file, read_metrics(metrics_file)
    loaded = load_checkpoint_biencoder(checkpoint_path, pretrained_model_cfg, trust_checkpoint)
    check_exportable(loaded, checkpoint_path)
    card.epoch, card.offset = loaded.checkpoint.epoch, loaded.checkpoint.offset
    card.training_records = read_training_records(checkpoint_path)
    with atomic_output_directory(out_dir) as temp_dir, tempfile.TemporaryDirectory(prefix="dpr_st_export.") as staging:
        model = build_sentence_transformer(loaded, staging)
        model.save(temp_dir, create_model_card=False)
        Path(temp_dir, "README.md").write_text(model_card(loaded, card, model), encoding="utf-8")
        difference = probe_difference(loaded, temp_dir)
        if difference > PROBE_TOLERANCE:
            raise RuntimeError(f"the exported folder's vectors differ from the checkpoint's by {difference:.2e} "
                               f"(> {PROBE_TOLERANCE:g}): a bug of the export, the folder was not written")
    logger.info("probe texts: largest difference to the repository's vectors %.2e", difference)
    return ConversionReport(written=[out_dir])


# ---------------------------------------------------------------- the model card


def model_card(loaded: CheckpointBiEncoder, card: ModelCardInputs, model) -> str:
    spec = loaded.spec
    base = spec.pretrained_model_cfg
    hub_base = "sentence-transformers/all-MiniLM-L6-v2" if base.lower() in MINILM_ALIASES else base
    dimension = model.get_embedding_dimension()
    towers = ("one encoder shared by questions and passages (`encoder.share_encoders=true`)" if loaded.shares_encoders
              else "two: the question encoder (`encode_query`) and the context encoder (`encode_document`), "
                   "one model through sentence-transformers' `Router`")
    projection = (f"encode_proj, a linear layer to {spec.projection_dim} (a `Dense` module)"
                  if spec.projection_dim else "none")
    where_cut = ""
    if spec.question_length != spec.sequence_length:
        where_cut = (": the shared Transformer's `query_length`" if loaded.shares_encoders
                     else ": the query tower's `max_seq_length`")
    similarity = ("dot product (DPR's)" if spec.similarity == "dot"
                  else "cosine: vectors L2-normalised (a `Normalize` module), ranked by inner product")
    lines = [
        "---",
        "library_name: sentence-transformers",
        "pipeline_tag: sentence-similarity",
        "tags:", "- sentence-transformers", "- feature-extraction", "- dense-passage-retrieval", "- dpr",
    ]
    if not os.path.isdir(base):
        lines.append(f"base_model: {hub_base}")
    lines += [
        "---",
        "",
        f"# Dense passage retriever exported from `{Path(card.checkpoint).name}`",
        "",
        f"Exported by `convert_dpr_checkpoint.py export-st` on {datetime.date.today().isoformat()} from "
        f"`{card.checkpoint}` (epoch {card.epoch}" + (f", batch {card.offset}" if card.offset else "") + "). "
        "Its `encode_query` and `encode_document` give the vectors the repository's `dense_retriever.py` and "
        "`generate_dense_embeddings.py` compute (tested to 1e-5 in fp32).",
        "",
        "## Model",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{base}` |",
        f"| towers | {towers} |",
        f"| pooling | {'the last-layer [CLS] vector' if spec.pooling == 'cls' else 'the mean of the non-padding last-layer token vectors'} |",
        f"| projection | {projection} |",
        f"| similarity | {similarity}; `model.similarity` ranks as the retriever does |",
        f"| temperature | {spec.temperature:g} (training loss only: it scales every score alike, so rankings do not change) |",
        f"| max sequence length | {spec.sequence_length} tokens (passages; longer texts are truncated) |",
        f"| question length | {spec.question_length} tokens (`encode_query` truncates questions there{where_cut}) |",
        f"| question prefix | {_shown(spec.query_prefix)} (`encode_query` puts it before each question: the folder's "
        "`query` prompt) |",
        f"| passage prefix | {_shown(spec.passage_prefix)} (`encode_document` and `encode` put it before each "
        "passage's title, or its text when it has none: the folder's `document` prompt) |",
        f"| lower-cased | {'yes' if spec.do_lower_case else 'no'} |",
        f"| dimensions | {dimension} |",
        "",
        "## Usage",
        "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "",
        'model = SentenceTransformer("path/to/this/folder")',
        'questions = model.encode_query(["who wrote on the origin of species?"])',
        "passages = model.encode_document([",
        '    ["Charles Darwin", "Darwin published On the Origin of Species in 1859."],  # [title, text]',
        '    "a passage without a title is its text alone",',
        "])",
        "scores = model.similarity(questions, passages)",
        "```",
        "",
        "Passages are `[title, text]` pairs: the tokenizer joins them as the repository does, `[CLS] title [SEP] "
        "text [SEP]`, truncating the longer of the two first. The single string `\"title [SEP] text\"` gives the "
        "same tokens and vectors unless the passage is longer than the sequence length. The prefixes and the question "
        "length above are applied by `encode_query` and `encode_document` themselves: give them the plain texts "
        "(a `prompt=` or `prompt_name=` argument would replace the prefix). The retriever replaces "
        "`\u2019` with `'` in questions (DPR's normalisation) before encoding them; do the same for identical "
        "vectors. `model.encode` without a task encodes as `encode_document` does.",
        "",
        "## Training",
        "",
    ]
    lines += training_lines(card.training_records)
    if card.metrics:
        lines += ["", "## Retrieval results", "", f"From `{card.metrics_file}`.", "", "| metric | value |",
                  "|---|---|"]
        lines += [f"| {name} | {value:.4f} |" for name, value in card.metrics.items()]
    return "\n".join(lines) + "\n"


def _shown(prefix: str) -> str:
    return f"`{prefix!r}`" if prefix else "none"


RECIPE_ROWS = (
    ("processes", "processes"), ("global_batch", "questions per optimizer step"),
    ("gradient_accumulation_steps", "gradient accumulation steps"), ("num_train_epochs", "epochs"),
    ("total_steps", "optimizer steps"), ("learning_rate", "learning rate"), ("warmup_steps", "warmup steps"),
    ("precision", "precision"),
)
DETAIL_ROWS = (
    ("grad_cache", "gradient cache"), ("q_chunk_size", "question chunk"), ("ctx_chunk_size", "passage chunk"),
    ("hard_negatives", "hard negatives per question"), ("other_negatives", "other negatives per question"),
    ("share_encoders", "shared encoder"),
)


def training_lines(records: List[dict]) -> List[str]:
    """The recipe of the last training run, its progress and its validations, from training_records.jsonl."""
    runs = [r for r in records if r.get("kind") == "run"]
    steps = [r for r in records if r.get("kind") == "step"]
    validations = [r for r in records if r.get("kind") == "validation" and r.get("metric")]
    if not (runs or steps or validations):
        return ["No `training_records.jsonl` beside the checkpoint: the recipe is not known here."]
    lines = []
    if runs:
        run = runs[-1]
        details = run.get("details") or {}
        lines += ["| recipe | |", "|---|---|"]
        lines += [f"| {label} | {run[key]} |" for key, label in RECIPE_ROWS if run.get(key) is not None]
        lines += [f"| {label} | {details[key]} |" for key, label in DETAIL_ROWS if details.get(key) is not None]
        lines.append("")
    if steps:
        last = steps[-1]
        lines.append(f"Trained {last['step']} of {last.get('total_steps', '?')} optimizer steps; loss at the last "
                     f"step {last['loss']:.4f}.")
    if validations:
        best = [r for r in validations if r.get("best")] or validations[-1:]
        record = best[-1]
        lines.append(f"Best validation: {record['metric']} = {record['value']:.4f} at step {record['step']} "
                     f"(`{Path(str(record.get('checkpoint'))).name}`).")
    return lines
