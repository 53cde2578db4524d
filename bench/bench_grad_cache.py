"""Gradient cache benchmark: peak memory and step time of bi-encoder training steps, with and without the cache,
against sentence-transformers' CachedMultipleNegativesRankingLoss on the same model, batch and mini-batch size.

Every configuration runs in a fresh process (peak resident memory on CPU is then that configuration's own;
on a GPU, torch.cuda.max_memory_allocated). One warm-up step, then `--steps` timed optimizer steps.

    python bench/bench_grad_cache.py --data ../shared/data/squad_open/biencoder-train.json --sequence_length 128

`--interleaved` times step variants that must be compared on equal terms in one process, one step of each per
round, so that load from other jobs on a shared machine falls on all of them alike: the cached step with
per-example dropout masks and with standard dropout, and sentence-transformers' CachedMultipleNegativesRankingLoss
on the same token ids (questions, positives, first hard negatives), mini-batch and precision:

    python bench/bench_grad_cache.py --interleaved --batch 64 --sequence_length 256 --repeats 3 --threads 1
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def peak_memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def build_trainer(spec: dict):
    """This repository's trainer (the code train_dense_encoder.py runs), its scheduler and its batch indices."""
    from hydra import compose, initialize_config_dir

    from dpr.data.batching import training_batches
    from dpr.training.biencoder_trainer import BiEncoderTrainer
    from dpr.training.optim import build_scheduler

    overrides = [
        f"encoder.pretrained_model_cfg={spec['model']}", f"encoder.sequence_length={spec['sequence_length']}",
        f"train_datasets=[{spec['data']}]", f"output_dir={spec['tmp']}", f"train.batch_size={spec['batch']}",
        f"train.grad_cache={str(spec['cache']).lower()}", f"train.q_chunk_size={spec['q_chunk']}",
        f"train.ctx_chunk_size={spec['ctx_chunk']}", "train.hard_negatives=1", f"bf16={str(spec['bf16']).lower()}",
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="biencoder_train_cfg", overrides=overrides)
    trainer = BiEncoderTrainer(cfg)
    trainer.model.train()
    scheduler = build_scheduler(trainer.optimizer, 0, 1000)
    return trainer, scheduler, training_batches([len(trainer.train_sets[0])], spec["batch"], cfg.seed, 0)


def dpr_batch(trainer, batches, step: int):
    from dpr.data.batching import local_slice
    from dpr.data.biencoder_batch import make_biencoder_batch

    return make_biencoder_batch(trainer.train_sets[0], local_slice(batches[step], 0, 1), trainer.tensorizer,
                                1, 0, shuffle=True, seed=trainer.cfg.seed)


def timed(step, device) -> tuple:
    """(wall seconds, CPU seconds) of one call of `step`."""
    _sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    step()
    _sync(device)
    return time.perf_counter() - start, time.process_time() - cpu_start


def run_dpr(spec: dict) -> dict:
    """Steps of this repository's trainer."""
    trainer, scheduler, batches = build_trainer(spec)
    times, cpu_times = [], []
    for i in range(spec["steps"] + 1):
        batch = dpr_batch(trainer, batches, i)
        wall, cpu = timed(lambda: (trainer.forward_backward(batch), trainer.optimizer_step(scheduler)), trainer.device)
        times.append(wall)
        cpu_times.append(cpu)
    return _result(times, cpu_times, spec, trainer.device)


