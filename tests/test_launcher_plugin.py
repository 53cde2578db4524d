"""hydra_plugins/dpr_launcher without the `cluster` extra, and its one line for a killed job when submitit's record
of the job cannot be read. Hydra imports the plugin at every start of every entry script."""
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# As a machine without the cluster extra: submitit cannot be imported and hydra_plugins holds only this
# repository's plugin (not hydra_submitit_launcher). `plugin_too=0` keeps the plugin and blocks submitit only.
WITHOUT_CLUSTER_EXTRA = """
import importlib.abc, os, sys
class _NoSubmitit(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "submitit":
            raise ImportError(f"No module named {name!r}")
        return None
sys.meta_path.insert(0, _NoSubmitit())
if os.environ.get("DPR_TEST_BLOCK_PLUGIN") == "1":
    import hydra_plugins
    hydra_plugins.__path__ = [os.path.join(os.environ["DPR_TEST_REPO"], "hydra_plugins")]
"""


def run_without_cluster_extra(tmp_path, arguments, block_plugin=True):
    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(WITHOUT_CLUSTER_EXTRA)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hooks), str(REPO)]), PYTHONWARNINGS="error",
               DPR_TEST_BLOCK_PLUGIN="1" if block_plugin else "0", DPR_TEST_REPO=str(REPO))
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-W", "error", *arguments], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("block_plugin", [True, False], ids=["no-extra", "no-submitit"])
def test_an_entry_point_starts_without_a_warning_when_submitit_is_missing(tmp_path, block_plugin):
    result = run_without_cluster_extra(tmp_path, [str(REPO / "train_reader.py"), "--cfg", "job"], block_plugin)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "output_dir" in result.stdout  # the job's configuration was printed: hydra started fully
    assert "Plugin is incompatible" not in result.stderr and "Warning" not in result.stderr, result.stderr[-3000:]


def test_a_submitit_launcher_without_the_cluster_extra_is_one_line_naming_it(tmp_path):
    result = run_without_cluster_extra(
        tmp_path, [str(REPO / "generate_dense_embeddings.py"), "-m", "hydra/launcher=local", "shard_id=0,1",
                   "num_shards=2", f"hydra.sweep.dir={tmp_path / 'multirun'}"])
    assert result.returncode == 1
    assert "not installed: pip install -e '.[cluster]'" in result.stderr and "Traceback" not in result.stderr


@pytest.fixture
def named_failures():
    from hydra_plugins.dpr_launcher import named_failures

    return named_failures


def killed(job_id="4242"):
    from submitit.core.utils import UncompletedJobError

    return UncompletedJobError(f"Job {job_id} (task: 0) with path /x/y\nhas not produced any output (state: KILLED)")


def test_a_killed_job_is_named_from_its_submission_record(named_failures, tmp_path):
    from submitit.core.utils import DelayedSubmission, JobPaths

    DelayedSubmission(print, ["shard_id=3", "num_shards=4"], "multirun/0", 3, "x", {}).dump(
        JobPaths(tmp_path, job_id="4242", task_id=0).submitted_pickle)
    message = str(named_failures._job_failure(killed(), str(tmp_path)))
    assert message.startswith("job 3 (shard_id=3 num_shards=4) ended without a result (state: KILLED)")


@pytest.mark.parametrize("record", [None, b"not a pickle", pickle.dumps({"another": "layout"})],
                         ids=["missing", "unreadable", "another-layout"])
def test_a_killed_job_whose_record_cannot_be_read_gets_the_generic_line(named_failures, tmp_path, record):
    from submitit.core.utils import JobPaths

    if record is not None:
        path = JobPaths(tmp_path, job_id="4242", task_id=0).submitted_pickle
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(record)
    message = str(named_failures._job_failure(killed(), str(tmp_path)))
    assert message == (f"a job of the sweep ended without a result: Job 4242 (task: 0) with path /x/y; the jobs' "
                       f"logs: {tmp_path}")
