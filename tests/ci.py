"""No silent green: a test whose dependency cannot be installed skips on a laptop, but fails
with the reason under ``CI=true``, so CI cannot pass without running it."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def unavailable(reason: str) -> NoReturn:
    """Skip (outside CI) or fail (``CI=true``) because ``reason`` keeps the test from running."""
    if in_ci():
        pytest.fail(f"CI=true: this test's dependency cannot be installed, and CI must run it: "
                    f"{reason}", pytrace=False)
    pytest.skip(reason)
