"""``tests/ci.py``: under CI=true a test skips only for an allow-listed reason; any other skip
(a missing install, a missing ../shared, a skip marker) fails the run."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from ci import ALLOWED_SKIPS, allowed

TESTS = Path(__file__).resolve().parent

# The suite's own wiring (tests/conftest.py registers the guard the same way).
CONFTEST = """
from ci import SkipGuard, in_ci


def pytest_configure(config):
    if in_ci():
        config.pluginmanager.register(SkipGuard(), "dermedge-ci-skip-guard")
"""
# One test per way a test can skip, and one allow-listed skip.
SKIPS = """
import pytest
from ci import need, skip_unless, unavailable


@pytest.fixture
def tool():
    unavailable("the-tool is not installed (fixture)")


def test_allow_listed():
    unavailable("needs a GPU: none visible")


def test_unavailable():
    unavailable("pip cannot install the-tool==1.0 (no network)")


def test_plain_skip():
    pytest.skip("no ../shared here")


@skip_unless(False, "needs Linux /proc")
def test_marker():
    pass


@pytest.mark.skipif(True, reason="raw skipif marker")
def test_raw_marker():
    pass


def test_fixture(tool):
    pass
"""
MODULE_SKIP = """
from ci import need

need("a_module_that_does_not_exist", "the dev extra installs it")


def test_never_collected():
    pass
"""


def _run(tmp_path: Path, ci: str, *files: str) -> subprocess.CompletedProcess:
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_skips.py").write_text(SKIPS)
    (tmp_path / "test_module_skip.py").write_text(MODULE_SKIP)
    env = {**os.environ, "CI": ci, "PYTHONPATH": str(TESTS)}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-rfEs", *files], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)


def test_outside_ci_every_missing_dependency_skips(tmp_path):
    proc = _run(tmp_path, "", "test_skips.py", "test_module_skip.py")
    assert proc.returncode == 0, proc.stdout
    assert re.search(r"\b7 skipped\b", proc.stdout), proc.stdout
    assert "pip cannot install the-tool==1.0" in proc.stdout


def test_under_ci_only_allow_listed_reasons_skip(tmp_path):
    proc = _run(tmp_path, "true", "test_skips.py")
    out = proc.stdout
    assert proc.returncode == 1, out
    # unavailable and a plain skip fail; both markers and the fixture skip at setup, so they
    # are errors; the GPU reason alone skips.
    assert re.search(r"\b2 failed\b.*\b1 skipped\b.*\b3 errors\b", out), out
    for reason in ("pip cannot install the-tool==1.0", "no ../shared here", "needs Linux /proc",
                   "raw skipif marker", "the-tool is not installed (fixture)"):
        assert reason in out, reason
    assert "CI must run it" in out and "ALLOWED_SKIPS" in out
    assert re.search(r"SKIPPED \[1\] test_skips.py:\d+: needs a GPU: none visible", out), out


def test_under_ci_a_module_level_skip_is_a_collection_error(tmp_path):
    proc = _run(tmp_path, "true", "test_module_skip.py")
    assert proc.returncode != 0 and "error during collection" in proc.stdout, proc.stdout
    assert "a_module_that_does_not_exist is not installed" in proc.stdout
    assert "CI must run it" in proc.stdout


def test_the_allow_list_is_short_and_matches_by_prefix():
    assert 1 <= len(ALLOWED_SKIPS) <= 4 and all(ALLOWED_SKIPS.values())
    assert allowed("slow test: pass --run-slow to run it") and allowed("needs a GPU")
    assert not allowed("needs the shared data folder, not found at /x")
    assert not allowed("keras is not installed") and not allowed("a GPU would help")


def _skip_calls(tree: ast.AST) -> list[tuple[int, str]]:
    """``pytest.skip``, ``pytest.importorskip``, ``pytest.mark.skip``/``skipif`` and
    ``pytest.xfail`` used directly."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ("skip", "importorskip", "skipif",
                                                              "xfail"):
            base = ast.unparse(node.value)
            if base in ("pytest", "pytest.mark"):
                found.append((node.lineno, f"{base}.{node.attr}"))
    return found


def test_every_skip_in_the_suite_goes_through_tests_ci():
    """A new test that calls pytest.skip/importorskip or uses a skip marker directly would
    bypass the reasons CI checks: use tests/ci.py (unavailable, need, skip_unless)."""
    offenders = [f"{path.name}:{line}: {what}"
                 for path in sorted(TESTS.glob("*.py")) if path.name != "ci.py"
                 for line, what in _skip_calls(ast.parse(path.read_text()))]
    assert not offenders, ("use tests/ci.py (unavailable, need, skip_unless) instead of: "
                           + "; ".join(offenders))


@pytest.mark.parametrize("ci, code", [("true", 1), ("", 0)])
def test_the_suites_conftest_fails_a_missing_shared_folder_under_ci(ci, code, tmp_path):
    """tests/conftest.py itself (copied beside a test that needs ../shared, which is absent)."""
    for name in ("conftest.py", "ci.py"):
        (tmp_path / name).write_text((TESTS / name).read_text())
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    shared: needs ../shared\n")
    (tmp_path / "test_needs_shared.py").write_text(
        "import pytest\n\n\n@pytest.mark.shared\ndef test_reads_shared():\n    pass\n")
    env = {**os.environ, "CI": ci, "DERMEDGE_SHARED": str(tmp_path / "no-shared")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-rfs", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == code, proc.stdout[-2000:]
    assert "needs the shared data folder" in proc.stdout
