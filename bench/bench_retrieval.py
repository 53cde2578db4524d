"""Embedding and retrieval benchmark, all measured in one run on one machine:

1. passages/s of generate_dense_embeddings (the whole call: model loading, tokenizer workers, writing the shard)
   against sentence-transformers' SentenceTransformer.encode (encoding only, model loaded beforehand) on the same
   model, passages, batch size and maximum sequence length, in fp32 and in bf16 (bf16 autocast here, the model
   cast to bf16 for ST). ST gets `title [SEP] text`, which tokenizes to the same ids as the pair encoding here.
   Runs alternate; the best of `--repeats` is reported for each.
2. questions/s of answer validation: DPR's per-question algorithm (tests/qa_validation_reference.py) against
   calculate_matches, 100 passages per question, `match=string` and `match=regex`, on
   - the 3,610 NQ test questions, each with 100 random passages of squad_open + WikiText (no NQ passages here);
   - the 1,427 squad_open dev questions with their BM25 top 100 over the same passages (real answer hits);
   - both again with every retrieval its own passage id ("unshared": nothing to gain from passages shared
     between questions, the worst case for calculate_matches);
   and the peak memory validation allocates.
3. search questions/s of flat and HNSW (DPR's settings) over the real embeddings from 1 and over `--synthetic`
   random vectors of the same dimension, with build time and index bytes per vector (serialized index size).

    python bench/bench_retrieval.py --passages ../shared/data/squad_open/psgs.tsv --out bench_retrieval.json
    python bench/bench_retrieval.py --sections validation
"""
import argparse
import csv
import itertools
import json
import os
import platform
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Optional

import faiss
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dpr.data.embeddings_io import read_embeddings  # noqa: E402
from dpr.data.passages import iter_passages  # noqa: E402
from dpr.data.qa_data import read_qa_file  # noqa: E402
from dpr.evaluation.qa_validation import calculate_matches  # noqa: E402
from dpr.indexing.faiss_indexers import create_indexer  # noqa: E402
from dpr.indexing.generate_embeddings import generate_dense_embeddings  # noqa: E402
from dpr.models.hf_encoder import resolve_pretrained_path  # noqa: E402
from tests.qa_validation_reference import (  # noqa: E402
    Workload,
    read_passages,
    reference_calculate_matches,
    squad_bm25_workload,
)


SECTIONS = ("embedding", "validation", "search")


def write_subset(passages_file: str, n: int, folder: Path) -> tuple[Path, list]:
    rows = [(p.id, p.text, p.title) for p in itertools.islice(iter_passages(passages_file), n)]
    path = folder / "psgs.tsv"
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file, delimiter="\t", lineterminator="\n")
        writer.writerow(["id", "text", "title"])
        writer.writerows(rows)
    return path, rows


def time_generate(args, tsv: Path, out_file: Path, bf16: bool, extra_overrides: tuple = ()) -> float:
    from hydra import compose, initialize_config_dir

    overrides = [f"encoder.pretrained_model_cfg={args.model}", f"encoder.sequence_length={args.sequence_length}",
                 f"ctx_src={tsv}", f"out_file={out_file}", f"batch_size={args.batch_size}",
                 f"num_workers={args.num_workers}", "out_format=npz", f"bf16={str(bf16).lower()}", *extra_overrides]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="gen_embs", overrides=overrides)
    for stale in out_file.parent.glob(out_file.name + "_*"):
        stale.unlink()  # a complete shard would be skipped
    start = time.perf_counter()
    generate_dense_embeddings(cfg)
    return time.perf_counter() - start


def time_sentence_transformers(model, rows: list, args) -> float:
    texts = [f"{title} [SEP] {text}" for _id, text, title in rows]
    start = time.perf_counter()
    model.encode(texts, batch_size=args.batch_size, convert_to_numpy=True, show_progress_bar=False)
    return time.perf_counter() - start


def sentence_transformer(args, dtype: torch.dtype):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(resolve_pretrained_path(args.model), device="cpu").to(dtype)
    model.max_seq_length = args.sequence_length
    model.encode(["warm up"] * args.batch_size, batch_size=args.batch_size)
    return model


