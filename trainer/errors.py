"""User-facing errors. CLIs print them as one paragraph and exit non-zero."""


class DermedgeError(ValueError):
    """A problem with the user's input that they can fix; the message says how."""


class DataError(DermedgeError):
    """The dataset on disk is missing, malformed or inconsistent."""


class ConfigError(DermedgeError):
    """A config file or override is invalid."""


class UnknownBackboneError(DermedgeError):
    """A backbone name that is not in the registry."""


class RunDirError(DermedgeError):
    """A run directory is missing, incomplete or corrupt."""
