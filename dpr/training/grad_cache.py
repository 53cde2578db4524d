"""Gradient cache (Gao et al. 2021): the gradient of a contrastive loss over a large batch at the activation
memory of one small chunk.

A contrastive loss couples every example of the batch, so it cannot be split like an ordinary loss; but it only
depends on the representations. The cache therefore works in named steps:

1. `split`: cut each tower's inputs (questions, contexts) into chunks;
2. `forward_no_grad`: encode every chunk without building a graph, recording the random state it started from;
3. `build_cache`: compute the loss on the detached representations and backpropagate it to them only, which
   gives d loss / d representation for every example (the cache);
4. `forward_backward`: per chunk, encode again with a graph under the recorded random state (same dropout) and
   backpropagate the cached representation gradients (the surrogate dot(reps, cached_grad)).

The parameter gradients equal those of one backward through the whole batch (tests/test_grad_cache.py).
Chunks are formed from length-sorted rows, so each chunk pads only to its own longest row; representations and
cached gradients are put back into the original order, so the loss never sees the sorting.

`full_batch_step` is the ordinary step with the same interface, for comparison and for small batches.

Two factors act on the gradients here and are kept apart: `backward_weight` multiplies the loss before the
backward pass (the trainer's gradient compensation over accumulation steps, see dpr/training/trainer_base.py), and
the fp16 `grad_scaler` multiplies it once more to keep fp16 gradients from underflowing (undone by `unscale_`
before clipping). A dataset's loss weight (DPR's loss_scale_factors) is part of the loss function itself.
"""
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence, Tuple

import torch

Inputs = Dict[str, Any]  # tensors with rows along dim 0, or per-row lists
LossFn = Callable[..., Tuple[torch.Tensor, Any]]  # (*representations, **kwargs) -> (loss, aux)


@dataclass
class RandState:
    """The CPU and CUDA random states at one moment, to replay a forward pass with the same dropout."""

    cpu: torch.Tensor
    cuda_devices: List[int]
    cuda: List[torch.Tensor]

    @classmethod
    def capture(cls, inputs: Inputs) -> "RandState":
        devices = sorted({v.device.index or 0 for v in inputs.values() if isinstance(v, torch.Tensor) and v.is_cuda})
        return cls(torch.get_rng_state(), devices, [torch.cuda.get_rng_state(d) for d in devices])

    @contextmanager
    def restored(self):
        """Run the block from this state; the random state outside the block is left as it was."""
        with torch.random.fork_rng(devices=self.cuda_devices):
            torch.set_rng_state(self.cpu)
            for device, state in zip(self.cuda_devices, self.cuda):
                torch.cuda.set_rng_state(state, device)
            yield


@dataclass
class Tower:
    """One encoder's share of a batch: `encode(chunk_inputs) -> representations [rows, D]`."""

    encode: Callable[[Inputs], torch.Tensor]
    inputs: Inputs
    chunk_size: int
    requires_grad: bool = True

    @property
    def rows(self) -> int:
        return len(next(iter(self.inputs.values())))


@dataclass
class Chunk:
    inputs: Inputs
    rows: torch.Tensor  # positions of the chunk's rows in the tower's original order


def _take(value: Any, rows: torch.Tensor, width: Optional[int]) -> Any:
    if isinstance(value, torch.Tensor):
        taken = value[rows.to(value.device)]
        return taken[:, :width] if width is not None and taken.dim() >= 2 else taken
    return [value[i] for i in rows.tolist()]


def split(tower: Tower) -> List[Chunk]:
    """Chunks of `chunk_size` rows. With an `attention_mask` in the inputs, rows are sorted by length (longest
    first) and each chunk's 2-D tensors are cut to its longest row."""
    n = tower.rows
    mask = tower.inputs.get("attention_mask")
    if mask is not None:
        lengths = mask.sum(dim=1).cpu()
        order = torch.sort(lengths, descending=True, stable=True).indices
    else:
        lengths, order = None, torch.arange(n)
    chunks = []
    for start in range(0, n, tower.chunk_size):
        rows = order[start : start + tower.chunk_size]
        width = int(lengths[rows].max()) if lengths is not None else None
        chunks.append(Chunk({k: _take(v, rows, width) for k, v in tower.inputs.items()}, rows))
    return chunks


