"""Datasets on disk → one table of records; splits; the reference image resize; the image cache.

Pure numpy / pandas / Pillow: importing this module imports neither Keras nor TensorFlow.

Layouts read by :func:`load_records`:

* ``ham10000`` — the HAM10000 download: ``HAM10000_metadata.csv`` (or any CSV with at least
  ``image_id,dx``) plus images found by ``image_id`` anywhere under the image root.
* ``isic`` — an ISIC 2018 Task 3 ground-truth CSV ``image,MEL,NV,...`` (one-hot) plus images.
* ``folders`` — one subfolder per diagnosis code (``akiec/``, ``bcc/``, ...), images inside.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from dermedge import files
from dermedge import image as image_contract
from dermedge import splits as splits_file
from dermedge.errors import ImageError
from dermedge.files import atomic_path
from dermedge.labels import DIAGNOSIS_LABELS, DX_TO_ISIC, ISIC_COLUMNS, ISIC_TO_DX, MELANOMA_DX
from dermedge.splits import EXTRA_COLUMNS, SPLIT_COLUMNS, SPLITS
from trainer.errors import DataError

RECORD_COLUMNS: tuple[str, ...] = (
    "image_id", "path", "dx", "melanoma", "lesion_id", "age", "sex", "site",
)
LAYOUTS: tuple[str, ...] = ("auto", "ham10000", "isic", "folders")
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png")
HAM_CSV_NAMES: tuple[str, ...] = ("HAM10000_metadata.csv", "labels.csv")
CLASS_WEIGHT_METHODS: tuple[str, ...] = ("median_frequency", "inverse", "none")
# Bump when load_image or the cache file format changes: old caches are then ignored.
CACHE_FORMAT_VERSION = 1
_SHOW = 5  # how many offending ids/paths an error message names
_UNKNOWN = {"", "unknown", "nan", "none", "null"}


# --------------------------------------------------------------------------- helpers


def _first(items, n: int = _SHOW) -> str:
    items = [str(i) for i in items]
    more = f" (and {len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _raise_problems(problems: list[str], source: Path, fix: str) -> None:
    if problems:
        raise DataError(f"Problems with the dataset at {source}: " + " ".join(problems) + " " + fix)


def _index_images(root: Path) -> dict[str, str]:
    """Map image stem → absolute path for every image under ``root`` (one recursive walk)."""
    index: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            stem, ext = os.path.splitext(name)
            if ext.lower() in IMAGE_EXTENSIONS and not name.startswith("."):
                index.setdefault(stem, os.path.join(dirpath, name))
    return index


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(
            f"Cannot read {path} as a CSV file ({exc}). Check that it is a comma-separated "
            "text file with a header row."
        ) from exc


def _csv_header(path: Path) -> list[str]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            line = f.readline()
    except (OSError, UnicodeDecodeError):
        return []
    return [c.strip() for c in line.strip().split(",")]


def _clean_str(series: pd.Series) -> pd.Series:
    """Strip strings; unknown/empty → NaN (object dtype)."""
    out = series.astype(str).str.strip()
    return out.where(~out.str.lower().isin(_UNKNOWN), np.nan).astype(object)


def _finish(df: pd.DataFrame) -> pd.DataFrame:
    """Fill optional columns, derive ``melanoma``, order the columns."""
    df = df.copy()
    if "lesion_id" not in df:
        df["lesion_id"] = df["image_id"]
    lesion = df["lesion_id"].astype(object)
    missing_lesion = lesion.isna() | lesion.astype(str).str.strip().str.lower().isin(_UNKNOWN)
    df["lesion_id"] = np.where(missing_lesion, df["image_id"], lesion.astype(str).str.strip())
    df["age"] = pd.to_numeric(df["age"], errors="coerce") if "age" in df else np.nan
    df["age"] = df["age"].astype(float)
    for col in ("sex", "site"):
        df[col] = _clean_str(df[col]) if col in df else np.nan
        df[col] = df[col].astype(object)
    df["melanoma"] = (df["dx"] == MELANOMA_DX).astype(int)
    for col in ("image_id", "path", "dx", "lesion_id"):
        df[col] = df[col].astype(object)
    return df[list(RECORD_COLUMNS)].reset_index(drop=True)


def _check_labels(dx: pd.Series, problems: list[str], where: str = "") -> None:
    bad = dx[~dx.isin(DIAGNOSIS_LABELS)]
    if len(bad):
        counts = bad.fillna("<empty>").replace("", "<empty>").value_counts()
        listed = ", ".join(f"{k!r} ×{v}" for k, v in counts.head(10).items())
        problems.append(
            f"{len(bad)} rows{where} have a diagnosis outside the seven codes "
            f"{', '.join(DIAGNOSIS_LABELS)}: {listed}."
        )


def _check_duplicates(ids: pd.Series, problems: list[str]) -> None:
    dup = ids[ids.duplicated(keep=False)]
    if len(dup):
        problems.append(
            f"{dup.nunique()} image ids appear more than once ({len(dup)} rows): "
            f"{_first(dup.unique())}."
        )


# --------------------------------------------------------------------------- layouts


def _find_ham_csv(folder: Path) -> Path:
    for name in HAM_CSV_NAMES:
        if (folder / name).is_file():
            return folder / name
    csvs = sorted(p for p in folder.glob("*.csv") if p.is_file())
    if len(csvs) == 1:
        return csvs[0]
    found = ", ".join(p.name for p in csvs) or "no CSV files"
    raise DataError(
        f"Cannot find the metadata CSV in {folder}: expected {' or '.join(HAM_CSV_NAMES)} or a "
        f"single CSV file, found {found}. Pass the CSV file itself as the data path."
    )


def _isic_csvs(folder: Path) -> list[Path]:
    """ISIC ground-truth CSVs in ``folder``, else one level down (the ISIC download root)."""
    for pattern in ("*.csv", "*/*.csv"):
        csvs = sorted(p for p in folder.glob(pattern) if p.is_file() and _is_isic_header(p))
        if csvs:
            return csvs
    return []


def _find_isic_csv(folder: Path) -> Path:
    csvs = _isic_csvs(folder)
    if len(csvs) == 1:
        return csvs[0]
    found = ", ".join(p.name for p in csvs) or "none"
    raise DataError(
        f"Cannot find a single ISIC ground-truth CSV (columns image,{','.join(ISIC_COLUMNS)}) in "
        f"{folder}; found: {found}. Pass the CSV file itself as the data path."
    )


def _is_isic_header(path: Path) -> bool:
    header = set(_csv_header(path))
    return "image" in header and set(ISIC_COLUMNS) <= header


def _is_ham_header(path: Path) -> bool:
    header = set(_csv_header(path))
    return {"image_id", "dx"} <= header


def _load_ham(data: Path, images: Path | None, missing_images: str) -> pd.DataFrame:
    csv = _find_ham_csv(data) if data.is_dir() else data
    root = images if images is not None else csv.parent
    df = _read_csv(csv)
    df.columns = [c.strip() for c in df.columns]
    required = ("image_id", "dx")
    missing_cols = [c for c in required if c not in df.columns]
    if missing_cols:
        raise DataError(
            f"The metadata CSV {csv} lacks the required column(s) {', '.join(missing_cols)}; "
            f"columns found: {', '.join(df.columns) or 'none'}. A HAM10000-style CSV needs at "
            "least image_id,dx (and optionally lesion_id, age, sex, localization)."
        )
    problems: list[str] = []
    df["image_id"] = df["image_id"].str.strip()
    df["dx"] = df["dx"].str.strip().str.lower()
    if "localization" in df and "site" not in df:
        df = df.rename(columns={"localization": "site"})
    if df.empty:
        problems.append("The CSV has no rows (no images).")
    _check_labels(df["dx"], problems)
    _check_duplicates(df["image_id"], problems)
    df = _attach_paths(df, "image_id", root, problems, missing_images)
    _raise_problems(
        problems, csv,
        f"Fix the CSV, or point `images=` (--images) at the folder that holds the images "
        f"(searched recursively; looked under {root}).",
    )
    return _finish(df)


def _attach_paths(df: pd.DataFrame, id_col: str, root: Path, problems: list[str],
                  missing_images: str) -> pd.DataFrame:
    if not root.is_dir():
        problems.append(f"The image folder {root} does not exist.")
        df = df.assign(path=np.nan)
        return df
    index = _index_images(root)
    paths = df[id_col].map(index)
    missing = df.loc[paths.isna(), id_col]
    if len(missing) and missing_images == "error":
        problems.append(
            f"{len(missing)} of {len(df)} images were not found under {root} (looked for "
            f"IMAGE_ID{'/'.join(IMAGE_EXTENSIONS)} in all subfolders, found {len(index)} image "
            f"files): {_first(missing)}."
        )
    df = df.assign(path=paths)
    if missing_images == "drop":
        df = df[paths.notna()]
        if df.empty:
            problems.append(f"None of the images were found under {root}.")
    elif missing_images == "keep":
        guess = df[id_col].map(lambda i: str(root / f"{i}.jpg"))
        df = df.assign(path=paths.fillna(guess))
    return df


def read_isic_csv(path: str | Path, *, ground_truth: bool = False) -> pd.DataFrame:
    """Read an ISIC 2018 Task 3 CSV (``image,MEL,NV,BCC,AKIEC,BKL,DF,VASC``).

    Returns ``image`` + the seven columns as floats; with ``ground_truth=True`` also checks that
    every row is exactly one-hot and adds ``dx`` (HAM10000 code).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"The ISIC CSV {path} does not exist. Check the path.")
    df = _read_csv(path)
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in ("image", *ISIC_COLUMNS) if c not in df.columns]
    if missing:
        raise DataError(
            f"The ISIC CSV {path} lacks the column(s) {', '.join(missing)}; columns found: "
            f"{', '.join(df.columns) or 'none'}. The ISIC 2018 Task 3 format is "
            f"image,{','.join(ISIC_COLUMNS)}."
        )
    out = pd.DataFrame({"image": df["image"].str.strip().astype(object)})
    problems: list[str] = []
    for col in ISIC_COLUMNS:
        values = pd.to_numeric(df[col], errors="coerce")
        bad = out["image"][values.isna() | (values < 0) | (values > 1)]
        if len(bad):
            problems.append(f"column {col} has {len(bad)} values that are not numbers in [0, 1] "
                            f"(rows {_first(bad)}).")
        out[col] = values.astype(float)
    if ground_truth and not problems:
        m = out[list(ISIC_COLUMNS)].to_numpy()
        one_hot = np.isin(m, (0.0, 1.0)).all(axis=1) & (m.sum(axis=1) == 1)
        if not one_hot.all():
            bad = out["image"][~one_hot]
            problems.append(f"{len(bad)} rows are not exactly one-hot (one 1.0, the rest 0.0): "
                            f"{_first(bad)}.")
        else:
            out["dx"] = [ISIC_TO_DX[ISIC_COLUMNS[i]] for i in m.argmax(axis=1)]
    _check_duplicates(out["image"], problems)
    if out.empty:
        problems.append("The CSV has no rows.")
    _raise_problems(problems, path, "Fix these rows in the CSV.")
    return out


