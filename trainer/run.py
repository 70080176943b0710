"""The run directory (docs/ARTIFACTS.md) as ``trainer`` writes and loads it; reading and
checking one is dermedge.artifacts's (the export reads runs through it too)."""

from __future__ import annotations

import datetime as _dt
import json
import platform
from pathlib import Path
from typing import Any

from dermedge.artifacts import read_run
from dermedge.card import CARD_FILE, CARD_SCHEMA_VERSION, ModelCard
from dermedge.errors import RunDirError
from dermedge.files import atomic_path, replace_dir, write_json, write_text
from dermedge.labels import DIAGNOSIS_LABELS

__all__ = ["CARD_SCHEMA_VERSION", "RUN_FILES", "is_complete_run", "load_run", "move_into_place",
           "now_iso", "publish_run", "read_card", "read_json", "save_model", "start_run",
           "versions"]
# What makes a directory a complete run (written last: model_card.json).
RUN_FILES = ("model.keras", "model_card.json", "config.yaml", "labels.txt", "splits.csv",
             "history.csv", "metrics.json")


def is_complete_run(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and all((p / f).is_file() for f in RUN_FILES)


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()


def read_json(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RunDirError(f"{path} does not exist.") from None
    except json.JSONDecodeError as e:
        raise RunDirError(f"{path} is not valid JSON ({e}); the run directory is corrupt.") \
            from None


def read_card(run_dir: str | Path) -> ModelCard:
    """The validated, typed card of a complete run directory (dermedge.artifacts.read_run)."""
    return read_run(run_dir).card


def load_run(run_dir: str | Path) -> tuple[Any, ModelCard]:
    """``(keras model, card)`` of a run directory."""
    run = read_run(run_dir)
    return run.load_keras(), run.card


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


def start_run(work: str | Path, records, config_yaml: str) -> None:
    """The first step of writing a run directory (``trainer fit``, ``trainer ensemble``): its
    inputs, which ``--resume`` reads back: splits.csv, config.yaml and labels.txt."""
    from trainer.data import write_splits

    work = Path(work)
    write_splits(records, work / "splits.csv")
    write_text(work / "config.yaml", config_yaml)
    write_text(work / "labels.txt", "\n".join(DIAGNOSIS_LABELS) + "\n")


def publish_run(work: str | Path, out: str | Path, card: ModelCard, *, overwrite: bool) -> None:
    """The last step: ``model_card.json``, written last (a folder without one is not a run),
    then ``work`` (``<out>.partial``) renamed to ``out``."""
    write_json(Path(work) / CARD_FILE, card.to_dict())
    move_into_place(Path(work), Path(out), overwrite=overwrite)


def save_model(model, work: str | Path) -> None:
    """``work/model.keras`` (the inference model), written atomically."""
    with atomic_path(Path(work) / "model.keras", suffix=".keras") as tmp:
        model.save(str(tmp))


def move_into_place(work: Path, out: Path, *, overwrite: bool) -> None:
    """Rename ``work`` to ``out``; an existing ``out`` is replaced only with ``overwrite``."""
    replace_dir(work, out, overwrite=overwrite, exists_error=RunDirError,
                exists_message=f"{out} already exists; pass --overwrite to replace it.")
