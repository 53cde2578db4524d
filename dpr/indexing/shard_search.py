"""Exact search shard by shard (`shard_search=true`): the flat index's results without holding every vector.

DPR searches its 50 Wikipedia shards (21M x 768) through one flat index that holds them all: 61.7 GiB. Here the
shards are read in groups, in order; a group is as many consecutive shards as fit `memory_budget` together with
the search's working memory (one shard per group without a budget). Each group's vectors go through the exact
search of `dpr.indexing.exact_search`, which keeps every query's running top-k, then the group is dropped. The
results, scores included, are those of `DenseFlatIndexer` over all the shards in the same order, ties too (equal
scores in shard order, then row order), for any grouping.

Ids: only those of passages still in some query's top-k are kept (a passage that drops out never comes back), so
beside one group the search holds at most n_queries x k ids.
"""
import logging
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from tqdm import tqdm

from dpr.data.embeddings_io import ShardFileError, check_dimension, read_embeddings
from dpr.foundation.errors import UserInputError
from dpr.indexing.exact_search import MISSING, ExactTopK, search_results, working_memory_bytes
from dpr.indexing.faiss_indexers import SearchResult, ensure_memory

logger = logging.getLogger(__name__)

# Memory of one vector as read, besides its 4·D bytes: an .npz shard's id (its array and Python string); a
# pickle's list of (id, array) tuples, which is stacked into a second copy of the vectors.
_NPZ_BYTES_PER_ID = 160
_PICKLE_BYTES_PER_RECORD = 300


class ShardSearchBudgetError(UserInputError):
    """A shard that does not fit the memory budget of the shard-wise search on its own."""


@dataclass
class Shard:
    path: Path
    id_prefix: str
    vectors: int  # exact for .npz, estimated from the file size for pickles
    dim: int

    @property
    def pickled(self) -> bool:
        return not str(self.path).endswith(".npz")

    @property
    def memory_bytes(self) -> int:
        """Estimated memory while the shard is read and held."""
        if self.pickled:
            return self.vectors * (8 * self.dim + _PICKLE_BYTES_PER_RECORD)
        return self.vectors * (4 * self.dim + _NPZ_BYTES_PER_ID)


def describe_shards(shard_sets: Sequence[tuple[Sequence[Path], str]]) -> list[Shard]:
    """The shards of (paths, id prefix) sets, in search order, with their vector counts: read from an .npz
    header; for pickles scaled by file size from the first pickle (read whole once, for its vectors per byte)."""
    shards, pickles = [], []
    for paths, id_prefix in shard_sets:
        for path in map(Path, paths):
            shard = Shard(path, id_prefix, 0, 0)
            if shard.pickled:
                pickles.append(shard)
            else:
                shard.vectors, shard.dim = _npz_vectors_shape(path)
            shards.append(shard)
    if pickles:
        ids, vectors = read_embeddings(pickles[0].path)
        per_byte = len(ids) / max(pickles[0].path.stat().st_size, 1)
        dim = vectors.shape[1] if len(ids) else next((s.dim for s in shards if s.dim), 0)
        for shard in pickles:
            shard.vectors, shard.dim = round(per_byte * shard.path.stat().st_size), dim
    return shards


def _npz_vectors_shape(path: Path) -> tuple[int, int]:
    try:
        with zipfile.ZipFile(path) as archive, archive.open("vectors.npy") as array_file:
            version = np.lib.format.read_magic(array_file)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, _ = read_header(array_file)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
        raise ShardFileError(f"{path}: truncated or not an embedding shard ({type(e).__name__}: {e})") from e
    return shape[0], shape[1] if len(shape) > 1 else 0


def plan_groups(shards: Sequence[Shard], budget_bytes: Optional[int], working_bytes: int) -> list[list[Shard]]:
    """Consecutive shards grouped so that each group plus `working_bytes` fits `budget_bytes` (one shard per
    group without a budget). A shard too large for the budget on its own is an error naming it."""
    if budget_bytes is None:
        return [[shard] for shard in shards]
    groups: list[list[Shard]] = []
    held = 0
    for shard in shards:
        if shard.memory_bytes + working_bytes > budget_bytes:
            raise ShardSearchBudgetError(
                f"shard {shard.path} needs about {shard.memory_bytes / 2**30:.2f} GiB as read, and the search "
                f"{working_bytes / 2**30:.2f} GiB more, over shard_search_memory_gb={budget_bytes / 2**30:g}: "
                "raise shard_search_memory_gb, or embed the passages in more shards (num_shards)"
            )
        if groups and held + shard.memory_bytes + working_bytes <= budget_bytes:
            groups[-1].append(shard)
            held += shard.memory_bytes
        else:
            groups.append([shard])
            held = shard.memory_bytes
    return groups


class _RetainedIds:
    """The ids of the positions in some query's running top-k. Ids of rows added but not yet searched (a partial
    tile waiting for the next group) wait until they are."""

    def __init__(self) -> None:
        self.by_position: dict[int, object] = {}
        self.waiting: list[tuple[int, list]] = []  # (first position, ids)

    def add(self, first_position: int, ids: list) -> None:
        self.waiting.append((first_position, ids))

    def settle(self, searched: int, positions: np.ndarray) -> None:
        """Keep the ids of retained positions below `searched` (all searched), drop those of positions that left."""
        retained = np.unique(positions[positions != MISSING])
        still_waiting = []
        for first, ids in self.waiting:
            end = min(first + len(ids), searched)
            for position in retained[(retained >= first) & (retained < end)].tolist():
                self.by_position[position] = ids[position - first]
            if first + len(ids) > searched:
                still_waiting.append((searched, ids[searched - first :]) if searched > first else (first, ids))
        self.waiting = still_waiting
        self.by_position = {p: self.by_position[p] for p in retained.tolist() if p in self.by_position}


def search_shards(
    shard_sets: Sequence[tuple[Sequence[Path], str]],
    queries: np.ndarray,
    k: int,
    budget_bytes: Optional[int] = None,
    available: Optional[tuple[int, str]] = None,
) -> list[SearchResult]:
    """Per query, the ids and scores of the `k` best passages of the shards (paths and id prefix per set, searched
    in that order), exactly as a flat index over all of them, holding one group of shards at a time."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    shards = describe_shards(shard_sets)
    working = working_memory_bytes(len(queries), k, queries.shape[1])
    groups = plan_groups(shards, budget_bytes, working)
    largest = max((sum(shard.memory_bytes for shard in group) for group in groups), default=0)
    ensure_memory(largest + working, f"the shard-wise search of {len(shards)} shard(s) in {len(groups)} group(s)",
                  available)
    search = ExactTopK(queries, k)
    retained = _RetainedIds()
    started = time.perf_counter()
    for group in tqdm(groups, desc="shard-wise search", unit="group", disable=len(groups) <= 1):
        blocks = [read_embeddings(shard.path, shard.id_prefix) for shard in group]
        for shard, (ids, vectors) in zip(group, blocks):
            if not len(ids):
                continue
            check_dimension(shard.path, vectors, queries.shape[1], "the questions")
            retained.add(search.added, ids)
            search.add(vectors)
        del blocks
        retained.settle(search.searched, search.positions)
    scores, positions = search.finish()
    retained.settle(search.searched, positions)
    elapsed = time.perf_counter() - started
    logger.info("shard-wise search: %d questions over %d vectors in %d group(s), %.1f s (%.1f questions/s)",
                len(queries), search.added, len(groups), elapsed, len(queries) / max(elapsed, 1e-9))
    return search_results(scores, positions, retained.by_position.__getitem__)
