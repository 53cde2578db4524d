#!/usr/bin/env python3
"""SQuAD-open side by side: BM25, the untrained MiniLM encoder, a MiniLM bi-encoder trained as DPR (gradient
cache) and the BM25 + DPR hybrid, plus an extractive reader trained briefly on the trained retriever's results.

    python scripts/squad_open.py --data ../shared/data/squad_open            (`make squad-open DATA=...`)

DATA holds DPR-format files: psgs.tsv, biencoder-train.json, train.qa.csv, dev.qa.csv (built from the official
SQuAD v1.1 dev file by `python squad_to_dpr.py --squad_file data.squad1.dev --output_dir DATA --dev_fraction 0.2`).
The entry scripts run as subprocesses, each command printed before it runs; everything lands in --run_dir:
squad_open.md (the top-k table, reader EM, settings, timings and commands) and topk_accuracy.png (accuracy
against k). The defaults take about 30 minutes on 2 CPU cores; --max_train_questions, --epochs and the reader
options trade time for accuracy.
"""
import argparse
import json
import os
import random
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # runnable from anywhere: the `dpr` package of this checkout

TOP_KS = (1, 5, 20, 50, 100)
DATA_FILES = ("psgs.tsv", "biencoder-train.json", "train.qa.csv", "dev.qa.csv")
MATPLOTLIB_MISSING = ("matplotlib is needed for the plot: pip install matplotlib (the install's demo extra has it), "
                      "or pass --no_plot")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/squad_open", help="folder of the DPR-format files")
    parser.add_argument("--run_dir", help="output folder (default runs/squad-open-<timestamp>)")
    parser.add_argument("--sequence_length", type=int, default=256, help="bi-encoder and reader sequence length")
    parser.add_argument("--num_shards", type=int, default=2, help="passage embedding shards")
    train = parser.add_argument_group("bi-encoder training (gradient cache)")
    train.add_argument("--max_train_questions", type=int, default=800,
                       help="random training questions of biencoder-train.json (0: all 6,534)")
    train.add_argument("--epochs", type=int, default=1)
    train.add_argument("--batch_size", type=int, default=16)
    train.add_argument("--q_chunk_size", type=int, default=8)
    train.add_argument("--ctx_chunk_size", type=int, default=8)
    train.add_argument("--learning_rate", type=float, default=3e-5)
    reader = parser.add_argument_group("reader")
    reader.add_argument("--reader_train_questions", type=int, default=1200,
                        help="random questions of train.qa.csv, retrieved for and trained on")
    reader.add_argument("--reader_dev_questions", type=int, default=500, help="dev questions EM is measured on")
    reader.add_argument("--reader_epochs", type=int, default=1)
    reader.add_argument("--reader_batch_size", type=int, default=4)
    reader.add_argument("--reader_passages", type=int, default=2, help="passages per training question")
    reader.add_argument("--reader_eval_passages", type=int, default=5,
                        help="EM is reported for the answer from the top passage and from this many top passages")
    reader.add_argument("--reader_learning_rate", type=float, default=1e-4,
                        help="higher than DPR's 1e-5, which is for tens of thousands of steps")
    parser.add_argument("--bf16", choices=("auto", "true", "false"), default="auto",
                        help="bf16 autocast for training and encoding (auto: when the CPU has AMX or AVX512-BF16)")
    parser.add_argument("--seed", type=int, default=12345, help="seed of the question samples")
    parser.add_argument("--no_plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    return parser.parse_args(argv)


@dataclass
class Stage:
    name: str
    seconds: float
    command: str


@dataclass
class Pipeline:
    """Runs the entry scripts from the repository root, recording each command and its wall time."""
    run_dir: Path
    common_overrides: List[str]  # appended to every command
    stages: List[Stage] = field(default_factory=list)

    def run(self, name: str, script: str, *args: str) -> None:
        args = (*args, *self.common_overrides)
        command = [sys.executable, script, *args]
        shown = shlex.join(["python", script, *args])
        print(f"\n+ {shown}", flush=True)
        started = time.perf_counter()
        if subprocess.run(command, cwd=REPO).returncode != 0:
            sys.exit(f"squad_open: '{name}' failed; its log is under {self.run_dir / 'logs'}")
        self.stages.append(Stage(name, time.perf_counter() - started, shown))

    def hydra_dir(self, name: str) -> str:
        """Where hydra keeps a step's log and resolved config (not in the repository's outputs/)."""
        return f"hydra.run.dir={self.run_dir / 'logs' / name}"


def random_subset(items: list, n: int, seed: int) -> list:
    """n random items (all when n is 0 or too large), in their original order."""
    if n <= 0 or n >= len(items):
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


def subset_json(src: Path, dst: Path, n: int, seed: int, max_ctxs: Optional[int] = None) -> int:
    """Write n random records of a JSON list (retriever training data or results) to dst; with max_ctxs, each
    record keeps only its first max_ctxs retrieved passages."""
    with open(src, encoding="utf-8") as f:
        records = random_subset(json.load(f), n, seed)
    if max_ctxs is not None:
        records = [{**record, "ctxs": record["ctxs"][:max_ctxs]} for record in records]
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst, "w", encoding="utf-8") as f:
        json.dump(records, f)
    return len(records)


