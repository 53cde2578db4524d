"""Interoperability with transformers' DPR classes: export DPR-format checkpoints of this repository (or released
DPR / GC-DPR `.cp` files) to `DPRQuestionEncoder` / `DPRContextEncoder` / `DPRReader` directories, and import
such directories back as DPR-format checkpoints.

Both sides hold the same BERT and the same representation (last-layer [CLS] state, then the optional
`encode_proj`); only the key layout differs:

    this repository (a checkpoint half)     transformers
    embeddings.* / encoder.*               {question_encoder|ctx_encoder|span_predictor.encoder}.bert_model.*
    encode_proj.*                          {...}.encode_proj.*
    pooler.*                               (none: transformers' DPR encoders have no pooler)
    qa_outputs.* / qa_classifier.*         span_predictor.qa_outputs.* / span_predictor.qa_classifier.*

The BERT pooler is unused by DPR, so export drops it and import fills it with zeros; both are reported. A model
trained with `encoder.pooling=mean` has no transformers DPR equivalent ([CLS] only), so its export is refused.
"""
import copy
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Type

import torch
from transformers import (
    AutoConfig,
    AutoTokenizer,
    BertConfig,
    DPRConfig,
    DPRContextEncoder,
    DPRContextEncoderTokenizer,
    DPRQuestionEncoder,
    DPRQuestionEncoderTokenizer,
    DPRReader,
    DPRReaderTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from transformers.tokenization_utils_base import TOKENIZER_CONFIG_FILE

from dpr.foundation.errors import UserInputError
from dpr.models.biencoder import BiEncoder
from dpr.models.hf_encoder import encoder_from_config, load_tokenizer, resolve_pretrained_path, tokenizer_identity
from dpr.models.loading import CHECKPOINT_PREFIXES, load_checkpoint_biencoder
from dpr.foundation.checkpoints import CheckpointState, load_checkpoint, load_model_state, save_checkpoint, strip_prefix

logger = logging.getLogger(__name__)

QUESTION_SUBDIR = "question_encoder"
CTX_SUBDIR = "ctx_encoder"
READER_ENCODER_PREFIX = "encoder."
READER_HEAD_PREFIXES = ("qa_outputs.", "qa_classifier.")
HF_READER_HEADS_PREFIX = "span_predictor."
# Sequence lengths an imported checkpoint gets: DPR's defaults (a transformers directory does not store one).
DEFAULT_BIENCODER_SEQUENCE_LENGTH = 256
DEFAULT_READER_SEQUENCE_LENGTH = 350
# The configuration fields a DPRConfig shares with the BertConfig of the model it wraps.
SHARED_CONFIG_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "max_position_embeddings",
    "type_vocab_size",
    "initializer_range",
    "layer_norm_eps",
    "pad_token_id",
)


class ExportError(UserInputError):
    """A checkpoint that transformers' DPR classes cannot reproduce."""


@dataclass(frozen=True)
class HFRole:
    """A transformers DPR class, its tokenizer class, and where in its state dict the DPREncoder sits."""

    model_class: Type[PreTrainedModel]
    tokenizer_class: type
    encoder_prefix: str


HF_ROLES = {
    "question": HFRole(DPRQuestionEncoder, DPRQuestionEncoderTokenizer, "question_encoder."),
    "ctx": HFRole(DPRContextEncoder, DPRContextEncoderTokenizer, "ctx_encoder."),
    "reader": HFRole(DPRReader, DPRReaderTokenizer, "span_predictor.encoder."),
}


@dataclass
class ConversionReport:
    """What a conversion wrote, and which weights it did not carry over or had to create."""

    written: List[str] = field(default_factory=list)
    dropped: List[str] = field(default_factory=list)
    added: List[str] = field(default_factory=list)

    def lines(self) -> List[str]:
        out = [f"wrote {path}" for path in self.written]
        out += [f"dropped {item}" for item in self.dropped]
        out += [f"added {item}" for item in self.added]
        return out


# ---------------------------------------------------------------- configurations


def architecture(config) -> Dict[str, object]:
    """The BERT settings of a BertConfig or DPRConfig."""
    return {k: getattr(config, k) for k in SHARED_CONFIG_FIELDS}


def dpr_config_from_bert(bert_config: BertConfig, projection_dim: int = 0) -> DPRConfig:
    return DPRConfig(**architecture(bert_config), projection_dim=projection_dim)


def bert_config_from_dpr(dpr_config: DPRConfig) -> BertConfig:
    return BertConfig(**architecture(dpr_config))


