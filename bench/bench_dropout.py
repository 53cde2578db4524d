"""Per-example dropout benchmark: the compiled draw against the eager draw and standard dropout.

    python bench/bench_dropout.py --threads 2 --repeats 10 --out /tmp/bench_dropout.json
    python bench/bench_dropout.py --small              # tiny sizes, seconds: checks that the script runs

(a) One dropout call on the attention probabilities of a context chunk (8 x 12 x 256 x 256, fp32 and bf16):
per-example masks drawn eagerly, per-example masks drawn by the compiled kernel (dpr/models/example_dropout.py),
and standard `F.dropout`. Each sample is one `example_seeds` block of `--calls` calls (as a forward pass makes
them: the eager draw reuses its working memory within a block), timed per call.
(b) One training step, forward and backward, of a BERT the size of MiniLM-L12-H384 (random weights, dropout 0.1)
on 8 rows of 256 tokens: per-example dropout compiled, per-example eager, and standard dropout (which runs
attention through SDPA's fused kernel).

The variants are interleaved, one sample of each per round, so that load from other jobs falls on all alike;
the tables give medians of wall and CPU milliseconds. The first compiled call of each shape kind and dtype
compiles (its seconds are reported apart: set TORCHINDUCTOR_CACHE_DIR to a fresh folder for a cold compile);
compiled outputs are checked equal to eager ones before timing.
"""
import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import BertConfig  # noqa: E402

from dpr.foundation.files import atomic_output, ensure_writable_output  # noqa: E402
from dpr.models.example_dropout import compiled_draw_failure, example_dropout, example_seeds  # noqa: E402
from dpr.models.hf_encoder import encode, encoder_from_config  # noqa: E402

P = 0.1


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run: Callable[[], None], device: torch.device) -> tuple:
    """(wall ms, CPU ms) of one run."""
    synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    run()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3, (time.process_time() - cpu_start) * 1e3


def interleaved(variants: Dict[str, Callable[[], None]], repeats: int, device: torch.device) -> Dict[str, dict]:
    """Median wall and CPU ms of each variant over `repeats` rounds of one run each (after one warm-up round)."""
    for run in variants.values():
        run()
    samples = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            samples[name].append(timed(run, device))
    return {name: {"wall_ms": statistics.median(s[0] for s in runs), "cpu_ms": statistics.median(s[1] for s in runs)}
            for name, runs in samples.items()}


def first_call_seconds(run: Callable[[], None], device: torch.device) -> float:
    return timed(run, device)[0] / 1e3


def dropout_calls(args, device: torch.device) -> List[dict]:
    """Section (a): per dtype, the three variants of one dropout call."""
    shape = (args.rows, args.heads, args.length, args.length)
    seeds = list(range(args.rows))
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.rand(shape, device=device, dtype=dtype)

        def per_example(compiled: bool) -> Callable[[], None]:
            def run():
                with example_seeds(seeds, device, args.length, compiled):
                    for _ in range(args.calls):
                        example_dropout(x, P, True, sequence_dims=(2, 3))
            return run

        def standard():
            for _ in range(args.calls):
                F.dropout(x, P, True)

        compile_s = first_call_seconds(per_example(True), device)
        with example_seeds(seeds, device, args.length, True):
            compiled_out = example_dropout(x, P, True, sequence_dims=(2, 3))
        with example_seeds(seeds, device, args.length, False):
            equal = torch.equal(compiled_out, example_dropout(x, P, True, sequence_dims=(2, 3)))
        times = interleaved({"per-example, eager": per_example(False), "per-example, compiled": per_example(True),
                             "F.dropout": standard}, args.repeats, device)
        for name, t in times.items():
            rows.append({"section": "dropout call", "shape": list(shape), "dtype": str(dtype).replace("torch.", ""),
                         "variant": name, "wall_ms": t["wall_ms"] / args.calls, "cpu_ms": t["cpu_ms"] / args.calls,
                         "first_compiled_call_s": compile_s if "compiled" in name else None,
                         "equal_to_eager": equal if "compiled" in name else None})
    return rows