class GradCache:
    def __init__(
        self,
        loss_fn: LossFn,
        autocast: Callable[[], ContextManager] = nullcontext,
        grad_scaler: Optional[torch.amp.GradScaler] = None,
    ):
        self.loss_fn = loss_fn
        self.autocast = autocast
        self.grad_scaler = grad_scaler

    def forward_no_grad(self, tower: Tower, chunk: Chunk) -> Tuple[torch.Tensor, RandState]:
        state = RandState.capture(chunk.inputs)
        with torch.no_grad(), self.autocast():
            reps = tower.encode(chunk.inputs)
        return reps, state

    def build_cache(
        self,
        representations: Sequence[torch.Tensor],
        backward_weight: float = 1.0,
        trainable: Optional[Sequence[bool]] = None,
        **loss_kwargs,
    ) -> Tuple[torch.Tensor, Any, List[Optional[torch.Tensor]]]:
        """The loss on detached fp32 representations and its gradient with respect to each trainable one (None
        for the others). The cached gradients include `backward_weight` but never the GradScaler's factor: that
        is applied once, in the surrogate. A trainable tower the loss does not depend on is an error, not a
        silent zero gradient."""
        trainable = list(trainable) if trainable is not None else [True] * len(representations)
        leaves = [r.detach().float().requires_grad_(wants) for r, wants in zip(representations, trainable)]
        loss, aux = self.loss_fn(*leaves, **loss_kwargs)
        (loss * backward_weight).backward()
        for index, (leaf, wants) in enumerate(zip(leaves, trainable)):
            if wants and leaf.grad is None:
                raise ValueError(
                    f"tower {index} is trainable but the loss does not depend on its representations: "
                    "no gradient would reach its encoder (pass requires_grad=False for a frozen tower)"
                )
        return loss.detach(), aux, [leaf.grad for leaf in leaves]

    def forward_backward(self, tower: Tower, chunk: Chunk, rand_state: RandState, cached_grad: torch.Tensor) -> None:
        with rand_state.restored(), self.autocast():
            reps = tower.encode(chunk.inputs)
        surrogate = torch.dot(reps.flatten().float(), cached_grad.flatten())
        if self.grad_scaler is not None:
            surrogate = self.grad_scaler.scale(surrogate)
        surrogate.backward()

    def __call__(self, towers: Sequence[Tower], backward_weight: float = 1.0, **loss_kwargs) -> Tuple[torch.Tensor, Any]:
        """One batch: the gradients of `backward_weight` x loss accumulate into the parameters' .grad; returns
        (loss, aux) of the loss function, unweighted."""
        chunked = [split(t) for t in towers]
        states: List[List[RandState]] = []
        representations = []
        for tower, chunks in zip(towers, chunked):
            reps_and_states = [self.forward_no_grad(tower, c) for c in chunks]
            states.append([s for _, s in reps_and_states])
            representations.append(_unsort([r for r, _ in reps_and_states], chunks, tower.rows))
        trainable = [t.requires_grad for t in towers]
        loss, aux, grads = self.build_cache(representations, backward_weight, trainable, **loss_kwargs)
        for tower, chunks, tower_states, grad in zip(towers, chunked, states, grads):
            if not tower.requires_grad:
                continue
            for chunk, state in zip(chunks, tower_states):
                self.forward_backward(tower, chunk, state, grad[chunk.rows.to(grad.device)])
        return loss, aux


def _unsort(chunk_reps: List[torch.Tensor], chunks: List[Chunk], rows: int) -> torch.Tensor:
    if not chunk_reps:
        raise ValueError("a tower with no rows")
    sorted_reps = torch.cat(chunk_reps)
    order = torch.cat([c.rows for c in chunks]).to(sorted_reps.device)
    reps = torch.empty((rows,) + tuple(sorted_reps.shape[1:]), dtype=sorted_reps.dtype, device=sorted_reps.device)
    reps[order] = sorted_reps
    return reps


def full_batch_step(
    towers: Sequence[Tower],
    loss_fn: LossFn,
    backward_weight: float = 1.0,
    autocast: Callable[[], ContextManager] = nullcontext,
    grad_scaler: Optional[torch.amp.GradScaler] = None,
    **loss_kwargs,
) -> Tuple[torch.Tensor, Any]:
    """The ordinary step: encode every tower at once with a graph, backpropagate the loss through everything."""
    with autocast():
        representations = [t.encode(t.inputs) for t in towers]
    loss, aux = loss_fn(*[r.float() for r in representations], **loss_kwargs)
    weighted = loss * backward_weight
    (grad_scaler.scale(weighted) if grad_scaler is not None else weighted).backward()
    return loss.detach(), aux
