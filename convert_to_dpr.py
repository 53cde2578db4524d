#!/usr/bin/env python3
"""Convert a BEIR, MS MARCO, pairs or tevatron collection into DPR's files: psgs.tsv, biencoder-{train,dev}.json,
{split}.queries.jsonl and {split}.qrels.tsv (docs/own_data.md). E.g.

    python convert_to_dpr.py --format beir --input scifact --out_dir scifact_dpr --negatives bm25 --num_negatives 7
    python convert_to_dpr.py --format msmarco --input msmarco-passage --out_dir msmarco_dpr
    python convert_to_dpr.py --format pairs --input pairs.tsv --out_dir pairs_dpr
    python convert_to_dpr.py --format tevatron --input train.jsonl --out_dir tevatron_dpr
"""
import argparse
import sys
from pathlib import Path

# Runnable as a plain script from anywhere: make the repository's `dpr` package importable.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dpr.foundation.errors import user_errors_in_one_line  # noqa: E402
from dpr.foundation.logging import setup_logging  # noqa: E402
from dpr.interop.convert import ConvertOptions, convert  # noqa: E402
from dpr.interop.formats import FORMATS  # noqa: E402
from dpr.interop.negatives import SAMPLING, NegativeOptions  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", required=True, choices=FORMATS, help="the input's format")
    parser.add_argument("--input", required=True,
                        help="beir, msmarco: the collection's folder; pairs, tevatron: the file")
    parser.add_argument("--out_dir", required=True,
                        help="the folder written (replaced as a whole): new, empty or a previous conversion")
    parser.add_argument("--splits", nargs="+", help="the splits converted (default: every split of the input)")
    parser.add_argument("--biencoder_splits", nargs="*", default=["train", "dev"],
                        help="the splits that also get DPR's training JSON biencoder-{split}.json")
    parser.add_argument("--split", default="train", help="pairs, tevatron: the name of the file's one split")
    parser.add_argument("--skip_unknown_qrels", action="store_true",
                        help="skip (and count) qrels lines naming a query or passage the input lacks, instead of "
                             "refusing the input")
    parser.add_argument("--negatives", default="none", choices=("none", "bm25", "dense"),
                        help="hard negatives mined for the training JSON: none, BM25 or a trained bi-encoder's")
    parser.add_argument("--num_negatives", type=int, default=30, help="mined hard negatives per query (at most)")
    parser.add_argument("--negatives_from_rank", type=int, default=1,
                        help="the first rank (1-based) negatives are taken from: skip the top, where unjudged "
                             "relevant passages gather")
    parser.add_argument("--negatives_to_rank", type=int, default=100, help="the last rank negatives are taken from")
    parser.add_argument("--max_negative_score_ratio", type=float, default=None,
                        help="drop a candidate scoring above this fraction of the query's (lowest) positive score, "
                             "e.g. 0.95 (BM25 scores for bm25, the bi-encoder's for dense)")
    parser.add_argument("--negatives_sampling", default="top", choices=SAMPLING,
                        help="top: the best-ranked eligible candidates; random: drawn among all in the window")
    parser.add_argument("--seed", type=int, default=0, help="seed of --negatives_sampling random")
    parser.add_argument("--model_file", help="--negatives dense: the bi-encoder checkpoint that ranks the passages")
    parser.add_argument("--dense_override", action="append", default=[], metavar="KEY=VALUE",
                        help="--negatives dense: a key of conf/dense_retriever.yaml (e.g. batch_size=64), repeatable")
    parser.add_argument("--dataset_name", help="the training JSON's 'dataset' field (default: the format's name)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    setup_logging()
    negatives = NegativeOptions(args.negatives, args.num_negatives, args.negatives_from_rank,
                                args.negatives_to_rank, args.max_negative_score_ratio, args.negatives_sampling,
                                args.seed)
    with user_errors_in_one_line():
        convert(ConvertOptions(args.format, args.input, args.out_dir, tuple(args.splits) if args.splits else None,
                               tuple(args.biencoder_splits), args.split, args.skip_unknown_qrels, negatives,
                               args.model_file, tuple(args.dense_override), args.dataset_name or args.format))


if __name__ == "__main__":
    main()
