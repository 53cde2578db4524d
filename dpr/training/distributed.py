"""torch.distributed set-up and the collectives training needs.

Gradients are all-reduced by hand, once per optimizer step, instead of through DDP: with the gradient cache a
step runs many partial backward passes, each through only one of the two encoders, and DDP would all-reduce
after each of them and wait on parameters a pass does not use. One flat all-reduce after the last backward is
the same sum, sent once.
"""
import logging
import os
from dataclasses import dataclass
from typing import Iterable, List, Optional

import torch
import torch.distributed as dist

from dpr.foundation.devices import process_device

logger = logging.getLogger(__name__)


@dataclass
class DistributedContext:
    rank: int = 0
    local_rank: int = -1
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(local_rank: Optional[int] = None, no_cuda: bool = False) -> DistributedContext:
    """Join the process group torchrun (or torch.distributed.launch) describes in the environment; a single
    process otherwise. The device is `process_device`'s; CUDA devices use NCCL, CPU runs gloo."""
    env_local_rank = os.environ.get("LOCAL_RANK")
    local_rank = int(env_local_rank) if env_local_rank is not None else (-1 if local_rank is None else local_rank)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = process_device(no_cuda, local_rank)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    if local_rank >= 0 and world_size > 1:
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        ctx = DistributedContext(dist.get_rank(), local_rank, dist.get_world_size(), device)
    else:
        ctx = DistributedContext(device=device)
    logger.info(
        "Initialized host %s as rank %d of %d, local rank %d, device %s",
        os.uname().nodename, ctx.rank, ctx.world_size, ctx.local_rank, ctx.device,
    )
    return ctx


def end_distributed() -> None:
    """Leave the process group once every process has reached the end of the run. Without it a process could exit
    while another's gloo threads still talk to it, and the other aborted at exit ("terminate called without an
    active exception", seen under load in the 2-process reader and two-node tests)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_gather_rows(tensor: torch.Tensor) -> List[torch.Tensor]:
    """Every process's `tensor` (rows may differ in number), in rank order. This process's entry is `tensor`
    itself, so gradients flow into the local rows only; the others are detached copies."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [tensor]
    world = dist.get_world_size()
    rows = torch.tensor([tensor.shape[0]], device=tensor.device)
    all_rows = [torch.zeros_like(rows) for _ in range(world)]
    dist.all_gather(all_rows, rows)
    sizes = [int(r) for r in all_rows]
    padded = torch.zeros((max(sizes),) + tuple(tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor.detach()
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    out = [g[:n] for g, n in zip(gathered, sizes)]
    out[dist.get_rank()] = tensor
    return out


def all_reduce_gradients(parameters: Iterable[torch.nn.Parameter]) -> bool:
    """Sum the gradients of all processes, in one flat buffer; returns whether any process backpropagated at all
    (a reader step whose questions all lack a usable positive has nothing to apply). A trainable parameter without
    a gradient counts as zero, so every process sends a buffer of the same layout, whatever its batch held; the
    flag travels as one more element of that buffer, not in a collective of its own."""
    params = [p for p in parameters if p.requires_grad]
    backpropagated = any(p.grad is not None for p in params)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1 or not params:
        return backpropagated
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flag = torch.full((1,), float(backpropagated), dtype=grads[0].dtype, device=grads[0].device)
    flat = torch.cat([g.reshape(-1) for g in grads] + [flag])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
    return bool(flat[-1] > 0)


def all_reduce_sum(values: List[float], device: torch.device) -> List[float]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Start every process from rank 0's weights (what DDP does at wrap time)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src=0)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
