"""What ONNX Runtime costs in retrieval accuracy: squad_open's passages embedded and its dev questions encoded by each
backend (torch fp32, ONNX fp32, ONNX int8), retrieved with dense_retriever's own validation, top-k accuracy side by
side, and the largest difference of each backend's passage vectors from torch's.

    python bench/bench_onnx_accuracy.py --out /tmp/onnx_accuracy.json                       # MiniLM as pretrained
    python bench/bench_onnx_accuracy.py --model_file out/dpr_biencoder.1 --out /tmp/onnx_accuracy.json
    python bench/bench_onnx_accuracy.py --passages 200 --questions 20                      # a smoke test

Each backend embeds the passages (generate_dense_embeddings.py, one shard) and encodes the questions with the same
backend (dense_retriever.py's encoder_backend), as a user running the whole pipeline on it would.
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

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BACKENDS = ("torch", "onnx", "onnx_int8")
TOP_KS = (1, 5, 20, 100)


def write_subsets(args, folder: Path) -> tuple[str, str]:
    """The first `--passages` passages and `--questions` questions (all when 0)."""
    from bench_embedding import write_subset  # this folder is on sys.path when a bench script runs

    passages = write_subset(args.passages_file, args.passages or 10**9, folder)
    questions = folder / "dev.qa.csv"
    with open(args.qa_file, encoding="utf-8") as source, open(questions, "w", encoding="utf-8") as target:
        rows = csv.reader(source, delimiter="\t")
        csv.writer(target, delimiter="\t", lineterminator="\n").writerows(
            itertools.islice(rows, args.questions or None))
    return str(passages), str(questions)


def compose(config_name: str, overrides: dict):
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return hydra_compose(config_name=config_name, overrides=[f"{k}={v}" for k, v in overrides.items()])


def run_backend(args, backend: str, passages: str, questions: str, folder: Path) -> dict:
    from dpr.data.embeddings_io import read_embeddings
    from dpr.evaluation.qa_validation import top_k_accuracy
    from dpr.indexing.dense_retriever import run_dense_retriever
    from dpr.indexing.generate_embeddings import generate_dense_embeddings

    common = {"encoder": "minilm", "encoder.sequence_length": args.sequence_length, "encoder_backend": backend,
              "onnx_cache_dir": folder / "onnx_cache", **({"model_file": args.model_file} if args.model_file else {})}
    started = time.perf_counter()
    shard = generate_dense_embeddings(compose("gen_embs", {
        **common, "ctx_src": passages, "out_file": folder / backend / "psgs", "out_format": "npz",
        "batch_size": args.batch_size, "num_workers": 0}))
    embedded = time.perf_counter() - started
    stats = run_dense_retriever(compose("dense_retriever", {
        **common, "qa_dataset": questions, "ctx_datatsets": f"[{passages}]", "encoded_ctx_files": f"[{shard}]",
        "out_file": folder / f"{backend}.json", "n_docs": max(TOP_KS), "validation_workers": 1}))
    accuracy = top_k_accuracy(stats["dense"].top_k_hits, len(stats["dense"].questions_doc_hits))
    return {"seconds_embedding": embedded, "vectors": read_embeddings(shard)[1],
            "top_k": {k: 100 * accuracy[k - 1] for k in TOP_KS if k <= len(accuracy)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages_file", default=str(REPO.parent / "shared/data/squad_open/psgs.tsv"))
    parser.add_argument("--qa_file", default=str(REPO.parent / "shared/data/squad_open/dev.qa.csv"))
    parser.add_argument("--passages", type=int, default=0, help="the first N passages (0: all)")
    parser.add_argument("--questions", type=int, default=0, help="the first N questions (0: all)")
    parser.add_argument("--model_file", help="a bi-encoder checkpoint (default: MiniLM as pretrained)")
    parser.add_argument("--sequence_length", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp(prefix="bench_onnx_accuracy_"))
    passages, questions = write_subsets(args, folder)
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "threads": args.threads, "args": vars(args),
              "load_average_start": os.getloadavg(), "backends": {}}
    results = {backend: run_backend(args, backend, passages, questions, folder) for backend in BACKENDS}
    for backend, result in results.items():
        report["backends"][backend] = {
            "top_k_accuracy_percent": result["top_k"],
            "change_from_torch_points": {k: result["top_k"][k] - results["torch"]["top_k"][k] for k in result["top_k"]},
            "max_abs_vector_difference_from_torch": float(np.abs(result["vectors"] - results["torch"]["vectors"]).max()),
            "seconds_embedding": result["seconds_embedding"],
        }
    report["load_average_end"] = os.getloadavg()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
