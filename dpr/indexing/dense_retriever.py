"""Retrieve passages for a question set and validate them (`dense_retriever.py`): dense, BM25 or hybrid.

Flow: read the questions; encode them in batches (or load GC-DPR's saved encodings); build the FAISS index from
the embedding shards, streamed `index_buffer` vectors at a time (or load it from `index_path`); search; load the
texts of the retrieved passages only; mark answers with `has_answer` in worker processes; print DPR's two raw
lines and a top-k table per retriever (and a side-by-side table when several are asked); write DPR's results JSON.

Hybrid retrieval (the DPR paper's BM25+DPR rows, which its repository lacks) fuses normalised scores. Per
question, each retriever returns its top `hybrid_depth` passages; each list's scores are min-max normalised,
s' = (s - worst) / (best - worst), so its best passage gets 1 and its worst 0 (all 1 when best == worst);
a passage missing from one list gets 0 for that retriever. The fused score is
alpha * dense' + (1 - alpha) * bm25', and the top `n_docs` by fused score are returned (ties keep the dense
order, then the BM25 order). For L2 indexes (hnsw, hnsw_sq) the dense score is the negated distance, which
differs from the inner product by a per-question affine map, so it normalises to the same values.
"""
import logging
import os
import time
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import faiss
import numpy as np
import torch
from omegaconf import DictConfig, ListConfig

from dpr.data.biencoder_data import normalize_question
from dpr.data.ctx_sources import CtxSource, iter_sources, load_passage_subset, resolve_ctx_sources
from dpr.data.embeddings_io import EmbeddingFiles, read_embeddings
from dpr.data.qa_data import QASample, read_qa_file
from dpr.data.resources import resolve_data_path
from dpr.data.tensorizer import Tensorizer
from dpr.evaluation.qa_validation import (
    REPORT_TOP_KS,
    QAMatchStats,
    RetrievedDocs,
    calculate_matches,
    format_validation_results,
    retrieval_results_records,
    top_k_accuracy,
    write_retrieval_results,
)
from dpr.indexing.bm25 import BM25Index, passage_text
from dpr.indexing.faiss_indexers import DenseIndexer, check_index_memory, create_indexer, index_exists
from dpr.models.hf_encoder import encode
from dpr.models.loading import load_inference_encoder
from dpr.foundation.devices import process_device
from dpr.foundation.precision import Precision, make_precision

logger = logging.getLogger(__name__)

RETRIEVERS = ("dense", "bm25", "hybrid")
# encoder_path values (DPR: the BiEncoder attribute) -> load_inference_encoder's encoder_type
ENCODER_PATHS = {None: "question", "": "question", "question_model": "question", "ctx_model": "ctx"}


# ------------------------------------------------------------------------------------------------ questions
def load_questions(cfg: DictConfig) -> list[QASample]:
    """The questions of `cfg.qa_dataset`: a `cfg.datasets` name (resource key or path) or a file path."""
    if not cfg.qa_dataset:
        raise ValueError("qa_dataset is required: a name from conf/datasets or a qas CSV / JSON-lines path")
    entry = (cfg.get("datasets") or {}).get(cfg.qa_dataset)
    target = entry.file if entry is not None else cfg.qa_dataset
    paths = resolve_data_path(str(target), cfg.get("data_dir"))
    columns = {key: entry[key] for key in ("question_col", "answers_col", "id_col") if entry and key in entry}
    return [sample for path in paths for sample in read_qa_file(path, **columns)]


def encode_questions(
    model: torch.nn.Module,
    tensorizer: Tensorizer,
    questions: Sequence[str],
    batch_size: int,
    device: torch.device,
    precision: Precision,
) -> torch.Tensor:
    """A float32 [len(questions), D] tensor on the CPU: `[CLS] question [SEP]`, batch by batch."""
    blocks = []
    with torch.inference_mode():
        for start in range(0, len(questions), batch_size):
            input_ids, attention_mask = tensorizer.tensorize(questions[start : start + batch_size])
            with precision.autocast():
                _, vectors = encode(model, input_ids.to(device), attention_mask.to(device))
            blocks.append(vectors.float().cpu())
    return torch.cat(blocks) if blocks else torch.empty(0, 0)