def write_isic_predictions(image_ids: Sequence[str], probs_diag: np.ndarray, path: str | Path,
                           *, labels: Sequence[str] = DIAGNOSIS_LABELS) -> None:
    """Write ``image,MEL,NV,BCC,AKIEC,BKL,DF,VASC`` from probabilities in ``labels`` order."""
    probs = np.asarray(probs_diag, dtype=float)
    ids = [str(i) for i in image_ids]
    if probs.ndim != 2 or probs.shape != (len(ids), len(labels)):
        raise ValueError(
            f"probs_diag must have shape (n_images, {len(labels)}) = ({len(ids)}, {len(labels)}); "
            f"received {probs.shape}."
        )
    unknown = [lab for lab in labels if lab not in DX_TO_ISIC]
    if unknown or sorted(labels) != sorted(DX_TO_ISIC):
        raise ValueError(f"labels must be the seven codes {DIAGNOSIS_LABELS}; received {labels}.")
    col = {DX_TO_ISIC[lab]: probs[:, i] for i, lab in enumerate(labels)}
    df = pd.DataFrame({"image": ids, **{c: col[c] for c in ISIC_COLUMNS}})
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def _load_isic(data: Path, images: Path | None, missing_images: str) -> pd.DataFrame:
    csv = _find_isic_csv(data) if data.is_dir() else data
    truth = read_isic_csv(csv, ground_truth=True)
    problems: list[str] = []
    if images is not None:
        root = images
    else:
        # The ISIC download keeps the ground truth and the images in sibling folders.
        root = csv.parent
        if not any(i in _index_images(root) for i in truth["image"].head(20)):
            root = csv.parent.parent
    df = truth.rename(columns={"image": "image_id"})[["image_id", "dx"]]
    lesions = _find_isic_lesion_groupings(csv.parent)
    if lesions is not None:
        df = df.assign(lesion_id=df["image_id"].map(lesions))
    df = _attach_paths(df, "image_id", root, problems, missing_images)
    _raise_problems(problems, csv, "Point `images=` (--images) at the folder with the images.")
    return _finish(df)


