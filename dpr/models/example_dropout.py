"""Dropout whose masks belong to the example, not to the batch the example happens to be in.

Standard dropout draws its masks from one random stream for the whole batch, so the mask an example gets depends on
how many examples came before it in the forward call. Then a batch encoded in chunks (the gradient cache), or split
across processes, sees different masks than the same batch encoded at once, and the results differ by more than
float noise. Here every example carries its own seed: inside `example_seeds(...)` the mask of every dropout call is
a counter-based draw (as Philox computes one), a pure function of (the example's seed, the call's number in the
block, the element's canonical index), so the masks, and with them losses and gradients, are the same for any
chunking, padding and world size. Replaying a chunk (the cache's second pass) is re-entering the context with the
same seeds.

The draw is the same on CPU and CUDA: no generator and no Python loop per row. With mix = splitmix64's mixing
function without its final xor-shift (that one only changes the low 33 bits) and G = 0x9E3779B97F4A7C15, all
arithmetic modulo 2^64:

    key = mix(seed + G);  h = mix(key + ((call << 32) + canonical index) * G);  u = ((h + 2^63) mod 2^64) / 2^64

and the element is kept when u >= p. Its canonical index is its row-major index in the row's block with every
sequence dimension at `max_length`, so cutting or padding a batch to another width renumbers nothing.

Two implementations draw these same masks, bit for bit. The eager one makes about ten in-place int64 passes over the
input (16 bytes of working memory per element): memory-bound, about 40% of a CPU training step. The compiled one
(`example_seeds(..., compiled=True)`, the trainer's `train.compile_dropout`) is one torch.compile'd kernel with
dynamic shapes that hashes in registers, applies the mask and writes only the result; backward draws the mask again
(nothing of the input's size is kept). It compiles once per process (seconds with inductor's on-disk cache, up to a
minute without); where it cannot compile (no C++ compiler, an unsupported platform, a torch without a setting it
makes) the eager draw runs, forward and backward, the log says so once, and `compiled_draw_failure()` tells why.
Only a failure to compile falls back: an error of running the kernel (out of memory above all: the eager draw
needs more) is raised as it is.

Outside the context, or in eval mode, everything behaves as the standard modules do (attention runs through
PyTorch's fused SDPA kernel).
"""
import logging
import math
import platform
import subprocess
import sys
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

ATTENTION_IMPLEMENTATION = "dpr_example_dropout"

_active = threading.local()


