"""Hard negatives for converted training data: candidates ranked by BM25 (the repository's bm25s index) or by a
trained bi-encoder (the dense retriever's machinery, as `mine_hard_negatives.py`), filtered per query.

A candidate is taken as a negative only when it is
- in the rank window [from_rank, to_rank] (1-based, of the whole ranking, positives included: the very top ranks
  hold most false negatives, passages relevant without a judgement);
- no known positive of the query, by id or by text (`passage_text_key`: a positive repeated under another id);
- not scoring above `max_score_ratio` times the query's lowest-scoring positive (the false-negative filter of
  NV-Retriever's TopK-PercPos and sentence-transformers' relative margin). For BM25 the ratio is of BM25 scores,
  for dense of the bi-encoder's scores (inner products, cosines for a cosine model).
BM25 candidates scoring 0 (no word in common with the query) are not candidates. `top` takes the first eligible
ones; `random` draws among all eligible ones in the window, seeded per query (`seed`, query id).
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, NamedTuple, Optional, Sequence

import numpy as np

from dpr.data.passages import passage_text_key

SAMPLING = ("top", "random")
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# the dense overrides that also apply to embedding the passages (the others are the retriever's)
_GEN_EMBS_KEYS = {"batch_size", "encoder.sequence_length", "no_cuda", "fp16", "bf16", "trust_checkpoint",
                  "encoder.pretrained_model_cfg", "tokenize_chunk"}


@dataclass(frozen=True)
class NegativeOptions:
    kind: str  # none, bm25, dense
    count: int
    from_rank: int
    to_rank: int
    max_score_ratio: Optional[float]
    sampling: str
    seed: int


class Candidate(NamedTuple):
    """A ranked passage."""

    id: str
    score: float
    text: str
    title: str


@dataclass
class NegativeStats:
    """What happened to the candidates, over all queries of a split."""

    queries: int = 0
    positives: list = field(default_factory=list)  # per query
    found: list = field(default_factory=list)  # negatives per query
    given: int = 0  # negatives the source file listed and that were kept
    dropped_given_positive: int = 0  # listed as negative but a known positive of the query
    dropped_rank: int = 0  # ranked before from_rank
    dropped_positive: int = 0  # a known positive, by id
    dropped_positive_text: int = 0  # the text of a known positive under another id
    dropped_ratio: int = 0  # scored above max_score_ratio x the positive's score

    def rows(self, options: NegativeOptions) -> list[tuple[str, str]]:
        positives = np.array(self.positives or [0])
        found = np.array(self.found or [0])
        rows = [("queries with a positive", f"{self.queries}"),
                ("positives per query", f"mean {positives.mean():.2f}, min {positives.min()}, max {positives.max()}")]
        if self.given or self.dropped_given_positive:
            rows += [("negatives given by the file, kept", f"{self.given}"),
                     ("negatives given by the file that are positives of the query, dropped",
                      f"{self.dropped_given_positive}")]
        if options.kind != "none":
            rows.append((f"{options.kind} negatives found", f"{int(found.sum())} (mean {found.mean():.2f} per query, "
                         f"{int((found < options.count).sum())} queries with fewer than {options.count})"))
            if options.from_rank > 1:
                rows.append((f"candidates dropped: ranked before {options.from_rank}", f"{self.dropped_rank}"))
            rows += [("candidates dropped: a known positive", f"{self.dropped_positive}"),
                     ("candidates dropped: the text of a known positive", f"{self.dropped_positive_text}")]
            if options.max_score_ratio is not None:
                rows.append((f"candidates dropped: scoring above {options.max_score_ratio} x the positive",
                             f"{self.dropped_ratio}"))
        return rows


def select_negatives(ranking: Iterable[Candidate], positive_ids: set, positive_texts: set,
                     positive_score: Optional[float], options: NegativeOptions, query_id: str,
                     stats: NegativeStats) -> list[Candidate]:
    """The query's negatives from its ranking, best first (ranks `1..`), counting every candidate dropped in
    `stats`."""
    eligible = []
    for rank, candidate in enumerate(ranking, start=1):
        passage_id, score, text = candidate.id, candidate.score, candidate.text
        if rank > options.to_rank or (options.sampling == "top" and len(eligible) == options.count):
            break
        if rank < options.from_rank:
            stats.dropped_rank += 1
        elif passage_id in positive_ids:
            stats.dropped_positive += 1
        elif passage_text_key(text) in positive_texts:
            stats.dropped_positive_text += 1
        elif (options.max_score_ratio is not None and positive_score is not None
              and score > options.max_score_ratio * positive_score):
            stats.dropped_ratio += 1
        else:
            eligible.append(candidate)
    if options.sampling == "random" and len(eligible) > options.count:
        chosen = sorted(random.Random(f"{options.seed}:{query_id}").sample(range(len(eligible)), options.count))
        eligible = [eligible[i] for i in chosen]
    return eligible


def bm25_rankings(index, questions: Sequence[str], positives: Sequence[Sequence[int]], depth: int):
    """Per question: (top `depth` positions by BM25 score, best first, ties by position; their scores; the scores of
    its positives at `positives` positions). Passages scoring 0 are left out."""
    for question, positive_positions in zip(questions, positives):
        scores = index.scores(question)
        k = min(depth, len(scores))
        top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        top = top[np.lexsort((top, -scores[top]))]
        top = top[scores[top] > 0]
        yield top, scores[top], scores[list(positive_positions)]


def _quoted(path: object) -> str:
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"


def dense_rankings(model_file: str, passages_file: Path, questions: Sequence[str],
                   positive_ids: Sequence[Sequence[str]], depth: int, overrides: Sequence[str], work_dir: Path):
    """Per question: (its top `depth` passage ids, their scores, the scores of its positives), by the bi-encoder
    `model_file`: the passages are embedded into `work_dir` by `generate_dense_embeddings` and searched by the
    dense retriever's `retrieve` (flat inner-product index unless `overrides`, hydra `key=value`s of
    conf/gen_embs.yaml and conf/dense_retriever.yaml, say otherwise). The positives' scores are the same inner
    products, of the saved question vectors and the positives' passage vectors."""
    from hydra import compose, initialize_config_dir

    from dpr.data.embeddings_io import read_embeddings
    from dpr.indexing.dense_retriever import question_vectors, retrieve
    from dpr.indexing.generate_embeddings import generate_dense_embeddings
    from dpr.indexing.retrieval_settings import RetrievalSettings

    common = [f"model_file={_quoted(model_file)}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        embed_cfg = compose("gen_embs", common + [f"ctx_src={_quoted(passages_file)}",
                                                  f"out_file={_quoted(work_dir / 'passages')}", "num_workers=0"]
                            + [o for o in overrides if o.split("=")[0] in _GEN_EMBS_KEYS])
        search_cfg = compose("dense_retriever", common + [
            f"ctx_datatsets=[{_quoted(passages_file)}]", f"encoded_ctx_files=[{_quoted(work_dir / 'passages_*')}]",
            f"n_docs={depth}", f"q_encoding_path={_quoted(work_dir / 'questions.pt')}", "validation_workers=1",
        ] + list(overrides))
    shard = generate_dense_embeddings(embed_cfg)  # a later split's call reuses the shard (same provenance)
    settings = RetrievalSettings.from_config(search_cfg)
    results = retrieve(settings, ["dense"], list(questions), settings.sources)["dense"]
    queries = question_vectors(settings, list(questions))  # the vectors retrieve saved, not encoded again
    os.unlink(settings.question_encoding.saved_path)  # the next split's questions are others
    wanted = {passage_id for ids in positive_ids for passage_id in ids}
    ids, vectors = read_embeddings(shard)
    rows = {passage_id: row for row, passage_id in enumerate(ids) if passage_id in wanted}
    return [(list(ranked), np.asarray(scores, dtype=np.float32), vectors[[rows[p] for p in positives]] @ query)
            for query, (ranked, scores), positives in zip(queries, results, positive_ids)]