def _find_isic_lesion_groupings(folder: Path) -> dict[str, str] | None:
    """ISIC 2018 ships ``*LesionGroupings.csv`` (image,lesion_id); use it when it is there."""
    for p in sorted(folder.glob("*.csv")):
        header = set(_csv_header(p))
        if {"image", "lesion_id"} <= header:
            df = _read_csv(p)
            return dict(zip(df["image"].str.strip(), df["lesion_id"].str.strip(), strict=True))
    return None


def _dx_folders(folder: Path) -> tuple[dict[str, Path], list[Path]]:
    """Subfolders named by a diagnosis code (any case), and the other subfolders."""
    known: dict[str, Path] = {}
    other: list[Path] = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        code = sub.name.strip().lower()
        if code in DIAGNOSIS_LABELS and code not in known:
            known[code] = sub
        else:
            other.append(sub)
    return known, other


def _load_folders(data: Path, images: Path | None, missing_images: str) -> pd.DataFrame:
    root = images if images is not None else data
    if not root.is_dir():
        raise DataError(f"The folders layout needs a directory; {root} is not one.")
    known, other = _dx_folders(root)
    problems: list[str] = []
    rows = []
    for code, sub in known.items():
        for stem, path in _index_images(sub).items():
            rows.append((stem, path, code))
    strays = [(p.name, len(_index_images(p))) for p in other]
    strays = [(n, k) for n, k in strays if k]
    if strays:
        problems.append(
            "Subfolders that are not one of the seven diagnosis codes "
            f"({', '.join(DIAGNOSIS_LABELS)}) hold images: "
            + ", ".join(f"{n!r} ×{k}" for n, k in strays) + "."
        )
    df = pd.DataFrame(rows, columns=["image_id", "path", "dx"])
    if df.empty and not strays:
        problems.append(
            f"No images ({'/'.join(IMAGE_EXTENSIONS)}) were found in the class subfolders "
            f"({', '.join(p.name for p in known.values()) or 'none'})."
        )
    _check_duplicates(df["image_id"], problems)
    _raise_problems(problems, root, "Rename the class folders to the diagnosis codes and make "
                    "image file names unique across folders.")
    return _finish(df)


