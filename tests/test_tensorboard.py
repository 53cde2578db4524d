"""TensorBoard is the `tensorboard` extra: without it a run says nothing above debug level and writes no scalars;
with it the scalars land in the log folder."""
import logging
import sys

import pytest

from dpr.foundation.tensorboard import ScalarLog


def test_without_the_extra_a_run_logs_nothing_above_debug_and_writes_nothing(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # importing it raises ImportError
    caplog.set_level(logging.DEBUG)
    scalars = ScalarLog(str(tmp_path / "tensorboard"))
    scalars.add("train/loss", 1.0, 1)
    scalars.close()
    assert [r for r in caplog.records if r.levelno >= logging.INFO] == []
    assert not scalars.writing
    assert not (tmp_path / "tensorboard").exists()


def test_with_the_extra_the_scalars_are_written(tmp_path):
    pytest.importorskip("tensorboard", reason='pip install -e ".[tensorboard]"')
    scalars = ScalarLog(str(tmp_path / "tensorboard"))
    scalars.add("train/loss", 1.0, 1)
    scalars.close()
    assert scalars.writing
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
