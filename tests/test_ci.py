"""``tests/ci.py``: under CI=true a test that cannot install its dependency fails, never skips."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


@pytest.mark.parametrize("ci, outcome", [("true", "1 failed"), ("", "1 skipped")])
def test_unavailable_dependency_fails_only_under_ci(tmp_path, ci, outcome):
    (tmp_path / "test_needs_tool.py").write_text(
        "from ci import unavailable\n\n"
        "def test_needs_tool():\n"
        "    unavailable('pip cannot install the-tool==1.0 (no network)')\n")
    env = {**os.environ, "CI": ci, "PYTHONPATH": str(TESTS)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-rfs", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert outcome in proc.stdout, proc.stdout
    assert "pip cannot install the-tool==1.0" in proc.stdout
    if ci:
        assert proc.returncode == 1 and "CI must run it" in proc.stdout