def detect_layout(data: str | Path) -> str:
    """Name the layout of ``data`` (``ham10000``, ``isic`` or ``folders``), or raise DataError."""
    data = Path(data)
    if not data.exists():
        raise DataError(f"The data path {data} does not exist. Check the path.")
    if data.is_file():
        if _is_isic_header(data):
            return "isic"
        if _is_ham_header(data):
            return "ham10000"
        raise DataError(
            f"Cannot tell the layout of {data}: its header is {_csv_header(data)}, but a "
            f"HAM10000 CSV needs image_id,dx and an ISIC CSV needs image,{','.join(ISIC_COLUMNS)}."
            f" Layouts: {', '.join(LAYOUTS[1:])}."
        )
    if any((data / n).is_file() for n in HAM_CSV_NAMES):
        return "ham10000"
    csvs = sorted(p for p in data.glob("*.csv") if p.is_file())
    isic = [p for p in csvs if _is_isic_header(p)]
    ham = [p for p in csvs if _is_ham_header(p)]
    known, other = _dx_folders(data)
    kinds = [k for k, ok in (("isic", len(isic) == 1), ("ham10000", len(ham) == 1),
                             ("folders", bool(known))) if ok]
    if len(kinds) == 1:
        return kinds[0]
    if not kinds and not csvs and len(_isic_csvs(data)) == 1:
        return "isic"  # the ISIC download root: the ground truth sits in a subfolder
    found = (f"{len(csvs)} CSV file(s) ({_first(p.name for p in csvs)}), "
             f"subfolders: {_first([p.name for p in [*known.values(), *other]]) or 'none'}")
    what = "ambiguous: " + " and ".join(kinds) if kinds else "no known layout"
    raise DataError(
        f"Cannot tell the layout of {data} ({what}; found {found}). Layouts: 'ham10000' "
        f"(HAM10000_metadata.csv or labels.csv with image_id,dx + images), 'isic' "
        f"(CSV image,{','.join(ISIC_COLUMNS)} + images), "
        f"'folders' (one subfolder per code: {', '.join(DIAGNOSIS_LABELS)}). Pass layout= "
        "(--layout) or the CSV file itself."
    )


