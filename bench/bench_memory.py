"""Memory of GC-DPR's 11 GB recipe, measured: bert-base (random weights, BertConfig()), 128 questions with a
positive and a hard negative each, sequence length 256 filled by every input, gradient cache with chunks q 16 /
ctx 8, AdamW; the repository's gradient cache and the trainers' optimizer step (through bench/bench_common.py's
helpers). Each configuration runs `--steps` optimizer steps in a fresh process:

    nice -n 10 python bench/bench_memory.py --batches 16 128 --out memory.json
    nice -n 10 python bench/bench_memory.py --batches 128 --precisions bf16 --gradient_checkpointing --chunks 64 32

The peak is split into
- parameters, gradients (fp32) and AdamW state: the bytes of those tensors after the steps;
- one chunk's activations: the bytes of the tensors autograd saves during one chunk's forward with gradients
  (torch.autograd.graph.saved_tensors_hooks, each storage counted once), the larger of a question chunk and a
  passage chunk; under 16-bit autocast this includes the 16-bit copies of the weights it saves. With
  `--gradient_checkpointing` (encoder.gradient_checkpointing: each layer recomputed in backward) the steps
  checkpoint, a checkpointed layer's saved tensors are its input hidden states only, and the table also gives one
  chunk's activations without checkpointing (the recompute's one layer of activations in backward is not counted);
- the cache's representations: questions and passages, in the autocast dtype, their fp32 copies and the fp32
  gradients the cache keeps of them;
and the peak itself: torch.cuda.max_memory_allocated on a GPU, the process's peak resident memory on CPU (which
also holds the Python runtime and libraries); `runtime` is the part of it there before the model is built (the
peak resident memory so far on CPU, torch.cuda.memory_allocated on a GPU).

From the CPU breakdown it projects the recipe's GPU memory at fp16 (bf16 autocast on CPU saves tensors of the same
sizes as fp16 autocast on a GPU): parameters + gradients + AdamW state + one chunk's activations + the cache's
representations + a CUDA context of CUDA_CONTEXT_GIB (not counted by the allocator) + ALLOCATOR_OVERHEAD of
the allocated bytes (caching-allocator fragmentation and the optimizer step's temporaries), against 11 GB; and
the largest question chunk (passage chunk half of it) that projection keeps within 10 GiB, with checkpointing
and without (one chunk's activations are linear in its rows). Each optimizer step is timed (`step_seconds`; the
last one, after the first step's warm-up, is in the table): with `--chunks 64 32 --gradient_checkpointing`
against the recipe's 16 / 8 without, it shows what fewer, larger chunks cost or save in time (`--time_only`: the
steps alone, for chunks whose activations without checkpointing would not fit in the machine's memory):

    python bench/bench_memory.py --batches 64 --precisions bf16 --chunks 16 8 --steps 3 --threads 2
    python bench/bench_memory.py --batches 64 --precisions bf16 --chunks 64 32 --gradient_checkpointing --time_only \
        --steps 3 --threads 2
"""
import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from transformers import BertConfig  # noqa: E402

from bench_common import (  # noqa: E402,I100
    build_model, forward_backward, make_towers, new_optimizer, optimizer_step, precision_for, synthetic_batch)
from dpr.data.biencoder_batch import BiEncoderBatch  # noqa: E402

GIB = 2**30
CARD_BYTES = 11 * 10**9  # an "11 GB" card (GTX 1080 Ti / RTX 2080 Ti): 11 GB, about 10.2 GiB usable
TARGET_GIB = 10.0
CUDA_CONTEXT_GIB = 0.5  # the CUDA context and cuBLAS/cuDNN workspaces, outside max_memory_allocated
ALLOCATOR_OVERHEAD = 0.15


def recipe_config(tiny: bool, large: bool = False) -> dict:
    if tiny:
        config = BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=64)
        return {"config": config, "sequence_length": 32, "q_chunk": 4, "ctx_chunk": 2}
    config = (BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
              if large else BertConfig())
    return {"config": config, "sequence_length": 256, "q_chunk": 16, "ctx_chunk": 8}


def filled_batch(questions: int, vocab_size: int, sequence_length: int, seed: int = 0) -> BiEncoderBatch:
    """bench_common's synthetic batch (a question, a positive and a hard negative each) with token ids filling
    sequence_length in every row."""
    generator = torch.Generator().manual_seed(seed)

    def rows(n: int) -> dict:
        return {"ids": torch.randint(5, vocab_size, (n, sequence_length), generator=generator),
                "mask": torch.ones(n, sequence_length, dtype=torch.long)}

    q, c = rows(questions), rows(2 * questions)
    return replace(synthetic_batch(questions, vocab_size, sequence_length, seed), question_ids=q["ids"],
                   question_mask=q["mask"], context_ids=c["ids"], context_mask=c["mask"])


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def saved_bytes_of_one_chunk(tower, rows: int, precision, layers=()) -> int:
    """Bytes autograd saves for the backward of the tower's first `rows` rows (each storage once). Under gradient
    checkpointing a checkpointed layer saves nothing through autograd (its own hooks take over) and keeps its
    input for the recompute instead: the input hidden states of `layers` count too."""
    storages = {}

    def keep(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    handles = [layer.register_forward_pre_hook(lambda _, args: keep(args[0])) for layer in layers]
    # copies, as the cache's chunks are (index_select): a view would count the whole batch's storage
    chunk = {k: (v[:rows].clone() if torch.is_tensor(v) else v[:rows]) for k, v in tower.inputs.items()}
    try:
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), precision.autocast():
            reps = tower.encode(chunk)
    finally:
        for handle in handles:
            handle.remove()
    del reps
    return sum(storages.values())


