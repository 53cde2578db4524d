"""What a bi-encoder is, resolved once: the pretrained model, how its vectors are made and how they are compared.

`EncoderSpec.from_config(cfg.encoder, cfg.do_lower_case)` builds it from the hydra config (conf/encoder/*.yaml);
a checkpoint saves it (`checkpoint_params()`, DPR's `{"do_lower_case", "encoder": {...}}` shape) and
`with_checkpoint_params` reads it back, the checkpoint's values overriding the configured ones as in DPR. Training,
embedding, indexing and retrieval take this object, not the whole config, so a model trained with cosine
similarity is also embedded, indexed and searched with it.
"""
import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from dpr.foundation.errors import UserInputError
from dpr.models.hf_encoder import MINILM_ALIASES

logger = logging.getLogger(__name__)

POOLINGS = ("cls", "mean")
SIMILARITIES = ("dot", "cosine")
# The fields of `vector_params`.
VECTOR_FIELDS = (
    "encoder_model_type", "projection_dim", "sequence_length", "token_type_ids", "pooling", "similarity", "do_lower_case",
    "query_sequence_length", "query_prefix", "passage_prefix",
)
# Fields added after checkpoints and shard records were first written: saved only when not at their default, so
# that a checkpoint or record of the defaults is the one older versions wrote, and the two compare equal.
SAVED_WHEN_SET = {"query_sequence_length": None, "query_prefix": "", "passage_prefix": ""}
# Keys of `cfg.encoder` that change how the trainer computes, not the model: the trainer reads them
# (dpr/training/trainer_base.py), the spec and the checkpoints do not hold them.
TRAINING_ONLY_KEYS = ("gradient_checkpointing",)
# [CLS] and [SEP] take two positions: anything shorter leaves no room for a token of text.
MIN_SEQUENCE_LENGTH = 3


class EncoderConfigError(UserInputError):
    """An encoder setting that cannot work."""


