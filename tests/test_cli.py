"""The real command lines, run as a user runs them: GC-DPR flags, hydra overrides, torchrun."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.fixtures import write_retriever_json
from tests.tiny_models import tiny_bert_dir
from tests.training_helpers import assert_trains_as, records_file

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "train_dense_encoder.py")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    return {
        "model": tiny_bert_dir(folder / "bert", dropout=0.1),
        "train": write_retriever_json(folder / "train.json", 16),
        "dev": write_retriever_json(folder / "dev.json", 4),
        # passage ids by topic: gold passages recur among other questions' contexts (in-batch false negatives)
        "train_topics": write_retriever_json(folder / "train_topics.json", 16, topic_ids=True),
    }


def run(args, cwd, launcher=(sys.executable,), expect_ok=True, **env_changes):
    """Exit status and output of the command; env_changes set (None: remove) environment variables."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for name, value in env_changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    proc = subprocess.run([*launcher, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    if expect_ok:
        assert proc.returncode == 0, output[-3000:]
    return proc.returncode, output


def steps(output_dir):
    """(step, loss, grad_norm) of each optimizer update, from the records file the run wrote."""
    return [(r["step"], r["loss"], r["grad_norm"]) for r in records_file(output_dir, "step")]


def test_gc_dpr_command_line(data, tmp_path):
    out = tmp_path / "gc"
    _, output = run([
        SCRIPT, "--encoder_model_type", "hf_bert", "--pretrained_model_cfg", data["model"], "--train_file", data["train"],
        "--dev_file", data["dev"], "--output_dir", str(out), "--batch_size", "8", "--sequence_length", "48",
        "--do_lower_case", "--learning_rate", "2e-05", "--warmup_steps", "1", "--max_grad_norm", "2.0",
        "--num_train_epochs", "1", "--seed", "12345", "--grad_cache", "--q_chunk_size", "2", "--ctx_chunk_size", "3",
        "--log_batch_step", "1",
    ], tmp_path)
    assert [s[0] for s in steps(out)] == [1, 2]
    assert "Gradient cache: on, chunks q=2 ctx=3" in output
    assert [r["metric"] for r in records_file(out, "validation")] == ["nll_loss"]
    state = torch.load(out / "dpr_biencoder.0", weights_only=True)
    assert state["encoder_params"]["encoder"]["sequence_length"] == 48 and state["encoder_params"]["do_lower_case"]


def test_hydra_command_line(data, tmp_path):
    """With train.compile_dropout at its default (true: the suite's conftest turns it off for every other run), so
    that the compiled dropout draw runs as a user's training runs it: it compiles (inductor writes its kernels)."""
    out, inductor = tmp_path / "hydra", tmp_path / "inductor"
    _, output = run([
        SCRIPT, f"train_datasets=[{data['train']}]", f"dev_datasets=[{data['dev']}]", f"output_dir={out}",
        f"encoder.pretrained_model_cfg={data['model']}", "encoder.sequence_length=48", "train.batch_size=8",
        "train.num_train_epochs=1", "train.log_batch_step=1",
    ], tmp_path, DPR_COMPILE_DROPOUT=None, TORCHINDUCTOR_CACHE_DIR=str(inductor))
    assert [s[0] for s in steps(out)] == [1, 2] and (out / "dpr_biencoder.0").exists()
    assert any(path.is_file() for path in inductor.rglob("*")), "the dropout kernel was compiled"


def test_bad_flag_and_bad_file_fail_clearly(data, tmp_path):
    code, output = run([SCRIPT, "--batchsize", "4"], tmp_path, expect_ok=False)
    assert code == 2 and "unknown option '--batchsize'" in output and "--batch_size" in output
    bad = tmp_path / "bad.json"
    bad.write_text('[{"question": "q"')
    code, output = run([SCRIPT, f"train_datasets=[{bad}]", f"output_dir={tmp_path / 'o'}",
                        f"encoder.pretrained_model_cfg={data['model']}"], tmp_path, expect_ok=False)
    assert code != 0 and re.search(r"bad.json: not valid JSON at line 1", output)


