"""A failed job of a multirun (a shard of a cluster sweep): one line for the launching process, naming the job and
its log; the log keeps the traceback when the failure is a bug of ours, not a user error."""
import logging
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from dpr.foundation.errors import JobFailedError, UserInputError, user_errors_in_one_line

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def multirun_job(tmp_path):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose("gen_embs", overrides=["shard_id=3"], return_hydra_config=True)
    cfg.hydra.mode = "MULTIRUN"
    cfg.hydra.runtime.output_dir = str(tmp_path)
    cfg.hydra.job.num = 3
    cfg.hydra.job.name = "generate_dense_embeddings"
    cfg.hydra.overrides.task = ["shard_id=3"]
    HydraConfig.instance().set_config(cfg)
    yield tmp_path
    HydraConfig.instance().cfg = None


@pytest.mark.parametrize("error, traceback_logged", [(RuntimeError("a bug"), True), (UserInputError("bad file"), False)])
def test_a_multirun_job_failure_is_one_line_and_its_log_has_the_traceback_of_a_bug(
    multirun_job, caplog, monkeypatch, error, traceback_logged
):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with caplog.at_level(logging.ERROR), pytest.raises(JobFailedError) as failed:
        with user_errors_in_one_line():
            raise error
    message = str(failed.value)
    assert message.startswith("job 3 (shard_id=3) failed: ") and str(error) in message
    assert message.endswith(f"its log: {multirun_job / 'generate_dense_embeddings.log'}")
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert bool(record.exc_info) == traceback_logged  # the job log keeps the traceback of a bug only