_LOADERS = {"ham10000": _load_ham, "isic": _load_isic, "folders": _load_folders}


def load_records(data: str | Path, *, layout: str = "auto", images: str | Path | None = None,
                 missing_images: str = "error") -> pd.DataFrame:
    """Read a dataset into one table with :data:`RECORD_COLUMNS`.

    ``missing_images``: ``"error"`` (default), ``"drop"`` rows whose image is absent, or
    ``"keep"`` them with the path the image would have (for metadata-only work).
    """
    if layout not in LAYOUTS:
        import difflib

        hint = difflib.get_close_matches(str(layout), LAYOUTS, n=1)
        raise DataError(
            f"Unknown layout {layout!r}"
            + (f"; did you mean {hint[0]!r}?" if hint else ".")
            + f" Layouts: {', '.join(LAYOUTS)}."
        )
    if missing_images not in ("error", "drop", "keep"):
        raise ValueError(f"missing_images must be 'error', 'drop' or 'keep'; "
                         f"received {missing_images!r}.")
    data = Path(data).expanduser().resolve()
    if not data.exists():
        raise DataError(f"The data path {data} does not exist. Check the path (a dataset folder "
                        "or its metadata CSV).")
    images = Path(images).expanduser().resolve() if images is not None else None
    if images is not None and not images.is_dir():
        raise DataError(f"The image folder {images} (images=) does not exist or is not a folder.")
    if layout == "auto":
        layout = detect_layout(data)
    if layout == "folders" and data.is_file():
        raise DataError(f"The folders layout needs a directory; {data} is a file.")
    return _LOADERS[layout](data, images, missing_images)


# --------------------------------------------------------------------------- splits


def _check_fraction(name: str, value) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1); received {value!r}.") from None
    if not (0.0 <= f < 1.0):
        raise ValueError(f"{name} must be in [0, 1); received {value!r}.")
    return f


