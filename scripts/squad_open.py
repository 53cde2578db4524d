#!/usr/bin/env python3
"""SQuAD-open side by side: BM25, the untrained MiniLM encoder, a MiniLM bi-encoder trained as DPR (gradient
cache) and the BM25 + DPR hybrid, plus an extractive reader trained on the trained retriever's results.

    python scripts/squad_open.py --data ../shared/data/squad_open            (`make squad-open DATA=...`)
    python scripts/squad_open.py --recipe full                   (`make squad-open ARGS="--recipe full"`)

DATA holds DPR-format files: psgs.tsv, biencoder-train.json, train.qa.csv, dev.qa.csv (built from the official
SQuAD v1.1 dev file by `python squad_to_dpr.py --squad_file data.squad1.dev --output_dir DATA --dev_fraction 0.2`),
and for the full recipe psgs_plus_wikitext2.tsv (the same passages and 2,064 WikiText-2 distractors).
The entry scripts run as subprocesses, each command printed before it runs (--dry_run: printed only); everything
lands in --run_dir: squad_open.md (the top-k tables, reader EM, settings, timings and commands) and
topk_accuracy.png (accuracy against k). Each finished stage is recorded in RUN_DIR/stages/ with its command and
the identity of every file it reads; run the same command again with the same --run_dir after an interruption and
the finished stages are skipped (a stage whose command or any of whose files changed runs again from scratch, its
earlier checkpoints and saved indexes removed, and so does every stage after it). One run at a time uses a
--run_dir; ending the script (Ctrl-C, SIGTERM) ends the stage it is running.

Two recipes set the defaults; any option given explicitly wins:
  short (default, about 10 minutes on 2 idle CPU cores): 800 random training questions, 1 epoch of batch 16 (gradient
    cache, chunks 8/8), DPR's encoder ([CLS] pooling, dot product, two towers), the psgs.tsv collection; a short
    reader (1,200 questions, 2 passages each, EM on 500 dev questions).
  full: all 6,534 training questions, 2 epochs of batch 128 (DPR's batch; chunks 32/16), MiniLM as it was
    pre-trained (mean pooling, cosine similarity at temperature 0.05, one shared tower); both collections; then
    hard negatives mined with the trained model (mine_hard_negatives.py, ranks 3-30, 5 per question, kept beside
    the BM25 ones) and the first model trained further on them for 2 epochs at learning rate 5e-5 (DPR's
    adversarial NQ model was trained on hard negatives mined with its first model; --hn_init pretrained starts
    this round from the pretrained MiniLM instead); the reader (4,000 training questions retrieved by the
    final retriever, 3 passages each, 2 epochs of batch 8 at learning rate 2e-4, EM on 700 dev questions from the
    top passage and the top 20).
    Wall time measured on this machine (2 CPU cores with AMX-BF16, bf16 autocast, 2026-11-30): a bi-encoder step
    of 128 questions takes 26-38 s (26-29 s on otherwise idle cores), so each round of 102 steps takes 45-65 min;
    the reader about 1 h (988 steps of about 3 s, and EM over 700 x 20 passages after each epoch, about
    4.5 min each); the embeddings, retrievals and mining about 5 min. About 3 h in all on otherwise idle cores,
    several times that under load (docs/quickstart.md).
"""
import argparse
import json
import os
import random
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # runnable from anywhere: the `dpr` package of this checkout
# light imports (no torch): --help and the input checks answer at once
from dpr.foundation.errors import user_errors_in_one_line  # noqa: E402
from dpr.foundation.files import atomic_output, ensure_writable_directory, remove_stale_temporaries  # noqa: E402
from dpr.foundation.process_groups import end_orphan_process_group, ending_raises, run_in_process_group  # noqa: E402
from dpr.foundation.run_lock import RunLock, run_lock  # noqa: E402
from dpr.foundation.stage_records import (DamagedStageRecordError, StageRecord, input_identities,  # noqa: E402
                                          read_stage_record, stage_record_path, write_stage_record)

TOP_KS = (1, 5, 20, 50, 100)
DATA_FILES = ("psgs.tsv", "biencoder-train.json", "train.qa.csv", "dev.qa.csv")
DISTRACTOR_COLLECTION = "psgs_plus_wikitext2.tsv"
RETRIEVER_LABELS = {"bm25": "BM25", "hybrid": "hybrid"}  # in stage names
IN_BATCH_NEGATIVES = ("all", "mask_duplicates", "mask_answers")  # dpr/training/false_negatives.py (needs torch)
MATPLOTLIB_MISSING = ("matplotlib is needed for the plot: pip install matplotlib (the install's demo extra has it), "
                      "or pass --no_plot")

