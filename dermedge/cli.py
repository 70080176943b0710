"""What every dermedge command line shares: one error format, defaults in --help, quiet TF.

Standard library only, so a CLI can check its arguments and paths before anything heavy loads.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
from collections.abc import Iterator

# TensorFlow's C++ start-up lines ("oneDNN custom operations are on", the absl preamble) are
# written to fd 2 before TF_CPP_MIN_LOG_LEVEL takes effect, so hiding them needs the fd itself.
TF_LOG_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "ABSL_MIN_LOG_LEVEL": "2", "GRPC_VERBOSITY": "ERROR"}


def error_text(prog: str, message: object) -> str:
    """``PROG: error: MESSAGE`` as one line (the terminal wraps it; a log keeps it whole)."""
    return f"{prog}: error: {' '.join(str(message).split())}"


def print_error(prog: str, message: object) -> None:
    print(error_text(prog, message), file=sys.stderr, flush=True)


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help unless the help already names its default;
    positionals, required options and flags (``--no-...`` says what it changes) say nothing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or default is None or default is False or default == []
                or default is argparse.SUPPRESS or not action.option_strings
                or action.required or action.nargs == 0):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """The one argument parser of every dermedge CLI (``trainer``, ``python -m export``,
    ``edge-demo``): the project's help formatter, and a usage error printed like any other
    error, ``ROOT: error: MESSAGE. See `PROG --help`.`` (``ROOT`` the program, ``PROG`` the
    subcommand), then exit 2. Sub-parsers from :meth:`add_subparsers` are Parsers too."""

    def __init__(self, *args, root: str | None = None, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.root = root or self.prog

    def add_subparsers(self, **kwargs):
        kwargs.setdefault("parser_class", functools.partial(Parser, root=self.root))
        return super().add_subparsers(**kwargs)

    def error(self, message: str):
        print_error(self.root, f"{message.rstrip('.')}. See `{self.prog} --help`.")
        sys.exit(2)


def quiet_tensorflow(verbose: bool = False) -> None:
    """Import TensorFlow now, with its C++ start-up logging hidden unless ``verbose``.

    A no-op when TensorFlow is not installed or already imported (the caller's own import then
    reports what is missing).
    """
    if "tensorflow" in sys.modules:
        return
    if verbose:
        return
    for key, value in TF_LOG_ENV.items():
        os.environ.setdefault(key, value)
    with _stderr_to_devnull():
        try:
            import tensorflow  # noqa: F401
        except ImportError:
            return


@contextlib.contextmanager
def _stderr_to_devnull() -> Iterator[None]:
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # pytest capture or no real stderr
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)
