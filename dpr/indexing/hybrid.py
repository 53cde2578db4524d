"""Hybrid retrieval (the DPR paper's BM25+DPR rows, which its repository lacks): fusion of normalised scores.

Per question, each retriever returns its top `hybrid_depth` passages; each list's scores are min-max normalised,
s' = (s - worst) / (best - worst), so its best passage gets 1 and its worst 0 (all 1 when best == worst);
a passage missing from one list gets 0 for that retriever. The fused score is
alpha * dense' + (1 - alpha) * bm25', and the top `n_docs` by fused score are returned (ties keep the dense
order, then the BM25 order). For L2 indexes (hnsw, hnsw_sq) the dense score is the negated distance, which
differs from the inner product by a per-question affine map, so it normalises to the same values; so do cosine
scores, whatever the temperature.
"""
from typing import Sequence

import numpy as np

from dpr.evaluation.qa_validation import RetrievedDocs


def _min_max(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if not len(scores):
        return scores
    low, high = scores.min(), scores.max()
    return np.ones_like(scores) if high == low else (scores - low) / (high - low)


def fuse_scores(dense: RetrievedDocs, bm25: RetrievedDocs, alpha: float, k: int,
                dense_higher_is_better: bool = True) -> tuple[list, np.ndarray]:
    """The top `k` of the union of two result lists by alpha * dense' + (1 - alpha) * bm25' (module docstring)."""
    dense_ids, dense_scores = dense
    dense_scores = np.asarray(dense_scores, dtype=np.float64)
    dense_norm = _min_max(dense_scores if dense_higher_is_better else -dense_scores)
    fused: dict[object, float] = {}
    for doc_id, score in zip(dense_ids, dense_norm):
        fused[doc_id] = alpha * score
    bm25_ids, bm25_scores = bm25
    for doc_id, score in zip(bm25_ids, _min_max(bm25_scores)):
        fused[doc_id] = fused.get(doc_id, 0.0) + (1 - alpha) * score
    # dicts keep insertion order (dense first, then BM25-only) and sorted() is stable: that breaks ties
    ranked = sorted(fused.items(), key=lambda item: -item[1])[:k]
    return [doc_id for doc_id, _ in ranked], np.array([score for _, score in ranked], dtype=np.float32)


def hybrid_results(dense: Sequence[RetrievedDocs], bm25: Sequence[RetrievedDocs], alpha: float, k: int,
                   dense_higher_is_better: bool = True) -> list[tuple[list, np.ndarray]]:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return [fuse_scores(d, b, alpha, k, dense_higher_is_better) for d, b in zip(dense, bm25)]
