"""How often each train.in_batch_negatives mode masks: global training batches built as the trainer builds them
(its epoch batches and per-example sampling), the mask of each mode, and counts per batch.

    python bench/count_false_negatives.py --data ../shared/data/squad_open/biencoder-train.json \
        --batch_size 128 --batches 200 --out /tmp/false_negatives.json

Batches are taken epoch after epoch (training_batches with --seed, the recipe's 12345) until --batches; each
question gets --hard_negatives hard and --other_negatives other negatives (the recipe: 1 and 0). Per mode: masked
(question, context) pairs per batch, questions with at least one masked context per batch, and the median CPU
milliseconds of one mask (the first batches fill the token-key cache). The counts do not depend on the machine.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dpr.data.batching import training_batches  # noqa: E402
from dpr.data.biencoder_batch import sample_examples  # noqa: E402
from dpr.data.biencoder_data import load_biencoder_samples  # noqa: E402
from dpr.foundation.files import atomic_output, ensure_writable_output  # noqa: E402
from dpr.training.false_negatives import IN_BATCH_NEGATIVES, FalseNegativeMask  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/squad_open/biencoder-train.json"),
                        help="DPR retriever training file(s): path, glob or resource key")
    parser.add_argument("--batch_size", type=int, default=128, help="global batch")
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--hard_negatives", type=int, default=1)
    parser.add_argument("--other_negatives", type=int, default=0)
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--out", help="JSON of the results (also printed as a table)")
    return parser.parse_args(argv)


def count(args: argparse.Namespace) -> dict:
    samples = load_biencoder_samples([args.data])
    batches, epoch = [], 0
    while len(batches) < args.batches:
        epoch_batches = training_batches([len(samples)], args.batch_size, args.seed, epoch)
        if not epoch_batches:
            raise SystemExit(f"{args.data}: {len(samples)} questions, fewer than one batch of {args.batch_size}")
        batches += [(epoch, b) for b in epoch_batches]
        epoch += 1
    batches = batches[: args.batches]
    results = {}
    for mode in IN_BATCH_NEGATIVES[1:]:
        mask_of = FalseNegativeMask(mode)
        pairs, questions, ms = [], [], []
        for batch_epoch, batch in batches:
            examples = sample_examples(samples, batch.indices, args.hard_negatives, args.other_negatives,
                                       shuffle=True, seed=args.seed, epoch=batch_epoch)
            answers = [samples[int(i)].answers for i in batch.indices]
            start = time.process_time()
            mask = mask_of(examples, answers)
            ms.append((time.process_time() - start) * 1e3)
            pairs.append(int(mask.sum()))
            questions.append(int(mask.any(dim=1).sum()))
        results[mode] = {
            "masked_pairs_per_batch": statistics.mean(pairs), "masked_pairs_max": max(pairs),
            "questions_masked_per_batch": statistics.mean(questions),
            "batches_with_a_masked_pair": sum(p > 0 for p in pairs),
            "cpu_ms_per_mask_median": statistics.median(ms),
        }
    contexts = args.batch_size * (1 + args.hard_negatives + args.other_negatives)
    return {"data": args.data, "questions": len(samples), "batch_size": args.batch_size, "batches": len(batches),
            "epochs": batches[-1][0] + 1, "contexts_per_batch": contexts, "seed": args.seed, "modes": results}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.out:
        ensure_writable_output(args.out, "--out")
    result = count(args)
    print(f"{result['batches']} batches of {result['batch_size']} questions ({result['contexts_per_batch']} "
          f"contexts) from {result['questions']} questions of {result['data']}:")
    print("| mode | masked pairs / batch (max) | questions with a masked context / batch | batches with any | "
          "CPU ms / mask (median) |")
    print("|---|---:|---:|---:|---:|")
    for mode, r in result["modes"].items():
        print(f"| {mode} | {r['masked_pairs_per_batch']:.1f} ({r['masked_pairs_max']}) | "
              f"{r['questions_masked_per_batch']:.1f} | {r['batches_with_a_masked_pair']} | "
              f"{r['cpu_ms_per_mask_median']:.1f} |")
    if args.out:
        with atomic_output(args.out) as temp_name:
            Path(temp_name).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
