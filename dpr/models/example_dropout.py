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
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_IMPLEMENTATION = "dpr_example_dropout"

_active = threading.local()


def _row_seeds() -> Optional[List[int]]:
    return getattr(_active, "seeds", None)


@contextmanager
def example_seeds(seeds: Optional[Sequence[int]], device: torch.device, max_length: int):
    """Draw dropout masks per row from `seeds` (one per batch row) inside this block; None leaves dropout as is.

    Each dropout call inside the block draws row i's mask from a generator seeded with (seeds[i], call number),
    at the canonical sequence length `max_length`, cut to the width of the batch: an example gets the same masks
    however much padding its batch or chunk has, and replaying the block replays the masks."""
    if seeds is None:
        yield
        return
    previous = _row_seeds(), getattr(_active, "max_length", None), getattr(_active, "calls", 0)
    _active.seeds, _active.max_length, _active.calls = [int(s) for s in seeds], max_length, 0
    try:
        yield
    finally:
        _active.seeds, _active.max_length, _active.calls = previous


def _call_seed(row_seed: int, call: int) -> int:
    # splitmix64-style mixing: distinct, well-spread seeds for every (row, dropout call)
    z = (row_seed + (call + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


_MASK64 = (1 << 64) - 1


def _row_uniform(row_shape: Tuple[int, ...], sequence_dims: List[int], seed: int, device: torch.device) -> torch.Tensor:
    """Uniform numbers for one row, equal to the canonical-length draw cut to `row_shape`.

    The numbers are drawn with the first sequence dimension outermost. On CPU the generator's stream is a
    prefix-consistent sequence, so that dimension is drawn at its actual length (a short question does not pay
    for max_length positions); on CUDA the whole canonical block is drawn and cut."""
    max_length = _active.max_length
    lead = sequence_dims[0] if sequence_dims else None
    order = ([lead] if lead is not None else []) + [d for d in range(len(row_shape)) if d != lead]
    shape = []
    for d in order:
        if row_shape[d] > max_length and d in sequence_dims:
            raise RuntimeError(f"sequence of {row_shape[d]} tokens is longer than max_length={max_length}")
        canonical = d in sequence_dims and (d != lead or device.type != "cpu")
        shape.append(max_length if canonical else row_shape[d])
    generator = torch.Generator(device=device).manual_seed(seed)
    uniform = torch.rand(shape, generator=generator, device=device)
    uniform = uniform[tuple(slice(0, row_shape[d]) for d in order)]
    return uniform.permute([order.index(d) for d in range(len(row_shape))])


def example_dropout(x: torch.Tensor, p: float, training: bool, sequence_dims: Tuple[int, ...] = (1,)) -> torch.Tensor:
    """F.dropout with per-row masks when `example_seeds` is active; `sequence_dims` are the dimensions of x that
    run over token positions."""
    seeds = _row_seeds()
    if not training or p == 0.0 or seeds is None:
        return F.dropout(x, p, training)
    if len(seeds) != x.shape[0]:
        raise RuntimeError(f"example_seeds has {len(seeds)} seeds for a batch of {x.shape[0]} rows")
    call = _active.calls
    _active.calls += 1
    row_dims = [d - 1 for d in sequence_dims if 0 < d < x.dim()]
    keep = torch.empty(x.shape, dtype=torch.bool, device=x.device)
    for row, seed in enumerate(seeds):  # compare row by row: no float copy of the whole batch's random numbers
        torch.ge(_row_uniform(tuple(x.shape[1:]), row_dims, _call_seed(seed, call), x.device), p, out=keep[row])
    return x * keep * (1.0 / (1.0 - p))


class ExampleDropout(nn.Dropout):
    """nn.Dropout for hidden states [B, T, ...] that honours `example_seeds`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return example_dropout(x, self.p, self.training)


def example_dropout_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Attention for the transformers attention interface: SDPA, or eager attention with per-row dropout masks
    on the attention probabilities when dropout is on and `example_seeds` is active."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if dropout == 0.0 or _row_seeds() is None:
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
