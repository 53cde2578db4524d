"""Where CI runs the suite ($DPR_FORBID_SKIPS=1, set by .ci/run), a test that skips fails: a missing extra, tool
or the shared data cannot let a run pass without the tests that need them."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SKIPPING_TESTS = """
import pytest

pytest.importorskip("a_module_that_is_not_installed_anywhere")
"""

SKIPPING_TEST = """
import pytest

def test_needs_the_data():
    pytest.skip("shared data not found")

@pytest.mark.skipif(True, reason="a tool is missing")
def test_needs_a_tool():
    pass

@pytest.mark.xfail(reason="a known failure stays an expected failure")
def test_known_failure():
    assert False
"""


@pytest.mark.parametrize("forbidden", [True, False], ids=["ci", "developer"])
def test_a_skip_fails_where_skips_are_forbidden(tmp_path, forbidden):
    (tmp_path / "test_module_skip.py").write_text(SKIPPING_TESTS)
    (tmp_path / "test_skip.py").write_text(SKIPPING_TEST)
    env = dict(os.environ, DPR_FORBID_SKIPS="1" if forbidden else "0", PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider",
                             "--continue-on-collection-errors", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    summary = result.stdout.strip().splitlines()[-1]
    if forbidden:
        # the module-level skip fails its collection, each test's skip fails the test (a skipif in its set-up)
        assert result.returncode == 1 and "skipped" not in summary and "1 xfailed" in summary, result.stdout[-3000:]
        for reason in ("could not import 'a_module_that_is_not_installed_anywhere'", "shared data not found",
                       "a tool is missing"):
            assert f"DPR_FORBID_SKIPS=1 forbids skips (CI installs every extra and has the shared data): " \
                   f"{reason}" in result.stdout, result.stdout[-3000:]
    else:
        assert result.returncode == 0 and "3 skipped" in summary and "1 xfailed" in summary, result.stdout[-3000:]


def test_ci_forbids_skips():
    assert "export DPR_FORBID_SKIPS=1" in (REPO / ".ci" / "run").read_text()
