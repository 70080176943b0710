"""Reading a run directory (docs/ARTIFACTS.md): the card, the Keras model, the splits."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dermedge.card import card_from_dict, read_card
from dermedge.image import load_image
from export.errors import ExportError, RunDirError

HEADS: tuple[str, ...] = ("melanoma", "diagnosis")
# Outputs a model may have beside the heads: the input gate's ``ood`` (the export adds it).
OPTIONAL_OUTPUTS: tuple[str, ...] = ("ood",)


@dataclass(frozen=True)
class Run:
    """A validated run directory; the model itself is loaded on demand."""

    path: Path
    card: dict

    @property
    def name(self) -> str:
        return str(self.card.get("name") or self.path.name)

    @property
    def input_size(self) -> int:
        return int(self.card["input"]["shape"][0])

    @property
    def diagnosis_labels(self) -> tuple[str, ...]:
        return tuple(self.card["heads"]["diagnosis"]["labels"])

    @property
    def melanoma_labels(self) -> tuple[str, ...]:
        return tuple(self.card["heads"]["melanoma"].get("labels") or ["melanoma"])

    @property
    def backbone_layer(self) -> str | None:
        """The feature-extractor sub-model's name, from the card (None for an ensemble)."""
        return card_from_dict(self.card).backbone_layer

    @property
    def melanoma_threshold(self) -> float:
        return float(self.card["heads"]["melanoma"]["threshold"])

    def load_model(self):
        """The float Keras model, checked against the card (input ``image``, named heads)."""
        import keras

        path = self.path / "model.keras"
        if path.is_file() and not zipfile.is_zipfile(path):  # Keras would say "File not found"
            raise RunDirError(
                f"Cannot load {path}: it exists ({path.stat().st_size:,} bytes) but is not a"
                " complete .keras file (not a readable zip archive: truncated or corrupt)."
                " Restore it or re-run `trainer fit`.")
        try:
            model = keras.saving.load_model(path, compile=False)
        except Exception as exc:  # noqa: BLE001 - any load failure means a bad file
            raise RunDirError(
                f"Cannot load {path} ({type(exc).__name__}: {str(exc)[:300]}). The file is corrupt "
                "or was not written by `trainer fit`; re-run training or restore the file."
            ) from exc
        _check_model(model, self, path)
        return model

    def splits(self):
        from trainer.data import read_splits

        path = self.path / "splits.csv"
        if not path.is_file():
            raise RunDirError(f"The run directory {self.path} has no splits.csv; int8 calibration "
                              "and validation read their images from it. Re-run `trainer fit` or "
                              "pass --data for validation.")
        return read_splits(path)


def open_run(path: str | Path) -> Run:
    """Check that ``path`` is a run directory with a usable card and a model file."""
    path = Path(path)
    if not path.exists():
        raise RunDirError(f"The run directory {path} does not exist. Pass the folder written by "
                          "`trainer fit` (it holds model.keras and model_card.json).")
    if not path.is_dir():
        raise RunDirError(f"{path} is a file, not a run directory. Pass the folder written by "
                          "`trainer fit` (it holds model.keras and model_card.json).")
    card_path = path / "model_card.json"
    if not card_path.is_file():
        raise RunDirError(f"The run directory {path} has no model_card.json, so the input size, "
                          "labels and melanoma threshold are unknown. Export needs a complete run: "
                          "re-run `trainer fit`, or point at the right folder.")
    card = read_card(card_path, error=RunDirError).to_dict()
    if not (path / "model.keras").is_file():
        raise RunDirError(f"The run directory {path} has no model.keras. Training may not have "
                          "finished; re-run `trainer fit` (or `--resume`).")
    return Run(path.resolve(), card)


