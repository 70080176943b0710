"""Files every stage writes: never half-written (a temp file beside the target, then a rename),
and the per-user cache folder. Standard library only."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def cache_dir() -> Path:
    """Where dermedge caches images, weights and its pinned venvs: ``$DERMEDGE_CACHE``, else
    ``~/.cache/dermedge``."""
    root = os.environ.get("DERMEDGE_CACHE") or Path.home() / ".cache" / "dermedge"
    return Path(root).expanduser()


def _temp_beside(path: Path, suffix: str = "") -> Path:
    # Hidden, unique per process and call; ``suffix`` keeps an extension writers insist on
    # (np.save adds ".npy", Keras wants ".keras").
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{suffix}")


@contextlib.contextmanager
def atomic_path(path: str | Path, *, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path beside ``path`` for a writer that needs a file name (``model.save``,
    ``np.savez``, ``df.to_csv``, ``fig.savefig``); on success it is renamed onto ``path``, on
    any error it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_open(path: str | Path, *, binary: bool = False, mode: int | None = None,
                durable: bool = False, **open_kw) -> Iterator[IO]:
    """A file object onto a temp file beside ``path``, renamed onto it on success (as
    :func:`atomic_path`). ``mode`` (e.g. 0o600 for health data or a private key): the file has
    those permissions from its first byte. ``durable``: the data and the rename are on disk
    (fsync of the file, then of its folder) before this returns, for records that must
    survive a power cut."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666 if mode is None else mode)
        if not binary:
            open_kw.setdefault("encoding", "utf-8")
        with os.fdopen(fd, "wb" if binary else "w", **open_kw) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
    if durable:
        fsync_dir(path.parent)


def fsync_dir(folder: str | Path) -> None:
    """Make a rename or an unlink in ``folder`` durable (a no-op where folders cannot be
    opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: str | Path, data: bytes, *, mode: int | None = None,
                durable: bool = False) -> None:
    """``data`` to ``path``; ``mode`` and ``durable`` as in :func:`atomic_open`."""
    with atomic_open(path, binary=True, mode=mode, durable=durable) as out:
        out.write(data)


def write_text(path: str | Path, text: str, *, mode: int | None = None,
               durable: bool = False) -> None:
    """``text`` (UTF-8) to ``path``; ``mode`` and ``durable`` as in :func:`atomic_open`."""
    with atomic_open(path, mode=mode, durable=durable) as out:
        out.write(text)


def write_json(path: str | Path, obj: Any, **dumps) -> None:
    """``obj`` as indented, strict JSON (no NaN) with a final newline; ``dumps`` are extra
    ``json.dumps`` arguments (e.g. ``default=``)."""
    dumps = {"indent": 2, "allow_nan": False, **dumps}
    write_text(path, json.dumps(obj, **dumps) + "\n")


def replace_dir(work: str | Path, out: str | Path, *, overwrite: bool,
                exists_error: type[Exception] = FileExistsError,
                exists_message: str | None = None) -> None:
    """Rename the finished folder ``work`` to ``out`` (same parent). An existing ``out`` is
    replaced only with ``overwrite`` (moved aside first, restored if the rename fails, then
    deleted); otherwise ``exists_error(exists_message)`` is raised."""
    work, out = Path(work), Path(out)
    if not out.exists():
        work.rename(out)
        return
    if not overwrite:
        raise exists_error(exists_message or f"{out} already exists.")
    trash = out.with_name(f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    out.rename(trash)
    try:
        work.rename(out)
    except BaseException:
        trash.rename(out)
        raise
    shutil.rmtree(trash, ignore_errors=True)