# ---------------------------------------------------------------- state dict layouts


def encoder_state_to_hf(
    state: Dict[str, torch.Tensor], encoder_prefix: str
) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """(DPREncoder keys under `encoder_prefix`, keys left out) for one encoder's state dict of this repository.
    The pooler and the `position_ids` buffer have no place in a DPREncoder."""
    mapped, dropped = {}, []
    for key, value in state.items():
        if key.startswith("encode_proj."):
            mapped[encoder_prefix + key] = value
        elif key.startswith(("embeddings.", "encoder.")) and not key.endswith("position_ids"):
            mapped[encoder_prefix + "bert_model." + key] = value
        else:
            dropped.append(key)
    return mapped, dropped


def encoder_state_from_hf(hf_state: Dict[str, torch.Tensor], encoder_prefix: str) -> Dict[str, torch.Tensor]:
    """This repository's encoder keys from the DPREncoder under `encoder_prefix` of a transformers state dict."""
    bert_prefix, proj_prefix = encoder_prefix + "bert_model.", encoder_prefix + "encode_proj."
    state = {}
    for key, value in hf_state.items():
        if key.startswith(bert_prefix):
            state[key[len(bert_prefix) :]] = value
        elif key.startswith(proj_prefix):
            state["encode_proj." + key[len(proj_prefix) :]] = value
    return state


def projection_dim_of(state: Dict[str, torch.Tensor]) -> int:
    """The encoder's projection size as its weights say (0: no encode_proj)."""
    weight = state.get("encode_proj.weight")
    return int(weight.shape[0]) if weight is not None else 0


# ---------------------------------------------------------------- this repository's models


def load_encoder_state(bert_config: BertConfig, state: Dict[str, torch.Tensor]) -> PreTrainedModel:
    """This repository's encoder (eval mode) holding `state`; position_ids and pooler differences are tolerated
    as in any checkpoint load, anything else that does not fit is an error."""
    model = encoder_from_config(copy.deepcopy(bert_config), None, projection_dim_of(state))
    load_model_state(model, state)
    return model.eval()


def base_model_of_checkpoint(
    ckpt: CheckpointState, pretrained_model_cfg: Optional[str] = None
) -> Tuple[BertConfig, PreTrainedTokenizerBase]:
    """(BERT config, tokenizer) of the model a checkpoint was trained from: `pretrained_model_cfg` when given,
    else the one its encoder_params name. The released files name `bert-base-uncased`; without the model hub,
    give a local directory with the same architecture (config and tokenizer suffice)."""
    name = pretrained_model_cfg or ckpt.encoder_params.get("encoder", {}).get("pretrained_model_cfg")
    if not name:
        raise ValueError("the checkpoint names no pretrained model: give pretrained_model_cfg")
    try:
        config = AutoConfig.from_pretrained(resolve_pretrained_path(name))
    except OSError as e:
        raise ValueError(
            f"cannot read the configuration of '{name}' ({e}); give pretrained_model_cfg: a local directory "
            "holding the config and tokenizer of the BERT the checkpoint was trained from"
        ) from e
    if config.model_type != "bert":
        raise ValueError(f"transformers' DPR classes wrap a BERT; '{name}' is a {config.model_type} model")
    tokenizer = load_tokenizer(name, ckpt.encoder_params.get("do_lower_case", True))
    return config, tokenizer


def load_biencoder(
    checkpoint_path: str, pretrained_model_cfg: Optional[str] = None, trust_checkpoint: bool = False
) -> Tuple[BiEncoder, PreTrainedTokenizerBase]:
    """(BiEncoder in eval mode, tokenizer) from a DPR-format bi-encoder checkpoint: one of this repository, of
    hydra DPR, or a released old-DPR / GC-DPR `.cp` file (`load_checkpoint_biencoder` reads it)."""
    loaded = load_checkpoint_biencoder(checkpoint_path, pretrained_model_cfg, trust_checkpoint)
    spec = loaded.spec
    biencoder = BiEncoder(loaded.question_model, loaded.ctx_model, spec.sequence_length, pooling=spec.pooling)
    return biencoder.eval(), loaded.tokenizer


