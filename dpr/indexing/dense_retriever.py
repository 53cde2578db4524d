"""Retrieve passages for a question set and validate them (`dense_retriever.py`): dense, BM25 or hybrid.

Flow: read the questions; check that the embedding shards come from one model and passages file, and that the
question encoder is that model (`shard_provenance`); encode the questions in batches (or load GC-DPR's saved
encodings) with the encoder spec the shards were made with (`encoding`); build the FAISS index from the shards,
streamed `index_buffer` vectors at a time, or load it from `index_path` (`configured_index`), and search it; or,
with `shard_search`, search the shards a group at a time without an index (`shard_search`: the flat index's
results in bounded memory); fuse with BM25 for hybrid (`hybrid`); load the texts of the retrieved passages only; mark answers with `has_answer` in
worker processes; print DPR's two raw lines and a top-k table per retriever (and a side-by-side table when several
are asked); write DPR's results JSON. With cosine similarity the vectors are L2-normalised, so the scores are
cosines (the temperature is a training scale and changes no ranking).
"""
import logging
import os
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

import faiss
import numpy as np
from omegaconf import DictConfig, ListConfig

from dpr.data.biencoder_data import normalize_question
from dpr.data.ctx_sources import CtxSource, load_passage_subset, resolve_ctx_sources
from dpr.data.qa_data import QASample, read_qa_file
from dpr.data.resources import resolve_data_path
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
from dpr.foundation.devices import process_device
from dpr.foundation.errors import ConfigError
from dpr.foundation.files import atomic_output, ensure_writable_output
from dpr.foundation.precision import make_precision
from dpr.indexing.configured_index import (
    bm25_index,
    build_or_load_index,
    check_shard_search_options,
    index_location,
    prepare_index_location,
    shard_wise_search,
    shards_of,
)
from dpr.indexing.encoding import encode_questions, load_configured_encoder
from dpr.indexing.bm25 import check_index_location
from dpr.indexing.faiss_indexers import DenseIndexer, index_exists
from dpr.indexing.hybrid import hybrid_results
from dpr.indexing.question_encodings import load_question_vectors, questions_record, save_question_vectors
from dpr.indexing.shard_provenance import (
    check_question_encoder, check_saved_index_passages, check_shard_passages, check_shard_sets, model_record,
)

logger = logging.getLogger(__name__)

RETRIEVERS = ("dense", "bm25", "hybrid")
# encoder_path values (DPR: the BiEncoder attribute) -> load_inference_encoder's encoder_type
ENCODER_PATHS = {None: "question", "": "question", "question_model": "question", "ctx_model": "ctx"}
ShardsModel = Optional[tuple[Path, dict]]


# ------------------------------------------------------------------------------------------------ questions
def question_files(cfg: DictConfig) -> list[str]:
    """The files of `cfg.qa_dataset`: a `cfg.datasets` name (resource key or path) or a file path."""
    if not cfg.qa_dataset:
        raise ConfigError("qa_dataset is required: a name from conf/datasets or a qas CSV / JSON-lines path")
    entry = (cfg.get("datasets") or {}).get(cfg.qa_dataset)
    return resolve_data_path(str(entry.file if entry is not None else cfg.qa_dataset), cfg.get("data_dir"))


def load_questions(cfg: DictConfig) -> list[QASample]:
    """The questions of `cfg.qa_dataset`, read with the dataset entry's column settings."""
    entry = (cfg.get("datasets") or {}).get(cfg.qa_dataset) if cfg.qa_dataset else None
    columns = {key: entry[key] for key in ("question_col", "answers_col", "id_col") if entry and key in entry}
    return [sample for path in question_files(cfg) for sample in read_qa_file(path, **columns)]


def _encode_with_model(cfg: DictConfig, questions: Sequence[str], shards_model: ShardsModel = None
                       ) -> tuple[np.ndarray, dict]:
    """The questions' vectors and the record of the model that made them (`question_encodings.model_record`)."""
    if cfg.encoder_path not in ENCODER_PATHS:
        raise ConfigError(f"encoder_path must be question_model or ctx_model, not {cfg.encoder_path!r}")
    device = process_device(cfg.no_cuda, cfg.get("local_rank"))
    precision = make_precision(device, cfg.fp16, cfg.bf16)
    encoder = load_configured_encoder(cfg, ENCODER_PATHS[cfg.encoder_path])
    if shards_model is not None:
        check_question_encoder(encoder, shards_model)
    encoder.model.to(device)
    return encode_questions(encoder, questions, cfg.batch_size, device, precision), model_record(encoder, cfg.model_file)


def _questions_record(cfg: DictConfig, questions: Sequence[str]) -> dict:
    qa_files = question_files(cfg) if cfg.get("qa_dataset") else []
    return questions_record(questions, qa_files)