def chunk_activations(model, data, q_chunk: int, ctx_chunk: int, precision) -> dict:
    """The bytes one question chunk and one passage chunk save for backward, as the model's layers are set."""
    q_tower, ctx_tower = make_towers(model, data, q_chunk, ctx_chunk, example_dropout=True)
    checkpointed = [[layer for layer in encoder.encoder.layer if layer.gradient_checkpointing]
                    for encoder in (model.question_model, model.ctx_model)]
    return {"question_chunk": saved_bytes_of_one_chunk(q_tower, q_chunk, precision, checkpointed[0]),
            "passage_chunk": saved_bytes_of_one_chunk(ctx_tower, ctx_chunk, precision, checkpointed[1])}


def measure(config: BertConfig, sequence_length: int, batch: int, q_chunk: int, ctx_chunk: int, precision_name: str,
            steps: int, device: torch.device, gradient_checkpointing: bool = False, time_only: bool = False) -> dict:
    """The recipe's memory breakdown in bytes (see the module doc), after `steps` optimizer steps; with
    `gradient_checkpointing` the steps recompute activations and one chunk's activations are also measured
    without it (`activations_without_checkpointing`); `time_only`: the steps' seconds and the peak alone (a large
    chunk's activations measured without checkpointing may not fit in memory)."""
    # what is there before: the Python runtime and libraries on CPU, other models on a GPU
    runtime = (torch.cuda.memory_allocated(device) if device.type == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    precision = precision_for(device, precision_name)
    model = build_model(config, sequence_length, device, gradient_checkpointing)
    optimizer = new_optimizer(model)
    data = filled_batch(batch, config.vocab_size, sequence_length).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        forward_backward(model, data, precision, True, q_chunk, ctx_chunk)
        optimizer_step(model, optimizer, precision)
        step_seconds.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    params = [p for p in model.parameters() if p.requires_grad]
    if time_only:
        return {"device": device.type, "precision": precision_name, "batch": batch, "q_chunk": q_chunk,
                "ctx_chunk": ctx_chunk, "gradient_checkpointing": gradient_checkpointing, "step_seconds": step_seconds,
                "peak": peak}
    activations = chunk_activations(model, data, q_chunk, ctx_chunk, precision)
    without = None
    if gradient_checkpointing:
        for encoder in (model.question_model, model.ctx_model):
            encoder.activation_checkpointing_disable()
        without = chunk_activations(model, data, q_chunk, ctx_chunk, precision)
    reps_element = 2 if precision_name in ("fp16", "bf16") else 4
    fp32_copy = 4 if reps_element == 2 else 0  # the cache's .float() of 16-bit representations
    representations = 3 * batch * config.hidden_size * (reps_element + fp32_copy + 4)
    parts = {
        "parameters": tensor_bytes(model.parameters()),
        "gradients": tensor_bytes(params),  # fp32, of the trained parameters (not the unused poolers)
        "adamw_state": tensor_bytes(t for state in optimizer.state.values() for t in state.values()
                                    if torch.is_tensor(t)),
        "chunk_activations": max(activations.values()),
        "cache_representations": representations,
    }
    return {"device": device.type, "precision": precision_name, "batch": batch, "sequence_length": sequence_length,
            "q_chunk": q_chunk, "ctx_chunk": ctx_chunk, "steps": steps, "parts": parts,
            "gradient_checkpointing": gradient_checkpointing, "activations": activations,
            "activations_without_checkpointing": without, "step_seconds": step_seconds, "peak": peak,
            "runtime": runtime, "layers": config.num_hidden_layers,
            "parameter_count": sum(p.numel() for p in model.parameters()),
            "trained_parameter_count": sum(p.numel() for p in params)}


def projection_fp16_gpu(breakdown: dict) -> dict:
    """The recipe's GPU memory at fp16 projected from a 16-bit autocast breakdown (the module doc's assumptions)."""
    allocated = sum(breakdown["parts"].values())
    total = allocated * (1 + ALLOCATOR_OVERHEAD) + CUDA_CONTEXT_GIB * GIB
    return {"allocated_gib": allocated / GIB, "total_gib": total / GIB, "card_gib": CARD_BYTES / GIB,
            "target_gib": TARGET_GIB, "fits_target": total / GIB <= TARGET_GIB,
            "assumptions": f"CUDA context {CUDA_CONTEXT_GIB} GiB; allocator and optimizer temporaries "
                           f"+{ALLOCATOR_OVERHEAD:.0%} of the allocated bytes; fp32 master weights, gradients "
                           f"and AdamW state; activations of 16-bit autocast as measured with bf16 on CPU"}


def largest_chunks_within_target(breakdown: dict) -> dict:
    """The largest question chunk (passage chunk half of it, the recipe's ratio) whose projected fp16 GPU memory
    stays within TARGET_GIB, without checkpointing and, where measured, with it: one chunk's activations are linear
    in its rows, so the bytes per row of the measured chunks scale to any chunk. With checkpointing a chunk holds
    its layers' inputs and, in backward, one layer's activations recomputed (the activations without
    checkpointing divided by the number of layers)."""
    fixed = sum(v for k, v in breakdown["parts"].items() if k != "chunk_activations")
    budget = ((TARGET_GIB - CUDA_CONTEXT_GIB) * GIB / (1 + ALLOCATOR_OVERHEAD)) - fixed
    plain = breakdown["activations_without_checkpointing"] or breakdown["activations"]

    def per_row(chunk: str, rows: int, checkpointed: bool) -> float:
        held = plain[chunk] / rows
        if checkpointed:
            held = breakdown["activations"][chunk] / rows + held / breakdown["layers"]
        return held

    def largest(checkpointed: bool) -> int:
        # a question chunk of q rows and a passage chunk of q / 2 rows; the larger of the two is what is held
        per_q = max(per_row("question_chunk", breakdown["q_chunk"], checkpointed),
                    per_row("passage_chunk", breakdown["ctx_chunk"], checkpointed) / 2)
        return max(0, int(budget // per_q))

    result = {"without_checkpointing": largest(False)}
    if breakdown["gradient_checkpointing"]:
        result["with_checkpointing"] = largest(True)
    return result


def run_in_subprocess(spec: dict) -> dict:
    """One configuration in a fresh process, so that its peak resident memory is its own."""
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
            f"import bench_memory as b; print(json.dumps(b.measure_spec({spec!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"configuration {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_spec(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    recipe = recipe_config(spec["tiny"], spec["large"])
    q_chunk, ctx_chunk = spec["chunks"] or (recipe["q_chunk"], recipe["ctx_chunk"])
    return measure(recipe["config"], recipe["sequence_length"], spec["batch"], q_chunk, ctx_chunk,
                   spec["precision"], spec["steps"], torch.device(spec["device"]), spec["gradient_checkpointing"],
                   spec.get("time_only", False))


def print_table(results: List[dict]) -> None:
    names = list(results[0]["parts"])
    print("| precision | batch | checkpointing | " + " | ".join(names)
          + " | chunk_activations without checkpointing | sum of parts | peak | runtime | (MiB) | last step (s) |")
    print("|" + "---|" * (len(names) + 9))
    for r in results:
        parts = [r["parts"][n] / 2**20 for n in names]
        without = r["activations_without_checkpointing"]
        cells = [f"{v:.0f}" for v in parts] + [f"{max(without.values()) / 2**20:.0f}" if without else "-"] + [
            f"{v:.0f}" for v in (sum(parts), r["peak"] / 2**20, r["runtime"] / 2**20)]
        print(f"| {r['precision']} | {r['batch']} | {r['gradient_checkpointing']} | " + " | ".join(cells)
              + f" | | {r['step_seconds'][-1]:.1f} |")


def main(argv=None) -> List[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp32"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps (the AdamW state exists after one)")
    parser.add_argument("--tiny", action="store_true", help="a tiny BERT, for tests")
    parser.add_argument("--large", action="store_true", help="bert-large's shape (24 layers, hidden 1024)")
    parser.add_argument("--chunks", type=int, nargs=2, metavar=("Q", "CTX"), default=None,
                        help="question and passage chunk sizes instead of the recipe's 16 and 8")
    parser.add_argument("--gradient_checkpointing", action="store_true",
                        help="the steps recompute activations (encoder.gradient_checkpointing); one chunk's activations "
                             "are measured with and without")
    parser.add_argument("--time_only", action="store_true",
                        help="time the steps and report the peak, without the breakdown")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=None, help="JSON file of the results")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = []
    for precision in args.precisions:
        for batch in args.batches:
            results.append(run_in_subprocess({"batch": batch, "precision": precision, "steps": args.steps,
                                              "tiny": args.tiny, "threads": args.threads, "device": device,
                                              "gradient_checkpointing": args.gradient_checkpointing,
                                              "large": args.large, "chunks": args.chunks,
                                              "time_only": args.time_only}))
            print(json.dumps(results[-1]), flush=True)  # a long run shows each configuration as it ends
    if args.time_only:
        return results
    print_table(results)
    sixteen_bit = [r for r in results if r["precision"] in ("bf16", "fp16")]
    report = {"machine": platform.processor() or platform.machine(), "results": results}
    if sixteen_bit:
        largest = max(sixteen_bit, key=lambda r: sum(r["parts"].values()))
        report["projection_fp16_gpu"] = projection_fp16_gpu(largest)
        report["largest_question_chunk_within_target"] = largest_chunks_within_target(largest)
        print(json.dumps({**report["projection_fp16_gpu"],
                          "largest_question_chunk_within_target": report["largest_question_chunk_within_target"]},
                         indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return results


if __name__ == "__main__":
    main()
