#!/usr/bin/env python3
"""Download DPR data, checkpoints and indexes: ``python data/download_data.py --resource KEY [--output_dir DIR]``.

Without ``--resource`` it lists every key. Files land in ``{output_dir}/downloads/...`` (DPR's layout).
"""
import argparse
import os
import sys
from pathlib import Path

# Runnable as a plain script from anywhere: make the repository's `dpr` package importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpr.data.download import (DEFAULT_DEADLINE_MIN, MIRROR_ENV, DownloadError, RetryPolicy,  # noqa: E402
                               UnknownResourceError, download)
from dpr.foundation.logging import setup_logging  # noqa: E402


def positive_minutes(text: str) -> float:
    try:
        minutes = float(text)
    except ValueError:
        minutes = float("nan")
    if not minutes > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of minutes above 0")
    return minutes


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resource", help="resource key, or a prefix of keys to download all of them "
                                           "(omit it to list the keys)")
    parser.add_argument("--output_dir", default="./", help="root folder; files go under OUTPUT_DIR/downloads/")
    parser.add_argument("--mirror", nargs="+", default=os.environ.get(MIRROR_ENV, "").split() or None,
                        metavar="URL",
                        help=f"base URL(s) holding the same relative paths as dl.fbaipublicfiles.com/dpr/ "
                             f"(http(s):// or file://), tried in order for each file: one that cannot serve a file "
                             f"whole (of its published size) gives way to the next (default ${MIRROR_ENV}, "
                             f"space-separated)")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="trust existing files instead of checking their recorded sha256, and accept what a "
                             "server sends (another size than the published one, an HTML page, a .gz without "
                             "gzip's first bytes, a text file cut in a line)")
    parser.add_argument("--deadline_min", type=positive_minutes, default=DEFAULT_DEADLINE_MIN, metavar="MIN",
                        help="give each file this long from one server, retries included, before the next mirror "
                             "is asked (a rerun resumes)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    setup_logging()
    try:
        download(args.resource, args.output_dir, mirror=args.mirror, verify=args.verify,
                 retry=RetryPolicy(deadline_s=args.deadline_min * 60))
    except (UnknownResourceError, DownloadError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