def _check_model(model, run: Run, path: Path) -> None:
    names = [getattr(t, "name", "") for t in model.inputs]
    outputs = model.output
    problems = []
    if len(model.inputs) != 1:
        problems.append(f"it has {len(model.inputs)} inputs, expected one named 'image'")
    elif not str(names[0]).startswith("image"):
        problems.append(f"its input is named {names[0]!r}, expected 'image'")
    else:
        shape = tuple(model.inputs[0].shape[1:])
        if shape != (run.input_size, run.input_size, 3):
            problems.append(f"its input shape {shape} differs from the card's "
                            f"{[run.input_size, run.input_size, 3]}")
    if not isinstance(outputs, dict) or not set(HEADS) <= set(outputs) <= {*HEADS,
                                                                          *OPTIONAL_OUTPUTS}:
        got = sorted(outputs) if isinstance(outputs, dict) else type(outputs).__name__
        problems.append(f"its outputs must be a dict with keys melanoma and diagnosis (and"
                        f" optionally ood); received {got}")
    else:
        n = len(run.diagnosis_labels)
        if tuple(outputs["melanoma"].shape[1:]) != (1,):
            problems.append(f"melanoma has shape {tuple(outputs['melanoma'].shape)}, expected "
                            "(N, 1)")
        if "ood" in outputs and tuple(outputs["ood"].shape[1:]) != (1,):
            problems.append(f"ood has shape {tuple(outputs['ood'].shape)}, expected (N, 1)")
        if tuple(outputs["diagnosis"].shape[1:]) != (n,):
            problems.append(f"diagnosis has shape {tuple(outputs['diagnosis'].shape)}, expected "
                            f"(N, {n}) for the card's {n} labels")
    if problems:
        raise RunDirError(f"The model {path} does not match the export contract: "
                          + "; ".join(problems) + ". See docs/ARTIFACTS.md.")


def stratified_sample(df, n: int, *, seed: int = 0, by: str = "dx"):
    """``n`` rows, classes in proportion to their frequency, every class present at least once."""
    counts = df[by].value_counts()
    if n >= len(df):
        return df.sample(frac=1.0, random_state=seed)
    quota = (counts / counts.sum() * n).apply(np.floor).astype(int).clip(lower=1)
    quota = quota.clip(upper=counts)
    rng = np.random.default_rng(seed)
    # Hand out (or take back) the rounding remainder by largest fractional part.
    while quota.sum() != n:
        room = counts - quota
        if quota.sum() < n:
            quota[room[room > 0].index[rng.integers(len(room[room > 0]))]] += 1
        else:
            big = quota[quota > 1]
            quota[big.idxmax()] -= 1
    parts = [df[df[by] == cls].sample(int(k), random_state=seed) for cls, k in quota.items()]
    import pandas as pd

    return pd.concat(parts).sample(frac=1.0, random_state=seed)


def representative_records(run: Run, n: int, *, seed: int = 0):
    """The int8 calibration rows: ``n`` images of the run's train split, stratified by class."""
    from export.errors import CalibrationError

    splits = run.splits()
    train = splits[splits["split"] == "train"]
    if len(train) < n:
        raise CalibrationError(
            f"int8 calibration asked for {n} representative images but the train split of "
            f"{run.path / 'splits.csv'} has only {len(train)}. Pass --representative "
            f"{len(train)} or fewer (at least 10), or export a float mode instead.")
    return stratified_sample(train, n, seed=seed)


def validation_records(run: Run, data: str | Path | None = None, split: str = "val"):
    """The labelled rows to validate on: the run's ``split`` or a labelled set at ``data``."""
    if data is not None:
        from trainer.data import load_records

        df = load_records(data)
        where = str(data)
    else:
        df = run.splits()
        if split not in set(df["split"]):
            present = sorted(set(df["split"]))
            raise ExportError(f"The run's splits.csv has no {split!r} rows to validate on (splits "
                              f"present: {', '.join(present) or 'none'}). Pass --split with one of "
                              "those, or --data LABELLED_SET.")
        df = df[df["split"] == split]
        where = f"{run.path / 'splits.csv'} split={split}"
    unknown = sorted(set(df["dx"]) - set(run.diagnosis_labels))
    if unknown:
        raise ExportError(f"The validation set {where} has diagnoses {unknown} that the model's "
                          f"head does not know ({', '.join(run.diagnosis_labels)}).")
    if len(df) == 0:
        raise ExportError(f"The validation set {where} is empty.")
    return df.reset_index(drop=True), where


def load_images(paths, size: int) -> np.ndarray:
    """uint8 ``(N, S, S, 3)`` through the image contract (dermedge.image), as training."""
    if len(paths) == 0:
        return np.zeros((0, size, size, 3), np.uint8)
    return np.stack([load_image(p, size) for p in paths])