def bench_embedding(args, folder: Path) -> dict:
    """Seconds per variant and run; variants alternate so that a change in machine load hits all of them."""
    tsv, rows = write_subset(args.passages, args.n_passages, folder)
    st_models = {"fp32": sentence_transformer(args, torch.float32), "bf16": sentence_transformer(args, torch.bfloat16)}
    seconds: dict[str, list] = {}
    for _ in range(args.repeats):
        for precision in ("fp32", "bf16"):
            out_file = folder / precision / "psgs"
            seconds.setdefault(f"ours_{precision}", []).append(time_generate(args, tsv, out_file, precision == "bf16"))
            seconds.setdefault(f"st_{precision}", []).append(time_sentence_transformers(st_models[precision], rows,
                                                                                       args))
    _, fp32 = read_embeddings(folder / "fp32" / "psgs_0.npz")
    _, bf16 = read_embeddings(folder / "bf16" / "psgs_0.npz")
    cosine = np.sum(fp32 * bf16, axis=1) / (np.linalg.norm(fp32, axis=1) * np.linalg.norm(bf16, axis=1))
    return {"passages": len(rows), "batch_size": args.batch_size, "sequence_length": args.sequence_length,
            "num_workers": args.num_workers, "seconds": seconds,
            "passages_per_s": {name: len(rows) / min(runs) for name, runs in seconds.items()},
            "ours_bf16_vs_fp32_min_cosine": float(cosine.min()),
            "embeddings": str(folder / "fp32" / "psgs_0.npz")}


def random_candidates(data_dir: Path, qas_file: str, n_questions: Optional[int], n_docs: int, rng) -> Workload:
    """NQ questions with `n_docs` random passages of squad_open + WikiText each (there are no NQ passages here)."""
    passages = read_passages(data_dir / "squad_open" / "psgs_plus_wikitext2.tsv")
    samples = read_qa_file(data_dir / "qas" / qas_file)[:n_questions]
    ids = list(passages)
    closest = [([ids[i] for i in rng.choice(len(ids), n_docs, replace=False)], [0.0] * n_docs) for _ in samples]
    return passages, [sample.answers for sample in samples], closest


def unshared(workload: Workload) -> Workload:
    """The same texts, but every retrieval its own passage id: no passage is shared between questions."""
    passages, answers, closest = workload
    own_passages, own_closest = {}, []
    for question, (doc_ids, scores) in enumerate(closest):
        own_ids = [f"{question}:{rank}" for rank in range(len(doc_ids))]
        own_passages.update(zip(own_ids, (passages[doc_id] for doc_id in doc_ids)))
        own_closest.append((own_ids, scores))
    return own_passages, answers, own_closest


def peak_allocated_mb(run) -> float:
    """Peak of the memory Python allocates during run() (tracemalloc; a separate, untimed call)."""
    tracemalloc.start()
    run()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2**20


def bench_validation(args, rng) -> dict:
    """questions/s of DPR's per-question algorithm (the reference) and of calculate_matches, runs interleaved.

    Every variant's hits are checked against the reference's before timing. Passage texts (the same in all
    variants) are held by the workload, as the retriever holds them; the peak counts only what validation allocates.
    """
    data_dir = Path(args.data_dir)
    nq_random = random_candidates(data_dir, "nq-test.qa.csv", args.validation_questions, 100, rng)
    squad_bm25 = squad_bm25_workload(data_dir, args.validation_questions or 10**9, 100)
    workloads = {"nq_test_random": nq_random, "nq_test_random_unshared": unshared(nq_random),
                 "squad_dev_bm25": squad_bm25, "squad_dev_bm25_unshared": unshared(squad_bm25)}
    cases = [(name, "string") for name in workloads] + [("nq_test_random", "regex"), ("squad_dev_bm25", "regex")]
    variants = {"dpr_per_question": lambda p, a, c, m: reference_calculate_matches(p, a, c, m)[1]}
    for workers in sorted({1, args.validation_workers}):
        variants[f"ours_{workers}_workers"] = (
            lambda p, a, c, m, workers=workers: calculate_matches(p, a, c, workers, m).questions_doc_hits)
    seconds: dict[str, dict[str, list]] = {f"{name}/{match}": {} for name, match in cases}
    expected = {}
    for repeat in range(args.validation_repeats):
        for name, match in cases:
            passages, answers, closest = workloads[name]
            for variant, run in variants.items():
                start = time.perf_counter()
                hits = run(passages, answers, closest, match)
                seconds[f"{name}/{match}"].setdefault(variant, []).append(time.perf_counter() - start)
                assert hits == expected.setdefault((name, match), hits), f"{variant} differs on {name}/{match}"
    out = {}
    for name, match in cases:
        passages, answers, closest = workloads[name]
        case_seconds = seconds[f"{name}/{match}"]
        best = {variant: min(runs) for variant, runs in case_seconds.items()}
        out[f"{name}/{match}"] = {
            "questions": len(answers), "docs_per_question": len(closest[0][0]),
            "distinct_passages": len({doc_id for doc_ids, _ in closest for doc_id in doc_ids}),
            "questions_per_s": {variant: len(answers) / value for variant, value in best.items()},
            "speedup_vs_dpr": {variant: best["dpr_per_question"] / value for variant, value in best.items()},
            "seconds": case_seconds,
        }
    passages, answers, closest = workloads["nq_test_random_unshared"]
    out["peak_allocated_mb_nq_test_random_unshared"] = {
        "ours_1_workers": peak_allocated_mb(lambda: calculate_matches(passages, answers, closest, 1)),
        "passage_texts": sum(len(text) for text, _title in passages.values()) / 2**20,
    }
    return out


