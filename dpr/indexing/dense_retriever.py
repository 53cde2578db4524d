"""Retrieve passages for a question set and validate them (`dense_retriever.py`): dense, BM25 or hybrid.

Flow: read the questions; check that the embedding shards come from one model and passages file, and that the
question encoder is that model (`shard_provenance`); encode the questions in batches (or load GC-DPR's saved
encodings) with the encoder spec the shards were made with (`encoding`); build the FAISS index from the shards,
streamed `index_buffer` vectors at a time, or load it from `index_path` (`configured_index`), and search it; or,
with `shard_search`, search the shards a group at a time without an index (`shard_search`: the flat index's
results in bounded memory); fuse with BM25 for hybrid (`hybrid`); load the texts of the retrieved passages only; mark answers with `has_answer` in
worker processes; print DPR's two raw lines and a top-k table per retriever (and a side-by-side table when several
are asked); write DPR's results JSON. With cosine similarity the vectors are L2-normalised, so the scores are
cosines (the temperature is a training scale and changes no ranking). The options arrive resolved
(`retrieval_settings.RetrievalSettings`).
"""
import logging
import os
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

import faiss
import numpy as np
from omegaconf import DictConfig

from dpr.data.biencoder_data import normalize_question
from dpr.data.ctx_sources import CtxSource, load_passage_subset
from dpr.data.qa_data import QASample
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
from dpr.foundation.errors import ConfigError
from dpr.foundation.files import atomic_output, ensure_writable_output, remove_stale_temporaries
from dpr.foundation.run_lock import run_lock
from dpr.indexing.configured_index import (
    bm25_index,
    build_or_load_index,
    check_shard_search_options,
    index_location,
    prepare_index_location,
    shard_wise_search,
    shards_of,
)
from dpr.indexing.encoder_backend import batch_encoder
from dpr.indexing.encoding import encode_questions
from dpr.indexing.bm25 import check_index_location
from dpr.indexing.faiss_indexers import DenseIndexer, index_exists
from dpr.indexing.hybrid import hybrid_results
from dpr.indexing.judged_evaluation import JudgedEvaluation
from dpr.indexing.question_encodings import load_question_vectors, questions_record, save_question_vectors
from dpr.indexing.retrieval_settings import RETRIEVERS, QuestionEncodingSettings, RetrievalSettings
from dpr.indexing.shard_provenance import (
    check_question_encoder, check_saved_index_passages, check_shard_passages, check_shard_sets, model_record,
)

logger = logging.getLogger(__name__)

ShardsModel = Optional[tuple[Path, dict]]


# ------------------------------------------------------------------------------------------------ questions
def _encode_with_model(encoding: QuestionEncodingSettings, questions: Sequence[str], shards_model: ShardsModel = None
                       ) -> tuple[np.ndarray, dict]:
    """The questions' vectors and the record of the model that made them (`question_encodings.model_record`)."""
    settings = encoding.encoder
    backend = encoding.backend
    device = settings.device()
    precision = settings.precision(device)
    encoder = settings.load(encoding.encoder_type)
    if shards_model is not None:
        check_question_encoder(encoder, shards_model, backend.quantization)
    vectors_of = batch_encoder(encoder, backend, encoding.encoder_type, settings.model_file, device, precision)
    return (encode_questions(encoder, vectors_of, questions, settings.batch_size),
            model_record(encoder, settings.model_file, backend.quantization))


def _questions_record(settings: RetrievalSettings, questions: Sequence[str]) -> dict:
    return questions_record(questions, settings.questions.files if settings.questions else [])


def _loads_saved_questions(encoding: QuestionEncodingSettings) -> bool:
    path = encoding.saved_path
    return bool(path) and os.path.isfile(path) and not encoding.re_encode


def question_vectors(settings: RetrievalSettings, questions: Sequence[str], shards_model: ShardsModel = None
                     ) -> np.ndarray:
    """The questions' vectors: loaded from `q_encoding_path` when it exists (unless `re_encode_q`), after checking
    its record against the shards' model and these questions; else encoded by the shards' model (and saved there,
    with its record, when the path is set)."""
    encoding = settings.question_encoding
    path = encoding.saved_path
    if _loads_saved_questions(encoding):
        vectors = load_question_vectors(path, _questions_record(settings, questions), shards_model)
    else:
        vectors, model = _encode_with_model(encoding, questions, shards_model)
        if path:
            save_question_vectors(vectors, path, model, _questions_record(settings, questions))
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
def retrieve(settings: RetrievalSettings, names: Sequence[str], questions: Sequence[str],
             sources: Sequence[CtxSource]) -> dict[str, list[RetrievedDocs]]:
    """The `n_docs` results per question of each retriever named."""
    need_dense = "dense" in names or "hybrid" in names
    need_bm25 = "bm25" in names or "hybrid" in names
    n_docs, index_settings, encoding = settings.n_docs, settings.index, settings.question_encoding
    depth = max(n_docs, settings.hybrid_depth) if "hybrid" in names else n_docs
    results: dict[str, list[RetrievedDocs]] = {}
    dense, higher_is_better = None, True
    # every output location before any work: encoding and indexing take hours on Wikipedia
    if need_dense and encoding.saved_path and not _loads_saved_questions(encoding):
        ensure_writable_output(encoding.saved_path, "q_encoding_path")
    if need_bm25 and settings.bm25.index_path:
        check_index_location(settings.bm25.index_path, "bm25_index_path")
    if need_dense:
        check_shard_search_options(index_settings)
        shards = shards_of(index_settings, sources)
        index: Optional[DenseIndexer] = None
        if shards is None:  # a saved index: its meta file names the model of its vectors
            index = build_or_load_index(index_settings, None)
            location = index_location(index_settings, None)
            shards_model = (Path(location), index.provenance) if index.provenance else None
            check_saved_index_passages(location, index.source_records, index.provenance, sources)
        else:
            shard_sets = [files.paths for files in shards.files]
            shards_model = check_shard_sets(shard_sets)
            check_shard_passages(shard_sets, sources)
            location = index_location(index_settings, shards)
            if location and not index_settings.shard_search and not index_exists(location):
                prepare_index_location(index_settings, location)
        queries = question_vectors(settings, questions, shards_model)
        if index_settings.shard_search:
            dense = shard_wise_search(index_settings, shards, queries, depth)
        else:
            if index is None:
                index = build_or_load_index(index_settings, shards, shards_model)
            dense, higher_is_better = dense_search(index, queries, depth)
    bm25 = bm25_index(settings.bm25, sources).search(list(questions), depth) if need_bm25 else None
    for name in names:
        if name == "dense":
            results[name] = _truncate(dense, n_docs)
        elif name == "bm25":
            results[name] = _truncate(bm25, n_docs)
        else:
            results[name] = hybrid_results(dense, bm25, settings.alpha, n_docs, higher_is_better)
    return results


