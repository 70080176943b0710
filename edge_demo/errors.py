"""User-facing errors of the demo. CLIs print them as one paragraph and exit 2."""

from __future__ import annotations

from dermedge.errors import BundleError, DermedgeError

__all__ = ["EdgeDemoError", "BundleError", "PolicyError", "CalibrationError", "RequestError"]


class EdgeDemoError(DermedgeError):
    """A problem the operator can fix; the message says how."""


class PolicyError(EdgeDemoError):
    """A policy file or policy value is invalid."""


class CalibrationError(EdgeDemoError):
    """The labelled validation set cannot be used for calibration."""


class RequestError(EdgeDemoError):
    """A bad request from a client; carries the HTTP status and a stable error code."""

    def __init__(self, message: str, *, status: int = 400, code: str = "bad_request"):
        super().__init__(message)
        self.status = int(status)
        self.code = code
