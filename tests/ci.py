"""No silent green: every skip in the suite goes through here, and under ``CI=true`` a skip
whose reason is not on :data:`ALLOWED_SKIPS` fails the test instead.

Outside CI a test whose dependency is missing (an install, ``../shared``, a browser) skips with
the reason. Under ``CI=true`` the :class:`SkipGuard` plugin (registered by ``conftest.py``)
turns every such skip into a failure that names the reason, so CI cannot pass without running
the test. Only the reasons below may skip under CI, each because CI runs the test elsewhere or
cannot have what it needs.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import NoReturn

import pytest

# reason prefix -> why CI may skip a test for it. Keep this list short and fixed.
ALLOWED_SKIPS: dict[str, str] = {
    "slow test": "the default line leaves them out; .ci/run's second line runs them "
                 "(`--run-slow -m slow`)",
    "needs a GPU": "CI runs on CPU-only machines",
    "needs PyTorch": "no extra installs torch; the jax backend is the cross-backend check CI "
                     "runs",
}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def allowed(reason: str) -> bool:
    """True when ``reason`` starts with an allow-listed prefix."""
    return any(reason.startswith(prefix) for prefix in ALLOWED_SKIPS)


def unavailable(reason: str) -> NoReturn:
    """Skip because ``reason`` keeps the test from running (under ``CI=true`` the guard makes
    it a failure unless the reason is allow-listed)."""
    __tracebackhide__ = True  # reports name the caller's line, not this one
    pytest.skip(reason)


def need(module: str, why: str) -> ModuleType:
    """``module`` imported, or the calling test module skipped (a failure under ``CI=true``)
    because it is not installed; ``why`` names the extra that installs it."""
    __tracebackhide__ = True
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pytest.skip(f"{module} is not installed ({exc}): {why}", allow_module_level=True)


def skip_unless(condition: bool, reason: str) -> pytest.MarkDecorator:
    """A ``skipif`` marker that goes through the same guard: skips when not ``condition``."""
    return pytest.mark.skipif(not condition, reason=reason)


def skip_reason(report) -> str | None:
    """The reason of a skipped test or collection report (None when it did not skip)."""
    if not report.skipped or hasattr(report, "wasxfail"):
        return None
    longrepr = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return text.removeprefix("Skipped: ")


def refusal(reason: str) -> str:
    return (f"CI=true: this test skipped, and CI must run it: {reason}. Install what it needs "
            f"(CI installs every extra and has ../shared beside the clone); only these reasons "
            f"may skip under CI (tests/ci.py ALLOWED_SKIPS): {', '.join(ALLOWED_SKIPS)}.")


class SkipGuard:
    """Under ``CI=true``: a skip whose reason is not allow-listed becomes a failure."""

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        outcome = yield
        self._guard(outcome.get_result())

    @pytest.hookimpl(hookwrapper=True)
    def pytest_make_collect_report(self, collector):
        outcome = yield
        self._guard(outcome.get_result())

    @staticmethod
    def _guard(report) -> None:
        reason = skip_reason(report)
        if reason is None or allowed(reason):
            return
        report.outcome = "failed"
        report.longrepr = refusal(reason)
