"""GPU check of the gradient cache and per-example dropout: equivalence, mixed precision and speed, in one run.

    python bench/gpu_check.py                          # bert-base (random weights) on CUDA, at most ~8 minutes
    python bench/gpu_check.py --cpu --tiny             # the same code on a tiny BERT on CPU, in seconds

Sections, each bounded by steps and by the time left of `--budget_s` (a section that would start past it is
recorded as skipped):

1. checks: the cached step's fp32 gradients equal the full batch's (dropout on, per-example masks) to the CPU
   tests' tolerances, and equal the cached step's with gradient checkpointing; fp16 with a GradScaler end to end
   (finite losses, the parameters move, an injected inf skips the step and halves the scale); bf16 (finite,
   cached and full-batch gradients agree); replay (standard dropout under the recorded random state, per-example
   masks on this device equal to the CPU's);
2. one dropout call on a context chunk's attention probabilities, per-example against standard: time and memory;
   then per-example drawn by the compiled kernel against the eager draw, fp32 and bf16: time, memory, the first
   call's compilation, masks equal bit for bit (to each other and to the CPU's); on CUDA only;
3. GC-DPR's recipe: sequence length 256, 128 questions with a positive and a hard negative each, chunks q 16 /
   ctx 8, fp16 and bf16, per-example dropout on and off: seconds per step, questions/s, MFU
   (dpr/training/flops.py), torch.cuda.max_memory_allocated;
4. passage embedding (bf16, length 256): this repository's encode path against SentenceTransformer.encode on the
   same weights (CLS pooling);
5. the step without the cache at the largest batch that fits (powers of two downwards, out-of-memory caught);
6. the recipe's memory split into parameters, gradients, AdamW state, one chunk's activations and the cache's
   representations, against torch.cuda.max_memory_allocated at fp16 (bench/bench_memory.py's measure).

The batches are synthetic token ids (questions of 12-40 tokens, passages of 160-256): the GPU machine needs no
data and no model download (bert-base is BertConfig() with random weights).

Imports: torch, transformers, numpy, sentence-transformers and the dpr modules for models, batches, the
gradient cache, precision and FLOPs. Those import omegaconf and hydra (dpr/models/encoder_spec.py,
dpr/foundation/errors.py), which the GPU machine lacks; faiss and bm25s are not imported (tests/test_gpu_check.py
runs the script with those two blocked). A machine without network gets the packages as wheels in the ignored
folder wheels/ of the repository. Here:

    pip wheel --no-deps -w wheels antlr4-python3-runtime==4.9.3
    pip download --no-deps --only-binary=:all: --dest wheels --python-version 3.12 \
        --platform manylinux_2_28_x86_64 hydra-core==1.3.8 omegaconf==2.3.1 faiss-cpu==1.15.1 bm25s==0.3.16

(antlr4 4.9, which hydra-core 1.3 needs, is a source archive on PyPI, so it is built into a wheel here; an
unpinned `pip download --only-binary=:all: hydra-core omegaconf antlr4-python3-runtime` resolves to hydra-core
0.11 and omegaconf 1.4 instead), and there:

    pip install --no-index --no-deps --target /tmp/site wheels/*.whl
    PYTHONPATH=/tmp/site python bench/gpu_check.py

The results go to --out, by default outputs/gpu_check.json (a folder git ignores). The exit status is 1 when a
check fails or a section raises (its error is recorded in the JSON and the run goes on with the next section).
"""
import argparse
import gc
import json
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "outputs" / "gpu_check.json"  # outputs/ is ignored by git: results never land in a commit
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "bench"))  # bench_common.py, and bench_memory.py, which the memory section runs

import torch  # noqa: E402
from transformers import BertConfig, BertModel, BertTokenizerFast  # noqa: E402

from bench_common import (  # noqa: E402,I100
    SPECIAL_TOKENS, build_model, forward_backward, new_optimizer, optimizer_step, precision_for, synthetic_batch)