def subset_lines(src: Path, dst: Path, n: int, seed: int) -> int:
    with open(src, encoding="utf-8") as f:
        lines = random_subset(f.readlines(), n, seed)
    dst.write_text("".join(lines), encoding="utf-8")
    return len(lines)


def cpu_has_bf16() -> bool:
    """AMX or AVX512-BF16, where bf16 autocast is about 2x faster than fp32 (and slower without them)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


# The dpr imports (torch, transformers) are deferred to the report so that --help and the input checks answer at once.
def accuracy_by_k(results_json: Path) -> tuple[List[float], int]:
    """Top-k accuracy (%) for k = 1..n_docs from a results JSON's has_answer flags, and the question count."""
    from dpr.evaluation.qa_validation import top_k_hits_from_results

    hits, n_questions = top_k_hits_from_results(results_json)
    return [100 * h / n_questions for h in hits], n_questions


def reader_exact_match(predictions_json: Path) -> tuple[Dict[int, float], int]:
    """EM (%) per number of top passages the answer comes from, in a reader prediction file; the question count."""
    from dpr.evaluation.reader_predictions import exact_match_by_top_k, read_predictions

    records = read_predictions(str(predictions_json))
    return exact_match_by_top_k(records), len(records)


def markdown_table(curves: Dict[str, List[float]], n_questions: int) -> str:
    header = "| retriever | " + " | ".join(f"top-{k}" for k in TOP_KS) + " |"
    rows = [header, "|---|" + "---:|" * len(TOP_KS)]
    for name, accuracy in curves.items():
        rows.append(f"| {name} | " + " | ".join(f"{accuracy[k - 1]:.2f}" for k in TOP_KS) + " |")
    caption = f"Top-k accuracy (%) on {n_questions} dev questions: an answer string in a top-k passage."
    return "\n".join(rows) + "\n\n" + caption


