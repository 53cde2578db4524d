"""bench/gpu_check.py in its CPU mode, with faiss and bm25s unimportable (the GPU machine has neither), so the
script the GPU machine runs cannot rot."""
import json
import runpy
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.py"
NOT_NEEDED = ["faiss", "bm25s"]


def test_gpu_check_passes_its_checks_and_measures_every_section_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    code = (f"import runpy, sys; sys.modules.update(dict.fromkeys({NOT_NEEDED!r})); "
            f"sys.argv = ['gpu_check.py', '--cpu', '--tiny', '--out', {str(out)!r}]; "
            f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())

    checks = results["checks"]
    assert set(checks) == {"cache_equals_full_batch_fp32", "gradient_checkpointing_fp32", "fp16_grad_scaler", "bf16",
                           "replay"}
    assert all(check["passed"] is True for check in checks.values()), checks
    assert checks["cache_equals_full_batch_fp32"]["gradient_error_over_tolerance"] <= 1.0
    assert checks["gradient_checkpointing_fp32"]["gradient_error_over_tolerance"] <= 1.0
    assert checks["fp16_grad_scaler"]["inf_step_skipped"] and checks["replay"]["masks_equal_to_cpu_masks"]

    assert results["dropout_call"]["per_example_ms"] > 0 and results["dropout_call"]["standard_ms"] > 0
    assert results["compiled_dropout"]["skipped"].startswith("on CPU")  # timed on CUDA only

    steps = results["recipe"]["steps"]
    assert {(r["precision"], r["example_dropout"]) for r in steps} == {
        (p, e) for p in ("fp16", "bf16") for e in (True, False)}
    assert all(r["cache"] and r["s_per_step"] > 0 and r["questions_per_s"] > 0 and r["tflops"] > 0 for r in steps)

    embedding = results["embedding"]
    assert embedding["dpr_passages_per_s"] > 0 and embedding["sentence_transformers_passages_per_s"] > 0
    assert embedding["min_cosine_dpr_vs_sentence_transformers"] > 0.99  # the same model on both sides

    memory = results["memory"]
    assert memory["precision"] == "bf16" and memory["peak_is"].startswith("the process's")  # the CPU mode's
    assert all(size > 0 for size in memory["parts"].values())  # the breakdown's consistency: test_bench_memory.py

    largest = results["no_cache"]["largest"]
    assert largest is not None and not largest["cache"] and largest["s_per_step"] > 0


def gpu_check_module() -> SimpleNamespace:
    """The script's functions (its __main__ block does not run)."""
    return SimpleNamespace(**runpy.run_path(str(SCRIPT)))


def test_the_results_go_to_a_folder_git_ignores_unless_out_names_a_file():
    gpu_check = gpu_check_module()
    default = Path(gpu_check.parse_arguments([]).out)
    assert default.is_relative_to(REPO)
    ignored = subprocess.run(["git", "check-ignore", "-q", str(default)], cwd=REPO)
    assert ignored.returncode == 0, f"{default} is not ignored by git"
    assert gpu_check.parse_arguments(["--out", "elsewhere.json"]).out == "elsewhere.json"


def test_the_compiled_dropout_section_runs_and_its_masks_equal_the_eager_ones():
    """On CPU here (the script runs it on CUDA only): the section's code cannot rot unseen."""
    gpu_check = gpu_check_module()
    section = gpu_check.compiled_dropout_cost(gpu_check.sizes(tiny=True), torch.device("cpu"))
    assert section["passed"] is True and section["compile_failure"] is None
    for dtype in ("float32", "bfloat16"):
        row = section[dtype]
        assert row["equal_to_eager"] and row["equal_to_cpu_eager"]
        assert row["compiled_ms"] > 0 and row["eager_ms"] > 0 and row["first_compiled_call_s"] > 0
