"""trainer.toy: the embedded default dataset is read by the real HAM10000 reader."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest

from dermedge.labels import DIAGNOSIS_LABELS
from trainer import data as D
from trainer.errors import DataError
from trainer.toy import class_counts, make_toy_dataset


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_dataset(tmp_path_factory.mktemp("toy") / "ds", n_lesions=210, size=64,
                            seed=0, min_per_class=20)


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_toy_is_a_ham10000_download(toy):
    assert (toy / "HAM10000_metadata.csv").is_file()
    assert D.detect_layout(toy) == "ham10000"
    rec = D.load_records(toy)
    parts = {p.split("/")[-2] for p in rec["path"]}
    assert parts == {"HAM10000_images_part_1", "HAM10000_images_part_2"}
    assert rec["image_id"].str.fullmatch(r"ISIC_\d{7}").all()
    meta = pd.read_csv(toy / "HAM10000_metadata.csv")
    assert list(meta.columns) == ["lesion_id", "image_id", "dx", "dx_type", "age", "sex",
                                  "localization"]
    assert meta["age"].between(5, 85).all() and set(meta["sex"]) <= {"male", "female", "unknown"}
    img = D.load_image(rec["path"].iloc[0], 64)
    assert img.shape == (64, 64, 3)


def test_toy_class_balance_and_lesion_groups(toy):
    rec = D.load_records(toy)
    lesions = rec.groupby("lesion_id")["dx"].first().value_counts()
    assert set(lesions.index) == set(DIAGNOSIS_LABELS)
    assert lesions.min() >= 20
    assert lesions.idxmax() == "nv"
    per_lesion = rec.groupby("lesion_id").size()
    assert per_lesion.max() == 2 and 0.05 < (per_lesion == 2).mean() < 0.3
    assert rec.groupby("lesion_id")["dx"].nunique().max() == 1
    split = D.split_records(rec, val_fraction=0.2, seed=0)
    assert split.groupby("lesion_id")["split"].nunique().max() == 1


def test_class_counts_like_ham10000():
    c = class_counts(420)
    assert sum(c.values()) == 420 and min(c.values()) >= 20
    assert c["nv"] > c["mel"] > c["df"]
    with pytest.raises(ValueError, match="at least 140"):
        class_counts(100)


def test_toy_is_deterministic_and_seeded(tmp_path):
    a, b, c = (make_toy_dataset(tmp_path / name, n_lesions=140, size=32, seed=seed)
               for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_toy_classes_differ_in_colour(toy):
    """A sanity check that the classes are learnable: mean lesion-centre colours differ."""
    rec = D.load_records(toy)
    means = {}
    for dx in DIAGNOSIS_LABELS:
        paths = rec.loc[rec["dx"] == dx, "path"].head(15)
        means[dx] = np.mean([D.load_image(p, 32)[8:24, 8:24].reshape(-1, 3).mean(0)
                             for p in paths], axis=0)
    for a in DIAGNOSIS_LABELS:
        for b in DIAGNOSIS_LABELS:
            if a < b:
                assert np.abs(means[a] - means[b]).max() > 8, (a, b)


def test_toy_refuses_to_overwrite(tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty.*overwrite=True"):
        make_toy_dataset(out, n_lesions=140, size=32)
    assert (out / "keep.txt").read_text() == "mine"
    make_toy_dataset(out, n_lesions=140, size=32, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "HAM10000_metadata.csv").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no temp folders left
    empty = tmp_path / "empty"
    empty.mkdir()
    make_toy_dataset(empty, n_lesions=140, size=32)  # an empty folder is fine
