"""``splits.csv``, the run directory's record of which image went to which split: one reader
and one writer (standard library only). ``trainer`` writes it; ``trainer``, ``export`` and
``edge_demo calibrate`` read it through :func:`read_splits`.

A relative ``path`` resolves against the folder that holds the file, so a run directory and
its images can move together.
"""

from __future__ import annotations

import csv
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dermedge.errors import DermedgeError
from dermedge.files import atomic_path
from dermedge.labels import DIAGNOSIS_LABELS

SPLITS_FILE = "splits.csv"
SPLIT_COLUMNS: tuple[str, ...] = ("image_id", "lesion_id", "dx", "melanoma", "path", "split")
# Patient fields, written when the training data had them (HAM10000's CSV does).
EXTRA_COLUMNS: tuple[str, ...] = ("age", "sex", "site")
SPLITS: tuple[str, ...] = ("train", "val", "test")
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp")
_SHOW = 5  # how many offending values a message names


@dataclass(frozen=True)
class SplitRow:
    """One row of ``splits.csv``; ``path`` is resolved, the patient fields are the file's text
    ("" when absent)."""

    image_id: str
    lesion_id: str
    dx: str
    melanoma: int
    path: str
    split: str
    age: str = ""
    sex: str = ""
    site: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in (*SPLIT_COLUMNS, *EXTRA_COLUMNS)}


def _first(items: Iterable[Any]) -> str:
    items = [str(i) for i in items]
    more = f" (and {len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return ", ".join(items[:_SHOW]) + more


def _resolve(folder: Path, value: str) -> str:
    return value if not value or os.path.isabs(value) else str(folder / value)


def read_splits(path: str | Path, *, error: type[DermedgeError] = DermedgeError
                ) -> list[SplitRow]:
    """The validated rows of a ``splits.csv`` (``error`` is the class raised)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"The splits file {path} does not exist. It is written by `trainer fit` "
                    "into the run directory.")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, skipinitialspace=True)
            columns = [c.strip() for c in reader.fieldnames or ()]
            rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k is not None}
                    for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise error(f"Cannot read {path} as a CSV file ({exc}). Check that it is a "
                    "comma-separated text file with a header row.") from None
    missing = [c for c in SPLIT_COLUMNS if c not in columns]
    if missing:
        raise error(f"The splits file {path} lacks the columns {', '.join(missing)}; columns "
                    f"found: {', '.join(columns) or 'none'}. Expected {','.join(SPLIT_COLUMNS)}.")
    problems = _problems(rows)
    if problems:
        raise error(f"Problems with the dataset at {path}: " + " ".join(problems)
                    + " Rewrite the file with write_splits().")
    folder = path.parent.absolute()
    return [SplitRow(image_id=r["image_id"], lesion_id=r["lesion_id"], dx=r["dx"],
                     melanoma=int(float(r["melanoma"])), path=_resolve(folder, r["path"]),
                     split=r["split"], **{c: r.get(c, "") for c in EXTRA_COLUMNS})
            for r in rows]


def _problems(rows: list[dict[str, str]]) -> list[str]:
    problems = []
    bad = Counter(r["dx"] or "<empty>" for r in rows if r["dx"] not in DIAGNOSIS_LABELS)
    if bad:
        listed = ", ".join(f"{k!r} ×{v}" for k, v in bad.most_common(10))
        problems.append(f"{sum(bad.values())} rows have a diagnosis outside the seven codes "
                        f"{', '.join(DIAGNOSIS_LABELS)}: {listed}.")
    bad_split = [r["split"] for r in rows if r["split"] not in SPLITS]
    if bad_split:
        problems.append(f"{len(bad_split)} rows have a split outside {', '.join(SPLITS)}: "
                        f"{_first(dict.fromkeys(bad_split))}.")
    if not all(_is_01(r["melanoma"]) for r in rows):
        problems.append("the melanoma column must be 0 or 1 on every row.")
    counts = Counter(r["image_id"] for r in rows)
    dup = [i for i, n in counts.items() if n > 1]
    if dup:
        problems.append(f"{len(dup)} image ids appear more than once "
                        f"({sum(counts[i] for i in dup)} rows): {_first(dup)}.")
    return problems


def _is_01(text: str) -> bool:
    try:
        return float(text) in (0.0, 1.0)
    except ValueError:
        return False


def _cell(value: Any) -> str:
    """A value as pandas' ``to_csv`` writes it: missing (None, NaN) is empty."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def write_splits(rows: Iterable[Mapping[str, Any]], path: str | Path, *,
                 extra: Iterable[str] = EXTRA_COLUMNS,
                 error: type[DermedgeError] = DermedgeError) -> None:
    """Write ``splits.csv`` atomically: :data:`SPLIT_COLUMNS`, then the ``extra`` patient
    columns (``age``, ``sex``, ``site``) the rows have."""
    rows = list(rows)
    extra = [c for c in extra if c in EXTRA_COLUMNS]
    columns = [*SPLIT_COLUMNS, *extra]
    for r in rows[:1]:
        missing = [c for c in columns if c not in r]
        if missing:
            raise error(f"write_splits needs the columns {', '.join(columns)}; missing "
                        f"{', '.join(missing)}.")
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        out = csv.writer(f, lineterminator="\n")
        out.writerow(columns)
        out.writerows([_cell(r[c]) for c in columns] for r in rows)


@dataclass(frozen=True)
class Sample:
    """A labelled image: its id, file and diagnosis."""

    image_id: str
    path: Path
    dx: str


def read_labelled(data: str | Path, split: str = "val", *,
                  error: type[DermedgeError] = DermedgeError) -> list[Sample]:
    """Labelled images from a run's ``splits.csv`` (the rows of ``split``) or from a folder
    with one sub-folder per diagnosis (``akiec/``, ``bcc/``, ...)."""
    p = Path(data).expanduser()
    if p.is_dir():
        samples = [Sample(f.stem, f, d.name) for d in sorted(p.iterdir()) if d.is_dir()
                   for f in sorted(d.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
        if not samples:
            raise error(f"{p} holds no class sub-folders with images ({IMAGE_SUFFIXES}). Pass "
                        "a run's splits.csv or a folder-per-class tree.")
        return samples
    if not p.is_file():
        raise error(f"Labelled data not found: {p}. Pass a run directory's splits.csv (columns "
                    f"{','.join(SPLIT_COLUMNS)}) or a folder with one sub-folder per class.")
    rows = read_splits(p, error=error)
    samples = [Sample(r.image_id, Path(r.path), r.dx) for r in rows if r.split == split]
    if not samples:
        present = sorted({r.split for r in rows})
        raise error(f"{p} has no rows with split={split!r} (splits present: {present}). Pass "
                    "--split with one of them.")
    return samples
