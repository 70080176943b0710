"""The marker of a refused export: a bundle that failed its validation gates.

Such a bundle keeps its file names (so its report can be read and compared), and its folder
also holds ``REFUSED.txt``; ``model_card.json`` says ``export.validation.passed: false``.
"""

from __future__ import annotations

REFUSED_NOTICE = "REFUSED.txt"


def refused_notice(failed: list[str]) -> str:
    """The text of ``REFUSED.txt``: what failed, and what not to do with the bundle."""
    return ("REFUSED: this export failed its validation gates and must not be shipped.\n\n"
            + "".join(f"- {f}\n" for f in failed)
            + "\nvalidation.json and model_card.json (export.validation.passed) say passed: "
            "false; validation.md has the figures. The demo refuses to serve this bundle unless "
            "told otherwise.\n")
