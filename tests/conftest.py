"""Shared fixtures and markers.

* ``shared`` tests read ../shared (real HAM10000 images, ImageNet weights) and skip when absent.
* ``slow`` tests run only with ``--run-slow``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DERMEDGE_SHARED", REPO.parent / "shared")).resolve()


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--run-slow")
    have_shared = (SHARED / "data").is_dir()
    skip_slow = pytest.mark.skip(reason="slow test: pass --run-slow to run it")
    skip_shared = pytest.mark.skip(reason=f"needs the shared data folder, not found at {SHARED}")
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "shared" in item.keywords and not have_shared:
            item.add_marker(skip_shared)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "data").is_dir():
        pytest.skip(f"needs the shared data folder, not found at {SHARED}")
    return SHARED
