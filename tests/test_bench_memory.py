"""bench/bench_memory.py on a tiny BERT: its breakdown of the recipe's memory is consistent (each configuration in
a fresh process, as the real run)."""
import runpy
from pathlib import Path

BENCH = runpy.run_path(str(Path(__file__).resolve().parents[1] / "bench" / "bench_memory.py"))


def test_breakdown_is_consistent_and_flat_in_the_batch():
    small, large = BENCH["main"](["--tiny", "--batches", "4", "8", "--precisions", "fp32", "--threads", "1"])
    for r in (small, large):
        parts = r["parts"]
        assert parts["parameters"] == 4 * r["parameter_count"]  # fp32
        assert parts["gradients"] == 4 * r["trained_parameter_count"]  # fp32; the unused poolers have none
        # exp_avg and exp_avg_sq per trained parameter, and a scalar step count per tensor
        assert 2 * parts["gradients"] <= parts["adamw_state"] <= 2.01 * parts["gradients"]
        assert parts["chunk_activations"] > 0
        # not peak - runtime: at this size the imports' transient resident peak can exceed the whole training's
        assert sum(parts.values()) <= r["peak"]
    # the cache's representations grow with the batch, one chunk's activations do not
    assert large["parts"]["cache_representations"] == 2 * small["parts"]["cache_representations"]
    assert large["parts"]["chunk_activations"] == small["parts"]["chunk_activations"]


def test_gradient_checkpointing_keeps_less_of_one_chunk_and_the_largest_chunk_that_fits_grows():
    (r,) = BENCH["main"](["--tiny", "--batches", "4", "--precisions", "fp32", "--threads", "1",
                          "--gradient_checkpointing", "--chunks", "2", "3"])
    largest_chunks_fit_and_one_more_row_does_not(r)
    assert r["gradient_checkpointing"] is True and (r["q_chunk"], r["ctx_chunk"]) == (2, 3)
    without = r["activations_without_checkpointing"]
    for chunk in ("question_chunk", "passage_chunk"):
        assert 0 < r["activations"][chunk] < without[chunk]
    assert r["parts"]["chunk_activations"] == max(r["activations"].values())
    assert len(r["step_seconds"]) == 2 and all(s > 0 for s in r["step_seconds"])


def largest_chunks_fit_and_one_more_row_does_not(r: dict) -> None:
    largest = BENCH["largest_chunks_within_target"](r)
    assert largest["with_checkpointing"] > largest["without_checkpointing"] > 0
    plain, layers = r["activations_without_checkpointing"], r["layers"]

    def projected_gib(q_rows: int, checkpointed: bool) -> float:
        def held(chunk, rows):  # per row: all layers' activations, or the layers' inputs plus one layer recomputed
            return (r["activations"][chunk] + plain[chunk] / layers) / rows if checkpointed else plain[chunk] / rows
        per_row = max(held("question_chunk", r["q_chunk"]), held("passage_chunk", r["ctx_chunk"]) / 2)
        return BENCH["projection_fp16_gpu"]({**r, "parts": {**r["parts"], "chunk_activations": per_row * q_rows}})[
            "total_gib"]

    for key, checkpointed in (("with_checkpointing", True), ("without_checkpointing", False)):
        rows = largest[key]
        assert projected_gib(rows, checkpointed) <= BENCH["TARGET_GIB"] < projected_gib(rows + 1, checkpointed)


def test_time_only_times_the_steps_without_the_breakdown():
    (r,) = BENCH["main"](["--tiny", "--batches", "4", "--precisions", "fp32", "--threads", "1",
                          "--gradient_checkpointing", "--chunks", "4", "2", "--time_only", "--steps", "3"])
    assert len(r["step_seconds"]) == 3 and all(s > 0 for s in r["step_seconds"]) and r["peak"] > 0
    assert "parts" not in r and r["gradient_checkpointing"] is True
