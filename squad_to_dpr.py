#!/usr/bin/env python3
"""Convert SQuAD-format JSON into DPR retriever files (biencoder JSON, passages TSV, qas CSV).

Example: python squad_to_dpr.py --squad_file data.squad1.dev --output_dir squad_dpr --dev_fraction 0.2
"""
import argparse
import sys
from pathlib import Path

# Runnable as a plain script from anywhere: make the repository's `dpr` package importable.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dpr.interop.squad_to_dpr import convert_squad  # noqa: E402
from dpr.foundation.errors import user_errors_in_one_line  # noqa: E402
from dpr.foundation.logging import setup_logging  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--squad_file", required=True,
                        help="SQuAD v1.1-format JSON file, or a resource key (data.squad1.train, data.squad1.dev)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--split_name", default="train", help="name of the single split when not splitting")
    parser.add_argument("--dev_fraction", type=float, default=0.0,
                        help="fraction of articles held out as a dev split (0: no split)")
    parser.add_argument("--dataset_name", default="squad1", help="value of the 'dataset' field")
    parser.add_argument("--hard_negatives", type=int, default=30, help="BM25 hard negatives per question (at most)")
    parser.add_argument("--negatives", type=int, default=30, help="random negatives per question (at most)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the article split and random negatives")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    setup_logging()
    with user_errors_in_one_line():
        convert_squad(args.squad_file, args.output_dir, split_name=args.split_name, dev_fraction=args.dev_fraction,
                      dataset=args.dataset_name, num_hard_negatives=args.hard_negatives, num_negatives=args.negatives,
                      seed=args.seed)


if __name__ == "__main__":
    main()