def check_exportable(ckpt: CheckpointState, checkpoint_path: str) -> None:
    """transformers' DPR encoders represent a text by its last-layer [CLS] vector (their pooler_output), so a
    model trained with another pooling would give other vectors there: refused. Cosine similarity exports (the
    vectors only need L2-normalising by the user), with a warning."""
    saved = ckpt.encoder_params.get("encoder", {})
    pooling = saved.get("pooling") or "cls"
    if pooling != "cls":
        raise ExportError(
            f"{checkpoint_path} was trained with encoder.pooling={pooling}, but transformers' DPR encoders "
            "represent a text by its [CLS] vector only, so their pooler_output would not be this model's vectors. "
            "Use this repository's generate_dense_embeddings.py and dense_retriever.py with the checkpoint instead"
        )
    if saved.get("similarity") == "cosine":
        logger.warning("%s was trained with cosine similarity: L2-normalise the exported encoders' pooler_output "
                       "before taking inner products", checkpoint_path)
    lost = settings_the_dpr_tokenizers_lose(saved)
    if lost:  # transformers' DPR tokenizers know no prefix, and no length of their own for questions
        logger.warning("%s was trained with %s; transformers' DPR classes have no place for them, so the exported "
                       "folders do not apply them: give the exported encoders texts prepared the same way",
                       checkpoint_path, "; ".join(lost))


def settings_the_dpr_tokenizers_lose(saved: dict) -> List[str]:
    """Each setting of a checkpoint's `encoder` params that the exported DPR folders cannot hold, with what to do
    in its stead: a question prefix, a passage prefix, a question length other than the passage length."""
    lost = []
    if saved.get("query_prefix"):
        lost.append(f"encoder.query_prefix={saved['query_prefix']!r} (put it before each question)")
    if saved.get("passage_prefix"):
        lost.append(f"encoder.passage_prefix={saved['passage_prefix']!r} (put it before each passage's title, or "
                    "its text when it has none)")
    length = saved.get("query_sequence_length")
    if length and length != saved.get("sequence_length"):
        lost.append(f"encoder.query_sequence_length={length} (cut questions at {length} tokens; passages at "
                    f"encoder.sequence_length={saved.get('sequence_length')})")
    return lost


def checkpoint_half(ckpt: CheckpointState, role: str) -> Dict[str, torch.Tensor]:
    state = strip_prefix(ckpt.model_dict, CHECKPOINT_PREFIXES[role])
    if not state:
        raise ValueError(f"the checkpoint has no '{CHECKPOINT_PREFIXES[role]}*' weights: is it a bi-encoder?")
    return state


