"""The run directory (docs/ARTIFACTS.md): paths, atomic writes, the model card, loading a run."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import uuid
from pathlib import Path
from typing import Any

from dermedge.card import CARD_SCHEMA_VERSION
from dermedge.card import read_card as read_model_card
from trainer.errors import RunDirError

__all__ = ["CARD_SCHEMA_VERSION", "RUN_FILES", "is_complete_run", "load_run", "move_into_place",
           "now_iso", "partial_dir", "read_card", "read_json", "versions", "write_json_atomic",
           "write_text_atomic"]
# What makes a directory a complete run (written last: model_card.json).
RUN_FILES = ("model.keras", "model_card.json", "config.yaml", "labels.txt", "splits.csv",
             "history.csv", "metrics.json")


def partial_dir(out: str | Path) -> Path:
    """Where an in-progress (or interrupted) ``trainer fit --out OUT`` lives: ``OUT.partial``."""
    out = Path(out).expanduser().resolve()
    return out.with_name(out.name + ".partial")


def is_complete_run(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and all((p / f).is_file() for f in RUN_FILES)


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def read_json(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RunDirError(f"{path} does not exist.") from None
    except json.JSONDecodeError as e:
        raise RunDirError(f"{path} is not valid JSON ({e}); the run directory is corrupt.") \
            from None


def read_card(run_dir: str | Path) -> dict[str, Any]:
    """The validated model card of a complete run directory."""
    run = Path(run_dir)
    if not run.is_dir():
        hint = ""
        if partial_dir(run).is_dir():
            hint = (f" An interrupted run exists at {partial_dir(run)}; finish it with "
                    f"`trainer fit --out {run} --resume`.")
        raise RunDirError(f"Run directory not found: {run}.{hint} Pass the --out folder of a "
                          "finished `trainer fit`.")
    missing = [f for f in ("model.keras", "model_card.json") if not (run / f).is_file()]
    if missing:
        raise RunDirError(f"{run} is not a complete run directory: missing "
                          f"{', '.join(missing)}. Pass the --out folder of a finished "
                          "`trainer fit`.")
    return read_model_card(run, error=RunDirError).to_dict()


def check_keras_file(path: Path) -> None:
    """A present but truncated/corrupt ``.keras`` file is named as such (Keras itself answers
    "File not found" for any file that is not a zip archive)."""
    import zipfile

    if path.is_file() and not zipfile.is_zipfile(path):
        raise RunDirError(
            f"Cannot load {path}: it exists ({path.stat().st_size:,} bytes) but is not a"
            " complete .keras file (not a readable zip archive: truncated or corrupt). Restore"
            " it or re-run `trainer fit`.")


def load_run(run_dir: str | Path):
    """``(keras model, card)`` of a run directory."""
    import keras

    card = read_card(run_dir)
    check_keras_file(Path(run_dir) / "model.keras")
    try:
        model = keras.saving.load_model(Path(run_dir) / "model.keras", compile=False)
    except Exception as e:  # noqa: BLE001 - any load failure means a corrupt artifact
        raise RunDirError(f"Cannot load {Path(run_dir) / 'model.keras'} "
                          f"({type(e).__name__}: {e}); the run directory is corrupt.") from None
    return model, card


def versions() -> dict[str, str]:
    import keras
    import numpy

    import trainer

    out = {"dermedge": trainer.__version__, "keras": keras.__version__,
           "backend": keras.backend.backend(), "numpy": numpy.__version__,
           "python": platform.python_version()}
    backend = keras.backend.backend()
    try:
        if backend == "tensorflow":
            import tensorflow as tf  # noqa: F401 - only to read its version

            out["tensorflow"] = tf.__version__
        elif backend == "jax":
            import jax

            out["jax"] = jax.__version__
        elif backend == "torch":
            import torch

            out["torch"] = torch.__version__
    except ImportError:
        pass
    from trainer.provenance import package_versions

    return {**out, **package_versions()}


def move_into_place(work: Path, out: Path, *, overwrite: bool) -> None:
    """Rename ``work`` to ``out``; an existing ``out`` is replaced only with ``overwrite``."""
    if out.exists():
        if not overwrite:
            raise RunDirError(f"{out} already exists; pass --overwrite to replace it.")
        trash = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        out.rename(trash)
        work.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        work.rename(out)
