#!/usr/bin/env python3
"""Convert a DPR retriever results JSON (DPR's released ones, or dense_retriever.py's out_file) into a TREC run
(`qid Q0 docid rank score tag`, ranked in trec_eval's order), for trec_eval, ir-measures or pyserini's tools.
The qid is a record's `id` when it has one, else its 0-based position in the file.

Example: python convert_results_to_trec.py --input nq_test_results.json --output nq_test.trec --tag dpr
"""
import argparse
import sys
from pathlib import Path

# Runnable as a plain script from anywhere: make the repository's `dpr` package importable.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dpr.interop.results_to_trec import convert_results_to_trec  # noqa: E402
from dpr.foundation.errors import user_errors_in_one_line  # noqa: E402
from dpr.foundation.logging import setup_logging  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="DPR's results JSON (a list of question, answers, ctxs)")
    parser.add_argument("--output", required=True, help="the TREC run file to write")
    parser.add_argument("--tag", default="dpr", help="the run's tag, its last column")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    setup_logging()
    with user_errors_in_one_line():
        queries, lines = convert_results_to_trec(args.input, args.output, args.tag)
    print(f"wrote {lines} lines for {queries} queries to {args.output}")


if __name__ == "__main__":
    main()