def test_a_sequence_length_without_room_for_text_is_a_one_line_error_before_any_data_is_read(data, tmp_path):
    """The training file does not exist: the run must stop at the config error, before reading it."""
    code, output = run([SCRIPT, f"train_datasets=[{tmp_path / 'missing.json'}]", f"output_dir={tmp_path / 'o'}",
                        f"encoder.pretrained_model_cfg={data['model']}", "encoder.sequence_length=0"],
                       tmp_path, expect_ok=False)
    assert code == 1 and output.strip().splitlines()[-1].startswith(
        "error: encoder.sequence_length=0 leaves no room for text after [CLS] and [SEP]")


@pytest.mark.parametrize("in_batch_negatives,two_process_extra", [
    ("all", []), ("mask_duplicates", []), ("mask_answers", []), ("all", ["encoder.gradient_checkpointing=true"])],
    ids=["all", "mask_duplicates", "mask_answers", "two_processes_checkpoint"])
def test_two_processes_equal_one_process_with_the_global_batch(data, tmp_path, in_batch_negatives, two_process_extra):
    """torchrun with 2 gloo processes of batch 4 against 1 process of batch 8, dropout on, false negatives masked
    or not: same losses, gradient norms, masked pairs and weights; also when the two processes recompute
    activations (gradient checkpointing) and the one does not."""
    train = data["train"] if in_batch_negatives == "all" else data["train_topics"]
    common = [f"train_datasets=[{train}]", f"dev_datasets=[{data['dev']}]", f"encoder.pretrained_model_cfg={data['model']}",
              "encoder.sequence_length=48", "train.num_train_epochs=1", "train.log_batch_step=1", "train.warmup_steps=0",
              "train.learning_rate=2e-5", "train.grad_cache=true", "train.q_chunk_size=3", "train.ctx_chunk_size=5",
              f"train.in_batch_negatives={in_batch_negatives}"]
    # batch sizes are per process, as in DPR under DDP
    _, single = run([SCRIPT, *common, "train.batch_size=8", "train.dev_batch_size=4", f"output_dir={tmp_path / 'one'}"], tmp_path)
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    _, double = run([SCRIPT, *common, *two_process_extra, "train.batch_size=4", "train.dev_batch_size=2",
                     f"output_dir={tmp_path / 'two'}"], tmp_path, launcher=torchrun)
    assert "rank 1 of 2" in double and double.count("Total cleaned data size") == 2  # rank 0 speaks for all
    assert [s[0] for s in steps(tmp_path / "one")] == [s[0] for s in steps(tmp_path / "two")] == [1, 2]
    assert len(records_file(tmp_path / "two", "validation")) == 1
    assert_trains_as(tmp_path / "one", tmp_path / "two")
    masked = [r["masked_pairs"] for r in records_file(tmp_path / "two", "step")]
    assert masked == [None, None] if in_batch_negatives == "all" else all(m > 0 for m in masked)


HOLD_OUTPUT_DIR = """import sys, time
from dpr.foundation.run_lock import acquire_run_lock
lock = acquire_run_lock(sys.argv[1], "output_dir")
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_training_into_a_busy_output_dir_is_one_line(data, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    first = subprocess.Popen([sys.executable, "-c", HOLD_OUTPUT_DIR, str(out)], env=env, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert first.stdout.readline().strip() == "held"
        code, output = run([SCRIPT, f"train_datasets=[{data['train']}]", f"output_dir={out}",
                            f"encoder.pretrained_model_cfg={data['model']}", "encoder.sequence_length=48"],
                           tmp_path, expect_ok=False, HYDRA_FULL_ERROR=None)
    finally:
        first.kill()
        first.wait()
    last = output.strip().splitlines()[-1]
    assert code == 1 and "Traceback" not in output
    assert last.startswith(f"error: output_dir={out} is in use by another run (-c, pid {first.pid} on ")