def build_sentence_transformers(spec: dict, device):
    """The same pretrained model as a SentenceTransformer, CachedMultipleNegativesRankingLoss and AdamW."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss

    from dpr.models.hf_encoder import resolve_pretrained_path

    model = SentenceTransformer(resolve_pretrained_path(spec["model"]), device=str(device))
    model.max_seq_length = spec["sequence_length"]
    model.train()
    loss_fn = CachedMultipleNegativesRankingLoss(model, mini_batch_size=spec["q_chunk"])
    return model, loss_fn, torch.optim.AdamW(model.parameters(), lr=1e-5)


def sentence_transformers_step(loss_fn, optimizer, features) -> None:
    import torch

    loss = loss_fn(features, torch.empty(0))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def run_sentence_transformers(spec: dict) -> dict:
    """Steps of CachedMultipleNegativesRankingLoss with (question, positive, hard negative) triples."""
    import torch

    from dpr.data.biencoder_data import load_biencoder_samples

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, loss_fn, optimizer = build_sentence_transformers(spec, device)
    samples = load_biencoder_samples([spec["data"]])
    times, cpu_times = [], []
    for i in range(spec["steps"] + 1):
        chunk = samples[i * spec["batch"] : (i + 1) * spec["batch"]]
        columns = [
            [s.question for s in chunk],
            [f"{s.positive_passages[0].title} {s.positive_passages[0].text}" for s in chunk],
            [f"{(s.hard_negative_passages or s.negative_passages)[0].title} {(s.hard_negative_passages or s.negative_passages)[0].text}" for s in chunk],
        ]
        features = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in model.preprocess(c).items()} for c in columns]
        wall, cpu = timed(lambda: sentence_transformers_step(loss_fn, optimizer, features), device)
        times.append(wall)
        cpu_times.append(cpu)
    return _result(times, cpu_times, spec, device)


def sentence_transformers_features(batch, device) -> list:
    """A DPR batch as sentence-transformers' three columns (questions, positives, first hard negatives): the same
    token ids, each column cut to its longest row as sentence-transformers pads."""
    import torch

    hard = torch.tensor([indices[0] for indices in batch.hard_negative_indices])
    columns = [(batch.question_ids, batch.question_mask),
               (batch.context_ids[batch.positive_indices], batch.context_mask[batch.positive_indices]),
               (batch.context_ids[hard], batch.context_mask[hard])]
    features = []
    for ids, mask in columns:
        width = int(mask.sum(1).max())
        features.append({"input_ids": ids[:, :width].to(device), "attention_mask": mask[:, :width].to(device)})
    return features


def run_interleaved(spec: dict) -> dict:
    """Rounds of one step per variant on the same batch; the first round is warm-up. Returns each variant's wall
    and CPU seconds per timed round."""
    trainer, scheduler, batches = build_trainer(spec)
    _, st_loss, st_optimizer = build_sentence_transformers(spec, trainer.device)
    train_cfg = trainer.cfg.train

    def dpr(example_dropout: bool, ctx_chunk: int):
        def step(batch, features):
            train_cfg.example_dropout, train_cfg.ctx_chunk_size = example_dropout, ctx_chunk
            trainer.forward_backward(batch)
            trainer.optimizer_step(scheduler)
        return step

    q, ctx = spec["q_chunk"], spec["ctx_chunk"]
    variants = {
        f"cache {q}/{ctx}, per-example dropout": dpr(True, ctx),
        f"cache {q}/{ctx}, standard dropout": dpr(False, ctx),
        f"cache {q}/{q}, per-example dropout": dpr(True, q),
        f"sentence-transformers CachedMNRL, mini-batch {q}":
            lambda batch, features: sentence_transformers_step(st_loss, st_optimizer, features),
    }
    results = {name: {"step_s": [], "cpu_s": []} for name in variants}
    for round_ in range(spec["repeats"] + 1):
        batch = dpr_batch(trainer, batches, round_)
        features = sentence_transformers_features(batch, trainer.device)
        for name, step in variants.items():
            wall, cpu = timed(lambda: step(batch, features), trainer.device)
            print(f"round {round_} {name}: {wall:.2f} s, {cpu:.2f} CPU s", file=sys.stderr, flush=True)
            if round_ > 0:  # the first round is warm-up
                results[name]["step_s"].append(wall)
                results[name]["cpu_s"].append(cpu)
    return results


def _result(times, cpu_times, spec, device) -> dict:
    """Mean over the timed steps (the first is warm-up). CPU seconds are less sensitive than wall time to other
    load on a shared machine."""
    steps = spec["steps"]
    return {"step_s": sum(times[1:]) / steps, "cpu_s": sum(cpu_times[1:]) / steps, "peak_mb": peak_memory_mb(device)}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker(spec_json: str) -> None:
    import torch

    spec = json.loads(spec_json)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    runners = {"st": run_sentence_transformers, "dpr": run_dpr, "interleaved": run_interleaved}
    result = runners[spec["kind"]](spec)
    print("RESULT " + json.dumps(result), flush=True)


def measure(spec: dict) -> dict:
    """Run one spec in a fresh process; its progress and errors go to this process's stderr."""
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], stdout=subprocess.PIPE, text=True, cwd=str(REPO)
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError("benchmark worker failed (its error is above)")