def training_steps(args, device: torch.device) -> List[dict]:
    """Section (b): one forward and backward of a MiniLM-sized BERT per variant."""
    config = BertConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                        intermediate_size=4 * args.hidden, max_position_embeddings=max(512, args.step_length))
    torch.manual_seed(0)
    model = encoder_from_config(config, dropout=P).to(device).train()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, config.vocab_size, (args.step_rows, args.step_length), generator=generator).to(device)
    mask = torch.ones_like(ids)
    seeds = list(range(args.step_rows))

    def step(compiled=None) -> Callable[[], torch.Tensor]:
        """compiled None: standard dropout (no example_seeds block)."""
        def run():
            model.zero_grad(set_to_none=True)
            if compiled is None:
                pooled = encode(model, ids, mask)[1]
            else:
                with example_seeds(seeds, device, args.step_length, compiled):
                    pooled = encode(model, ids, mask)[1]
            pooled.square().mean().backward()
            return pooled
        return run

    compile_s = first_call_seconds(step(True), device)
    equal = torch.equal(step(True)(), step(False)())
    times = interleaved({"per-example, eager": step(False), "per-example, compiled": step(True),
                         "standard dropout": step(None)}, args.repeats, device)
    return [{"section": "training step", "shape": [args.step_rows, args.step_length], "dtype": "float32",
             "variant": name, "wall_ms": t["wall_ms"], "cpu_ms": t["cpu_ms"],
             "first_compiled_call_s": compile_s if "compiled" in name else None,
             "equal_to_eager": equal if "compiled" in name else None} for name, t in times.items()]


def print_table(results: dict) -> None:
    print(f"\n{results['machine']}; torch {results['torch']}; {results['threads']} threads; {results['date']}")
    print("| section | shape | dtype | variant | wall ms | CPU ms | CPU vs standard | first compiled call s | equal to eager |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = results["rows"]
    for r in rows:
        standard = next(s for s in rows if s["section"] == r["section"] and s["dtype"] == r["dtype"]
                        and s["variant"] in ("F.dropout", "standard dropout"))
        compile_s = f"{r['first_compiled_call_s']:.1f}" if r["first_compiled_call_s"] is not None else "-"
        equal = "-" if r["equal_to_eager"] is None else str(r["equal_to_eager"])
        print(f"| {r['section']} | {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['variant']} "
              f"| {r['wall_ms']:.2f} | {r['cpu_ms']:.2f} | {r['cpu_ms'] / standard['cpu_ms']:.2f}x | {compile_s} "
              f"| {equal} |")
    if results["compile_failure"]:
        print(f"the compiled draw fell back to the eager one: {results['compile_failure']}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=8, help="rows of the dropout call's chunk")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--length", type=int, default=256, help="sequence length of the dropout call")
    parser.add_argument("--calls", type=int, default=4, help="dropout calls per example_seeds block")
    parser.add_argument("--step_rows", type=int, default=8)
    parser.add_argument("--step_length", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=10, help="interleaved timed rounds")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--small", action="store_true", help="tiny sizes and 2 rounds, to check the script runs")
    parser.add_argument("--cuda", action="store_true", help="run on the GPU")
    parser.add_argument("--out", help="write the results as JSON here too")
    args = parser.parse_args(argv)
    if args.small:
        args.rows, args.heads, args.length, args.calls = 2, 2, 24, 2
        args.step_rows, args.step_length, args.hidden, args.layers, args.repeats = 2, 16, 32, 2, 2
    if args.out:
        ensure_writable_output(args.out, "--out")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.cuda else "cpu")
    results = {"machine": torch.cuda.get_device_name(device) if args.cuda else f"CPU ({platform.machine()})",
               "torch": torch.__version__, "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
               "args": vars(args)}
    results["rows"] = dropout_calls(args, device) + training_steps(args, device)
    results["compile_failure"] = compiled_draw_failure()
    print_table(results)
    if args.out:
        with atomic_output(args.out) as temporary:
            Path(temporary).write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