def _loads_saved_questions(cfg: DictConfig) -> bool:
    path = cfg.get("q_encoding_path")
    return bool(path) and os.path.isfile(path) and not cfg.re_encode_q


def question_vectors(cfg: DictConfig, questions: Sequence[str], shards_model: ShardsModel = None) -> np.ndarray:
    """The questions' vectors: loaded from `q_encoding_path` when it exists (unless `re_encode_q`), after checking
    its record against the shards' model and these questions; else encoded by the shards' model (and saved there,
    with its record, when the path is set)."""
    path = cfg.q_encoding_path
    if _loads_saved_questions(cfg):
        vectors = load_question_vectors(path, _questions_record(cfg, questions), shards_model)
    else:
        vectors, model = _encode_with_model(cfg, questions, shards_model)
        if path:
            save_question_vectors(vectors, path, model, _questions_record(cfg, questions))
    return vectors.astype(np.float32, copy=False)


# ------------------------------------------------------------------------------------------------ dense search
def dense_search(indexer: DenseIndexer, queries: np.ndarray, depth: int) -> tuple[list[RetrievedDocs], bool]:
    """(results, higher_is_better): `depth` passages per question from the dense index."""
    if queries.shape[1] != indexer.vector_dim:
        raise ConfigError(f"the question vectors have {queries.shape[1]} dimensions but the index's passage vectors "
                          f"{indexer.vector_dim}: they come from different models (saved q_encoding_path?)")
    started = time.perf_counter()
    results = indexer.search_knn(queries, depth)
    elapsed = time.perf_counter() - started
    logger.info("dense search: %d questions in %.2f s (%.0f questions/s)", len(queries), elapsed,
                len(queries) / max(elapsed, 1e-9))
    return results, indexer.index.metric_type != faiss.METRIC_L2


# ------------------------------------------------------------------------------------------------ reporting
def retriever_names(value) -> list[str]:
    names = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    unknown = [name for name in names if name not in RETRIEVERS]
    if not names or unknown:
        raise ConfigError(f"retriever must be one or a list of {RETRIEVERS}, got {value!r}")
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
    # every output location before any work: encoding and indexing take hours on Wikipedia
    if need_dense and cfg.get("q_encoding_path") and not _loads_saved_questions(cfg):
        ensure_writable_output(cfg.q_encoding_path, "q_encoding_path")
    if need_bm25 and cfg.bm25_index_path:
        check_index_location(cfg.bm25_index_path, "bm25_index_path")
    if need_dense:
        check_shard_search_options(cfg)
        shards = shards_of(cfg, sources)
        index: Optional[DenseIndexer] = None
        if shards is None:  # a saved index: its meta file names the model of its vectors
            index = build_or_load_index(cfg, None)
            location = index_location(cfg, None)
            shards_model = (Path(location), index.provenance) if index.provenance else None
            check_saved_index_passages(location, index.source_records, index.provenance, sources)
        else:
            shard_sets = [files.paths for files in shards.files]
            shards_model = check_shard_sets(shard_sets)
            check_shard_passages(shard_sets, sources)
            location = index_location(cfg, shards)
            if location and not cfg.get("shard_search") and not index_exists(location):
                prepare_index_location(cfg, location)
        queries = question_vectors(cfg, questions, shards_model)
        if cfg.get("shard_search"):
            dense = shard_wise_search(cfg, shards, queries, depth)
        else:
            if index is None:
                index = build_or_load_index(cfg, shards, shards_model)
            dense, higher_is_better = dense_search(index, queries, depth)
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
            with atomic_output(results_path(cfg.out_file, name, position == 0)) as temp_name:
                write_retrieval_results(temp_name, records)
    if len(results) > 1:
        print(format_comparison(all_stats, len(samples)), flush=True)
    return all_stats


def run_dense_retriever(cfg: DictConfig) -> dict[str, QAMatchStats]:
    """The whole run; returns each retriever's match statistics ({} after `encode_q_and_save`)."""
    names = retriever_names(cfg.retriever)
    if cfg.encode_q_and_save:
        if not cfg.q_encoding_path:
            raise ConfigError("encode_q_and_save needs q_encoding_path, where the encodings are saved")
        ensure_writable_output(cfg.q_encoding_path, "q_encoding_path")
    elif cfg.out_file:
        ensure_writable_output(cfg.out_file, "out_file")
    samples = load_questions(cfg)
    questions = [normalize_question(sample.question) for sample in samples]
    if cfg.encode_q_and_save:
        vectors, model = _encode_with_model(cfg, questions)
        save_question_vectors(vectors, cfg.q_encoding_path, model, _questions_record(cfg, questions))
        return {}
    sources = resolve_ctx_sources(cfg.ctx_datatsets, cfg)
    if not sources:
        raise ConfigError("ctx_datatsets is required: the passages' texts are needed to validate the results")
    results = retrieve(cfg, names, questions, sources)
    return validate_and_report(cfg, samples, results, sources)