# Each recipe's defaults for the options left unset on the command line.
RECIPES = {
    "short": dict(max_train_questions=800, epochs=1, batch_size=16, q_chunk_size=8, ctx_chunk_size=8,
                  learning_rate=3e-5, pooling="cls", similarity="dot", temperature=1.0, share_encoders=False,
                  distractors=False, hard_negative_round=False, hn_init="pretrained", reader_recipe="short"),
    "full": dict(max_train_questions=0, epochs=2, batch_size=128, q_chunk_size=32, ctx_chunk_size=16,
                 learning_rate=3e-5, pooling="mean", similarity="cosine", temperature=0.05, share_encoders=True,
                 distractors=True, hard_negative_round=True, hn_init="first_round", hn_epochs=2, hn_learning_rate=5e-5,
                 reader_recipe="full"),
}
READER_RECIPES = {
    "short": dict(reader_train_questions=1200, reader_dev_questions=500, reader_epochs=1, reader_batch_size=4,
                  reader_passages=2, reader_eval_passages=5, reader_learning_rate=1e-4, reader_warmup_steps=10),
    "full": dict(reader_train_questions=4000, reader_dev_questions=700, reader_epochs=2, reader_batch_size=8,
                 reader_passages=3, reader_eval_passages=20, reader_learning_rate=2e-4, reader_warmup_steps=100),
}


def true_or_false(value: str) -> bool:
    if value not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, not {value!r}")
    return value == "true"


