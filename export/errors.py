"""Export errors. CLIs print them as one paragraph: exit 2 for bad input, 3 for a failed gate."""

from dermedge.errors import BundleError, DermedgeError, RunDirError

__all__ = ["DermedgeError", "RunDirError", "ExportError", "CalibrationError",
           "QuantizationCheckError", "BundleError"]


class ExportError(DermedgeError):
    """An export request that cannot be carried out as asked."""


class CalibrationError(ExportError):
    """The representative (calibration) set for int8 cannot be built."""


class QuantizationCheckError(ExportError):
    """The converted model is not what its mode claims (e.g. an "int8" model with float I/O)."""
