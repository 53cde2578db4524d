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
    }


def run(args, cwd, launcher=(sys.executable,), expect_ok=True):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
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
    out = tmp_path / "hydra"
    _, output = run([
        SCRIPT, f"train_datasets=[{data['train']}]", f"dev_datasets=[{data['dev']}]", f"output_dir={out}",
        f"encoder.pretrained_model_cfg={data['model']}", "encoder.sequence_length=48", "train.batch_size=8",
        "train.num_train_epochs=1", "train.log_batch_step=1",
    ], tmp_path)
    assert [s[0] for s in steps(out)] == [1, 2] and (out / "dpr_biencoder.0").exists()


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


@pytest.mark.parametrize("two_process_extra", [[], ["encoder.gradient_checkpointing=true"]],
                         ids=["plain", "two_processes_checkpoint"])
def test_two_processes_equal_one_process_with_the_global_batch(data, tmp_path, two_process_extra):
    """torchrun with 2 gloo processes of batch 4 against 1 process of batch 8, dropout on: same losses, gradient
    norms and weights; also when the two processes recompute activations (gradient checkpointing) and the one
    does not."""
    common = [f"train_datasets=[{data['train']}]", f"dev_datasets=[{data['dev']}]", f"encoder.pretrained_model_cfg={data['model']}",
              "encoder.sequence_length=48", "train.num_train_epochs=1", "train.log_batch_step=1", "train.warmup_steps=0",
              "train.learning_rate=2e-5", "train.grad_cache=true", "train.q_chunk_size=3", "train.ctx_chunk_size=5",
              ]
    # batch sizes are per process, as in DPR under DDP
    _, single = run([SCRIPT, *common, "train.batch_size=8", "train.dev_batch_size=4", f"output_dir={tmp_path / 'one'}"], tmp_path)
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    _, double = run([SCRIPT, *common, *two_process_extra, "train.batch_size=4", "train.dev_batch_size=2",
                     f"output_dir={tmp_path / 'two'}"], tmp_path, launcher=torchrun)
    assert "rank 1 of 2" in double and double.count("Total cleaned data size") == 2  # rank 0 speaks for all
    assert [s[0] for s in steps(tmp_path / "one")] == [s[0] for s in steps(tmp_path / "two")] == [1, 2]
    assert len(records_file(tmp_path / "two", "validation")) == 1
    assert_trains_as(tmp_path / "one", tmp_path / "two")