from dpr.data.tensorizer import Tensorizer  # noqa: E402
from dpr.models.example_dropout import example_keep_mask, example_keys  # noqa: E402
from dpr.models.hf_encoder import encode, encoder_from_config  # noqa: E402
from dpr.training.flops import ModelFlops  # noqa: E402
from dpr.training.grad_cache import RandState  # noqa: E402
from dpr.foundation.precision import Precision, make_precision  # noqa: E402

# The CPU tests' tolerances for "the cache equals the full batch" (tests/test_grad_cache.py)
GRADIENT_RTOL, GRADIENT_ATOL_OF_LARGEST, LOSS_RTOL = 1e-4, 1e-6, 1e-5


@dataclass
class Sizes:
    config: BertConfig
    sequence_length: int
    batch: int  # questions per step of the recipe
    q_chunk: int
    ctx_chunk: int
    check_questions: int  # the equivalence checks' batch, at check_length tokens
    check_length: int
    steps: int  # timed steps after one warm-up step
    passages: int  # embedded passages
    embed_batch: int
    no_cache_batches: List[int]


def sizes(tiny: bool) -> Sizes:
    if tiny:
        config = BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=64)
        return Sizes(config, 48, 8, 4, 3, 6, 32, 1, 32, 16, [16, 8])
    return Sizes(BertConfig(), 256, 128, 16, 8, 8, 64, 4, 8192, 256, [512, 256, 128, 64, 32])


class Budget:
    """Seconds left of the run; sections ask before they start."""

    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gradients(model) -> Dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def gradient_error(expected: Dict[str, torch.Tensor], actual: Dict[str, torch.Tensor]) -> float:
    """The largest |actual - expected| / (atol + rtol |expected|) over all entries, with the CPU tests' rtol and
    atol (1e-6 of the largest gradient): at most 1 where the tests' comparison passes; inf for other names."""
    if expected.keys() != actual.keys() or not expected:
        return float("inf")
    atol = GRADIENT_ATOL_OF_LARGEST * max(float(g.abs().max()) for g in expected.values())
    return max(float(((actual[n] - g).abs() / (atol + GRADIENT_RTOL * g.abs())).max()) for n, g in expected.items())


