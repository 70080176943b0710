"""User-facing errors. CLIs print them as one paragraph and exit non-zero."""

from dermedge.errors import DermedgeError

__all__ = ["DermedgeError", "DataError", "ConfigError", "UnknownBackboneError"]


class DataError(DermedgeError):
    """The dataset on disk is missing, malformed or inconsistent."""


class ConfigError(DermedgeError):
    """A config file or override is invalid."""


class UnknownBackboneError(DermedgeError):
    """A backbone name that is not in the registry."""
