"""The two artifacts between the stages, each read and checked in one place (docs/ARTIFACTS.md).

* A **run directory** (``trainer fit --out``): ``model.keras`` + ``model_card.json`` + the rest;
  ``trainer`` reads its own runs and ``export`` reads them with :func:`read_run`.
* An **export bundle** (``python -m export tflite --out``): ``model.tflite`` + ``model_card.json``
  + label files; the demo and ``export bench`` read it with :func:`read_bundle`.

Both return the validated, typed card (:class:`dermedge.card.ModelCard`). Reading them needs no
TensorFlow: :meth:`RunDir.load_keras` imports Keras only when called, and a bundle's model runs
on LiteRT (``dermedge.litert``).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from dermedge.card import CARD_FILE, ModelCard, read_card
from dermedge.errors import BundleError, RunDirError

KERAS_FILE = "model.keras"
SPLITS_FILE = "splits.csv"
TFLITE_FILE = "model.tflite"
LABELS_FILE = "labels_diagnosis.txt"
PARTIAL_SUFFIX = ".partial"
RUN_HINT = "Pass the --out folder of a finished `trainer fit` (it holds model.keras and " \
           "model_card.json)."


def partial_dir(out: str | Path) -> Path:
    """Where an in-progress (or interrupted) ``trainer fit --out OUT`` lives: ``OUT.partial``."""
    out = Path(out).expanduser().resolve()
    return out.with_name(out.name + PARTIAL_SUFFIX)


@dataclass(frozen=True)
class Artifact:
    """A folder whose card validated and whose model file (``MODEL_FILE``) is present."""

    MODEL_FILE: ClassVar[str] = ""
    path: Path
    card: ModelCard

    @property
    def name(self) -> str:
        return str(self.card.name or self.path.name)

    @property
    def model_path(self) -> Path:
        return self.path / self.MODEL_FILE


class RunDir(Artifact):
    """A run directory (``trainer fit --out``)."""

    MODEL_FILE = KERAS_FILE

    @property
    def splits_path(self) -> Path:
        return self.path / SPLITS_FILE

    def load_keras(self, *, error: type[RunDirError] = RunDirError):
        """The float Keras model in ``model.keras`` (needs Keras; imported here, on demand)."""
        import keras

        path = self.model_path
        if path.is_file() and not zipfile.is_zipfile(path):  # Keras would say "File not found"
            raise error(f"Cannot load {path}: it exists ({path.stat().st_size:,} bytes) but is "
                        "not a complete .keras file (not a readable zip archive: truncated or "
                        "corrupt). Restore it or re-run `trainer fit`.")
        try:
            return keras.saving.load_model(path, compile=False)
        except Exception as exc:  # noqa: BLE001 - any load failure means a bad file
            raise error(f"Cannot load {path} ({type(exc).__name__}: {str(exc)[:300]}). The file "
                        "is corrupt or was not written by `trainer fit`; re-run training or "
                        "restore the file.") from exc


def read_run(path: str | Path, *, error: type[RunDirError] = RunDirError) -> RunDir:
    """Check that ``path`` is a run directory with a usable card and a model file."""
    path = Path(path).expanduser()
    hint = ""
    if partial_dir(path).is_dir():
        hint = (f" An interrupted run exists at {partial_dir(path)}; finish it with "
                f"`trainer fit --out {path} --resume`.")
    if not path.exists():
        raise error(f"Run directory not found: {path} (it does not exist).{hint} {RUN_HINT}")
    if not path.is_dir():
        raise error(f"{path} is a file, not a run directory. {RUN_HINT}")
    missing = [f for f in (KERAS_FILE, CARD_FILE) if not (path / f).is_file()]
    if missing:
        why = ("without its card the input size, labels and melanoma threshold are unknown"
               if CARD_FILE in missing else "training may not have finished")
        raise error(f"The run directory {path} is not a finished run: it has no "
                    f"{' and no '.join(missing)} ({why}).{hint} Re-run `trainer fit` or point at "
                    f"the right folder. {RUN_HINT}")
    return RunDir(path.resolve(), read_card(path, error=error))


class Bundle(Artifact):
    """An export bundle (``python -m export tflite --out``)."""

    MODEL_FILE = TFLITE_FILE

    @property
    def mode(self) -> str | None:
        return (self.card.export or {}).get("mode")


def read_bundle(path: str | Path, *, error: type[BundleError] = BundleError) -> Bundle:
    """Check that ``path`` is an export bundle: a folder with ``model.tflite``, a card with its
    ``export`` section and, when present, a ``labels_diagnosis.txt`` that matches the card."""
    path = Path(path).expanduser()
    if not path.is_dir():
        hint = " (it is a file; pass the folder that holds it)" if path.is_file() else ""
        raise error(f"Bundle folder not found: {path}{hint} (it does not exist or is not a "
                    "folder). Pass the folder written by `python -m export tflite`, e.g. "
                    "--device exports/mnv2-int8.")
    if not (path / CARD_FILE).is_file():
        raise error(f"The bundle {path} has no {CARD_FILE}. Point to a folder written by "
                    "`python -m export tflite` (it holds model.tflite, model_card.json and "
                    "labels).")
    card = read_card(path, error=error, need_export=True)
    if not (path / TFLITE_FILE).is_file():
        raise error(f"The bundle {path} has no {TFLITE_FILE}; re-export it.")
    labels_txt = path / LABELS_FILE
    if labels_txt.is_file():
        listed = tuple(x.strip() for x in labels_txt.read_text().splitlines() if x.strip())
        if listed != card.diagnosis_labels:
            raise error(f"{labels_txt} lists {list(listed)} but the card's "
                        f"heads.diagnosis.labels are {list(card.diagnosis_labels)}; re-export "
                        "the bundle.")
    return Bundle(path.resolve(), card)