def _encode_with_model(cfg: DictConfig, questions: Sequence[str]) -> torch.Tensor:
    if cfg.encoder_path not in ENCODER_PATHS:
        raise ValueError(f"encoder_path must be question_model or ctx_model, not {cfg.encoder_path!r}")
    device = process_device(cfg.no_cuda, cfg.get("local_rank"))
    precision = make_precision(device, cfg.fp16, cfg.bf16)
    model, tokenizer = load_inference_encoder(cfg, ENCODER_PATHS[cfg.encoder_path], cfg.model_file)
    model.to(device)
    tensorizer = Tensorizer(tokenizer, cfg.encoder.sequence_length, cfg.encoder.get("pad_to_max", False))
    started = time.perf_counter()
    vectors = encode_questions(model, tensorizer, questions, cfg.batch_size, device, precision)
    logger.info("encoded %d questions on %s in %.1f s", len(questions), device, time.perf_counter() - started)
    return vectors


def question_vectors(cfg: DictConfig, questions: Sequence[str]) -> np.ndarray:
    """The questions' vectors: loaded from `q_encoding_path` when it exists (unless `re_encode_q`), else encoded
    (and saved there when the path is set)."""
    path = cfg.q_encoding_path
    if path and os.path.isfile(path) and not cfg.re_encode_q:
        vectors = torch.load(path, map_location="cpu", weights_only=True)
        logger.info("loaded question encodings %s from %s", tuple(vectors.shape), path)
        if len(vectors) != len(questions):
            raise ValueError(f"{path} holds {len(vectors)} question vectors for {len(questions)} questions")
    else:
        vectors = _encode_with_model(cfg, questions)
        if path:
            save_question_vectors(vectors, path)
    return vectors.numpy().astype(np.float32, copy=False)


