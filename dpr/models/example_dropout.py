"""Dropout whose masks belong to the example, not to the batch the example happens to be in.

Standard dropout draws its masks from one random stream for the whole batch, so the mask an example gets
depends on how many examples came before it in the forward call. Then a batch encoded in chunks (the gradient
cache), or split across processes, sees different masks than the same batch encoded at once, and the results
differ by more than float noise. Here every example carries its own seed: inside `example_seeds(...)` each row
of a dropout input draws its mask from a generator seeded for that row, so the masks, and with them losses and
gradients, are the same for any chunking and any world size. Replaying a chunk (the cache's second pass) is
re-entering the context with the same seeds.

Outside the context, or in eval mode, everything behaves as the standard modules do (attention runs through
PyTorch's fused SDPA kernel).
"""
import threading
from contextlib import contextmanager
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_IMPLEMENTATION = "dpr_example_dropout"

_active = threading.local()


def _generators() -> Optional[list]:
    return getattr(_active, "generators", None)


@contextmanager
def example_seeds(seeds: Optional[Sequence[int]], device: torch.device, max_length: int):
    """Draw dropout masks per row from `seeds` (one per batch row) inside this block; None leaves dropout as is.

    Masks are drawn at the canonical sequence length `max_length` and cut to the padded width of the batch, so
    an example gets the same mask however much padding its batch or chunk has."""
    if seeds is None:
        yield
        return
    previous = _generators(), getattr(_active, "max_length", None)
    _active.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    _active.max_length = max_length
    try:
        yield
    finally:
        _active.generators, _active.max_length = previous


def example_dropout(x: torch.Tensor, p: float, training: bool, sequence_dims: Tuple[int, ...] = (1,)) -> torch.Tensor:
    """F.dropout with per-row masks when `example_seeds` is active; `sequence_dims` are the dimensions of x that
    run over token positions (their masks are drawn at the canonical length, then cut)."""
    generators = _generators()
    if not training or p == 0.0 or generators is None:
        return F.dropout(x, p, training)
    if len(generators) != x.shape[0]:
        raise RuntimeError(f"example_seeds has {len(generators)} seeds for a batch of {x.shape[0]} rows")
    max_length = _active.max_length
    canonical = list(x.shape)
    for dim in sequence_dims:
        if dim < x.dim():
            if x.shape[dim] > max_length:
                raise RuntimeError(f"sequence of {x.shape[dim]} tokens is longer than max_length={max_length}")
            canonical[dim] = max_length
    cut = tuple(slice(0, n) for n in x.shape[1:])
    uniform = torch.stack([torch.rand(canonical[1:], generator=g, device=x.device)[cut] for g in generators])
    keep = (uniform >= p).to(x.dtype)
    return x * keep * (1.0 / (1.0 - p))


class ExampleDropout(nn.Dropout):
    """nn.Dropout for hidden states [B, T, ...] that honours `example_seeds`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return example_dropout(x, self.p, self.training)


def example_dropout_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Attention for the transformers attention interface: SDPA, or eager attention with per-row dropout masks
    on the attention probabilities when dropout is on and `example_seeds` is active."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if dropout == 0.0 or _generators() is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = example_dropout(torch.softmax(scores, dim=-1), dropout, True, sequence_dims=(2, 3))
    output = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return output, probs


def register_attention() -> str:
    """Make `ATTENTION_IMPLEMENTATION` known to transformers (masks as for SDPA); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    if ATTENTION_IMPLEMENTATION not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(ATTENTION_IMPLEMENTATION, example_dropout_attention)
        AttentionMaskInterface.register(ATTENTION_IMPLEMENTATION, sdpa_mask)
    return ATTENTION_IMPLEMENTATION


def install_example_dropout(model: nn.Module) -> None:
    """Swap every nn.Dropout of `model` for ExampleDropout (same p; no parameters, so state dicts are unchanged)."""
    for name, child in list(model.named_children()):
        if type(child) is nn.Dropout:
            setattr(model, name, ExampleDropout(child.p, child.inplace))
        else:
            install_example_dropout(child)
