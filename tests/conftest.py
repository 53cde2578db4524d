import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# train.compile_dropout's default for the suite's training runs, in this process and the processes it starts: each
# would spend seconds compiling the dropout kernel for a few tiny steps. The compiled draw gives the eager draw's
# masks bit for bit; tests/test_example_dropout.py proves that and trains with it.
os.environ.setdefault("DPR_COMPILE_DROPOUT", "false")


def shared_data_dir() -> Path:
    """The real data of ../shared/data (or $DPR_SHARED_DATA); tests that need it skip when it is absent."""
    env = os.environ.get("DPR_SHARED_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path}")
    return path
