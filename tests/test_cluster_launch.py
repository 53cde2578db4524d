"""The cluster path of generate_dense_embeddings.py (`-m ... hydra/launcher=submitit_slurm`) run here through the
same plugin's local launcher: submitit starts each shard as a job of its own."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dpr.data.embeddings_io import read_embeddings, shard_path
from tests.retrieval_helpers import passages, tiny_model, write_passages_tsv

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[cluster]'")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cluster")
    return {"model": tiny_model(folder / "bert"), "psgs": write_passages_tsv(folder / "psgs.tsv")}


def sweep(data, tmp_path, shard_ids, out_file, python_path=()):
    command = [sys.executable, str(REPO / "generate_dense_embeddings.py"), "-m", "hydra/launcher=local",
               f"shard_id={shard_ids}", "num_shards=2", f"encoder.pretrained_model_cfg={data['model']}",
               "encoder.sequence_length=32", f"ctx_src={data['psgs']}", f"out_file={out_file}", "out_format=npz",
               "num_workers=0", f"hydra.sweep.dir={tmp_path / 'multirun'}"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*map(str, python_path), str(REPO)]), OMP_NUM_THREADS="1")
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_each_shard_is_a_job_written_once_and_a_rerun_skips_them(data, tmp_path):
    out_file = tmp_path / "embs" / "psgs"
    first = sweep(data, tmp_path, "0,1", out_file)
    assert first.returncode == 0, first.stderr[-3000:]
    jobs = list((tmp_path / "multirun" / ".submitit").glob("*/*_submitted.pkl"))
    assert len(jobs) == 2  # two submitit jobs, one per shard
    shards = [shard_path(out_file, shard, "npz") for shard in range(2)]
    assert [i for shard in shards for i in read_embeddings(shard)[0]] == [row[0] for row in passages()]
    written = [shard.stat().st_mtime_ns for shard in shards]
    second = sweep(data, tmp_path, "0,1", out_file)
    assert second.returncode == 0, second.stderr[-3000:]
    assert [shard.stat().st_mtime_ns for shard in shards] == written


def test_a_failed_shard_job_is_named_with_its_log(data, tmp_path):
    result = sweep(data, tmp_path, "0,7", tmp_path / "embs" / "psgs")
    assert result.returncode == 1
    failure = re.search(r"job 1 \(shard_id=7 .*\) failed: (.*); its log: (\S+)", result.stderr)
    assert failure, result.stderr[-3000:]
    assert "shard_id 7 is not in" in failure.group(1) and "Traceback" not in result.stderr
    assert "shard_id 7 is not in" in Path(failure.group(2)).read_text()  # the job's log names the error


# In the first submitit job process to start (and only there): die as a job the cluster kills does.
KILL_FIRST_JOB = """
import os, signal
if os.environ.get("SUBMITIT_LOCAL_JOB_ID"):
    try:
        os.close(os.open(os.environ["DPR_TEST_KILLED_MARK"], os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        pass
    else:
        os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_shard_job_is_named_in_one_line(data, tmp_path, monkeypatch):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(KILL_FIRST_JOB)
    monkeypatch.setenv("DPR_TEST_KILLED_MARK", str(tmp_path / "killed"))
    out_file = tmp_path / "embs" / "psgs"
    result = sweep(data, tmp_path, "0,1", out_file, python_path=[hooks])
    assert result.returncode == 1 and (tmp_path / "killed").exists()
    failure = re.search(r"job (\d) \(shard_id=(\d) .*\) ended without a result.*Its log: (\S+)\. Run the sweep again",
                        result.stderr)
    assert failure, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and failure.group(1) == failure.group(2)  # job n is shard n here
    killed = int(failure.group(2))
    assert not shard_path(out_file, killed, "npz").exists()
    again = sweep(data, tmp_path, "0,1", out_file)  # the way out the line gives
    assert again.returncode == 0, again.stderr[-3000:]
    assert shard_path(out_file, killed, "npz").exists()