def subset_file(data: str, n: int, folder: str) -> str:
    """The first n records, so every process parses the same small file (its memory is not the model's)."""
    from dpr.data.biencoder_data import iter_json_records

    records = []
    for _, record in iter_json_records(data):
        records.append(record)
        if len(records) == n:
            break
    path = os.path.join(folder, "subset.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/squad_open/biencoder-train.json"))
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--sequence_length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=128, help="global batch of the cache/no-cache comparison")
    parser.add_argument("--scaling_batches", default="16,32,64,128,256")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--interleaved", action="store_true",
                        help="per-example vs standard dropout and the cache vs sentence-transformers, interleaved")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of --interleaved")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per run (0: torch's default); 1 is fairer on a machine shared with other load")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    if args.interleaved:
        interleaved(args)
        return
    scaling = [int(b) for b in args.scaling_batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        data = subset_file(args.data, (args.steps + 1) * max(scaling + [args.batch]), tmp)
        base = dict(model=args.model, sequence_length=args.sequence_length, data=data, tmp=tmp, steps=args.steps,
                    bf16=args.bf16, kind="dpr", q_chunk=16, ctx_chunk=8, threads=args.threads)
        rows = [
            ("no cache", dict(base, batch=args.batch, cache=False)),
            ("cache 16/8", dict(base, batch=args.batch, cache=True)),
            ("cache 16/16", dict(base, batch=args.batch, cache=True, ctx_chunk=16)),
            ("sentence-transformers CachedMNRL, mini-batch 16", dict(base, batch=args.batch, kind="st")),
        ] + [(f"cache 16/8, batch {b}", dict(base, batch=b, cache=True)) for b in scaling]
        results = []
        for name, spec in rows:
            result = measure(spec)
            results.append((name, spec["batch"], result))
            print(f"{name:50s} batch {spec['batch']:4d}: {result['step_s']:8.2f} s/step, {result['cpu_s']:8.2f} CPU s/step, "
                  f"peak {result['peak_mb']:9.1f} MB", flush=True)
    print_markdown(results, args)


def interleaved(args) -> None:
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        data = subset_file(args.data, (args.repeats + 1) * args.batch, tmp)
        spec = dict(model=args.model, sequence_length=args.sequence_length, data=data, tmp=tmp, bf16=args.bf16,
                    kind="interleaved", batch=args.batch, cache=True, q_chunk=16, ctx_chunk=8, threads=args.threads,
                    repeats=args.repeats)
        results = measure(spec)
    print_machine(args)
    print(f"Load average (1, 5, 15 min): {load_before} before, {os.getloadavg()} after\n")
    print(f"| variant ({args.batch} questions, {2 * args.batch} passages) | s/step (mean) | s/step (min) | CPU s/step (mean) |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {_mean(r['step_s']):.2f} | {min(r['step_s']):.2f} | {_mean(r['cpu_s']):.2f} |")
    per_example, standard, wide, st = results.values()
    for unit in ("step_s", "cpu_s"):
        print(f"\n[{unit}] per-example / standard dropout: {_mean(per_example[unit]) / _mean(standard[unit]):.3f}x "
              f"(target <= 1.10x); cache 16/16 / sentence-transformers: {_mean(wide[unit]) / _mean(st[unit]):.3f}x; "
              f"cache 16/8 / sentence-transformers: {_mean(per_example[unit]) / _mean(st[unit]):.3f}x")
    print("\nJSON " + json.dumps({"args": vars(args), "load_before": load_before, "results": results}))


def _mean(values) -> float:
    return sum(values) / len(values)


def print_machine(args) -> None:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    print(f"\nMachine: {device}; torch {torch.__version__}; model {args.model}; sequence length {args.sequence_length}; "
          f"{'bf16' if args.bf16 else 'fp32'}; torch threads {args.threads or torch.get_num_threads()}; "
          f"date {time.strftime('%Y-%m-%d')}\n")


def print_markdown(results, args) -> None:
    by_name = {name: r for name, _, r in results}
    print_machine(args)
    print("| configuration | questions | passages | s/step | CPU s/step | peak memory (MB) |")
    print("|---|---|---|---|---|---|")
    for name, batch, r in results:
        print(f"| {name} | {batch} | {2 * batch} | {r['step_s']:.2f} | {r['cpu_s']:.2f} | {r['peak_mb']:.0f} |")
    cached, plain, st = by_name["cache 16/8"], by_name["no cache"], by_name["sentence-transformers CachedMNRL, mini-batch 16"]
    for unit in ("step_s", "cpu_s"):
        print(f"\n[{unit}] cached / uncached: {cached[unit] / plain[unit]:.2f}x (target <= 1.45x); "
              f"cache 16/16 / sentence-transformers CachedMNRL: {by_name['cache 16/16'][unit] / st[unit]:.2f}x")
    small = [r for n, b, r in results if n.startswith("cache 16/8, batch") and b == 16]
    large = [r for n, b, r in results if n.startswith("cache 16/8, batch") and b == 128]
    if small and large:
        print(f"peak memory batch 128 / batch 16 with the cache: {large[0]['peak_mb'] / small[0]['peak_mb']:.2f}x (target <= 1.3x)")


if __name__ == "__main__":
    main()
