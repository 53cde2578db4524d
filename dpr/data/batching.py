"""Which examples form each global batch of an epoch, and which of them each process encodes.

An epoch's batches are a pure function of (seed, epoch, dataset sizes, global batch size). Every process
computes the same list and takes its own contiguous slice of each global batch, so K processes with batch B/K
encode exactly the examples one process with batch B does (DPR instead gives each rank a contiguous shard of
the data, which makes the global batches depend on the number of processes).
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np


@dataclass(frozen=True)
class GlobalBatch:
    dataset_index: int
    indices: np.ndarray  # example indices into the dataset, in batch order


def _cycled_permutation(n: int, length: int, seed: int, epoch: int, dataset_index: int) -> np.ndarray:
    """`length` indices of a seeded shuffle of range(n), reshuffled each time it runs out (sampling rates > 1)."""
    parts, cycle = [], 0
    while sum(len(p) for p in parts) < length:
        rng = np.random.default_rng([seed, epoch, dataset_index, cycle])
        parts.append(rng.permutation(n))
        cycle += 1
    return np.concatenate(parts)[:length] if parts else np.zeros(0, dtype=np.int64)


def training_batches(
    dataset_sizes: Sequence[int],
    global_batch_size: int,
    seed: int,
    epoch: int,
    sampling_rates: Optional[Sequence[float]] = None,
) -> List[GlobalBatch]:
    """The epoch's training batches. Each batch comes from one dataset (in-batch negatives stay in-domain, as in
    DPR's multi-set iterator); dataset i contributes floor(size_i * rate_i / batch) full batches, and the batches
    of all datasets are interleaved in a seeded order."""
    rates = list(sampling_rates) if sampling_rates else [1.0] * len(dataset_sizes)
    if len(rates) != len(dataset_sizes):
        raise ValueError(f"{len(rates)} sampling rates for {len(dataset_sizes)} training datasets")
    batches: List[GlobalBatch] = []
    for d, (size, rate) in enumerate(zip(dataset_sizes, rates)):
        n_batches = int(size * rate) // global_batch_size
        order = _cycled_permutation(size, n_batches * global_batch_size, seed, epoch, d)
        batches += [GlobalBatch(d, order[b * global_batch_size : (b + 1) * global_batch_size]) for b in range(n_batches)]
    if len(dataset_sizes) > 1:
        interleave = np.random.default_rng([seed, epoch, len(dataset_sizes)]).permutation(len(batches))
        batches = [batches[i] for i in interleave]
    return batches


def evaluation_batches(dataset_size: int, global_batch_size: int) -> List[GlobalBatch]:
    """Every example once, in file order; the last batch may be smaller."""
    indices = np.arange(dataset_size)
    return [GlobalBatch(0, indices[s : s + global_batch_size]) for s in range(0, dataset_size, global_batch_size)]


def local_slice(batch: GlobalBatch, rank: int, world_size: int) -> np.ndarray:
    """This process's contiguous part of a global batch (equal parts when the batch divides evenly)."""
    return np.array_split(batch.indices, world_size)[rank]