def cosine(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> float:
    flat_a = torch.cat([a[n].float().flatten() for n in sorted(a)])
    flat_b = torch.cat([b[n].float().flatten() for n in sorted(a)])
    return float(torch.nn.functional.cosine_similarity(flat_a, flat_b, dim=0))


def cached_and_full_gradients(model, batch, precision: Precision, chunks=(3, 5)):
    """(loss, gradients) of the full-batch step and of the cached step with uneven chunks."""
    results = []
    for cache in (False, True):
        model.zero_grad(set_to_none=True)
        loss = forward_backward(model, batch, precision, cache, *chunks)
        results.append((loss, gradients(model)))
    model.zero_grad(set_to_none=True)
    return results


def check_cache_equals_full_batch(model, s: Sizes, device) -> dict:
    batch = synthetic_batch(s.check_questions, s.config.vocab_size, s.check_length, seed=1).to(device)
    (loss_full, grads_full), (loss_cache, grads_cache) = cached_and_full_gradients(model, batch, make_precision(device))
    with torch.no_grad():  # equal gradients must not come from dropout being off
        other_seeds = [seed + 1 for seed in batch.question_seeds]
        first = model.encode_questions(batch.question_ids, batch.question_mask, batch.question_seeds)
        other = model.encode_questions(batch.question_ids, batch.question_mask, other_seeds)
    error = gradient_error(grads_full, grads_cache)
    loss_close = abs(loss_cache - loss_full) <= LOSS_RTOL * abs(loss_full)
    dropout_on = not torch.allclose(first, other)
    return {"passed": error <= 1.0 and loss_close and dropout_on, "gradient_error_over_tolerance": error,
            "loss_full": loss_full, "loss_cache": loss_cache, "dropout_changes_output": dropout_on}


def check_gradient_checkpointing(model, s: Sizes, device) -> dict:
    """The cached step's fp32 gradients with encoder.gradient_checkpointing equal those without it (per-example
    dropout redrawn in the recompute, which runs in backward: on CUDA, on autograd's device thread)."""
    batch = synthetic_batch(s.check_questions, s.config.vocab_size, s.check_length, seed=1).to(device)
    checkpointed = build_model(s.config, s.sequence_length, device, gradient_checkpointing=True)
    checkpointed.load_state_dict(model.state_dict())
    results = []
    for each in (model, checkpointed):
        each.zero_grad(set_to_none=True)
        results.append((forward_backward(each, batch, make_precision(device), True, 3, 5), gradients(each)))
        each.zero_grad(set_to_none=True)
    (loss_plain, grads_plain), (loss_checkpointed, grads_checkpointed) = results
    error = gradient_error(grads_plain, grads_checkpointed)
    loss_close = abs(loss_checkpointed - loss_plain) <= LOSS_RTOL * abs(loss_plain)
    return {"passed": error <= 1.0 and loss_close, "gradient_error_over_tolerance": error,
            "loss_plain": loss_plain, "loss_checkpointed": loss_checkpointed}


def check_fp16(model, s: Sizes, device) -> dict:
    precision = precision_for(device, "fp16")
    scaler = precision.grad_scaler
    batch = synthetic_batch(s.check_questions, s.config.vocab_size, s.check_length, seed=2).to(device)
    optimizer = new_optimizer(model)
    watched = next(p for p in model.parameters() if p.requires_grad)
    start = watched.detach().clone()
    losses = []
    for _ in range(3):
        losses.append(forward_backward(model, batch, precision, True, s.q_chunk, s.ctx_chunk))
        optimizer_step(model, optimizer, precision)
    moved = not torch.equal(start, watched)
    scale_before = scaler.get_scale()
    forward_backward(model, batch, precision, True, s.q_chunk, s.ctx_chunk)
    watched.grad.view(-1)[0] = float("inf")
    before = watched.detach().clone()
    optimizer_step(model, optimizer, precision)
    skipped = torch.equal(before, watched) and scaler.get_scale() == scale_before * scaler.get_backoff_factor()
    finite = all(torch.isfinite(torch.tensor(losses)).tolist())
    return {"passed": finite and moved and skipped and scale_before >= 1.0, "losses": losses,
            "parameters_moved": moved, "scale_before_inf": scale_before, "scale_after_inf": scaler.get_scale(),
            "inf_step_skipped": skipped}


def check_bf16(model, s: Sizes, device) -> dict:
    precision = precision_for(device, "bf16")
    batch = synthetic_batch(s.check_questions, s.config.vocab_size, s.check_length, seed=3).to(device)
    (loss_full, grads_full), (loss_cache, grads_cache) = cached_and_full_gradients(model, batch, precision)
    optimizer = new_optimizer(model)
    losses = []
    for _ in range(2):
        losses.append(forward_backward(model, batch, precision, True, s.q_chunk, s.ctx_chunk))
        optimizer_step(model, optimizer, precision)
    similarity = cosine(grads_full, grads_cache)
    finite = all(torch.isfinite(torch.tensor(losses + [loss_full, loss_cache])).tolist())
    return {"passed": finite and similarity >= 0.99, "losses": losses, "loss_full": loss_full,
            "loss_cache": loss_cache, "gradient_cosine_cache_vs_full": similarity}


def check_replay(model, s: Sizes, device) -> dict:
    batch = synthetic_batch(4, s.config.vocab_size, s.check_length, seed=4).to(device)
    ids, mask = batch.question_ids, batch.question_mask
    state = RandState.capture({"x": ids})
    with torch.no_grad():
        first = model.encode_questions(ids, mask)
        different = model.encode_questions(ids, mask)
        with state.restored():
            replay = model.encode_questions(ids, mask)
        per_example = model.encode_questions(ids, mask, batch.question_seeds)
        per_example_again = model.encode_questions(ids, mask, batch.question_seeds)
    heads, length = s.config.num_attention_heads, s.sequence_length
    shape = (len(batch.question_seeds), heads, length // 2, length - 3)
    keys = example_keys(batch.question_seeds)
    masks_equal = all(
        torch.equal(example_keep_mask(shape, keys.to(device), call, 0.1, length, (2, 3)).cpu(),
                    example_keep_mask(shape, keys, call, 0.1, length, (2, 3)))
        for call in (0, 5))
    standard_replays = bool(torch.allclose(replay, first, rtol=0, atol=1e-6)) and not torch.allclose(first, different)
    per_example_replays = torch.equal(per_example, per_example_again)
    return {"passed": standard_replays and per_example_replays and masks_equal,
            "standard_dropout_replays": standard_replays, "per_example_dropout_replays": per_example_replays,
            "masks_equal_to_cpu_masks": masks_equal}


def dropout_call_cost(s: Sizes, device) -> dict:
    """One dropout call on a context chunk's attention probabilities [ctx_chunk, heads, L, L] (bf16 on CUDA, fp32
    on CPU): milliseconds and, on CUDA, peak memory above the input, per-example against standard dropout."""
    from dpr.models.example_dropout import example_dropout, example_seeds

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    length = s.sequence_length
    probs = torch.rand(s.ctx_chunk, s.config.num_attention_heads, length, length, device=device, dtype=dtype)
    seeds = list(range(s.ctx_chunk))

    def per_example():
        with example_seeds(seeds, device, length):
            return example_dropout(probs, 0.1, True, sequence_dims=(2, 3))

    result = {"shape": list(probs.shape), "dtype": str(dtype)}
    for name, call in (("standard", lambda: torch.nn.functional.dropout(probs, 0.1, True)), ("per_example", per_example)):
        result.update({f"{name}_{key}": value for key, value in call_cost(call, device).items()})
    return result


def compiled_dropout_cost(s: Sizes, device) -> dict:
    """One per-example dropout call on a context chunk's attention probabilities [ctx_chunk, heads, L, L], fp32 and
    bf16, drawn by the compiled kernel and eagerly: milliseconds, peak memory above the input (CUDA), the first
    compiled call's seconds (its compilation) and whether the outputs equal, bit for bit, each other's and the CPU's
    eager draw's."""
    from dpr.models.example_dropout import compiled_draw_failure, example_dropout, example_seeds

    length = s.sequence_length
    shape = (s.ctx_chunk, s.config.num_attention_heads, length, length)
    seeds = list(range(s.ctx_chunk))

    def per_example(x: torch.Tensor, compiled: bool) -> torch.Tensor:
        with example_seeds(seeds, x.device, length, compiled):
            return example_dropout(x, 0.1, True, sequence_dims=(2, 3))

    result, passed = {"shape": list(shape)}, True
    for dtype in (torch.float32, torch.bfloat16):
        probs = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        synchronize(device)
        start = time.perf_counter()
        compiled = per_example(probs, True)
        synchronize(device)
        row = {"first_compiled_call_s": time.perf_counter() - start,
               "equal_to_eager": torch.equal(compiled, per_example(probs, False)),
               "equal_to_cpu_eager": torch.equal(compiled.cpu(), per_example(probs.cpu(), False))}
        for name, compiled_draw in (("eager", False), ("compiled", True)):
            row.update({f"{name}_{key}": value for key, value in
                        call_cost(partial(per_example, probs, compiled_draw), device).items()})
        result[str(dtype).replace("torch.", "")] = row
        passed = passed and row["equal_to_eager"] and row["equal_to_cpu_eager"]
    result["compile_failure"] = compiled_draw_failure()
    return dict(result, passed=passed and result["compile_failure"] is None)


def call_cost(call: Callable[[], torch.Tensor], device, calls: int = 10) -> dict:
    """Milliseconds per call of `call` (after one warm-up call) and, on CUDA, its peak memory above what was
    allocated before."""
    call()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    start = time.perf_counter()
    for _ in range(calls):
        call()
    synchronize(device)
    cost = {"ms": (time.perf_counter() - start) / calls * 1e3}
    if device.type == "cuda":
        cost["peak_mib_above_input"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return cost


def timed_steps(model, optimizer, batch, precision: Precision, cache: bool, s: Sizes, example_dropout: bool,
                device, cap_s: float) -> dict:
    """One warm-up step, then up to s.steps timed steps (fewer when they pass cap_s)."""
    flops = ModelFlops.of_biencoder(model, device, precision.name)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        forward_backward(model, batch, precision, cache, s.q_chunk, s.ctx_chunk, example_dropout)
        optimizer_step(model, optimizer, precision)

    step()
    synchronize(device)
    start, steps = time.perf_counter(), 0
    while steps < s.steps and (steps == 0 or time.perf_counter() - start < cap_s):
        step()
        steps += 1
        synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    questions = batch.question_ids.shape[0]
    tflops, mfu = flops.utilisation(flops.of_biencoder_batch(batch), seconds)
    return {"precision": precision.name, "cache": cache, "example_dropout": example_dropout,
            "questions": questions, "passages": batch.context_ids.shape[0], "steps": steps,
            "s_per_step": seconds, "questions_per_s": questions / seconds, "tflops": tflops,
            "mfu_percent": mfu,
            "max_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error)


def recipe_throughput(model, s: Sizes, device, budget: Budget) -> dict:
    batch = synthetic_batch(s.batch, s.config.vocab_size, s.sequence_length, seed=5).to(device)
    optimizer = new_optimizer(model)
    rows = []
    for precision_name in ("fp16", "bf16"):
        for example_dropout in (True, False):
            if budget.left() < 60:
                break
            rows.append(timed_steps(model, optimizer, batch, precision_for(device, precision_name), True, s,
                                    example_dropout, device, cap_s=20))
    return {"steps": rows}


def recipe_memory(s: Sizes, device) -> dict:
    """The recipe's memory breakdown (bench/bench_memory.py) at fp16 on CUDA, peak by torch.cuda.max_memory_allocated;
    on CPU, bf16 autocast and the whole process's peak resident memory, which says nothing of a GPU's."""
    from bench_memory import measure  # bench/ is on sys.path

    precision_name = "fp16" if device.type == "cuda" else "bf16"
    breakdown = measure(s.config, s.sequence_length, s.batch, s.q_chunk, s.ctx_chunk, precision_name, 2, device)
    breakdown["peak_is"] = ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                            else "the process's peak resident memory (CPU: not a GPU measure)")
    return breakdown


def largest_batch_without_cache(model, s: Sizes, device, budget: Budget) -> dict:
    """The step without the cache (bf16, per-example dropout) at the largest of s.no_cache_batches that fits."""
    tried = {}
    optimizer = new_optimizer(model)
    for questions in s.no_cache_batches:
        if budget.left() < 45:
            break
        batch = synthetic_batch(questions, s.config.vocab_size, s.sequence_length, seed=6).to(device)
        try:
            result = timed_steps(model, optimizer, batch, precision_for(device, "bf16"), False, s, True, device,
                                 cap_s=15)
            return {"tried": tried, "largest": result}
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not is_out_of_memory(error):
                raise
            tried[questions] = "out of memory"
        finally:
            model.zero_grad(set_to_none=True)
            del batch
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {"tried": tried, "largest": None}


def synthetic_texts(n: int, vocab_size: int, seed: int = 7) -> List[str]:
    """Passages of 150-300 vocabulary words (one token each: cut to the sequence length, like long passages)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(150, 301, (n,), generator=generator).tolist()
    return [" ".join(f"w{i}" for i in torch.randint(0, vocab_size - len(SPECIAL_TOKENS), (k,), generator=generator).tolist())
            for k in lengths]


def save_model_dir(config: BertConfig, folder: Path) -> str:
    """A randomly initialised BertModel and a word-level WordPiece vocabulary of config.vocab_size entries."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text(
        "\n".join(SPECIAL_TOKENS + [f"w{i}" for i in range(config.vocab_size - len(SPECIAL_TOKENS))]) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    return str(folder)


def embedding_throughput(s: Sizes, device, folder: Path) -> dict:
    """Passages/s of this repository's encode path (tokenize in batch, sort by length, pad per batch, encode under
    bf16 autocast, as generate_dense_embeddings does) and of SentenceTransformer.encode with the weights in bf16,
    on the same model, texts, batch size and maximum length; tokenization counts on both sides."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    path = save_model_dir(s.config, folder / "bert")
    texts = synthetic_texts(s.passages, s.config.vocab_size)
    tokenizer = BertTokenizerFast.from_pretrained(path)
    tensorizer = Tensorizer(tokenizer, s.sequence_length)
    encoder = encoder_from_config(BertConfig.from_pretrained(path), path).to(device).eval()
    precision = make_precision(device, bf16=True)

    def ours(batch_texts: List[str]) -> torch.Tensor:
        token_ids = tensorizer.token_ids(batch_texts)
        order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
        vectors = torch.empty(len(token_ids), s.config.hidden_size)
        with torch.inference_mode():
            for start in range(0, len(order), s.embed_batch):
                rows = order[start : start + s.embed_batch]
                ids, mask = tensorizer.pad([token_ids[i] for i in rows])
                with precision.autocast():
                    _, pooled = encode(encoder, ids.to(device), mask.to(device))
                vectors[rows] = pooled.float().cpu()
        return vectors

    st_model = SentenceTransformer(
        modules=[Transformer(path, max_seq_length=s.sequence_length), Pooling(s.config.hidden_size, "cls")],
        device=str(device)).to(torch.bfloat16)

    def sentence_transformers(batch_texts: List[str]) -> torch.Tensor:
        return st_model.encode(batch_texts, batch_size=s.embed_batch, convert_to_tensor=True).float().cpu()

    result = {"passages": len(texts), "batch_size": s.embed_batch, "sequence_length": s.sequence_length}
    vectors = {}
    for name, run in (("dpr", ours), ("sentence_transformers", sentence_transformers)):
        run(texts[: s.embed_batch])  # warm-up
        synchronize(device)
        start = time.perf_counter()
        vectors[name] = run(texts)
        synchronize(device)
        result[f"{name}_passages_per_s"] = len(texts) / (time.perf_counter() - start)
    result["min_cosine_dpr_vs_sentence_transformers"] = float(
        torch.nn.functional.cosine_similarity(vectors["dpr"], vectors["sentence_transformers"]).min())
    return result


def run_section(results: dict, name: str, budget: Budget, minimum_s: float, section: Callable[[], dict]) -> None:
    """Run a section when at least minimum_s of the budget is left; record its result with its seconds."""
    if budget.left() < minimum_s:
        results[name] = {"skipped": f"less than {minimum_s:.0f} s of the time budget left"}
        return
    start = time.perf_counter()
    try:
        results[name] = dict(section(), seconds=time.perf_counter() - start)
    except Exception:  # one broken section must not cost the others' numbers on a machine lent for minutes
        results[name] = {"error": traceback.format_exc(limit=-4)}
        print(results[name]["error"], file=sys.stderr, flush=True)
    print(f"[gpu_check] {name}: {time.perf_counter() - start:.1f} s", flush=True)


def parse_arguments(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="the results as JSON (default: %(default)s)")
    parser.add_argument("--cpu", action="store_true", help="run on CPU (fp16 then autocasts on CPU)")
    parser.add_argument("--tiny", action="store_true", help="a tiny BERT and small batches, for tests")
    parser.add_argument("--budget_s", type=float, default=420, help="time budget of the whole run")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_arguments(argv)
    if args.tiny:
        torch.set_num_threads(1)  # tiny operations gain nothing from threads, and on a busy machine threads stall
    budget = Budget(args.budget_s)
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    s = sizes(args.tiny)
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})",
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "tiny": args.tiny,
        "sequence_length": s.sequence_length, "recipe": {"questions": s.batch, "passages": 2 * s.batch,
                                                         "q_chunk": s.q_chunk, "ctx_chunk": s.ctx_chunk},
    }
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in the equivalence check
    model = build_model(s.config, s.sequence_length, device)
    checks = {}
    for name, check in (("cache_equals_full_batch_fp32", check_cache_equals_full_batch),
                        ("gradient_checkpointing_fp32", check_gradient_checkpointing), ("fp16_grad_scaler", check_fp16),
                        ("bf16", check_bf16), ("replay", check_replay)):
        run_section(checks, name, budget, 30, partial(check, model, s, device))
    results["checks"] = checks
    run_section(results, "dropout_call", budget, 30, partial(dropout_call_cost, s, device))
    if device.type == "cuda":
        run_section(results, "compiled_dropout", budget, 60, partial(compiled_dropout_cost, s, device))
    else:
        results["compiled_dropout"] = {"skipped": "on CPU: bench/bench_dropout.py times the compiled draw there"}
    run_section(results, "recipe", budget, 90, partial(recipe_throughput, model, s, device, budget))
    with tempfile.TemporaryDirectory() as folder:
        run_section(results, "embedding", budget, 60, partial(embedding_throughput, s, device, Path(folder)))
    run_section(results, "no_cache", budget, 60, partial(largest_batch_without_cache, model, s, device, budget))
    run_section(results, "memory", budget, 30, partial(recipe_memory, s, device))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print_table(results)
    return results


def all_passed(results: dict) -> bool:
    sections = list(results["checks"].values()) + [
        results[n] for n in ("dropout_call", "compiled_dropout", "recipe", "embedding", "no_cache", "memory")]
    return all(section.get("passed", True) and "error" not in section for section in sections)


def print_table(results: dict) -> None:
    print(f"\n{results['device']}, torch {results['torch']}, {results['date']}, sequence length "
          f"{results['sequence_length']}")
    print("| check | passed |\n|---|---|")
    for name, check in results["checks"].items():
        print(f"| {name} | {check.get('passed', 'skipped' if 'skipped' in check else 'error')} |")
    steps = list(results["recipe"].get("steps", []))
    if results["no_cache"].get("largest"):
        steps.append(results["no_cache"]["largest"])
    print("| precision | cache | per-example dropout | questions | s/step | questions/s | MFU % | max GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in steps:
        mfu = f"{r['mfu_percent']:.1f}" if r["mfu_percent"] is not None else "-"
        memory = f"{r['max_memory_gib']:.1f}" if r["max_memory_gib"] is not None else "-"
        print(f"| {r['precision']} | {r['cache']} | {r['example_dropout']} | {r['questions']} | {r['s_per_step']:.3f} "
              f"| {r['questions_per_s']:.1f} | {mfu} | {memory} |")
    call = results["dropout_call"]
    if "per_example_ms" in call:
        print(f"one dropout call on {call['shape']} {call['dtype']}: per-example {call['per_example_ms']:.2f} ms, "
              f"standard {call['standard_ms']:.2f} ms")
    print_compiled_dropout(results["compiled_dropout"])
    memory = results.get("memory", {})
    if "parts" in memory:
        parts = ", ".join(f"{name} {size / 2**30:.2f}" for name, size in memory["parts"].items())
        print(f"recipe memory at {memory['precision']} (GiB): {parts}; peak {memory['peak'] / 2**30:.2f} "
              f"({memory['peak_is']}), of which before the model {memory['runtime'] / 2**30:.2f}")
    embedding = results.get("embedding", {})
    if "dpr_passages_per_s" in embedding:
        print(f"passages/s (bf16): dpr {embedding['dpr_passages_per_s']:.0f}, sentence-transformers "
              f"{embedding['sentence_transformers_passages_per_s']:.0f}")


def print_compiled_dropout(section: dict) -> None:
    for dtype in ("float32", "bfloat16"):
        if dtype in section:
            r = section[dtype]
            print(f"per-example dropout on {section['shape']} {dtype}: compiled {r['compiled_ms']:.2f} ms, eager "
                  f"{r['eager_ms']:.2f} ms, first compiled call {r['first_compiled_call_s']:.1f} s; equal to eager "
                  f"{r['equal_to_eager']}, to the CPU's {r['equal_to_cpu_eager']}")
    if "skipped" in section:
        print(f"compiled per-example dropout: skipped ({section['skipped']})")


if __name__ == "__main__":
    sys.exit(0 if all_passed(main()) else 1)
