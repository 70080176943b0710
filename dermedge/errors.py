"""Errors shared by every stage. CLIs print them as one paragraph and exit non-zero."""


class DermedgeError(ValueError):
    """A problem with the user's input that they can fix; the message says how."""


class RunDirError(DermedgeError):
    """A run directory is missing, incomplete or corrupt."""


class BundleError(DermedgeError):
    """A bundle directory or .tflite file is missing, incomplete or corrupt."""


class ImageError(DermedgeError):
    """An image file or upload that cannot be read as the image contract requires."""
