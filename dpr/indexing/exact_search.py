"""Exact inner-product top-k over passage vectors that arrive in pieces, with one defined order.

Both exact searches use it: the flat index (`DenseFlatIndexer.search_knn`, over its stored vectors) and the
shard-wise search (`shard_search`, over shard files read a group at a time), so the two return the same passages
and the same scores however the vectors are split into shards and groups:

- Order: score descending; equal scores by global position ascending (the order the vectors were added: shard
  order, then row order). At the k-th place, of several passages with the same score the earliest ones are kept.
- Scores: each is computed in a tile of `TILE_ROWS` consecutive positions starting at a multiple of `TILE_ROWS`,
  against a batch of `QUERY_BATCH` queries (one float32 matrix product per tile and batch). A tile spanning two
  shards is copied together from both, so every tile, and every product, is the same whatever the shard
  boundaries; only then is the score of a passage bit-identical between the two searches (a matrix product's
  rounding can depend on the shapes it is given).
- Selection per tile and batch: torch.topk (threads, partial sort), then the rows whose k-th score is shared by
  more passages than fit are redone exactly; the tile's best are merged into the running top-k by (score,
  position). Memory beyond the vectors: the running top-k (12 bytes per query and k), one tile of scores
  (QUERY_BATCH x TILE_ROWS float32) and at most one partial tile of carried vectors.
"""
from typing import Callable

import numpy as np
import torch

TILE_ROWS = 16384
QUERY_BATCH = 1024
# Position of an empty result slot (fewer than k vectors): sorts after every real position.
MISSING = np.iinfo(np.int64).max


def working_memory_bytes(n_queries: int, k: int, dim: int) -> int:
    """Bytes the search holds besides the vectors: queries, running and merged top-k, one tile's scores and
    selection temporaries, one carried partial tile."""
    top_k = n_queries * k * 12 * 2
    tile_scores = QUERY_BATCH * TILE_ROWS * (4 + 1) + QUERY_BATCH * 2 * k * 28
    return n_queries * dim * 4 + top_k + tile_scores + TILE_ROWS * dim * 4


class ExactTopK:
    """The running exact top-k of `queries` over vectors added in position order (`add`, any split), `finish`ed
    into (scores, positions) arrays of shape [n_queries, k'] with k' = min(k, vectors added)."""

    def __init__(self, queries: np.ndarray, k: int) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.queries = np.ascontiguousarray(queries, dtype=np.float32)
        self.k = k
        self.scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        self.positions = np.full((len(queries), k), MISSING, dtype=np.int64)
        self.added = 0  # vectors added so far: the next one's global position
        self.searched = 0  # positions below this are searched; the rest wait in `carried`
        self.carried: list[np.ndarray] = []

    @property
    def dim(self) -> int:
        return self.queries.shape[1]

    def add(self, vectors: np.ndarray) -> None:
        """The next vectors, in position order. Whole tiles are searched now; a partial one is copied and waits
        for the next call (so `vectors` is not referenced after this call)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or (len(vectors) and vectors.shape[1] != self.dim):
            raise ValueError(f"vectors of shape {vectors.shape} for queries of dimension {self.dim}")
        start = 0
        if self.carried:
            carried_rows = self.added - self.searched
            start = min(TILE_ROWS - carried_rows, len(vectors))
            self.carried.append(vectors[:start].copy())
            self.added += start
            if self.added - self.searched < TILE_ROWS:
                return
            self._search_tile(np.concatenate(self.carried))
            self.carried = []
        whole_end = start + (len(vectors) - start) // TILE_ROWS * TILE_ROWS
        for tile_start in range(start, whole_end, TILE_ROWS):
            self.added += TILE_ROWS
            self._search_tile(vectors[tile_start : tile_start + TILE_ROWS])
        if whole_end < len(vectors):
            self.carried.append(vectors[whole_end:].copy())
            self.added += len(vectors) - whole_end

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """Search the last partial tile; (scores, positions), best first, trimmed to the vectors added."""
        if self.carried:
            self._search_tile(np.concatenate(self.carried))
            self.carried = []
        kept = min(self.k, self.added)
        return self.scores[:, :kept], self.positions[:, :kept]

    def _search_tile(self, tile: np.ndarray) -> None:
        first = self.searched
        for start in range(0, len(self.queries), QUERY_BATCH):
            rows = slice(start, start + QUERY_BATCH)
            scores, columns = _tile_top_k(self.queries[rows] @ tile.T, self.k)
            self._merge(rows, scores, columns + first)
        self.searched += len(tile)

    def _merge(self, rows: slice, scores: np.ndarray, positions: np.ndarray) -> None:
        all_scores = np.concatenate([self.scores[rows], scores], axis=1)
        all_positions = np.concatenate([self.positions[rows], positions], axis=1)
        best = np.lexsort((all_positions, -all_scores))[:, : self.k]  # score descending, then position
        self.scores[rows] = np.take_along_axis(all_scores, best, axis=1)
        self.positions[rows] = np.take_along_axis(all_positions, best, axis=1)


def _tile_top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of a tile's scores, the k best columns by (score descending, column ascending), any order."""
    if k >= scores.shape[1]:
        return scores, np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    values, columns = torch.topk(torch.from_numpy(scores), k, dim=1, sorted=False)
    values, columns = values.numpy(), columns.numpy()
    threshold = values.min(axis=1)
    # topk picks arbitrarily among scores equal to the k-th; where more share it than fit, take the first ones
    for row in np.flatnonzero((scores >= threshold[:, None]).sum(axis=1) > k):
        above = np.flatnonzero(scores[row] > threshold[row])
        tied = np.flatnonzero(scores[row] == threshold[row])[: k - len(above)]
        columns[row] = np.concatenate([above, tied])
        values[row] = scores[row, columns[row]]
    return values, columns


def search_results(scores: np.ndarray, positions: np.ndarray,
                   id_of: Callable[[int], object]) -> list[tuple[list[object], np.ndarray]]:
    """(ids, scores) per query from `finish`'s arrays; empty slots are dropped."""
    results = []
    for row_scores, row_positions in zip(scores, positions):
        found = row_positions != MISSING
        results.append(([id_of(int(p)) for p in row_positions[found]], row_scores[found]))
    return results