def index_bytes(indexer) -> int:
    return int(faiss.serialize_index(indexer.index).size)


def bench_index(kind: str, ids: list, vectors: np.ndarray, queries: np.ndarray, k: int) -> dict:
    indexer = create_indexer(kind, check_memory=False)
    start = time.perf_counter()
    indexer.index_data([(ids, vectors)])
    build = time.perf_counter() - start
    start = time.perf_counter()
    results = indexer.search_knn(queries, k)
    search = time.perf_counter() - start
    return {"vectors": len(ids), "build_seconds": build, "search_questions_per_s": len(queries) / search,
            "index_bytes_per_vector": index_bytes(indexer) / len(ids), "top1": [r[0][0] for r in results]}


def bench_search(args, embeddings: str, rng) -> dict:
    ids, vectors = read_embeddings(embeddings)
    dim = vectors.shape[1]
    queries = vectors[rng.choice(len(ids), args.n_queries)] + rng.normal(0, 0.05, (args.n_queries, dim))
    queries = queries.astype(np.float32)
    synthetic = (rng.standard_normal((args.synthetic, dim)) * rng.uniform(0.5, 1.5, (args.synthetic, 1)))
    synthetic = synthetic.astype(np.float32)
    synthetic_ids = [str(i) for i in range(args.synthetic)]
    synthetic_queries = rng.standard_normal((args.n_queries, dim)).astype(np.float32)
    out = {}
    for label, (data_ids, data, qs) in {"real": (ids, vectors, queries),
                                        "synthetic": (synthetic_ids, synthetic, synthetic_queries)}.items():
        runs = {kind: bench_index(kind, data_ids, data, qs, 100) for kind in ("flat", "hnsw")}
        agree = np.mean([a == b for a, b in zip(runs["flat"].pop("top1"), runs["hnsw"].pop("top1"))])
        out[label] = {**runs, "top1_agreement": float(agree), "queries": len(qs), "dim": dim}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", default=str(REPO.parent / "shared/data/squad_open/psgs.tsv"),
                        help="the passages of the embedding and search benchmarks")
    parser.add_argument("--data_dir", default=str(REPO.parent / "shared/data"),
                        help="the shared data (squad_open/, qas/) that the validation benchmark reads")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="what to run (search needs embedding: it searches the embedded passages)")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--n_passages", type=int, default=2000)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--sequence_length", type=int, default=256)
    parser.add_argument("--num_workers", type=int, default=2, help="tokenizer workers of generate_dense_embeddings")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--validation_workers", type=int, default=2)
    parser.add_argument("--validation_questions", type=int, help="only the first N questions (default: all)")
    parser.add_argument("--validation_repeats", type=int, default=2)
    parser.add_argument("--n_queries", type=int, default=2000)
    parser.add_argument("--synthetic", type=int, default=20000, help="random vectors for the index benchmark")
    parser.add_argument("--out", help="write the results as JSON here too")
    args = parser.parse_args()
    if "search" in args.sections and "embedding" not in args.sections:
        parser.error("--sections search needs embedding too: it searches the embedded passages")

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        machine = (f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
                   f"({torch.get_num_threads()} threads), faiss {faiss.__version__}")
        results = {"machine": machine, "load_average_at_start": os.getloadavg()}
        if "embedding" in args.sections:
            results["embedding"] = bench_embedding(args, Path(tmp))
        if "validation" in args.sections:
            results["validation"] = bench_validation(args, rng)
        if "search" in args.sections:
            results["search"] = bench_search(args, results["embedding"].pop("embeddings"), rng)
        results["load_average_at_end"] = os.getloadavg()
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
