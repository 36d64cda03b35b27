"""conftest's session check: a test session that leaves a file in the checkout fails, naming the
file; one that writes only under tmp paths (and Python's caches) passes. Each runs the real
check in a pytest of its own, in a throwaway git checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, checkout_entries, gained_entries

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")

# the inner session's conftest takes the check from ours, so this tests that very fixture
INNER_CONFTEST = "from tests.conftest import _checkout_left_clean  # noqa: F401\n"


def _checkout(folder: Path) -> Path:
    """An empty git checkout with a pytest.ini, so that the inner session's rootdir is it."""
    subprocess.run(["git", "init", "-q", str(folder)], check=True, timeout=60)
    (folder / "pytest.ini").write_text("[pytest]\n")
    (folder / "conftest.py").write_text(INNER_CONFTEST)
    return folder


def _session(folder: Path, test: str) -> subprocess.CompletedProcess:
    """A pytest session in `folder` running the single test whose body is `test`."""
    (folder / "test_inner.py").write_text(f"from pathlib import Path\n\n\ndef test_inner():\n"
                                          f"    {test}\n")
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "test_inner.py"], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=120)


def test_a_session_that_leaves_a_file_in_the_checkout_fails(tmp_path):
    folder = _checkout(tmp_path / "checkout")
    done = _session(folder, 'Path("left-behind.csv").write_text("x")')
    assert done.returncode != 0, done.stdout
    assert "the tests left files in the checkout" in done.stdout
    assert "left-behind.csv" in done.stdout


def test_a_session_that_writes_under_tmp_paths_passes(tmp_path):
    folder = _checkout(tmp_path / "checkout")
    outside = tmp_path / "outside"
    done = _session(folder, f'Path({str(outside)!r}).write_text("x")')
    assert done.returncode == 0, done.stdout + done.stderr
    assert outside.exists()


def test_checkout_entries_names_new_files_but_not_python_caches(tmp_path):
    folder = _checkout(tmp_path / "checkout")
    before = checkout_entries(folder)
    (folder / "mlflow.db").write_text("")
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "x.pyc").write_text("")
    assert gained_entries(before, checkout_entries(folder)) == ["mlflow.db"]
    assert gained_entries(None, checkout_entries(folder)) == []
    assert checkout_entries(tmp_path / "not-a-checkout") is None
