"""Embedding and retrieval benchmark, all measured in one run on one machine:

1. passages/s of generate_dense_embeddings (the whole call: model loading, tokenizer workers, writing the shard)
   against sentence-transformers' SentenceTransformer.encode (encoding only, model loaded beforehand) on the same
   model, passages, batch size and maximum sequence length, in fp32 and in bf16 (bf16 autocast here, the model
   cast to bf16 for ST). ST gets `title [SEP] text`, which tokenizes to the same ids as the pair encoding here.
   Runs alternate; the best of `--repeats` is reported for each.
2. questions/s of answer validation (calculate_matches) for the NQ test questions, 100 passages each
   (random passages of the collection: the matching work does not depend on which).
3. search questions/s of flat and HNSW (DPR's settings) over the real embeddings from 1 and over `--synthetic`
   random vectors of the same dimension, with build time and index bytes per vector (serialized index size).

    python bench/bench_retrieval.py --passages ../shared/data/squad_open/psgs.tsv \
        --nq_questions ../shared/data/qas/nq-test.qa.csv --out bench_retrieval.json
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
from pathlib import Path

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


def write_subset(passages_file: str, n: int, folder: Path) -> tuple[Path, list]:
    rows = [(p.id, p.text, p.title) for p in itertools.islice(iter_passages(passages_file), n)]
    path = folder / "psgs.tsv"
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file, delimiter="\t", lineterminator="\n")
        writer.writerow(["id", "text", "title"])
        writer.writerows(rows)
    return path, rows


def time_generate(args, tsv: Path, out_file: Path, bf16: bool) -> float:
    from hydra import compose, initialize_config_dir

    overrides = [f"encoder.pretrained_model_cfg={args.model}", f"encoder.sequence_length={args.sequence_length}",
                 f"ctx_src={tsv}", f"out_file={out_file}", f"batch_size={args.batch_size}",
                 f"num_workers={args.num_workers}", "out_format=npz", f"bf16={str(bf16).lower()}"]
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


def bench_validation(args, rng) -> dict:
    passages = {p.id: (p.text, p.title) for p in iter_passages(args.passages)}
    samples = read_qa_file(args.nq_questions)[: args.validation_questions]
    ids = list(passages)
    closest = [(list(rng.choice(ids, 100, replace=False)), np.zeros(100, np.float32)) for _ in samples]
    answers = [s.answers for s in samples]
    out = {"questions": len(samples), "docs_per_question": 100}
    for workers in sorted({1, args.validation_workers}):
        start = time.perf_counter()
        calculate_matches(passages, answers, closest, workers, "string")
        out[f"questions_per_s_{workers}_workers"] = len(samples) / (time.perf_counter() - start)
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
    parser.add_argument("--passages", default=str(REPO.parent / "shared/data/squad_open/psgs.tsv"))
    parser.add_argument("--nq_questions", default=str(REPO.parent / "shared/data/qas/nq-test.qa.csv"))
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--n_passages", type=int, default=2000)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--sequence_length", type=int, default=256)
    parser.add_argument("--num_workers", type=int, default=2, help="tokenizer workers of generate_dense_embeddings")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--validation_workers", type=int, default=2)
    parser.add_argument("--validation_questions", type=int, help="only the first N NQ questions (default: all)")
    parser.add_argument("--n_queries", type=int, default=2000)
    parser.add_argument("--synthetic", type=int, default=20000, help="random vectors for the index benchmark")
    parser.add_argument("--out", help="write the results as JSON here too")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        machine = (f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
                   f"({torch.get_num_threads()} threads), faiss {faiss.__version__}")
        results = {"machine": machine, "load_average_at_start": os.getloadavg()}
        results["embedding"] = bench_embedding(args, Path(tmp))
        results["validation"] = bench_validation(args, rng)
        results["search"] = bench_search(args, results["embedding"].pop("embeddings"), rng)
        results["load_average_at_end"] = os.getloadavg()
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