def validate_and_report(settings: RetrievalSettings, samples: Sequence[QASample],
                        results: dict[str, list[RetrievedDocs]], sources: Sequence[CtxSource],
                        judged: Optional[JudgedEvaluation] = None) -> dict[str, QAMatchStats]:
    """Match answers, print the tables and write a results JSON per retriever; with qrels, the judged metrics, and
    a TREC run per retriever when asked."""
    wanted: Iterable[object] = {doc_id for per_q in results.values() for ids, _ in per_q for doc_id in ids}
    passages = load_passage_subset(sources, wanted)
    answers = [sample.answers for sample in samples]
    workers = _validation_workers(settings.validation_workers)
    # a queries file judged by qrels may hold no answer at all: then answer strings are neither matched nor tabled
    answer_table = not (settings.qrels and not any(answers))
    all_stats: dict[str, QAMatchStats] = {}
    metrics: dict[str, dict[str, float]] = {}
    for position, (name, closest) in enumerate(results.items()):
        started = time.perf_counter()
        if answer_table:
            stats = calculate_matches(passages, answers, closest, workers, settings.match)
        else:
            stats = QAMatchStats.without_answers(closest)
        logger.info("validation of %s: %.1f s", name, time.perf_counter() - started)
        all_stats[name] = stats
        if len(results) > 1:
            print(f"Retriever: {name}")
        if answer_table:
            print(format_validation_results(stats.top_k_hits, len(samples)), flush=True)
        if judged is not None:
            rankings = judged.rankings(closest, sources)
            if settings.trec_run_file:
                judged.write_run(str(results_path(settings.trec_run_file, name, position == 0)), rankings, name)
            if judged.qrels is not None:
                metrics[name] = judged.metrics(rankings, settings.n_docs)
        if settings.out_file:
            records = retrieval_results_records(
                [s.question for s in samples], answers, passages, closest, stats.questions_doc_hits,
                [s.id for s in samples],
            )
            out_path = results_path(settings.out_file, name, position == 0)
            with atomic_output(out_path) as temp_name:
                write_retrieval_results(temp_name, records)
            logger.info("saved retrieval results of %d questions to %s", len(records), out_path)
    if len(results) > 1 and answer_table:
        print(format_comparison(all_stats, len(samples)), flush=True)
    if metrics:
        judged.report(metrics, settings.n_docs, settings.metrics_file)
    return all_stats


def run_dense_retriever(cfg: DictConfig) -> dict[str, QAMatchStats]:
    """The whole run; returns each retriever's match statistics ({} after `encode_q_and_save`). One run per
    out_file: it holds out_file's lock, and removes the temporaries of results files a killed run left."""
    settings = RetrievalSettings.from_config(cfg)
    if settings.question_encoding.save_only or not settings.out_file:
        return _run(settings)
    ensure_writable_output(settings.out_file, "out_file")
    with run_lock(settings.out_file, "out_file"):
        for name in RETRIEVERS:
            for path in {results_path(settings.out_file, name, True), results_path(settings.out_file, name, False)}:
                remove_stale_temporaries(path.parent, path.name + ".")
        return _run(settings)


def _run(settings: RetrievalSettings) -> dict[str, QAMatchStats]:
    encoding = settings.question_encoding
    if encoding.save_only:
        if not encoding.saved_path:
            raise ConfigError("encode_q_and_save needs q_encoding_path, where the encodings are saved")
        ensure_writable_output(encoding.saved_path, "q_encoding_path")
    else:
        for option, path in settings.outputs():
            ensure_writable_output(path, option)
    if settings.questions is None:
        raise ConfigError("qa_dataset is required: a name from conf/datasets or a qas CSV / JSON-lines path")
    samples = settings.questions.load()
    judged = None
    if (settings.qrels or settings.trec_run_file) and not encoding.save_only:
        judged = JudgedEvaluation.prepare(samples, settings.questions.files, settings.qrels)
    questions = [normalize_question(sample.question) for sample in samples]
    if encoding.save_only:
        vectors, model = _encode_with_model(encoding, questions)
        save_question_vectors(vectors, encoding.saved_path, model, _questions_record(settings, questions))
        return {}
    if not settings.sources:
        raise ConfigError("ctx_datatsets is required: the passages' texts are needed to validate the results")
    results = retrieve(settings, settings.retrievers, questions, settings.sources)
    return validate_and_report(settings, samples, results, settings.sources, judged)