def split_records(records: pd.DataFrame, *, val_fraction: float = 0.15,
                  test_fraction: float = 0.0, seed: int = 0) -> pd.DataFrame:
    """Assign ``split`` ∈ train/val/test: stratified by dx, grouped by lesion, seeded.

    Per class, lesions (largest first, ties in seeded random order) go greedily to the split
    furthest below its target image count; every requested split then gets at least one
    lesion of every class that has any. A lesion's class is its most frequent dx.
    """
    v = _check_fraction("val_fraction", val_fraction)
    t = _check_fraction("test_fraction", test_fraction)
    if v + t >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1 (something must be left to "
                         f"train on); received {v} + {t} = {v + t}.")
    missing = [c for c in ("image_id", "lesion_id", "dx") if c not in records.columns]
    if missing:
        raise DataError(f"split_records needs the columns image_id, lesion_id, dx; missing "
                        f"{', '.join(missing)}. Build the table with load_records().")
    if records.empty:
        raise DataError("split_records received no records (an empty table).")
    fractions = {"train": 1.0 - v - t, "val": v, "test": t}
    requested = [s for s in SPLITS if fractions[s] > 0]

    lesion_ids = records["lesion_id"].astype(str).to_numpy()
    dx = records["dx"].astype(str).to_numpy()
    table = pd.DataFrame({"lesion": lesion_ids, "dx": dx})
    sizes = table.groupby("lesion").size()
    # Majority dx per lesion; ties broken by the label order.
    per = table.groupby(["lesion", "dx"]).size().reset_index(name="n")
    per["rank"] = per["dx"].map({d: i for i, d in enumerate(DIAGNOSIS_LABELS)}).fillna(99)
    per = per.sort_values(["lesion", "n", "rank"], ascending=[True, False, True])
    lesion_dx = per.drop_duplicates("lesion").set_index("lesion")["dx"]

    too_few = []
    assignment: dict[str, str] = {}
    classes = sorted(lesion_dx.unique(), key=lambda d: (d not in DIAGNOSIS_LABELS, d))
    for ci, cls in enumerate(classes):
        lesions = np.array(sorted(lesion_dx.index[lesion_dx == cls]))
        if len(lesions) < len(requested):
            too_few.append(f"{cls!r} ({len(lesions)} lesion(s), {int(sizes[lesions].sum())} "
                           "image(s))")
            continue
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, ci, len(lesions)])
        order = rng.permutation(len(lesions))
        lesions = lesions[order]
        n_img = sizes[lesions].to_numpy()
        lesions = lesions[np.argsort(-n_img, kind="stable")]
        total = float(n_img.sum())
        target = {s: fractions[s] * total for s in requested}
        have = {s: 0 for s in requested}
        members: dict[str, list[str]] = {s: [] for s in requested}
        for les in lesions:
            k = int(sizes[les])
            best = max(requested, key=lambda s: (target[s] - have[s], -SPLITS.index(s)))
            have[best] += k
            members[best].append(les)
        for s in requested:  # each requested split gets at least one lesion of the class
            if not members[s]:
                donor = max(requested, key=lambda d: len(members[d]))
                smallest = min(members[donor], key=lambda les: (sizes[les], les))
                members[donor].remove(smallest)
                members[s].append(smallest)
        for s, les_list in members.items():
            for les in les_list:
                assignment[les] = s
    if too_few:
        raise DataError(
            f"Cannot split: {len(requested)} splits were requested ({', '.join(requested)}) but "
            f"these classes have fewer lesions than that: {', '.join(too_few)}. Add images of "
            "these classes, remove them, or request fewer splits (test_fraction=0 / "
            "val_fraction=0)."
        )
    out = records.copy()
    out["split"] = [assignment[les] for les in lesion_ids]
    return out


