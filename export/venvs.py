"""Pinned, cached venvs for export steps whose packages cannot share the project's venv.

QAT needs tf-keras (the full ``tensorflow`` wheel) and MediaPipe's metadata writer needs
numpy<2; each runs in its own venv under the dermedge cache, keyed by the Python version and
its pins, built aside and renamed into place (so an interrupted build is never used).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dermedge.files import cache_dir, replace_dir


@dataclass(frozen=True)
class PinnedVenv:
    """One isolated environment: its pins, the variable that overrides it and its error type."""

    label: str                       # "QAT", "MediaPipe": how messages name it
    slug: str                        # the cache folder's prefix
    requirements: tuple[str, ...]
    env_var: str
    error: type[Exception]
    hint: Callable[[], str]          # how to build it by hand, appended to errors
    no_deps: bool = False            # the pins are the complete set (pip --no-deps)
    pip_timeout: int = 1800

    def directory(self) -> Path:
        key = hashlib.sha256("\n".join(self.requirements).encode()).hexdigest()[:10]
        return cache_dir() / (f"{self.slug}-venv-py{sys.version_info[0]}"
                                      f"{sys.version_info[1]}-{key}")

    def cached_python(self) -> Path | None:
        """The cached venv's python once its build completed, else None."""
        venv = self.directory()
        return python_in(venv) if ((venv / ".installed").is_file()
                                   and python_in(venv).exists()) else None

    def explicit_python(self, value: str | os.PathLike, where: str) -> Path:
        """``value`` (an interpreter or a venv folder, given by ``where``) as an interpreter."""
        path = Path(value).expanduser()
        if path.is_dir() and python_in(path).exists():
            path = python_in(path)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise self.error(f"{where} names {path}, which is not an executable Python "
                             f"interpreter. Point it at the python of a {self.label} "
                             f"environment, or unset it. {self.hint()}")
        return path

    def build(self, base_python: str | os.PathLike | None = None, *, force: bool = False,
              log=None) -> Path:
        """Build (or reuse) the cached venv; returns its python."""
        say = log or (lambda msg: None)
        venv = self.directory()
        py = python_in(venv)
        if self.cached_python() is not None and not force:
            return py
        base = str(base_python or sys.executable)
        tmp = venv.with_name(f".{venv.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}")
        venv.parent.mkdir(parents=True, exist_ok=True)
        say(f"creating the {self.label} environment (once): {venv}")
        t0 = time.perf_counter()
        try:
            made = subprocess.run([base, "-m", "venv", str(tmp)], capture_output=True,
                                  text=True, timeout=300, check=False)
            if made.returncode:
                raise self.error(f"Cannot create a venv with {base}: "
                                 f"{made.stderr.strip()[-500:]}. Pass another interpreter with "
                                 f"--python. {self.hint()}")
            pip = subprocess.run([str(python_in(tmp)), "-m", "pip", "install", "-q",
                                  *(["--no-deps"] if self.no_deps else []),
                                  "--disable-pip-version-check", "--timeout", "30",
                                  "--retries", "2", *self.requirements],
                                 capture_output=True, text=True, timeout=self.pip_timeout,
                                 check=False)
            if pip.returncode:
                errors = [ln for ln in pip.stderr.splitlines() if "ERROR" in ln] or [pip.stderr]
                raise self.error(f"pip could not install the {self.label} environment: "
                                 f"{' '.join(errors)[-600:]}. It needs PyPI access (or a mirror "
                                 f"in pip's config) once. {self.hint()}")
            (tmp / ".installed").write_text("\n".join(self.requirements) + "\n")
            if self.cached_python() is not None and not force:  # another process built it
                return py
            replace_dir(tmp, venv, overwrite=True)
        except subprocess.TimeoutExpired as exc:
            raise self.error(f"Building the {self.label} environment timed out "
                             f"({exc.timeout:.0f} s for {' '.join(map(str, exc.cmd[:4]))} ...); "
                             "check the network and retry.") from None
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        say(f"{self.label} environment ready in {time.perf_counter() - t0:.0f} s: {py}")
        return py


def python_in(venv: Path) -> Path:
    return venv / "bin" / "python"