def fill_unset(args: argparse.Namespace, defaults: Dict[str, object]) -> None:
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/squad_open", help="folder of the DPR-format files")
    parser.add_argument("--run_dir", help="output folder (default runs/squad-open-<timestamp>)")
    parser.add_argument("--recipe", choices=tuple(RECIPES), default="short",
                        help="the defaults of the options below marked (recipe) (see above)")
    parser.add_argument("--dry_run", action="store_true", help="print the commands without running them")
    parser.add_argument("--sequence_length", type=int, default=256, help="bi-encoder and reader sequence length")
    parser.add_argument("--num_shards", type=int, default=2, help="passage embedding shards")
    parser.add_argument("--distractors", type=true_or_false, metavar="true|false",
                        help=f"(recipe) also retrieve from {DISTRACTOR_COLLECTION}")
    train = parser.add_argument_group("bi-encoder training (gradient cache)")
    train.add_argument("--max_train_questions", type=int,
                       help="(recipe) random training questions of biencoder-train.json (0: all 6,534)")
    train.add_argument("--epochs", type=int, help="(recipe)")
    train.add_argument("--batch_size", type=int, help="(recipe)")
    train.add_argument("--q_chunk_size", type=int, help="(recipe)")
    train.add_argument("--ctx_chunk_size", type=int, help="(recipe)")
    train.add_argument("--learning_rate", type=float, help="(recipe)")
    train.add_argument("--in_batch_negatives", choices=IN_BATCH_NEGATIVES, default="all",
                       help="train.in_batch_negatives of both rounds: all (DPR's), or in-batch false negatives "
                            "masked: copies of a question's gold passage (mask_duplicates), and also passages "
                            "holding its answer (mask_answers)")
    encoder = parser.add_argument_group("the encoder (conf/encoder/hf_bert.yaml)")
    encoder.add_argument("--pooling", choices=("cls", "mean"), help="(recipe) MiniLM was pre-trained with mean")
    encoder.add_argument("--similarity", choices=("dot", "cosine"), help="(recipe)")
    encoder.add_argument("--temperature", type=float, help="(recipe) divides cosine scores in the loss")
    encoder.add_argument("--share_encoders", type=true_or_false, metavar="true|false",
                         help="(recipe) one tower for questions and passages")
    mining = parser.add_argument_group("second round on hard negatives mined with the first model")
    mining.add_argument("--hard_negative_round", type=true_or_false, metavar="true|false", help="(recipe)")
    mining.add_argument("--hn_init", choices=("pretrained", "first_round"),
                        help="(recipe) the second round starts from the pretrained MiniLM or from the first model")
    mining.add_argument("--hn_epochs", type=int, help="(recipe full: 2) epochs of the second round (default: --epochs)")
    mining.add_argument("--hn_learning_rate", type=float,
                        help="(recipe full: 5e-5) of the second round (default: --learning_rate)")
    mining.add_argument("--mine_rank_from", type=int, default=3,
                        help="first rank mined (the top ranks hold most false negatives)")
    mining.add_argument("--mine_rank_to", type=int, default=30)
    mining.add_argument("--num_hard_negatives", type=int, default=5, help="mined per question")
    reader = parser.add_argument_group("reader")
    reader.add_argument("--reader_recipe", choices=tuple(READER_RECIPES),
                        help="(recipe) the defaults of the reader options marked (reader recipe)")
    reader.add_argument("--reader_train_questions", type=int,
                        help="(reader recipe) random questions of train.qa.csv, retrieved for and trained on (0: all)")
    reader.add_argument("--reader_dev_questions", type=int,
                        help="(reader recipe) dev questions EM is measured on (0: all)")
    reader.add_argument("--reader_epochs", type=int, help="(reader recipe)")
    reader.add_argument("--reader_batch_size", type=int, help="(reader recipe) questions per step")
    reader.add_argument("--reader_passages", type=int, help="(reader recipe) passages per training question")
    reader.add_argument("--reader_eval_passages", type=int,
                        help="(reader recipe) EM is reported for the answer from the top passage and from this "
                             "many top passages")
    reader.add_argument("--reader_learning_rate", type=float,
                        help="(reader recipe) higher than DPR's 1e-5, which is for tens of thousands of steps")
    reader.add_argument("--reader_warmup_steps", type=int, help="(reader recipe)")
    parser.add_argument("--bf16", choices=("auto", "true", "false"), default="auto",
                        help="bf16 autocast for training and encoding (auto: when the CPU has AMX or AVX512-BF16)")
    parser.add_argument("--seed", type=int, default=12345, help="seed of the question samples")
    parser.add_argument("--no_plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    args = parser.parse_args(argv)
    fill_unset(args, RECIPES[args.recipe])
    fill_unset(args, READER_RECIPES[args.reader_recipe])
    if args.hn_epochs is None:
        args.hn_epochs = args.epochs
    if args.hn_learning_rate is None:
        args.hn_learning_rate = args.learning_rate
    args.data_path = Path(args.data).resolve()
    return args


@dataclass
class Stage:
    name: str
    seconds: float
    command: str


@dataclass
class Pipeline:
    """Runs the entry scripts from the repository root, recording each command and its wall time (with dry_run,
    prints and records the commands only)."""
    run_dir: Path
    common_overrides: List[str]  # appended to every command
    dry_run: bool = False
    stages: List[Stage] = field(default_factory=list)
    on_stage_start: Callable[[int], None] = lambda process_group: None  # told each stage's process group

    def run(self, name: str, script: str, *args: str, inputs: Sequence[Optional[Path]] = (),
            outputs: Sequence[Path] = (), resumable: bool = True) -> None:
        """Run one stage, unless an earlier run into the same run_dir finished this very command on the same
        `inputs`: a rerun after an interruption (or with only later stages changed) resumes where the work stopped.
        A stage that runs makes every later stage run again (they read its new outputs).

        `inputs` are every file the command reads (None: none there): the data files, the question samples this
        script writes, the checkpoint it starts from; their identities (`stage_records.input_identities`: the
        sha256 of every byte, read again only when the file is not the very one, untouched since, that the earlier
        record saw) are recorded beside the command. `outputs` are folders the stage would read back
        if they held an earlier run's files (checkpoints a trainer resumes from, a saved index a retriever loads):
        they are removed before the stage runs, unless the stage is `resumable` and this very command resuming
        after an interruption."""
        args = (*args, *self.common_overrides)
        command = [sys.executable, script, *args]
        shown = shlex.join(["python", script, *args])
        record = stage_record_path(self.run_dir / "stages", len(self.stages))
        earlier = None if self.dry_run else read_earlier_stage(record)
        identities = {} if self.dry_run else input_identities(inputs, earlier.inputs if earlier else None)
        if earlier is not None and earlier.done_as(shown, identities):
            print(f"\n= {shown}\n  (done by an earlier run in {format_seconds(earlier.seconds)}: {record})",
                  flush=True)
            self.stages.append(Stage(name, earlier.seconds, shown))
            return
        print(f"\n+ {shown}", flush=True)
        if not self.dry_run:
            if not (earlier is not None and earlier.same_as(shown, identities) and resumable):
                for folder in outputs:
                    if folder.exists():
                        print(f"  (removing {folder}: an earlier run's outputs)", flush=True)
                        shutil.rmtree(folder)
            # started: an interrupted stage resumes its outputs; the stages after it run again
            write_stage_record(record, StageRecord(name, shown, identities, None))
        started = time.perf_counter()
        if not self.dry_run and run_command(command, self.on_stage_start) != 0:
            sys.exit(f"squad_open: '{name}' failed; its log is under {self.run_dir / 'logs'}")
        stage = Stage(name, time.perf_counter() - started, shown)
        self.stages.append(stage)
        if not self.dry_run:
            write_stage_record(record, StageRecord(name, shown, identities, stage.seconds))

    def hydra_dir(self, name: str) -> str:
        """Where hydra keeps a step's log and resolved config (not in the repository's outputs/)."""
        return f"hydra.run.dir={self.run_dir / 'logs' / name}"


def read_earlier_stage(record: Path) -> Optional[StageRecord]:
    """An earlier run's record of a stage; None when there is none, or when it is damaged (the stage then runs
    again)."""
    try:
        return read_stage_record(record)
    except DamagedStageRecordError:
        print(f"  ({record} is damaged: the stage runs again)", flush=True)
        return None


def run_command(command: List[str], on_start: Callable[[int], None]) -> int:
    """Run a stage from the repository root in its own process group (`on_start` is told its id); ending the script
    ends the group."""
    return run_in_process_group(command, REPO, on_start)


def take_over_orphan_stage(lock: Optional[RunLock], run_dir: Path) -> None:
    """End the stage a `kill -9`ed run into run_dir left running, as its lock record names it: on this host only (a
    run_dir on a shared disk may have been run from another node, whose process groups mean nothing here)."""
    earlier = lock.earlier if lock is not None else None
    if earlier is None or earlier.process_group is None:
        return
    if not earlier.on_this_host:
        print(f"  (a killed run on {earlier.host} may have left its stage, process group {earlier.process_group}, "
              f"running there: end it on {earlier.host} if it still writes into {run_dir})", flush=True)
    elif end_orphan_process_group(earlier.process_group, str(run_dir)):
        print(f"  (ended process group {earlier.process_group}: a stage of a killed run into {run_dir}, still "
              "running)", flush=True)


@dataclass(frozen=True)
class Collection:
    """A passage collection and where each model's files for it go: the first one (psgs.tsv) under the plain
    names, another one under names with its stem."""
    path: Path
    first: bool

    @property
    def stem(self) -> str:
        return self.path.stem

    def suffixed(self, name: str, separator: str = "_") -> str:
        return name if self.first else f"{name}{separator}{self.stem}"

    def embeddings(self, model_dir: Path) -> Path:
        """The shard prefix: {model_dir}/embs/psgs_0, {model_dir}/embs_psgs_plus_wikitext2/psgs_plus_wikitext2_0."""
        return model_dir / self.suffixed("embs") / self.stem

    def results(self, model_dir: Path) -> Path:
        return model_dir / f"{self.suffixed('dev', '.')}.json"


@dataclass(frozen=True)
class Retriever:
    """A row group of the report: a model (untrained: the configured encoder; else a checkpoint) and its rows,
    keyed by the retriever names dense_retriever.py writes (dense, bm25, hybrid)."""
    key: str  # folder under run_dir and log name
    label: str  # in stage names
    rows: Dict[str, str]  # retriever -> report row
    model_file: Optional[Path] = None
    retriever_name: str = ""  # in the report's prose


def random_subset(items: list, n: int, seed: int) -> list:
    """n random items (all when n is 0 or too large), in their original order."""
    if n <= 0 or n >= len(items):
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


def subset_json(src: Path, dst: Path, n: int, seed: int, max_ctxs: Optional[int] = None,
                write: bool = True) -> int:
    """Write n random records of a JSON list (retriever training data or results) to dst (unless not `write`);
    with max_ctxs, each record keeps only its first max_ctxs retrieved passages. Returns the record count."""
    with open(src, encoding="utf-8") as f:
        records = random_subset(json.load(f), n, seed)
    if max_ctxs is not None:
        records = [{**record, "ctxs": record["ctxs"][:max_ctxs]} for record in records]
    if write:
        write_if_changed(dst, json.dumps(records))
    return len(records)


def subset_lines(src: Path, dst: Path, n: int, seed: int, write: bool = True) -> int:
    with open(src, encoding="utf-8") as f:
        lines = random_subset(f.readlines(), n, seed)
    if write:
        write_if_changed(dst, "".join(lines))
    return len(lines)


def write_if_changed(dst: Path, text: str) -> None:
    """Write `text` to dst (atomically) unless it holds it already: an unchanged input keeps its mtime, so a rerun
    does not take the stages that read it (and the reader's samples made from it) for stale."""
    if dst.is_file() and dst.read_bytes() == text.encode("utf-8"):
        return
    write_text_atomically(dst, text)


def write_text_atomically(path: Path, text: str) -> None:
    with atomic_output(path) as temp_name:
        Path(temp_name).write_text(text, encoding="utf-8")


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


def masked_pairs_per_step(output_dir: Path) -> Optional[float]:
    """The mean number of in-batch false negatives masked per step of a training run (its records); None when it
    masked none (train.in_batch_negatives=all) or left no records."""
    from dpr.training.trainer_base import RECORDS_FILE

    path = output_dir / RECORDS_FILE
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    counts = [r["masked_pairs"] for r in records if r.get("kind") == "step" and r.get("masked_pairs") is not None]
    return sum(counts) / len(counts) if counts else None


def markdown_table(curves: Dict[str, List[float]], n_questions: int) -> str:
    header = "| retriever | " + " | ".join(f"top-{k}" for k in TOP_KS) + " |"
    rows = [header, "|---|" + "---:|" * len(TOP_KS)]
    for name, accuracy in curves.items():
        rows.append(f"| {name} | " + " | ".join(f"{accuracy[k - 1]:.2f}" for k in TOP_KS) + " |")
    caption = f"Top-k accuracy (%) on {n_questions} dev questions: an answer string in a top-k passage."
    return "\n".join(rows) + "\n\n" + caption


def plot_curves(collections: Dict[str, Dict[str, List[float]]], n_questions: int, path: Path) -> None:
    """One panel per passage collection, one curve per retriever."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(collections), figsize=(6.4 * len(collections), 4.2), squeeze=False)
    for ax, (collection, curves) in zip(axes[0], collections.items()):
        for name, accuracy in curves.items():
            ax.plot(range(1, len(accuracy) + 1), accuracy, label=name)
        ax.set_xscale("log")
        ax.set_xticks(TOP_KS, [str(k) for k in TOP_KS])
        ax.set_xlabel("k (retrieved passages)")
        ax.set_ylabel("top-k accuracy (%)")
        ax.set_title(f"SQuAD-open dev, {n_questions} questions, {collection}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    with atomic_output(path) as temp_name:
        fig.savefig(temp_name, dpi=120, format="png")
    plt.close(fig)


def format_seconds(seconds: float) -> str:
    hours, rest = divmod(round(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def encoder_overrides(args: argparse.Namespace) -> List[str]:
    """The encoder of the untrained rows and of training: MiniLM with the chosen spec (a checkpoint carries its own)."""
    return ["encoder=minilm", f"encoder.sequence_length={args.sequence_length}", f"encoder.pooling={args.pooling}",
            f"encoder.similarity={args.similarity}", f"encoder.temperature={args.temperature}",
            f"encoder.share_encoders={str(args.share_encoders).lower()}"]


def shard_sweep(args: argparse.Namespace) -> List[str]:
    return ["shard_id=" + ",".join(str(i) for i in range(args.num_shards)), f"num_shards={args.num_shards}"]


def embed_and_retrieve(pipeline: Pipeline, args: argparse.Namespace, retriever: Retriever,
                       collections: Sequence[Collection]) -> None:
    """Embed every collection with the retriever's model and retrieve for the dev questions; the dense index is
    saved ({model}/index/), BM25's too (bm25_index/, built by the first retriever that asks for it)."""
    model_dir = pipeline.run_dir / retriever.key
    model = [f"model_file={retriever.model_file}"] if retriever.model_file else encoder_overrides(args)
    for collection in collections:
        embeddings = collection.embeddings(model_dir)
        pipeline.run(f"embed {'passages' if collection.first else collection.path.name}, {retriever.label}",
                     "generate_dense_embeddings.py", "-m", *model, f"ctx_src={collection.path}",
                     f"out_file={embeddings}", *shard_sweep(args),
                     f"hydra.sweep.dir={pipeline.run_dir / 'logs' / collection.suffixed('embed_' + retriever.key)}",
                     inputs=[collection.path, retriever.model_file],
                     outputs=[embeddings.parent])  # else fewer shards than before would leave stale ones to the glob
        where = "" if collection.first else f" ({collection.path.name})"
        others = " and ".join(RETRIEVER_LABELS[name] for name in list(retriever.rows)[1:])
        bm25_index = pipeline.run_dir / collection.suffixed("bm25_index")
        indexes = [model_dir / collection.suffixed("index")]
        if "bm25" in retriever.rows:  # the retriever reporting BM25 builds its index; the hybrid one loads it
            indexes.append(bm25_index)
        pipeline.run(f"retrieve dev{where}: {retriever.label} and {others}",
                     "dense_retriever.py", *model, f"qa_dataset={args.data_path / 'dev.qa.csv'}",
                     f"ctx_datatsets=[{collection.path}]", f"encoded_ctx_files=[{embeddings}_*]",
                     f"retriever=[{','.join(retriever.rows)}]",
                     f"bm25_index_path={bm25_index}",
                     f"index_path={model_dir / collection.suffixed('index')}/", f"out_file={collection.results(model_dir)}",
                     pipeline.hydra_dir(collection.suffixed("retrieve_" + retriever.key)),
                     inputs=[args.data_path / "dev.qa.csv", collection.path, retriever.model_file],
                     outputs=indexes, resumable=False)  # an index half-saved by a killed run must not be loaded


def train_biencoder(pipeline: Pipeline, args: argparse.Namespace, name: str, train_json: Path, n_train: int,
                    epochs: int, learning_rate: float, output_dir: Path, init_from: Optional[Path] = None) -> Path:
    """DPR training with the gradient cache, from the pretrained MiniLM or from the weights of checkpoint
    `init_from` (with a fresh optimizer and schedule); returns the last epoch's checkpoint."""
    total_steps = epochs * (n_train // args.batch_size)
    start = ([f"model_file={init_from}", "ignore_checkpoint_offset=true", "ignore_checkpoint_optimizer=true",
              "ignore_checkpoint_lr=true"] if init_from else [])
    # DPR's `all` is the trainer's default: left out, the command of earlier runs stays the same (not run again)
    masking = [] if args.in_batch_negatives == "all" else [f"train.in_batch_negatives={args.in_batch_negatives}"]
    pipeline.run(name, "train_dense_encoder.py", *encoder_overrides(args), *start,
                 f"train_datasets=[{train_json}]", f"train.batch_size={args.batch_size}", "train.grad_cache=true",
                 f"train.q_chunk_size={args.q_chunk_size}", f"train.ctx_chunk_size={args.ctx_chunk_size}",
                 f"train.num_train_epochs={epochs}", f"train.learning_rate={learning_rate}",
                 f"train.warmup_steps={max(1, total_steps // 10)}", "train.log_batch_step=5", *masking,
                 f"output_dir={output_dir}", pipeline.hydra_dir(output_dir.name), inputs=[train_json, init_from],
                 outputs=[output_dir])
    return output_dir / f"dpr_biencoder.{epochs - 1}"


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    data = args.data_path
    needed = DATA_FILES + ((DISTRACTOR_COLLECTION,) if args.distractors else ())
    missing = [name for name in needed if not (data / name).is_file()]
    if missing:
        sys.exit(f"{data} lacks {', '.join(missing)}; build them from the SQuAD v1.1 dev file with\n"
                 f"  python squad_to_dpr.py --squad_file data.squad1.dev --output_dir {args.data} --dev_fraction 0.2"
                 + ("\n(or run without the distractor collection: --distractors false)"
                    if DISTRACTOR_COLLECTION in missing else ""))
    if not args.no_plot and not args.dry_run:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            sys.exit(MATPLOTLIB_MISSING)  # before the hours of work, not after

    run_dir = Path(args.run_dir or f"runs/squad-open-{datetime.now():%Y%m%d-%H%M%S}")
    run_dir = (run_dir if run_dir.is_absolute() else Path.cwd() / run_dir).resolve()
    if args.dry_run:
        run_recipe(args, run_dir)
        return
    ensure_writable_directory(run_dir, "--run_dir")
    with run_lock(run_dir, "--run_dir") as lock, ending_raises():
        take_over_orphan_stage(lock, run_dir)
        note_stage = lock.note_process_group if lock is not None else (lambda process_group: None)
        for folder, name_prefix in ((run_dir, ""), (run_dir / "stages", ""), (run_dir / "data", ""),
                                    (run_dir / "reader", "dev.json")):
            remove_stale_temporaries(folder, name_prefix)  # of this script's writes killed in an earlier run
        run_recipe(args, run_dir, note_stage)


def run_recipe(args: argparse.Namespace, run_dir: Path,
               note_stage: Callable[[int], None] = lambda process_group: None) -> None:
    data = args.data_path
    write = not args.dry_run
    subsets = run_dir / "data"
    use_bf16 = cpu_has_bf16() if args.bf16 == "auto" else args.bf16 == "true"
    pipeline = Pipeline(run_dir, [f"bf16={str(use_bf16).lower()}"], dry_run=args.dry_run, on_stage_start=note_stage)
    collections = [Collection(data / "psgs.tsv", True)]
    if args.distractors:
        collections.append(Collection(data / DISTRACTOR_COLLECTION, False))
    psgs = collections[0]

    # 1. The untrained MiniLM (with the recipe's pooling) and BM25: both zero-shot.
    untrained = Retriever("untrained", "untrained MiniLM", {"dense": "MiniLM, untrained", "bm25": "BM25"})
    embed_and_retrieve(pipeline, args, untrained, collections)

    # 2. DPR training with the gradient cache on a random sample of the training questions.
    train_json = subsets / "biencoder-train.json"
    n_train = subset_json(data / "biencoder-train.json", train_json, args.max_train_questions, args.seed, write=write)
    model = train_biencoder(pipeline, args, "train bi-encoder (gradient cache)", train_json, n_train, args.epochs,
                            args.learning_rate, run_dir / "biencoder")
    trained = Retriever("trained", "trained encoder",
                        {"dense": "MiniLM, DPR-trained", "hybrid": "hybrid (BM25 + DPR-trained)"}, model,
                        "DPR-trained retriever")
    embed_and_retrieve(pipeline, args, trained, collections)
    retrievers = [untrained, trained]

    # 3. DPR's second round: hard negatives mined with the first model, and a model trained on them (mixed with
    # the BM25 ones), from the first model's weights or from the pretrained MiniLM.
    if args.hard_negative_round:
        mined_json = subsets / "biencoder-train-mined.json"
        pipeline.run("mine hard negatives with the trained encoder", "mine_hard_negatives.py", f"model_file={model}",
                     f"input_file={train_json}", f"ctx_datatsets=[{psgs.path}]",
                     f"encoded_ctx_files=[{psgs.embeddings(run_dir / trained.key)}_*]",
                     f"index_path={run_dir / trained.key / 'index'}/", f"out_file={mined_json}",
                     f"mine_rank_from={args.mine_rank_from}", f"mine_rank_to={args.mine_rank_to}",
                     f"num_hard_negatives={args.num_hard_negatives}", "keep_existing_hard_negatives=true",
                     pipeline.hydra_dir("mine_hard_negatives"), inputs=[model, train_json, psgs.path])
        model = train_biencoder(pipeline, args, "train bi-encoder on mined hard negatives", mined_json, n_train,
                                args.hn_epochs, args.hn_learning_rate, run_dir / "biencoder_hn",
                                init_from=model if args.hn_init == "first_round" else None)
        second = Retriever("trained_hn", "encoder trained on mined negatives",
                           {"dense": "MiniLM, DPR-trained on mined negatives",
                            "hybrid": "hybrid (BM25 + trained on mined negatives)"}, model,
                           "retriever trained on mined negatives")
        embed_and_retrieve(pipeline, args, second, collections)
        retrievers.append(second)
    final = retrievers[-1]

    # 4. The reader, trained on the final retriever's results for training questions.
    reader_train_qa = subsets / "reader-train.qa.csv"
    subset_lines(data / "train.qa.csv", reader_train_qa, args.reader_train_questions, args.seed + 1, write=write)
    pipeline.run("retrieve reader training questions", "dense_retriever.py", f"model_file={model}",
                 f"qa_dataset={reader_train_qa}", f"ctx_datatsets=[{psgs.path}]",
                 f"index_path={run_dir / final.key / 'index'}/", "n_docs=20",
                 f"out_file={run_dir / 'reader' / 'train.json'}", pipeline.hydra_dir("retrieve_reader"),
                 inputs=[model, reader_train_qa, psgs.path])
    reader_dev = run_dir / "reader" / "dev.json"
    if write:
        subset_json(psgs.results(run_dir / final.key), reader_dev, args.reader_dev_questions, args.seed + 2,
                    max_ctxs=args.reader_eval_passages)
    predictions = run_dir / "reader" / "dev_predictions.json"
    pipeline.run("train reader and measure EM", "train_reader.py", "encoder=minilm",
                 f"encoder.sequence_length={args.sequence_length}",
                 f"train_files={run_dir / 'reader' / 'train.json'}", f"dev_files={reader_dev}",
                 f"train.batch_size={args.reader_batch_size}", f"passages_per_question={args.reader_passages}",
                 f"train.num_train_epochs={args.reader_epochs}", f"train.learning_rate={args.reader_learning_rate}",
                 f"train.warmup_steps={args.reader_warmup_steps}", "train.log_batch_step=10",
                 f"passages_per_question_predict={args.reader_eval_passages}",
                 f"eval_top_docs=[{','.join(map(str, sorted({1, args.reader_eval_passages})))}]", "num_workers=2",
                 f"output_dir={run_dir / 'reader' / 'model'}", f"prediction_results_file={predictions}",
                 pipeline.hydra_dir("train_reader"), inputs=[run_dir / "reader" / "train.json", reader_dev],
                 outputs=[run_dir / "reader" / "model"])
    if args.dry_run:
        return
    total = sum(stage.seconds for stage in pipeline.stages)  # with the recorded times of stages a rerun skipped
    write_report(args, run_dir, pipeline, collections, retrievers, predictions, n_train, use_bf16, total)


def write_report(args: argparse.Namespace, run_dir: Path, pipeline: Pipeline, collections: Sequence[Collection],
                 retrievers: Sequence[Retriever], predictions: Path, n_train: int, use_bf16: bool,
                 total: float) -> None:
    from dpr.indexing.dense_retriever import results_path  # the file of each retriever of a run

    curves: Dict[str, Dict[str, List[float]]] = {}  # collection -> row -> accuracy by k
    n_questions = 0
    for collection in collections:
        rows: Dict[str, List[float]] = {}
        for retriever in retrievers:
            out_file = str(collection.results(run_dir / retriever.key))
            files = {name: results_path(out_file, name, position == 0) for position, name in enumerate(retriever.rows)}
            for name in sorted(retriever.rows, key=lambda name: name != "bm25"):  # BM25 heads the table
                rows[retriever.rows[name]], n_questions = accuracy_by_k(files[name])
        curves[collection.path.name] = rows
    ems, n_reader_questions = reader_exact_match(predictions)
    em_summary = ", ".join(f"{ems[n]:.2f} from the top {f'{n} passages' if n > 1 else 'passage'}" for n in sorted(ems))
    plot = run_dir / "topk_accuracy.png"
    if not args.no_plot:
        plot_curves(curves, n_questions, plot)

    total_steps = args.epochs * (n_train // args.batch_size)
    encoder = (f"MiniLM, {args.pooling} pooling, {args.similarity} similarity"
               + (f" at temperature {args.temperature}" if args.similarity == "cosine" else "")
               + (", one shared tower" if args.share_encoders else ", two towers"))
    settings = (f"Recipe: {args.recipe}. Encoder: {encoder}. "
                f"Bi-encoder: {n_train} training questions, {args.epochs} epoch(s) of batch {args.batch_size} "
                f"({total_steps} steps), gradient cache with chunks q={args.q_chunk_size} ctx={args.ctx_chunk_size}, "
                f"learning rate {args.learning_rate}, sequence length {args.sequence_length}, 1 hard negative, "
                f"{'bf16 autocast' if use_bf16 else 'fp32'}, in-batch negatives: {args.in_batch_negatives}")
    masked = masked_pairs_per_step(run_dir / "biencoder")
    settings += (f" ({masked:.1f} masked (question, passage) pairs per step of the first round). " if masked is not None
                 else ". ")
    if args.hard_negative_round:
        settings += (f"Second round: up to {args.num_hard_negatives} hard negatives per question mined with the first "
                     f"model from ranks {args.mine_rank_from}-{args.mine_rank_to} (no answer, no positive), kept "
                     f"beside the BM25 ones; "
                     + ("the first model trained further on them" if args.hn_init == "first_round"
                        else "a new model trained on them from the pretrained MiniLM")
                     + f", {args.hn_epochs} epoch(s) at learning rate {args.hn_learning_rate}, otherwise the same "
                     "settings. ")
    settings += (f"Reader ({args.reader_recipe} recipe): {args.reader_train_questions or 'all'} training questions "
                 f"retrieved by the {retrievers[-1].retriever_name}, {args.reader_epochs} epoch(s) of batch "
                 f"{args.reader_batch_size} x {args.reader_passages} passages, "
                 f"learning rate {args.reader_learning_rate}.")
    tables = []
    for collection, rows in curves.items():
        if len(curves) > 1:
            tables += [f"### {collection}", ""]
        tables += [markdown_table(rows, n_questions), ""]
    lines = [
        f"# SQuAD-open: retrievers side by side ({datetime.now():%Y-%m-%d}, {os.cpu_count()} CPUs)",
        "",
        f"Data: `{args.data_path}`. {settings}",
        "",
        *tables,
        f"Reader exact match on {n_reader_questions} dev questions (passages of the {retrievers[-1].retriever_name}"
        f"{', psgs.tsv' if len(collections) > 1 else ''}): {em_summary}.",
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
    write_text_atomically(report, "\n".join(lines))
    print("\n" + "\n".join(tables))
    print(f"Reader EM on {n_reader_questions} dev questions: {em_summary}")
    print(f"Done in {format_seconds(total)}. Report: {report}" + ("" if args.no_plot else f"; plot: {plot}"))


if __name__ == "__main__":
    try:
        with user_errors_in_one_line():
            main()
    except KeyboardInterrupt:
        sys.exit("squad_open: interrupted, its running stage ended; run the same command again to resume")