def write_splits(records_with_split: pd.DataFrame, path: str | Path) -> None:
    """Write ``splits.csv`` (dermedge.splits): image_id,lesion_id,dx,melanoma,path,split, then
    age,sex,site when the records have them (atomic)."""
    missing = [c for c in SPLIT_COLUMNS if c not in records_with_split.columns]
    if missing:
        raise DataError(f"write_splits needs the columns {', '.join(SPLIT_COLUMNS)}; missing "
                        f"{', '.join(missing)}. Call split_records() first.")
    extra = [c for c in EXTRA_COLUMNS if c in records_with_split.columns]
    splits_file.write_splits(records_with_split[[*SPLIT_COLUMNS, *extra]].to_dict("records"),
                             path, extra=extra, error=DataError)


def read_splits(path: str | Path) -> pd.DataFrame:
    """A ``splits.csv`` (read and validated by dermedge.splits) as records: RECORD_COLUMNS +
    ``split``; relative paths resolved against the file's folder."""
    rows = splits_file.read_splits(path, error=DataError)
    df = pd.DataFrame([r.as_dict() for r in rows], columns=[*SPLIT_COLUMNS, *EXTRA_COLUMNS],
                      dtype=object)
    split = df["split"].astype(object)
    out = _finish(df.drop(columns=["melanoma"]))
    out["split"] = split.to_numpy()
    return out


# --------------------------------------------------------------------------- images


def load_image(path: str | Path, size: int) -> np.ndarray:
    """THE reference resize (``dermedge.image.load_image``): ``(size, size, 3)`` uint8 RGB."""
    try:
        return image_contract.load_image(path, size)
    except ImageError as exc:
        raise DataError(str(exc)) from exc


def cache_key(paths: Sequence[str], size: int) -> tuple[str, list[str]]:
    """``(key, absolute paths)``: the image cache's key for these files at this size."""
    abs_paths = [os.path.abspath(str(p)) for p in paths]
    entries, missing = [], []
    for p in abs_paths:
        try:
            st = os.stat(p)
        except OSError:
            missing.append(p)
            continue
        entries.append([p, st.st_size, st.st_mtime_ns])
    if missing:
        raise DataError(f"{len(missing)} of {len(abs_paths)} images to cache do not exist: "
                        f"{_first(missing)}. Reload the records (the files moved?).")
    blob = json.dumps({"v": CACHE_FORMAT_VERSION, "size": int(size), "files": entries})
    return hashlib.sha256(blob.encode()).hexdigest()[:24], abs_paths


def _build_cache(tmp: Path, paths: list[str], size: int, workers: int | None,
                 progress: bool) -> None:
    from tqdm.auto import tqdm

    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                    shape=(len(paths), size, size, 3))

    def work(i: int) -> None:
        out[i] = load_image(paths[i], size)

    n_workers = max(1, workers or min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=n_workers) as pool, tqdm(
        total=len(paths), desc=f"caching {size}px images", unit="img", disable=not progress,
        leave=False,
    ) as bar:
        for _ in pool.map(work, range(len(paths))):
            bar.update(1)
    out.flush()


def cache_images(paths: Sequence[str], size: int, cache_dir: str | Path | None = None, *,
                 workers: int | None = None, progress: bool = True) -> np.ndarray:
    """Decode + resize (:func:`load_image`) once into a uint8 ``(N, size, size, 3)`` ``.npy``.

    Keyed by the paths, file sizes, mtimes, ``size`` and :data:`CACHE_FORMAT_VERSION`; returns
    a read-only memmap. Built in a temp file then renamed, so concurrent builders are harmless.
    """
    size = int(size)
    if size <= 0:
        raise ValueError(f"size must be a positive number of pixels; received {size!r}.")
    paths = list(paths)
    if not paths:
        return np.zeros((0, size, size, 3), dtype=np.uint8)
    key, abs_paths = cache_key(paths, size)
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else files.cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / f"images_{size}px_n{len(paths)}_{key}.npy"
    shape = (len(paths), size, size, 3)
    if final.is_file():
        try:
            arr = np.load(final, mmap_mode="r")
            if arr.shape == shape and arr.dtype == np.uint8:
                return arr
        except (OSError, ValueError):
            pass  # a corrupt cache file is rebuilt below
    with atomic_path(final, suffix=".npy") as tmp:
        _build_cache(tmp, abs_paths, size, workers, progress)
    return np.load(final, mmap_mode="r")


