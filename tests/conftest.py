import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# train.compile_dropout's default for the suite's training runs, in this process and the processes it starts: each
# would spend seconds compiling the dropout kernel for a few tiny steps. The compiled draw gives the eager draw's
# masks bit for bit; tests/test_example_dropout.py proves that and trains with it.
os.environ.setdefault("DPR_COMPILE_DROPOUT", "false")


# CI (.ci/run) installs every extra and has the shared data: there, a test that skips is a failure, so a missing
# extra, tool or data set cannot pass unseen. A developer's `make test` without them skips those tests.
FORBID_SKIPS_ENV = "DPR_FORBID_SKIPS"


def _skip_reason(report) -> str:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return reason.removeprefix("Skipped: ")


def _fail_a_skip(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail") and os.environ.get(FORBID_SKIPS_ENV) == "1":
        report.outcome = "failed"
        report.longrepr = (f"skipped where {FORBID_SKIPS_ENV}=1 forbids skips (CI installs every extra and has the "
                           f"shared data): {_skip_reason(report)}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_a_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_a_skip(outcome.get_result())


def shared_data_dir() -> Path:
    """The real data of ../shared/data (or $DPR_SHARED_DATA); tests that need it skip when it is absent (a failure
    where $DPR_FORBID_SKIPS=1)."""
    env = os.environ.get("DPR_SHARED_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path}")
    return path
