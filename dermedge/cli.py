"""What every dermedge command line shares: one error format, defaults in --help, quiet TF.

Standard library only, so a CLI can check its arguments and paths before anything heavy loads.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import textwrap
from collections.abc import Iterator

# TensorFlow's C++ start-up lines ("oneDNN custom operations are on", the absl preamble) are
# written to fd 2 before TF_CPP_MIN_LOG_LEVEL takes effect, so hiding them needs the fd itself.
TF_LOG_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "ABSL_MIN_LOG_LEVEL": "2", "GRPC_VERBOSITY": "ERROR"}


def error_text(prog: str, message: object, width: int = 100) -> str:
    """``PROG: error: MESSAGE`` as one wrapped paragraph (argparse's style)."""
    words = f"{prog}: error: {' '.join(str(message).split())}".split(" ")
    head = len(prog.split(" ")) + 2  # "PROG: error: FIRST-WORD" stays on the first line
    glued = "\0".join(words[:head])
    text = " ".join([glued, *words[head:]])
    return textwrap.fill(text, width=width, break_long_words=False,
                         break_on_hyphens=False).replace("\0", " ")


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
    """argparse with the project's formatter; usage errors stay argparse's (exit 2)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.print_usage(sys.stderr)
        print_error(self.prog, f"{message}. See `{self.prog} --help`.")
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