@dataclass(frozen=True)
class EncoderSpec:
    pretrained_model_cfg: str
    encoder_model_type: str = "hf_bert"
    pretrained_file: Optional[str] = None
    projection_dim: int = 0
    sequence_length: int = 256
    # != 0 overrides the model's hidden and attention dropout, as DPR does; 0 keeps the model's own
    dropout: float = 0.1
    pretrained: bool = True
    fix_ctx_encoder: bool = False
    # one encoder for questions and passages (Tevatron's and sentence-transformers' option); DPR: two
    share_encoders: bool = False
    pad_to_max: bool = False
    # the reader's: token type ids computed per row (1 after the question's [SEP]); DPR's released reader has none
    token_type_ids: bool = False
    # cls: the last-layer [CLS] vector (DPR); mean: the mean of the non-padding token vectors
    pooling: str = "cls"
    # dot: DPR's inner product; cosine: inner product of L2-normalised vectors, divided by temperature
    similarity: str = "dot"
    temperature: float = 1.0
    do_lower_case: bool = True
    # questions' own length (None: sequence_length), and text put before each question / passage before
    # tokenization (e5's "query: ", "passage: "); the passage's goes before its title when it has one
    query_sequence_length: Optional[int] = None
    query_prefix: str = ""
    passage_prefix: str = ""

    @property
    def question_length(self) -> int:
        return int(self.query_sequence_length or self.sequence_length)

    def __post_init__(self) -> None:
        if not self.pretrained_model_cfg:
            raise EncoderConfigError("encoder.pretrained_model_cfg is empty: name a model hub id, a directory or minilm")
        if int(self.sequence_length) < MIN_SEQUENCE_LENGTH:
            raise EncoderConfigError(
                f"encoder.sequence_length={self.sequence_length} leaves no room for text after [CLS] and [SEP]: "
                f"use at least {MIN_SEQUENCE_LENGTH} (DPR: 256 for the retriever, 350 for the reader)"
            )
        if self.query_sequence_length is not None and int(self.query_sequence_length) < MIN_SEQUENCE_LENGTH:
            raise EncoderConfigError(
                f"encoder.query_sequence_length={self.query_sequence_length} leaves no room for text after [CLS] and "
                f"[SEP]: use at least {MIN_SEQUENCE_LENGTH}, or null for encoder.sequence_length")
        for key in ("query_prefix", "passage_prefix"):
            if not isinstance(getattr(self, key), str):
                raise EncoderConfigError(f"encoder.{key}={getattr(self, key)!r} must be text (quote it), or empty")
        if self.pooling not in POOLINGS:
            raise EncoderConfigError(f"encoder.pooling={self.pooling!r}: choose one of {', '.join(POOLINGS)}")
        if self.similarity not in SIMILARITIES:
            raise EncoderConfigError(f"encoder.similarity={self.similarity!r}: choose one of {', '.join(SIMILARITIES)}")
        if not float(self.temperature) > 0:
            raise EncoderConfigError(f"encoder.temperature={self.temperature} must be positive")
        if int(self.projection_dim) < 0:
            raise EncoderConfigError(f"encoder.projection_dim={self.projection_dim} must be 0 (none) or positive")
        if self.share_encoders and self.fix_ctx_encoder:
            raise EncoderConfigError(
                "encoder.share_encoders=true with encoder.fix_ctx_encoder=true: the one encoder both towers share "
                "cannot stay fixed for passages while questions train it; set one of them to false"
            )

    @classmethod
    def from_config(cls, encoder_cfg: Mapping[str, Any], do_lower_case: bool = True) -> "EncoderSpec":
        """The spec of a `cfg.encoder` mapping; keys this spec does not know are an error that names them."""
        values = {key: encoder_cfg[key] for key in encoder_cfg if key not in TRAINING_ONLY_KEYS}
        return cls._from_values(values, do_lower_case, "encoder config")

    @classmethod
    def _from_values(cls, values: dict, do_lower_case: bool, where: str) -> "EncoderSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise EncoderConfigError(f"unknown key(s) in the {where}: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        values = {key: value for key, value in values.items() if value is not None or key == "pretrained_file"}
        values.setdefault("do_lower_case", do_lower_case)
        return cls(**values)

    def checkpoint_params(self) -> dict:
        """The `encoder_params` a checkpoint saves: DPR's shape, every field of this spec under `encoder`."""
        encoder = {key: value for key, value in dataclasses.asdict(self).items()
                   if key not in SAVED_WHEN_SET or value != SAVED_WHEN_SET[key]}
        do_lower_case = encoder.pop("do_lower_case")
        return {"do_lower_case": do_lower_case, "encoder": encoder}

    def vector_params(self) -> dict:
        """The settings that shape a vector once the weights are given (what the text becomes as tokens, how the
        tokens' vectors become one, how it is compared): two encodings are comparable when these and the weights
        agree. Training-only settings, padding (masked out) and the temperature (a scale) are left out."""
        return {key: getattr(self, key) for key in VECTOR_FIELDS}

    def tokenization_params(self) -> dict:
        """How texts become the token ids an exported graph takes: the prefix put before each question / passage
        (before a passage's title when it has one), the length each is cut at, and the lower-casing of the
        tokenizer saved beside the graph."""
        return {"query_prefix": self.query_prefix, "passage_prefix": self.passage_prefix,
                "query_sequence_length": self.question_length, "sequence_length": int(self.sequence_length),
                "do_lower_case": bool(self.do_lower_case)}

    def with_checkpoint_params(self, params: Mapping[str, Any]) -> "EncoderSpec":
        """This spec with a checkpoint's saved encoder settings applied over it, as DPR does; a saved model path
        that does not exist on this machine keeps the configured one (with a warning). Keys of DPR's encoder
        config that describe no part of the model here (GC-DPR's flat form has a few) are ignored."""
        saved = dict(params.get("encoder") or {})
        known = {f.name for f in dataclasses.fields(self)}
        updates = {}
        for key, value in saved.items():
            if key not in known or value is None and key != "pretrained_file":
                continue
            if key == "pretrained_model_cfg" and value != self.pretrained_model_cfg and not _model_is_here(str(value)):
                logger.warning("checkpoint's encoder %s is not here; using %s", value, self.pretrained_model_cfg)
                continue
            if getattr(self, key) != value:
                logger.info("encoder.%s from the checkpoint: %s -> %s", key, getattr(self, key), value)
            updates[key] = value
        if "do_lower_case" in params:
            updates["do_lower_case"] = bool(params["do_lower_case"])
        return dataclasses.replace(self, **updates)


def check_fits_model(spec: EncoderSpec, max_position_embeddings: Optional[int]) -> None:
    """Refuse a query_sequence_length the model has no positions for (sequence_length is not checked here, as
    before it)."""
    if (spec.query_sequence_length is not None and max_position_embeddings
            and int(spec.query_sequence_length) > int(max_position_embeddings)):
        raise EncoderConfigError(
            f"encoder.query_sequence_length={spec.query_sequence_length} is above the model's "
            f"max_position_embeddings={max_position_embeddings}: use at most {max_position_embeddings}")


def _model_is_here(name: str) -> bool:
    """A local directory, the offline MiniLM, or a plain hub name (no slash: the hub's canonical models)."""
    return os.path.exists(name) or name.lower() in MINILM_ALIASES or "/" not in name

