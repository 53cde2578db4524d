"""Shard-wise exact search against one flat index and a compressed factory index (IVF-PQ), on synthetic shards.

Data: `--vectors` float32 vectors of dimension `--dim` in `--shards` equal `.npz` shards, a Gaussian mixture (so
that IVF/PQ recall means something): `--centres` unit-norm centres drawn from N(0, I/D); each vector is a
uniformly chosen centre plus N(0, sigma^2 I/D) noise (noise norm ~ sigma). Queries are drawn the same way (not
database members). Shards go to a temporary folder that is deleted afterwards.

Phases, each in its own process so that its peak RSS (`ru_maxrss`, the resident high-water mark, which sees
FAISS's and BLAS's memory) is its own; a process's RSS after imports is reported as the baseline:
1. shard-wise exact search (`dpr.indexing.shard_search.search_shards`, one shard held at a time);
2. one flat index over all shards (`DenseFlatIndexer`, what DPR does), unless --skip-flat;
3. `--factory` (default IVF4096,PQ64) through `DenseFactoryIndexer`: trained on a uniform sample of
   `--train-sample` vectors, added shard by shard, searched with `--search-params`.
Reported: seconds (build, search), queries/s, peak RSS, and recall@k of 2 and 3 against the exact top-k of 1.

    python bench/bench_shard_search.py --out /tmp/bench_shard_search.json
    python bench/bench_shard_search.py --vectors 200000 --shards 10      (a small run)
"""
import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dpr.data.embeddings_io import EmbeddingFiles, expand_embedding_paths, shard_path, write_embeddings  # noqa: E402


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # Linux: KiB


def mixture(rng, centres: np.ndarray, n: int, sigma: float) -> np.ndarray:
    dim = centres.shape[1]
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    vectors *= sigma / np.sqrt(dim)
    vectors += centres[rng.integers(0, len(centres), n)]
    return vectors


def generate(args, folder: Path) -> np.ndarray:
    """Write the shards; returns the queries."""
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.centres, args.dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    per_shard = -(-args.vectors // args.shards)
    for shard_id in range(args.shards):
        first = shard_id * per_shard
        n = max(0, min(per_shard, args.vectors - first))
        ids = [f"synth:{i}" for i in range(first, first + n)]
        write_embeddings(shard_path(folder / "emb", shard_id, "npz"), ids, mixture(rng, centres, n, args.sigma))
    return mixture(rng, centres, args.queries, args.sigma)


def phase_shard_search(args, folder: Path, queries: np.ndarray) -> dict:
    from dpr.indexing.shard_search import search_shards

    baseline = peak_rss_gib()
    started = time.perf_counter()
    results = search_shards([(expand_embedding_paths(str(folder / "emb_*")), "")], queries, args.k)
    elapsed = time.perf_counter() - started
    return {"search_s": elapsed, "queries_per_s": len(queries) / elapsed, "baseline_rss_gib": baseline,
            "peak_rss_gib": peak_rss_gib(), "ids": [ids for ids, _ in results]}


def build_and_search(indexer, folder: Path, queries: np.ndarray, k: int) -> dict:
    """Index every shard of `folder`, then search: times, peak memory and the ids found."""
    baseline = peak_rss_gib()
    started = time.perf_counter()
    indexer.index_data(EmbeddingFiles(str(folder / "emb_*")))
    built = time.perf_counter()
    results = indexer.search_knn(queries, k)
    searched = time.perf_counter()
    return {"build_s": built - started, "search_s": searched - built, "queries_per_s": len(queries) / (searched - built),
            "baseline_rss_gib": baseline, "peak_rss_gib": peak_rss_gib(), "ids": [ids for ids, _ in results]}


def phase_flat(args, folder: Path, queries: np.ndarray) -> dict:
    from dpr.indexing.faiss_indexers import DenseFlatIndexer

    return build_and_search(DenseFlatIndexer(check_memory=False), folder, queries, args.k)


def phase_factory(args, folder: Path, queries: np.ndarray) -> dict:
    from dpr.indexing.faiss_indexers import DenseFactoryIndexer

    indexer = DenseFactoryIndexer(args.factory, train_sample_size=args.train_sample, search_params=args.search_params,
                                  check_memory=False)
    return {**build_and_search(indexer, folder, queries, args.k),
            "estimate_21m_gib": indexer.estimate_memory(21_015_324, args.dim) / 2**30}


PHASES = {"shard_search": phase_shard_search, "flat": phase_flat, "factory": phase_factory}


def run_phase(name: str, argv: list, folder: Path) -> dict:
    out = folder / f"{name}.json"
    command = [sys.executable, __file__, *argv, "--phase", name, "--folder", str(folder), "--phase-out", str(out)]
    subprocess.run(command, check=True)
    return json.loads(out.read_text())


def recall(found: list, exact: list) -> float:
    return float(np.mean([len(set(f) & set(e)) / max(len(e), 1) for f, e in zip(found, exact)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=int, default=2_000_000)
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--centres", type=int, default=2000)
    parser.add_argument("--sigma", type=float, default=0.6)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--factory", default="IVF4096,PQ64")
    parser.add_argument("--search-params", default="nprobe=64")
    parser.add_argument("--train-sample", type=int, default=100_000)
    parser.add_argument("--skip-flat", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tmp", default=None, help="where the temporary shard folder is made")
    parser.add_argument("--out", default=None)
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--phase-out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.phase:
        folder = Path(args.folder)
        result = PHASES[args.phase](args, folder, np.load(folder / "queries.npy"))
        Path(args.phase_out).write_text(json.dumps(result))
        return

    argv = [a for a in sys.argv[1:]]
    folder = Path(tempfile.mkdtemp(prefix="bench_shard_search_", dir=args.tmp))
    report = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "load_average_start": os.getloadavg(), "args": vars(args)}
    try:
        started = time.perf_counter()
        np.save(folder / "queries.npy", generate(args, folder))
        report["generate_s"] = time.perf_counter() - started
        report["shard_bytes"] = sum(path.stat().st_size for path in folder.glob("emb_*"))
        phases = ["shard_search"] + ([] if args.skip_flat else ["flat"]) + ["factory"]
        for name in phases:
            report[name] = run_phase(name, argv, folder)
            print(name, {key: value for key, value in report[name].items() if key != "ids"}, flush=True)
        exact = report["shard_search"]["ids"]
        for name in phases[1:]:
            report[name]["recall_at_k"] = recall(report[name]["ids"], exact)
        for name in phases:
            del report[name]["ids"]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    report["load_average_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
