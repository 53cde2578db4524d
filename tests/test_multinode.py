"""Two nodes on this machine: two torchrun launchers meeting through a c10d rendezvous on 127.0.0.1, started by
hand and by scripts/slurm_train.sh (srun and scontrol replaced by stand-ins), train as one process with the two
nodes' batch. c10d ranks the launchers by host name and process id, whatever --node_rank says (here: the launcher
started first is rank 0), so nothing may depend on which node is rank 0: the test starts node 1 first, then node 0
first."""
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures import write_retriever_json
from tests.tiny_models import tiny_bert_dir
from tests.training_helpers import assert_trains_as, compose_config, records_file, run_trainer, tiny_overrides

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "train_dense_encoder.py")
# 16 questions in global batches of 8: two steps, a checkpoint after the first (eval_per_epoch=2) and at the end
TRAINING = dict(train__warmup_steps=0, train__learning_rate=2e-5, train__eval_per_epoch=2, train__grad_cache="true",
                train__q_chunk_size=3, train__ctx_chunk_size=5)
PER_NODE_BATCH = dict(train__batch_size=4, train__dev_batch_size=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("multinode")
    data = {
        "model": tiny_bert_dir(folder / "bert", dropout=0.1),
        "train": write_retriever_json(folder / "train.json", 16),
        "dev": write_retriever_json(folder / "dev.json", 4),
    }
    # the reference: one process with the global batch, uninterrupted
    data["single"] = folder / "single"
    run_trainer(compose_config(training_arguments(data, data["single"], train__batch_size=8, train__dev_batch_size=4)))
    return data


def training_arguments(data, output_dir, **batch):
    return tiny_overrides(data["model"], data["train"], data["dev"], str(output_dir), **TRAINING, **batch)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_environment(**extra) -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **extra)


def wait_all(processes, logs, timeout=300, expected_code=0):
    """Wait for every process; on failure the assertion shows the tail of each log."""
    deadline = time.monotonic() + timeout
    try:
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    tails = "\n".join(f"--- {log}\n{Path(log).read_text()[-3000:]}" for log in logs)
    assert codes == [expected_code] * len(processes), tails


def train_on_two_nodes(data, output_dir, work_dir, start_order, expected_code=0):
    """Two launchers, one process each, as nodes `start_order` (node_ranks) started in that order."""
    port = free_port()
    processes, logs = [], []
    for node_rank in start_order:
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                   "--node_rank", str(node_rank), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
                   "--rdzv_id", "two-nodes", "--rdzv_conf", "join_timeout=120",
                   SCRIPT, *training_arguments(data, output_dir, **PER_NODE_BATCH)]
        log = work_dir / f"{Path(output_dir).name.replace('${oc.env:RANK}', '')}.node{node_rank}.log"
        with open(log, "w") as out:
            processes.append(subprocess.Popen(command, cwd=work_dir, env=launcher_environment(), stdout=out,
                                              stderr=subprocess.STDOUT))
        logs.append(log)
    wait_all(processes, logs, expected_code=expected_code)
    return logs


def steps(output_dir):
    return [r["step"] for r in records_file(output_dir, "step")]


def test_two_nodes_train_as_one_process_and_resume_to_the_same_end(data, tmp_path):
    two_nodes = tmp_path / "two_nodes"
    train_on_two_nodes(data, two_nodes, tmp_path, start_order=(1, 0))
    assert steps(two_nodes) == steps(data["single"]) == [1, 2]
    assert [r["step"] for r in records_file(two_nodes, "validation")] == [1, 2]
    assert_trains_as(data["single"], two_nodes)
    # Stopped after step 1, output_dir holds that step's checkpoint: the run continues from it (the launchers in
    # the other order) and ends where the uninterrupted single process did.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(two_nodes / "dpr_biencoder.0.1", resumed)
    train_on_two_nodes(data, resumed, tmp_path, start_order=(0, 1))
    assert steps(resumed) == [2]
    assert_trains_as(data["single"], resumed)


def test_nodes_that_would_resume_from_different_checkpoints_stop_in_one_line(data, tmp_path):
    """Each node with an output_dir of its own (a local disk), one of them holding a checkpoint: the ranks would
    run different numbers of steps and wait for each other at a collective until the timeout. They stop at once."""
    (tmp_path / "own_0").mkdir()
    shutil.copy(data["single"] / "dpr_biencoder.0.1", tmp_path / "own_0")
    logs = train_on_two_nodes(data, tmp_path / "own_${oc.env:RANK}", tmp_path, start_order=(0, 1), expected_code=1)
    for log in logs:
        assert ("error: the processes would resume from different checkpoints (rank 0: epoch 0, offset 1, "
                "rank 1: none (from the start)): output_dir must be one folder that every node sees") in Path(log).read_text()
    assert not (tmp_path / "own_1").exists() or not list((tmp_path / "own_1").glob("dpr_biencoder*"))


def write_stand_in(folder: Path, name: str, text: str) -> None:
    path = folder / name
    path.write_text(text)
    path.chmod(0o755)


SRUN = """#!/bin/bash
# srun stand-in: the command once per node of the allocation, all on this machine, as srun runs one task a node
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
  SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""

SCONTROL = """#!/bin/bash
# scontrol stand-in: `scontrol show hostnames LIST` names this machine once per node
[ "$1 $2" = "show hostnames" ] || { echo "scontrol stand-in: $* not supported" >&2; exit 2; }
for ((node = 0; node < SLURM_NNODES; node++)); do echo 127.0.0.1; done
"""


def test_the_slurm_script_trains_two_nodes_as_one_process(data, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_stand_in(bin_dir, "srun", SRUN)
    write_stand_in(bin_dir, "scontrol", SCONTROL)
    # this interpreter's torchrun, whether or not its console script is on PATH
    write_stand_in(bin_dir, "torchrun", f'#!/bin/bash\nexec "{sys.executable}" -m torch.distributed.run "$@"\n')
    output_dir = tmp_path / "slurm"
    env = launcher_environment(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_NNODES="2", SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="node[1-2]", SLURM_SUBMIT_DIR=str(REPO), NPROC_PER_NODE="1", RDZV_PORT=str(free_port()),
    )
    log = tmp_path / "slurm.log"
    with open(log, "w") as out:
        job = subprocess.Popen(["bash", str(REPO / "scripts" / "slurm_train.sh"),
                                *training_arguments(data, output_dir, **PER_NODE_BATCH)],
                               cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    wait_all([job], [log])
    assert steps(output_dir) == [1, 2]
    assert_trains_as(data["single"], output_dir)