def reader_parts(model_dict: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """(encoder state, head weights `qa_outputs.*` and `qa_classifier.*`) of a reader checkpoint."""
    encoder_state = strip_prefix(model_dict, READER_ENCODER_PREFIX)
    heads = {k: v for k, v in model_dict.items() if k.startswith(READER_HEAD_PREFIXES)}
    if not encoder_state or len(heads) != 4:
        raise ValueError(
            "not a reader checkpoint: expected encoder.*, qa_outputs.{weight,bias} and qa_classifier.{weight,bias}"
        )
    if projection_dim_of(encoder_state):
        raise ValueError("a reader encoder with encode_proj has no DPRReader equivalent (its heads read hidden states)")
    return encoder_state, heads


# ---------------------------------------------------------------- export


def save_hf_directory(
    role: str,
    out_dir: str,
    bert_config: BertConfig,
    hf_state: Dict[str, torch.Tensor],
    projection_dim: int,
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    """Build the transformers DPR model of `role` holding exactly `hf_state` (every key must fit) and save it with
    its config and tokenizer, laid out as the DPR directories of the model hub."""
    spec = HF_ROLES[role]
    model = spec.model_class(dpr_config_from_bert(bert_config, projection_dim))
    model.load_state_dict(hf_state, strict=True)
    model.save_pretrained(out_dir)
    save_dpr_tokenizer(tokenizer, spec.tokenizer_class, out_dir)
    logger.info("Saved %s with its tokenizer to %s", spec.model_class.__name__, out_dir)


def save_dpr_tokenizer(tokenizer: PreTrainedTokenizerBase, tokenizer_class: type, out_dir: str) -> None:
    """Save `tokenizer` unchanged, its tokenizer_config naming the DPR tokenizer class as the model hub's DPR
    directories do (DPR's tokenizers are BERT's under another name, so AutoTokenizer builds the DPR class)."""
    tokenizer.save_pretrained(out_dir)
    config_path = os.path.join(out_dir, TOKENIZER_CONFIG_FILE)
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    config["tokenizer_class"] = tokenizer_class.__name__
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def export_biencoder(
    checkpoint_path: str, out_dir: str, pretrained_model_cfg: Optional[str] = None, trust_checkpoint: bool = False
) -> ConversionReport:
    """A bi-encoder checkpoint -> `out_dir/question_encoder` (DPRQuestionEncoder) and `out_dir/ctx_encoder`
    (DPRContextEncoder), each with config, weights and tokenizer."""
    ckpt = load_checkpoint(checkpoint_path, trust_checkpoint)
    check_exportable(ckpt, checkpoint_path)
    bert_config, tokenizer = base_model_of_checkpoint(ckpt, pretrained_model_cfg)
    report = ConversionReport()
    for role, subdir in (("question", QUESTION_SUBDIR), ("ctx", CTX_SUBDIR)):
        state = load_encoder_state(bert_config, checkpoint_half(ckpt, role)).state_dict()
        hf_state, dropped = encoder_state_to_hf(state, HF_ROLES[role].encoder_prefix)
        target = os.path.join(out_dir, subdir)
        save_hf_directory(role, target, bert_config, hf_state, projection_dim_of(state), tokenizer)
        report.written.append(target)
        report.dropped += [f"{CHECKPOINT_PREFIXES[role]}{key} (no such weight in transformers' DPR)" for key in dropped]
    return report


def export_reader(
    checkpoint_path: str, out_dir: str, pretrained_model_cfg: Optional[str] = None, trust_checkpoint: bool = False
) -> ConversionReport:
    """A reader checkpoint -> a DPRReader directory with config, weights and tokenizer."""
    ckpt = load_checkpoint(checkpoint_path, trust_checkpoint)
    bert_config, tokenizer = base_model_of_checkpoint(ckpt, pretrained_model_cfg)
    encoder_state, heads = reader_parts(ckpt.model_dict)
    state = load_encoder_state(bert_config, encoder_state).state_dict()
    hf_state, dropped = encoder_state_to_hf(state, HF_ROLES["reader"].encoder_prefix)
    hf_state.update({HF_READER_HEADS_PREFIX + key: value for key, value in heads.items()})
    save_hf_directory("reader", out_dir, bert_config, hf_state, 0, tokenizer)
    return ConversionReport(
        written=[out_dir],
        dropped=[f"{READER_ENCODER_PREFIX}{key} (no such weight in transformers' DPR)" for key in dropped],
    )


# ---------------------------------------------------------------- import


def load_hf_model(dpr_dir: str, role: str, report: ConversionReport) -> PreTrainedModel:
    """The transformers DPR model of `role` saved in `dpr_dir`; a directory of another role, or weights that
    leave part of the model uninitialised, are errors rather than silently random weights. Weights the model
    has no place for are reported as dropped."""
    spec = HF_ROLES[role]
    architectures = DPRConfig.from_pretrained(dpr_dir).architectures or []
    if architectures and spec.model_class.__name__ not in architectures:
        raise ValueError(f"{dpr_dir} holds a {architectures[0]}, not a {spec.model_class.__name__}")
    model, info = spec.model_class.from_pretrained(dpr_dir, output_loading_info=True)
    missing, mismatched = sorted(info.get("missing_keys", [])), list(info.get("mismatched_keys", []))
    if missing or mismatched:
        raise ValueError(
            f"{dpr_dir} does not fit {spec.model_class.__name__}: missing {missing[:10]}, mismatched {mismatched[:10]}"
        )
    unexpected = sorted(info.get("unexpected_keys", []))
    report.dropped += [f"{key} (not part of {spec.model_class.__name__})" for key in unexpected]
    return model.eval()


def encoder_from_hf_state(
    bert_config: BertConfig,
    hf_state: Dict[str, torch.Tensor],
    encoder_prefix: str,
    report: ConversionReport,
    label: str,
) -> PreTrainedModel:
    """This repository's encoder holding the DPREncoder weights under `encoder_prefix`; the BERT pooler, which
    transformers' DPR lacks and DPR never uses, is filled with zeros (reported under `label`)."""
    state = encoder_state_from_hf(hf_state, encoder_prefix)
    model = encoder_from_config(copy.deepcopy(bert_config), None, projection_dim_of(state))
    for key, value in model.state_dict().items():
        if key not in state and key.startswith("pooler."):
            state[key] = torch.zeros_like(value)
            report.added.append(f"{label}{key} (zeros: unused, DPR represents by the [CLS] state)")
    load_model_state(model, state)
    return model.eval()


def import_encoder(dpr_dir: str, role: str) -> Tuple[PreTrainedModel, PreTrainedTokenizerBase, ConversionReport]:
    """(this repository's encoder, tokenizer, report) from a DPRQuestionEncoder (`role="question"`) or
    DPRContextEncoder (`role="ctx"`) directory; `encode(model, ids, mask)[1]` equals its `pooler_output`."""
    report = ConversionReport()
    hf_model = load_hf_model(dpr_dir, role, report)
    model = encoder_from_hf_state(
        bert_config_from_dpr(hf_model.config), hf_model.state_dict(), HF_ROLES[role].encoder_prefix, report, ""
    )
    return model, AutoTokenizer.from_pretrained(dpr_dir), report


def import_biencoder(
    question_dir: str,
    ctx_dir: str,
    out_checkpoint: str,
    sequence_length: int = DEFAULT_BIENCODER_SEQUENCE_LENGTH,
) -> ConversionReport:
    """DPRQuestionEncoder + DPRContextEncoder directories -> a DPR-format bi-encoder checkpoint (see
    `write_imported_checkpoint` for the base-model directory it also writes)."""
    question_model, tokenizer, report = import_encoder(question_dir, "question")
    ctx_model, _, ctx_report = import_encoder(ctx_dir, "ctx")
    if architecture(question_model.config) != architecture(ctx_model.config):
        raise ValueError(f"{question_dir} and {ctx_dir} hold different BERT architectures; a checkpoint names one")
    projection_dims = {projection_dim_of(m.state_dict()) for m in (question_model, ctx_model)}
    if len(projection_dims) != 1:
        raise ValueError(f"the question and context encoders project to different sizes {sorted(projection_dims)}")
    report.added = [CHECKPOINT_PREFIXES["question"] + a for a in report.added]
    report.added += [CHECKPOINT_PREFIXES["ctx"] + a for a in ctx_report.added]
    report.dropped += ctx_report.dropped
    model_dict = {CHECKPOINT_PREFIXES["question"] + k: v for k, v in question_model.state_dict().items()}
    model_dict.update({CHECKPOINT_PREFIXES["ctx"] + k: v for k, v in ctx_model.state_dict().items()})
    bert_config = bert_config_from_dpr(question_model.config)
    write_imported_checkpoint(
        out_checkpoint, model_dict, bert_config, tokenizer, projection_dims.pop(), sequence_length, report
    )
    return report


def import_reader(
    reader_dir: str, out_checkpoint: str, sequence_length: int = DEFAULT_READER_SEQUENCE_LENGTH
) -> ConversionReport:
    """A DPRReader directory -> a DPR-format reader checkpoint (`encoder.*`, `qa_outputs.*`, `qa_classifier.*`)."""
    report = ConversionReport()
    hf_model = load_hf_model(reader_dir, "reader", report)
    bert_config = bert_config_from_dpr(hf_model.config)
    hf_state = hf_model.state_dict()
    encoder = encoder_from_hf_state(
        bert_config, hf_state, HF_ROLES["reader"].encoder_prefix, report, READER_ENCODER_PREFIX
    )
    model_dict = {READER_ENCODER_PREFIX + k: v for k, v in encoder.state_dict().items()}
    heads = strip_prefix(hf_state, HF_READER_HEADS_PREFIX)
    model_dict.update({key: value for key, value in heads.items() if key.startswith(READER_HEAD_PREFIXES)})
    tokenizer = AutoTokenizer.from_pretrained(reader_dir)
    write_imported_checkpoint(out_checkpoint, model_dict, bert_config, tokenizer, 0, sequence_length, report)
    return report


def write_imported_checkpoint(
    out_checkpoint: str,
    model_dict: Dict[str, torch.Tensor],
    bert_config: BertConfig,
    tokenizer: PreTrainedTokenizerBase,
    projection_dim: int,
    sequence_length: int,
    report: ConversionReport,
) -> None:
    """Save `model_dict` as a DPR-format checkpoint (epoch 0, no optimizer state) whose encoder_params name
    `{out_checkpoint}.bert`, a directory written beside it with the BERT config and tokenizer (no weights:
    `pretrained: false` builds the model from the config, and the checkpoint fills it)."""
    base_dir = os.path.abspath(out_checkpoint) + ".bert"
    bert_config.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    encoder_params = {
        "do_lower_case": bool(getattr(tokenizer, "do_lower_case", True)),
        "encoder": {
            "encoder_model_type": "hf_bert",
            "pretrained_model_cfg": base_dir,
            "pretrained": False,
            "projection_dim": projection_dim,
            "sequence_length": sequence_length,
        },
        "tokenizer": tokenizer_identity(tokenizer),  # the one saved beside it: refused if it tokenizes otherwise
    }
    save_checkpoint(out_checkpoint, CheckpointState(model_dict, None, None, 0, 0, encoder_params))
    report.written += [out_checkpoint, base_dir]