# --------------------------------------------------------------------------- balancing


def _int_labels(labels, n_classes: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim == 2:
        y = y.argmax(axis=1)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D class indices; received shape {y.shape}.")
    if y.size and (not np.issubdtype(y.dtype, np.integer)):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise ValueError("labels must be integer class indices.")
        y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"labels must be in [0, {n_classes}); received values from {y.min()} "
                         f"to {y.max()}.")
    return y.astype(np.int64)


def class_weights(labels: np.ndarray, n_classes: int, *,
                  method: str = "median_frequency") -> np.ndarray:
    """Per-class loss weights; classes absent from ``labels`` get weight 0.

    ``median_frequency``: median(freq) / freq_c over present classes; ``inverse``:
    N / (K · n_c) with K the number of present classes (sklearn's "balanced"); ``none``: ones.
    """
    if method not in CLASS_WEIGHT_METHODS:
        import difflib

        hint = difflib.get_close_matches(str(method), CLASS_WEIGHT_METHODS, n=1)
        raise ValueError(f"Unknown class-weight method {method!r}"
                         + (f"; did you mean {hint[0]!r}?" if hint else "")
                         + f". Methods: {', '.join(CLASS_WEIGHT_METHODS)}.")
    y = _int_labels(labels, n_classes)
    if method == "none":
        return np.ones(n_classes, dtype=np.float64)
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(n_classes, dtype=np.float64)
    if not present.any():
        return w
    if method == "median_frequency":
        freq = counts / counts.sum()
        w[present] = np.median(freq[present]) / freq[present]
    else:
        w[present] = counts.sum() / (present.sum() * counts[present])
    return w


def resample_indices(labels: np.ndarray, *, cap: float = 5.0, seed: int = 0) -> np.ndarray:
    """One epoch of shuffled indices, each class oversampled towards the majority count.

    Class c gets ``min(n_max, round(cap · n_c))`` samples: whole repeats of its indices plus a
    seeded random subset for the remainder.
    """
    cap = float(cap)
    if not cap >= 1.0:
        raise ValueError(f"cap must be ≥ 1 (1 = no oversampling); received {cap!r}.")
    y = np.asarray(labels)
    if y.ndim == 2:
        y = y.argmax(axis=1)
    if y.size == 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    n_max = counts.max()
    parts = []
    for c, n_c in zip(classes, counts, strict=True):
        idx = np.flatnonzero(y == c)
        target = int(min(n_max, round(cap * n_c)))
        reps, rest = divmod(target, n_c)
        parts.append(np.tile(idx, reps))
        if rest:
            parts.append(rng.choice(idx, size=rest, replace=False))
    out = np.concatenate(parts).astype(np.int64)
    rng.shuffle(out)
    return out


# --------------------------------------------------------------------------- summaries


def describe(records: pd.DataFrame) -> dict:
    """Counts for the model card: images, lesions, per split and per class (JSON-able)."""
    def counts(df: pd.DataFrame) -> dict[str, int]:
        vc = df["dx"].value_counts()
        return {lab: int(vc.get(lab, 0)) for lab in DIAGNOSIS_LABELS}

    out: dict = {
        "n_images": int(len(records)),
        "n_lesions": int(records["lesion_id"].nunique()) if "lesion_id" in records else None,
        "n_melanoma": int((records["dx"] == MELANOMA_DX).sum()),
        "class_counts": {"all": counts(records)},
    }
    if "split" in records:
        out["splits"] = {s: int((records["split"] == s).sum()) for s in SPLITS}
        out["lesions"] = {s: int(records.loc[records["split"] == s, "lesion_id"].nunique())
                          for s in SPLITS} if "lesion_id" in records else None
        for s in SPLITS:
            out["class_counts"][s] = counts(records[records["split"] == s])
    return out