def save_question_vectors(vectors: torch.Tensor, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(vectors, path)
    logger.info("saved question encodings %s to %s", tuple(vectors.shape), path)


# ------------------------------------------------------------------------------------------------ dense index
class ChainedBlocks:
    """The embedding blocks of several shard-file sets, re-iterable (two-pass indexers read them twice)."""

    def __init__(self, files: Sequence[EmbeddingFiles]) -> None:
        self.files = list(files)

    def __iter__(self) -> Iterator[tuple[list[str], np.ndarray]]:
        for shard_files in self.files:
            yield from shard_files

    @property
    def paths(self) -> list[Path]:
        return [path for shard_files in self.files for path in shard_files.paths]


def embedding_files(cfg: DictConfig, sources: Sequence[CtxSource]) -> ChainedBlocks:
    """`encoded_ctx_files[i]` with the id prefix of `ctx_datatsets[i]`."""
    patterns = list(cfg.encoded_ctx_files or [])
    if not patterns:
        raise ValueError("encoded_ctx_files is required to build a dense index (or give an existing index_path)")
    if len(patterns) != len(sources):
        raise ValueError(
            f"encoded_ctx_files has {len(patterns)} entries but ctx_datatsets {len(sources)}: they pair up 1:1"
        )
    return ChainedBlocks([EmbeddingFiles(pattern, source.id_prefix) for pattern, source in zip(patterns, sources)])


def indexer_kind(cfg: DictConfig) -> str:
    return "hnsw" if cfg.hnsw_index else cfg.indexer


HNSW_SETTINGS = {"hnsw_store_n": "store_n", "hnsw_ef_search": "ef_search", "hnsw_ef_construction": "ef_construction"}


def create_configured_indexer(cfg: DictConfig) -> DenseIndexer:
    kind = indexer_kind(cfg)
    if kind in ("hnsw", "hnsw_sq"):
        settings = {arg: cfg[key] for key, arg in HNSW_SETTINGS.items() if cfg.get(key) is not None}
        return create_indexer(kind, buffer_size=cfg.index_buffer, **settings)
    if kind == "flat":
        return create_indexer(kind, buffer_size=cfg.index_buffer)
    if not cfg.index_factory:
        raise ValueError("indexer=factory needs index_factory, a FAISS index_factory string such as IVF4096,PQ64")
    return create_indexer(
        kind,
        factory_string=cfg.index_factory,
        buffer_size=cfg.index_buffer,
        train_sample_size=cfg.index_train_sample,
        search_params=cfg.index_search_params or "",
    )


def index_location(cfg: DictConfig, blocks: Optional[ChainedBlocks]) -> Optional[str]:
    """`index_path`, or with `save_or_load_index` GC-DPR's prefix from the first embedding file (emb_0 -> emb)."""
    if cfg.index_path:
        return str(cfg.index_path)
    if cfg.save_or_load_index and blocks is not None and blocks.paths:
        return "_".join(str(blocks.paths[0]).split("_")[:-1])
    return None


def estimate_vector_count(paths: Sequence[Path]) -> tuple[int, int]:
    """(vectors, dimension) of shard files: exact for `.npz` (array headers), for pickles scaled from the first
    pickle's vectors per byte (reading every pickle would cost a pass over all the data)."""
    count, dim, pickles = 0, 0, []
    for path in paths:
        if str(path).endswith(".npz"):
            rows, dim = _npz_vectors_shape(path)
            count += rows
        else:
            pickles.append(path)
    if pickles:
        ids, vectors = read_embeddings(pickles[0])
        dim = dim or vectors.shape[1]
        per_byte = len(ids) / max(os.path.getsize(pickles[0]), 1)
        count += round(per_byte * sum(os.path.getsize(path) for path in pickles))
    return count, dim


def _npz_vectors_shape(path: Path) -> tuple[int, int]:
    import zipfile

    with zipfile.ZipFile(path) as archive, archive.open("vectors.npy") as array_file:
        version = np.lib.format.read_magic(array_file)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, _ = read_header(array_file)
    return shape[0], shape[1] if len(shape) > 1 else 0


def build_or_load_index(cfg: DictConfig, sources: Sequence[CtxSource]) -> DenseIndexer:
    """The dense index: loaded from its location when saved there, else built from the shards (then saved)."""
    indexer = create_configured_indexer(cfg)
    blocks = None if cfg.index_path and index_exists(cfg.index_path) else embedding_files(cfg, sources)
    location = index_location(cfg, blocks)
    if location and index_exists(location):
        indexer.deserialize(location)
        return indexer
    count, dim = estimate_vector_count(blocks.paths)
    kwargs = {"factory_string": indexer.factory_string} if indexer.kind == "factory" else {}
    check_index_memory(indexer.kind, count, dim, **kwargs)  # prints the estimate; raises when it will not fit
    started = time.perf_counter()
    indexer.index_data(blocks)
    logger.info("built the %s index in %.1f s", indexer.kind, time.perf_counter() - started)
    if location:
        indexer.serialize(location)
    return indexer


def dense_search(
    cfg: DictConfig, sources: Sequence[CtxSource], queries: np.ndarray, depth: int
) -> tuple[list[RetrievedDocs], bool]:
    """(results, higher_is_better): `depth` passages per question from the dense index."""
    indexer = build_or_load_index(cfg, sources)
    started = time.perf_counter()
    results = indexer.search_knn(queries, depth)
    elapsed = time.perf_counter() - started
    logger.info("dense search: %d questions in %.2f s (%.0f questions/s)", len(queries), elapsed,
                len(queries) / max(elapsed, 1e-9))
    return results, indexer.index.metric_type != faiss.METRIC_L2


# ------------------------------------------------------------------------------------------------ BM25, hybrid
def bm25_index(cfg: DictConfig, sources: Sequence[CtxSource]) -> BM25Index:
    """Loaded from `bm25_index_path` when saved there, else built over the passage sources (and saved)."""
    path = cfg.bm25_index_path
    if path and os.path.isdir(path):
        return BM25Index.load(path)
    ids, texts = [], []
    for passage in iter_sources(sources):
        ids.append(passage.id)
        texts.append(passage_text(passage.title, passage.text))
    index = BM25Index.build(ids, texts, k1=cfg.bm25_k1, b=cfg.bm25_b)
    if path:
        index.save(path)
    return index


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


# ------------------------------------------------------------------------------------------------ reporting
def retriever_names(value) -> list[str]:
    names = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    unknown = [name for name in names if name not in RETRIEVERS]
    if not names or unknown:
        raise ValueError(f"retriever must be one or a list of {RETRIEVERS}, got {value!r}")
    return list(dict.fromkeys(names))


def results_path(out_file: str, name: str, first: bool) -> Path:
    """`out_file` for the first retriever; `results.json` -> `results.bm25.json` for the others."""
    path = Path(out_file)
    return path if first else path.with_name(f"{path.stem}.{name}{path.suffix}")


def format_comparison(stats: dict[str, QAMatchStats], n_questions: int) -> str:
    """One row per retriever, one column per top-k (the k within n_docs), accuracy in %."""
    n_docs = min(len(s.top_k_hits) for s in stats.values())
    top_ks = [k for k in REPORT_TOP_KS if k <= n_docs]
    lines = [f"{'retriever':>10} | " + " | ".join(f"{'top-' + str(k):>7}" for k in top_ks)
             + f"   ({n_questions} questions)"]
    for name, stat in stats.items():
        accuracy = top_k_accuracy(stat.top_k_hits, n_questions)
        lines.append(f"{name:>10} | " + " | ".join(f"{100 * accuracy[k - 1]:>6.2f}%" for k in top_ks))
    return "\n".join(lines)


def _truncate(results: Sequence[RetrievedDocs], k: int) -> list[RetrievedDocs]:
    return [(list(ids[:k]), scores[:k]) for ids, scores in results]


def _validation_workers(requested: int) -> int:
    return max(1, min(requested, os.cpu_count() or 1))


# ------------------------------------------------------------------------------------------------ the run
def retrieve(cfg: DictConfig, names: Sequence[str], questions: Sequence[str],
             sources: Sequence[CtxSource]) -> dict[str, list[RetrievedDocs]]:
    """The `n_docs` results per question of each retriever named."""
    need_dense = "dense" in names or "hybrid" in names
    need_bm25 = "bm25" in names or "hybrid" in names
    depth = max(cfg.n_docs, cfg.hybrid_depth) if "hybrid" in names else cfg.n_docs
    results: dict[str, list[RetrievedDocs]] = {}
    dense, higher_is_better = None, True
    if need_dense:
        dense, higher_is_better = dense_search(cfg, sources, question_vectors(cfg, questions), depth)
    bm25 = bm25_index(cfg, sources).search(list(questions), depth) if need_bm25 else None
    for name in names:
        if name == "dense":
            results[name] = _truncate(dense, cfg.n_docs)
        elif name == "bm25":
            results[name] = _truncate(bm25, cfg.n_docs)
        else:
            results[name] = hybrid_results(dense, bm25, cfg.alpha, cfg.n_docs, higher_is_better)
    return results


def validate_and_report(cfg: DictConfig, samples: Sequence[QASample], results: dict[str, list[RetrievedDocs]],
                        sources: Sequence[CtxSource]) -> dict[str, QAMatchStats]:
    """Match answers, print the tables and write a results JSON per retriever."""
    wanted: Iterable[object] = {doc_id for per_q in results.values() for ids, _ in per_q for doc_id in ids}
    passages = load_passage_subset(sources, wanted)
    answers = [sample.answers for sample in samples]
    workers = _validation_workers(cfg.validation_workers)
    all_stats: dict[str, QAMatchStats] = {}
    for position, (name, closest) in enumerate(results.items()):
        started = time.perf_counter()
        stats = calculate_matches(passages, answers, closest, workers, cfg.match)
        logger.info("validation of %s: %.1f s", name, time.perf_counter() - started)
        all_stats[name] = stats
        if len(results) > 1:
            print(f"Retriever: {name}")
        print(format_validation_results(stats.top_k_hits, len(samples)), flush=True)
        if cfg.out_file:
            records = retrieval_results_records(
                [s.question for s in samples], answers, passages, closest, stats.questions_doc_hits
            )
            write_retrieval_results(results_path(cfg.out_file, name, position == 0), records)
    if len(results) > 1:
        print(format_comparison(all_stats, len(samples)), flush=True)
    return all_stats


def run_dense_retriever(cfg: DictConfig) -> dict[str, QAMatchStats]:
    """The whole run; returns each retriever's match statistics ({} after `encode_q_and_save`)."""
    names = retriever_names(cfg.retriever)
    samples = load_questions(cfg)
    questions = [normalize_question(sample.question) for sample in samples]
    if cfg.encode_q_and_save:
        if not cfg.q_encoding_path:
            raise ValueError("encode_q_and_save needs q_encoding_path, where the encodings are saved")
        save_question_vectors(_encode_with_model(cfg, questions), cfg.q_encoding_path)
        return {}
    sources = resolve_ctx_sources(cfg.ctx_datatsets, cfg)
    if not sources:
        raise ValueError("ctx_datatsets is required: the passages' texts are needed to validate the results")
    results = retrieve(cfg, names, questions, sources)
    return validate_and_report(cfg, samples, results, sources)
