"""A synthetic MS MARCO passage collection of the real one's size, to measure convert_to_dpr.py's peak memory:

    python bench/synthetic_msmarco.py --out /tmp/msmarco_synth          # 8,841,823 passages, 502,939 queries
    /usr/bin/time -v python convert_to_dpr.py --format msmarco --input /tmp/msmarco_synth --out_dir /tmp/msmarco_dpr
    python bench/synthetic_msmarco.py --out /tmp/msmarco_small --passages 1000 --train_queries 100   # seconds

collection.tsv (`pid \\t text`, texts of 20 to 90 random words, about 330 characters on average as MS MARCO's),
queries.train.tsv (`--train_queries`, 6 random words each), qrels.train.tsv (TREC: 1.06 relevant passages per
query as MS MARCO train, each a random passage), and a dev split of 6,980 queries as MS MARCO's dev.small.
Seeded: the same arguments give the same files.
"""
import argparse
import random
from pathlib import Path

WORDS = [f"w{i}" for i in range(30000)]


def write_split(folder: Path, split: str, queries: int, passages: int, rng: random.Random) -> None:
    with open(folder / f"queries.{split}.tsv", "w") as q, open(folder / f"qrels.{split}.tsv", "w") as r:
        for qid in range(queries):
            q.write(f"{split}{qid}\t{' '.join(rng.choices(WORDS, k=6))}\n")
            for pid in rng.sample(range(passages), 2 if rng.random() < 0.06 else 1):
                r.write(f"{split}{qid}\t0\t{pid}\t1\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the folder written")
    parser.add_argument("--passages", type=int, default=8_841_823)
    parser.add_argument("--train_queries", type=int, default=502_939)
    parser.add_argument("--dev_queries", type=int, default=6_980)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    with open(folder / "collection.tsv", "w") as sink:
        for pid in range(args.passages):
            sink.write(f"{pid}\t{' '.join(rng.choices(WORDS, k=rng.randint(20, 90)))}\n")
    write_split(folder, "train", args.train_queries, args.passages, rng)
    write_split(folder, "dev.small", min(args.dev_queries, args.train_queries), args.passages, rng)


if __name__ == "__main__":
    main()
