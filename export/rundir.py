"""Reading a run directory for export (docs/ARTIFACTS.md): the typed run (dermedge.artifacts),
its Keras model checked against the card, and its splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dermedge.artifacts import RunDir, read_run
from dermedge.image import load_image
from dermedge.labels import HEADS, INPUT_NAME, MELANOMA_DX, OOD, OPTIONAL_OUTPUTS
from dermedge.splits import EXTRA_COLUMNS, SPLIT_COLUMNS, read_labelled, read_splits
from export.errors import ExportError, RunDirError


class Run(RunDir):
    """A validated run directory (its typed card); the model itself is loaded on demand."""

    @property
    def input_size(self) -> int:
        return self.card.input_size

    @property
    def diagnosis_labels(self) -> tuple[str, ...]:
        return self.card.diagnosis_labels

    @property
    def melanoma_labels(self) -> tuple[str, ...]:
        return self.card.melanoma.labels

    @property
    def backbone_layer(self) -> str | None:
        """The feature-extractor sub-model's name, from the card (None for an ensemble)."""
        return self.card.backbone_layer

    @property
    def melanoma_threshold(self) -> float:
        return self.card.melanoma_threshold

    def load_model(self):
        """The float Keras model, checked against the card (input ``image``, named heads)."""
        model = self.load_keras(error=RunDirError)
        _check_model(model, self, self.model_path)
        return model

    def splits(self):
        """``splits.csv`` (dermedge.splits) as a table, one row per image, in file order."""
        import pandas as pd

        if not self.splits_path.is_file():
            raise RunDirError(f"The run directory {self.path} has no splits.csv; int8 calibration "
                              "and validation read their images from it. Re-run `trainer fit` or "
                              "pass --data for validation.")
        rows = read_splits(self.splits_path, error=RunDirError)
        return pd.DataFrame([r.as_dict() for r in rows],
                            columns=[*SPLIT_COLUMNS, *EXTRA_COLUMNS])


def open_run(path: str | Path) -> Run:
    """Check that ``path`` is a run directory with a usable card and a model file."""
    run = read_run(path, error=RunDirError)
    return Run(run.path, run.card)


def _check_model(model, run: Run, path: Path) -> None:
    names = [getattr(t, "name", "") for t in model.inputs]
    outputs = model.output
    problems = []
    if len(model.inputs) != 1:
        problems.append(f"it has {len(model.inputs)} inputs, expected one named {INPUT_NAME!r}")
    elif not str(names[0]).startswith(INPUT_NAME):
        problems.append(f"its input is named {names[0]!r}, expected {INPUT_NAME!r}")
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
        if OOD in outputs and tuple(outputs[OOD].shape[1:]) != (1,):
            problems.append(f"ood has shape {tuple(outputs[OOD].shape)}, expected (N, 1)")
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
    """The labelled rows to validate on: the run's ``split``, or ``data``: another splits.csv
    (its rows of ``split``) or a folder with one sub-folder per diagnosis."""
    if data is not None:
        import pandas as pd

        df = pd.DataFrame([{"image_id": x.image_id, "path": str(x.path), "dx": x.dx,
                            "melanoma": int(x.dx == MELANOMA_DX)}
                           for x in read_labelled(data, split, error=ExportError)])
        where = f"{data} split={split}" if Path(data).is_file() else str(data)
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