def plot_curves(curves: Dict[str, List[float]], n_questions: int, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, accuracy in curves.items():
        ax.plot(range(1, len(accuracy) + 1), accuracy, label=name)
    ax.set_xscale("log")
    ax.set_xticks(TOP_KS, [str(k) for k in TOP_KS])
    ax.set_xlabel("k (retrieved passages)")
    ax.set_ylabel("top-k accuracy (%)")
    ax.set_title(f"SQuAD-open dev, {n_questions} questions")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_seconds(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    data = Path(args.data).resolve()
    missing = [name for name in DATA_FILES if not (data / name).is_file()]
    if missing:
        sys.exit(f"{data} lacks {', '.join(missing)}; build them from the SQuAD v1.1 dev file with\n"
                 f"  python squad_to_dpr.py --squad_file data.squad1.dev --output_dir {args.data} --dev_fraction 0.2")
    if not args.no_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            sys.exit(MATPLOTLIB_MISSING)  # before the half hour of work, not after

    run_dir = Path(args.run_dir or f"runs/squad-open-{datetime.now():%Y%m%d-%H%M%S}")
    run_dir = (run_dir if run_dir.is_absolute() else Path.cwd() / run_dir).resolve()
    subsets = run_dir / "data"
    subsets.mkdir(parents=True, exist_ok=True)
    use_bf16 = cpu_has_bf16() if args.bf16 == "auto" else args.bf16 == "true"
    pipeline = Pipeline(run_dir, [f"bf16={str(use_bf16).lower()}"])
    started = time.perf_counter()
    psgs = str(data / "psgs.tsv")
    dev_qa = str(data / "dev.qa.csv")
    seq = f"encoder.sequence_length={args.sequence_length}"

    # 1. The untrained MiniLM ([CLS] vectors) and BM25: both zero-shot.
    untrained = run_dir / "untrained"
    pipeline.run("embed passages, untrained MiniLM", "generate_dense_embeddings.py", "-m", "encoder=minilm", seq,
                 f"ctx_src={psgs}", f"out_file={untrained / 'embs' / 'psgs'}",
                 "shard_id=" + ",".join(str(i) for i in range(args.num_shards)), f"num_shards={args.num_shards}",
                 f"hydra.sweep.dir={run_dir / 'logs' / 'embed_untrained'}")
    bm25_index = run_dir / "bm25_index"
    pipeline.run("retrieve dev: untrained MiniLM and BM25", "dense_retriever.py", "encoder=minilm", seq,
                 f"qa_dataset={dev_qa}", f"ctx_datatsets=[{psgs}]",
                 f"encoded_ctx_files=[{untrained / 'embs' / 'psgs_*'}]", "retriever=[dense,bm25]",
                 f"bm25_index_path={bm25_index}", f"out_file={untrained / 'dev.json'}",
                 pipeline.hydra_dir("retrieve_untrained"))

    # 2. DPR training with the gradient cache on a random sample of the training questions.
    train_json = subsets / "biencoder-train.json"
    n_train = subset_json(data / "biencoder-train.json", train_json, args.max_train_questions, args.seed)
    total_steps = args.epochs * (n_train // args.batch_size)
    biencoder = run_dir / "biencoder"
    pipeline.run("train bi-encoder (gradient cache)", "train_dense_encoder.py", "encoder=minilm", seq,
                 f"train_datasets=[{train_json}]", f"train.batch_size={args.batch_size}", "train.grad_cache=true",
                 f"train.q_chunk_size={args.q_chunk_size}", f"train.ctx_chunk_size={args.ctx_chunk_size}",
                 f"train.num_train_epochs={args.epochs}", f"train.learning_rate={args.learning_rate}",
                 f"train.warmup_steps={max(1, total_steps // 10)}", "train.log_batch_step=5",
                 f"output_dir={biencoder}", pipeline.hydra_dir("train_biencoder"))
    model = biencoder / f"dpr_biencoder.{args.epochs - 1}"

    trained = run_dir / "trained"
    pipeline.run("embed passages, trained encoder", "generate_dense_embeddings.py", "-m", f"model_file={model}",
                 f"ctx_src={psgs}", f"out_file={trained / 'embs' / 'psgs'}",
                 "shard_id=" + ",".join(str(i) for i in range(args.num_shards)), f"num_shards={args.num_shards}",
                 f"hydra.sweep.dir={run_dir / 'logs' / 'embed_trained'}")
    pipeline.run("retrieve dev: trained encoder and hybrid", "dense_retriever.py", f"model_file={model}",
                 f"qa_dataset={dev_qa}", f"ctx_datatsets=[{psgs}]",
                 f"encoded_ctx_files=[{trained / 'embs' / 'psgs_*'}]", "retriever=[dense,hybrid]",
                 f"bm25_index_path={bm25_index}", f"index_path={trained / 'index'}/",
                 f"out_file={trained / 'dev.json'}", pipeline.hydra_dir("retrieve_trained"))

    # 3. The reader, trained on the trained retriever's results for other training questions.
    reader_train_qa = subsets / "reader-train.qa.csv"
    subset_lines(data / "train.qa.csv", reader_train_qa, args.reader_train_questions, args.seed + 1)
    pipeline.run("retrieve reader training questions", "dense_retriever.py", f"model_file={model}",
                 f"qa_dataset={reader_train_qa}", f"ctx_datatsets=[{psgs}]", f"index_path={trained / 'index'}/",
                 "n_docs=20", f"out_file={run_dir / 'reader' / 'train.json'}", pipeline.hydra_dir("retrieve_reader"))
    reader_dev = run_dir / "reader" / "dev.json"
    subset_json(trained / "dev.json", reader_dev, args.reader_dev_questions, args.seed + 2,
                max_ctxs=args.reader_eval_passages)
    predictions = run_dir / "reader" / "dev_predictions.json"
    pipeline.run("train reader and measure EM", "train_reader.py", "encoder=minilm", seq,
                 f"train_files={run_dir / 'reader' / 'train.json'}", f"dev_files={reader_dev}",
                 f"train.batch_size={args.reader_batch_size}", f"passages_per_question={args.reader_passages}",
                 f"train.num_train_epochs={args.reader_epochs}", f"train.learning_rate={args.reader_learning_rate}",
                 "train.warmup_steps=10", "train.log_batch_step=10",
                 f"passages_per_question_predict={args.reader_eval_passages}",
                 f"eval_top_docs=[{','.join(map(str, sorted({1, args.reader_eval_passages})))}]", "num_workers=2",
                 f"output_dir={run_dir / 'reader' / 'model'}", f"prediction_results_file={predictions}",
                 pipeline.hydra_dir("train_reader"))
    total = time.perf_counter() - started

    # 4. The report.
    curves: Dict[str, List[float]] = {}
    n_questions = 0
    for name, results in (("BM25", untrained / "dev.bm25.json"), ("MiniLM, untrained", untrained / "dev.json"),
                          ("MiniLM, DPR-trained", trained / "dev.json"),
                          ("hybrid (BM25 + DPR-trained)", trained / "dev.hybrid.json")):
        curves[name], n_questions = accuracy_by_k(results)
    ems, n_reader_questions = reader_exact_match(predictions)
    em_summary = ", ".join(f"{ems[n]:.2f} from the top {f'{n} passages' if n > 1 else 'passage'}" for n in sorted(ems))
    plot = run_dir / "topk_accuracy.png"
    if not args.no_plot:
        plot_curves(curves, n_questions, plot)

    settings = (f"bi-encoder: {n_train} training questions, {args.epochs} epoch(s) of batch {args.batch_size} "
                f"({total_steps} steps), gradient cache with chunks q={args.q_chunk_size} ctx={args.ctx_chunk_size}, "
                f"learning rate {args.learning_rate}, sequence length {args.sequence_length}, 1 hard negative, "
                f"{'bf16 autocast' if use_bf16 else 'fp32'}. "
                f"Reader: {args.reader_train_questions} training questions, {args.reader_epochs} epoch(s) of batch "
                f"{args.reader_batch_size} x {args.reader_passages} passages, "
                f"learning rate {args.reader_learning_rate}.")
    lines = [
        f"# SQuAD-open: retrievers side by side ({datetime.now():%Y-%m-%d}, {os.cpu_count()} CPUs)",
        "",
        f"Data: `{data}`. {settings}",
        "",
        markdown_table(curves, n_questions),
        "",
        f"Reader exact match on {n_reader_questions} dev questions (passages of the DPR-trained retriever): "
        f"{em_summary}.",
        "",
        f"Plot: `{plot.name}`." if not args.no_plot else "No plot (--no_plot).",
        "",
        f"## Timings (total {format_seconds(total)})",
        "",
        "| stage | wall time |",
        "|---|---:|",
        *(f"| {stage.name} | {format_seconds(stage.seconds)} |" for stage in pipeline.stages),
        "",
        "## Commands",
        "",
        "```",
        *(stage.command for stage in pipeline.stages),
        "```",
        "",
    ]
    report = run_dir / "squad_open.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    print("\n" + markdown_table(curves, n_questions))
    print(f"Reader EM on {n_reader_questions} dev questions: {em_summary}")
    print(f"Done in {format_seconds(total)}. Report: {report}" + ("" if args.no_plot else f"; plot: {plot}"))


if __name__ == "__main__":
    main()