def _int64(value: int) -> int:
    """The signed int64 with the same 64 bits as `value` (torch integer arithmetic wraps modulo 2^64)."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


GOLDEN = 0x9E3779B97F4A7C15
MIX_1, MIX_2 = _int64(0xBF58476D1CE4E5B9), _int64(0x94D049BB133111EB)
CALL_SHIFT = 32  # counters are (call << 32) + canonical index: up to 2^32 elements per row of one call


def _mix_(z: torch.Tensor, shifted: torch.Tensor) -> torch.Tensor:
    """mix of the module doc, in place on int64 `z`, with `shifted` (z's shape) as scratch."""
    torch.bitwise_right_shift(z, 30, out=shifted).bitwise_and_((1 << 34) - 1)  # a logical shift of the 64 bits
    z.bitwise_xor_(shifted).mul_(MIX_1)
    torch.bitwise_right_shift(z, 27, out=shifted).bitwise_and_((1 << 37) - 1)
    return z.bitwise_xor_(shifted).mul_(MIX_2)


def example_keys(seeds: Sequence[int]) -> torch.Tensor:
    """The int64 keys of example seeds (mixed, so that nearby seeds draw unrelated masks)."""
    keys = torch.tensor([_int64(int(s) + GOLDEN) for s in seeds], dtype=torch.int64)
    return _mix_(keys, torch.empty_like(keys))


@dataclass
class _Block:
    """The state of one `example_seeds` block."""

    keys: torch.Tensor  # one per row, from example_keys
    max_length: int
    compiled: bool  # draw with the compiled kernel (when it compiles; else eagerly)
    calls: int = 0
    scratch: Optional[torch.Tensor] = None  # int64 working memory of the draws, reused by every call
    indices: Dict[tuple, torch.Tensor] = field(default_factory=dict)  # canonical index * G, by row shape
    terms: Dict[tuple, Tuple[torch.Tensor, ...]] = field(default_factory=dict)  # its terms per dim, by row shape


def _block() -> Optional[_Block]:
    return getattr(_active, "block", None)


@contextmanager
def example_seeds(seeds: Optional[Sequence[int]], device: torch.device, max_length: int, compiled: bool = False):
    """Draw dropout masks per row from `seeds` (one per batch row) inside this block; None leaves dropout as is.

    Dropout call c of the block keeps element e of row i when the uniform number of (seeds[i], c, canonical
    index of e at sequence length `max_length`) is at least p: an example gets the same masks however its batch
    is chunked or padded, and replaying the block replays the masks. `compiled` draws and applies them with one
    compiled kernel (the same masks; eager where compilation is unavailable)."""
    if seeds is None:
        yield
        return
    keys = example_keys(seeds)
    if torch.device(device).type == "cuda":  # pinned and non-blocking: no stream synchronisation per chunk
        keys = keys.pin_memory().to(device, non_blocking=True)
    previous = _block()
    _active.block = _Block(keys, max_length, compiled)
    try:
        yield
    finally:
        _active.block = previous


def checkpoint_contexts():
    """torch.utils.checkpoint's `context_fn` for layers under activation checkpointing: the layer's recompute in
    backward (outside any `example_seeds` block, possibly on another thread) runs in a block of the same seeds
    whose call counter starts where the layer's forward started, so it redraws the forward's masks exactly.
    Standard dropout needs nothing: checkpoint restores the random state itself."""
    block = _block()
    if block is None:
        return nullcontext(), nullcontext()
    first_call = block.calls  # checkpoint calls this right before the layer's forward

    @contextmanager
    def replay():
        previous = _block()
        _active.block = _Block(block.keys, block.max_length, block.compiled, calls=first_call)
        try:
            yield
        finally:
            _active.block = previous

    return nullcontext(), replay()


def _int64_scratch(shape: Tuple[int, ...], device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Two int64 tensors of `shape` for the draw. Inside `example_seeds` their memory is kept for the rest of the
    block and reused by every dropout call of the forward pass: on CPU a fresh allocation this large is fresh
    pages, and faulting them in cost as much as the hash itself."""
    numel = math.prod(shape)
    block = _block()
    buffer = block.scratch if block is not None else None
    if buffer is None or buffer.numel() < 2 * numel or buffer.device != device:
        buffer = torch.empty(2 * numel, dtype=torch.int64, device=device)
        if block is not None:
            block.scratch = buffer
    return buffer[:numel].view(shape), buffer[numel : 2 * numel].view(shape)


def _golden_terms(shape: Tuple[int, ...], sequence_dims: Sequence[int], max_length: int,
                  device: torch.device) -> Tuple[torch.Tensor, ...]:
    """Per dimension d of one row of `shape` (row dims without the batch dim), the int64 vector position * stride_d
    * GOLDEN (mod 2^64): their broadcast sum is canonical index * GOLDEN. Kept for the rest of an `example_seeds`
    block: the layers of a forward pass repeat the same shapes."""
    block = _block()
    cache_key = (shape, tuple(sequence_dims), max_length, device)
    if block is not None and cache_key in block.terms:
        return block.terms[cache_key]
    terms = [None] * len(shape)
    stride = 1
    for d in reversed(range(len(shape))):
        if d in sequence_dims and shape[d] > max_length:
            raise RuntimeError(f"sequence of {shape[d]} tokens is longer than max_length={max_length}")
        terms[d] = torch.arange(shape[d], dtype=torch.int64, device=device) * _int64(stride * GOLDEN)
        stride *= max_length if d in sequence_dims else shape[d]
    if stride > 1 << CALL_SHIFT:
        raise RuntimeError(f"a row of {stride} canonical elements is more than one dropout call's 2^{CALL_SHIFT}")
    terms = tuple(terms)
    if block is not None:
        block.terms[cache_key] = terms
    return terms


def _along(term: torch.Tensor, dim: int, ndim: int) -> torch.Tensor:
    """A 1-D `term` viewed to run along `dim` of an `ndim`-dimensional tensor."""
    return term.view((1,) * dim + (-1,) + (1,) * (ndim - dim - 1))


def _canonical_index_times_golden(shape: Tuple[int, ...], sequence_dims: Sequence[int], max_length: int,
                                  device: torch.device) -> torch.Tensor:
    """canonical index * GOLDEN (mod 2^64) of every element of one row of `shape`, shaped [1, *shape] to broadcast
    over the rows; kept for the rest of an `example_seeds` block, as its terms."""
    block = _block()
    cache_key = (shape, tuple(sequence_dims), max_length, device)
    if block is not None and cache_key in block.indices:
        return block.indices[cache_key]
    index = torch.zeros((1,) * (len(shape) + 1), dtype=torch.int64, device=device)
    for d, term in enumerate(_golden_terms(shape, sequence_dims, max_length, device)):
        index = index + _along(term, d + 1, len(shape) + 1)
    if block is not None:
        block.indices[cache_key] = index
    return index


def example_keep_mask(shape: Tuple[int, ...], keys: torch.Tensor, call: int, p: float, max_length: int,
                      sequence_dims: Sequence[int] = (1,)) -> torch.Tensor:
    """Bool mask of `shape` [rows, ...]: True where row r's element is kept by dropout call `call` (`keys` from
    `example_keys`; `sequence_dims` are the dims of `shape` that run over token positions). Two int64 buffers of
    the mask's shape are the draw's working memory."""
    row_dims = [d - 1 for d in sequence_dims if 0 < d < len(shape)]
    index = _canonical_index_times_golden(tuple(shape[1:]), row_dims, max_length, keys.device)
    start = keys + _int64((call << CALL_SHIFT) * GOLDEN)
    z, shifted = _int64_scratch(tuple(shape), keys.device)
    h = _mix_(torch.add(start.view((-1,) + (1,) * (len(shape) - 1)), index, out=z), shifted)
    return h >= _keep_threshold(p)


def _keep_threshold(p: float) -> int:
    """u = ((h + 2^63) mod 2^64) / 2^64 >= p  <=>  h, read as a signed int64, >= ceil(p * 2^64) - 2^63."""
    return math.ceil(Fraction(p) * (1 << 64)) - (1 << 63)


# The compiled draw: torch.compile (inductor) fuses the hash, the comparison and the apply into one kernel (C++ on
# CPU, Triton on CUDA) that keeps the int64 state in registers and writes only the result, where the eager draw
# makes about ten passes over int64 buffers. Shapes are dynamic, so chunks of any width share one compiled kernel;
# the call number and the threshold arrive as tensors, so no layer or call compiles anew. Compiled once per
# process (inductor's on-disk cache spares later processes most of the cost).
_compiled: Optional[Callable] = None  # torch.compile of _draw_and_apply, made on first use
_compile_failure: Optional[str] = None  # why this process draws eagerly although the compiled draw was asked for
RECOMPILE_LIMIT = 32  # graphs dynamo may keep of _draw_and_apply (its default: 8; see _compiled_kernel)
_thresholds: Dict[tuple, torch.Tensor] = {}  # _keep_threshold(p) as an int64 scalar tensor, by (p, device)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """mix of the module doc, out of place: the form the compiler fuses (eagerly it would allocate per step)."""
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * MIX_1
    return (z ^ ((z >> 27) & ((1 << 37) - 1))) * MIX_2


def _draw_and_apply(x: torch.Tensor, starts: torch.Tensor, terms: Sequence[torch.Tensor], threshold: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """x with example dropout: `starts` per row (key + call * 2^32 * G), `terms` from _golden_terms, `threshold`
    from _keep_threshold; no int64 tensor of x's size exists outside the compiled kernel."""
    index = _along(starts, 0, x.dim())
    for d, term in enumerate(terms):
        index = index + _along(term, d + 1, x.dim())
    return torch.where(_mix(index) >= threshold, x, 0.0) * scale


def _compiled_kernel() -> Optional[Callable]:
    """The compiled _draw_and_apply, or None where compilation failed or is unavailable in this process. The whole
    set-up is guarded: a torch whose dynamo lacks a setting or torch.compile fails draws eagerly."""
    global _compiled
    if _compile_failure is None and _compiled is None:
        try:
            if not torch._dynamo.is_dynamo_supported():
                raise RuntimeError(f"torch.compile does not support Python {platform.python_version()} on "
                                   f"{sys.platform}")
            _raise_recompile_limit(torch._dynamo.config)
            _compiled = torch.compile(_draw_and_apply, dynamic=True)
        except Exception as error:  # noqa: BLE001 (no compiled draw here, whatever the cause: the eager one)
            if _is_out_of_memory(error):
                raise
            _give_up_compiling(_failure_text(error))
    return _compiled if _compile_failure is None else None


def _raise_recompile_limit(config) -> None:
    """dynamo keeps 8 graphs per function by default; this one has one per (dims, dtype), and one more where a batch
    or width of 1 specialises: about 12 at most in a run, none per call, layer or width. The setting is
    `recompile_limit` since torch 2.7, `cache_size_limit` before; a torch with neither keeps its default."""
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
            return


def _causes(error: BaseException):
    """error and the exceptions it was raised from or during (dynamo and inductor wrap what they catch)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


_OUT_OF_MEMORY = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), MemoryError)


def _is_out_of_memory(error: BaseException) -> bool:
    return any(isinstance(e, _OUT_OF_MEMORY) for e in _causes(error))


def _is_compilation_failure(error: BaseException) -> bool:
    """A failure to compile the kernel (dynamo, inductor, Triton, no C++ compiler), not a failure of running it: an
    out-of-memory error is never one (the eager draw needs more memory, not less), nor a device error."""
    if _is_out_of_memory(error):
        return False
    for e in _causes(error):
        module = type(e).__module__ or ""
        if (isinstance(e, (torch._dynamo.exc.TorchDynamoException, ImportError, OSError, subprocess.SubprocessError))
                or module.startswith(("torch._inductor", "torch._dynamo", "triton"))):
            return True
    return False


def _failure_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _give_up_compiling(reason: str) -> None:
    global _compile_failure
    _compile_failure = reason
    logger.warning("per-example dropout draws eagerly (the same masks, slower) in this process: its kernel does not "
                   "compile here (%s)", reason)


def compiled_draw_failure() -> Optional[str]:
    """Why this process draws per-example dropout eagerly although the compiled draw was asked for; None while the
    compiled draw works (or was never tried)."""
    return _compile_failure


class _CompiledExampleDropout(torch.autograd.Function):
    """The compiled draw-and-apply with a backward that draws the mask again from the row starts and terms (a few
    int64 values per row and position) and applies it to the gradient: nothing of x's size is kept, and forward
    and backward run the same graph, so neither grad mode nor backward compiles another."""

    @staticmethod
    def forward(ctx, x, starts, threshold, scale, *terms):
        ctx.save_for_backward(starts, threshold, *terms)
        ctx.scale = scale
        return _compiled(x.detach(), starts, terms, threshold, scale)  # detached: no requires_grad variant

    @staticmethod
    def backward(ctx, grad):
        starts, threshold, *terms = ctx.saved_tensors
        # d/dx of where(keep, x, 0) * scale; contiguous and a tuple of terms, as in forward, so its graph serves
        grad = grad.contiguous()
        kernel = _compiled if _compile_failure is None else None
        grad_x = None
        if kernel is not None:
            try:
                grad_x = kernel(grad, starts, tuple(terms), threshold, ctx.scale)
            except Exception as error:  # noqa: BLE001 (filtered: only a failure to compile falls back)
                if not _is_compilation_failure(error):
                    raise
                _give_up_compiling(_failure_text(error))
        if grad_x is None:  # the same function run eagerly: the same mask
            grad_x = _draw_and_apply(grad, starts, tuple(terms), threshold, ctx.scale)
        return (grad_x, None, None, None) + (None,) * len(terms)


def _compiled_draw_and_apply(x: torch.Tensor, block: _Block, call: int, p: float,
                             sequence_dims: Sequence[int]) -> Optional[torch.Tensor]:
    """example_dropout by the compiled kernel; None where it fails to compile (then the process draws eagerly).
    A bad input (a sequence longer than max_length) raises as in the eager draw."""
    row_dims = [d - 1 for d in sequence_dims if 0 < d < x.dim()]
    terms = _golden_terms(tuple(x.shape[1:]), row_dims, block.max_length, x.device)
    threshold = _thresholds.get((p, x.device))
    if threshold is None:
        threshold = _thresholds[(p, x.device)] = torch.tensor(_keep_threshold(p), dtype=torch.int64, device=x.device)
    starts = block.keys + _int64((call << CALL_SHIFT) * GOLDEN)
    try:
        return _CompiledExampleDropout.apply(x, starts, threshold, 1.0 / (1.0 - p), *terms)
    except Exception as error:  # noqa: BLE001 (filtered: only a failure to compile falls back to the eager draw)
        if not _is_compilation_failure(error):
            raise
        _give_up_compiling(_failure_text(error))
        return None


def example_dropout(x: torch.Tensor, p: float, training: bool, sequence_dims: Tuple[int, ...] = (1,)) -> torch.Tensor:
    """F.dropout with per-row masks when `example_seeds` is active; `sequence_dims` are the dimensions of x that
    run over token positions."""
    block = _block()
    if not training or p == 0.0 or block is None:
        return F.dropout(x, p, training)
    if len(block.keys) != x.shape[0]:
        raise RuntimeError(f"example_seeds has {len(block.keys)} seeds for a batch of {x.shape[0]} rows")
    call = block.calls
    block.calls += 1
    if block.compiled and _compiled_kernel() is not None:
        dropped = _compiled_draw_and_apply(x, block, call, p, sequence_dims)
        if dropped is not None:
            return dropped
    keep = example_keep_mask(tuple(x.shape), block.keys, call, p, block.max_length, sequence_dims)
    # where, not x * keep: a bool factor would be copied to x's dtype first; backward keeps only the bool mask
    return torch.where(keep, x, 0.0).mul_(1.0 / (1.0 - p))


class ExampleDropout(nn.Dropout):
    """nn.Dropout for hidden states [B, T, ...] that honours `example_seeds`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return example_dropout(x, self.p, self.training)


def example_dropout_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Attention for the transformers attention interface: SDPA, or eager attention with per-row dropout masks
    on the attention probabilities when dropout is on and `example_seeds` is active."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if dropout == 0.0 or _block() is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    # softmax in fp32, probabilities in the compute dtype (as transformers' eager attention): under autocast the
    # dropout mask multiplies, and backward keeps, half-width tensors
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = example_dropout(probs, dropout, True, sequence_dims=(2, 3))
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
