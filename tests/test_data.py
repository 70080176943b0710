"""trainer.data: layouts, validation, lesion-grouped splits, the reference resize, the cache."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from ci import need
from PIL import Image

from dermedge.labels import DIAGNOSIS_LABELS, ISIC_COLUMNS
from trainer import data as D
from trainer.errors import DataError

# --------------------------------------------------------------------------- fixtures


def _img(path: Path, colour=(120, 80, 60), size=(12, 9), fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)
    return path


def _ham_folder(root: Path, rows, *, split_parts=True, csv_name="HAM10000_metadata.csv"):
    """rows: (lesion_id, image_id, dx). Images go to two part folders like the download."""
    root.mkdir(parents=True, exist_ok=True)
    for i, (_, image_id, _) in enumerate(rows):
        part = f"HAM10000_images_part_{1 + (i % 2 if split_parts else 0)}"
        _img(root / part / f"{image_id}.jpg")
    pd.DataFrame(
        [{"lesion_id": les, "image_id": iid, "dx": dx, "dx_type": "histo", "age": 45.0,
          "sex": "male", "localization": "back"} for les, iid, dx in rows]
    ).to_csv(root / csv_name, index=False)
    return root


def _rows(n_per_class=3):
    rows, k = [], 0
    for dx in DIAGNOSIS_LABELS:
        for j in range(n_per_class):
            rows.append((f"HAM_{dx}_{j}", f"ISIC_{k:07d}", dx))
            k += 1
    return rows


def _records(n_lesions_per_class: dict[str, int], *, two_image_every=4, seed=0) -> pd.DataFrame:
    """A records table (no files) with some lesions having two images."""
    rows = []
    k = 0
    for dx, n in n_lesions_per_class.items():
        for j in range(n):
            for _ in range(2 if j % two_image_every == 0 else 1):
                rows.append({"image_id": f"ISIC_{k:07d}", "path": f"/x/{k}.jpg", "dx": dx,
                             "melanoma": int(dx == "mel"), "lesion_id": f"L_{dx}_{j}",
                             "age": 50.0, "sex": "male", "site": "back"})
                k += 1
    return pd.DataFrame(rows).sample(frac=1.0, random_state=seed).reset_index(drop=True)


# --------------------------------------------------------------------------- layouts


def test_ham10000_layout_reads_download_structure(tmp_path):
    root = _ham_folder(tmp_path / "ham", _rows())
    for data in (root, root / "HAM10000_metadata.csv"):
        for layout in ("ham10000", "auto"):
            rec = D.load_records(data, layout=layout)
            assert tuple(rec.columns) == D.RECORD_COLUMNS
            assert len(rec) == 21
            assert set(rec["dx"]) == set(DIAGNOSIS_LABELS)
            assert all(Path(p).is_absolute() and Path(p).is_file() for p in rec["path"])
            assert {Path(p).parent.name for p in rec["path"]} == {
                "HAM10000_images_part_1", "HAM10000_images_part_2"}
            assert (rec["melanoma"] == (rec["dx"] == "mel")).all()
            assert rec["age"].dtype == float and rec["site"].iloc[0] == "back"


def test_labels_csv_with_images_subfolder_and_optional_columns(tmp_path):
    root = tmp_path / "d"
    _img(root / "images" / "a.png", fmt="PNG")
    _img(root / "images" / "b.jpeg")
    pd.DataFrame({"image_id": ["a", "b"], "dx": ["NV", " mel "]}).to_csv(root / "labels.csv",
                                                                          index=False)
    rec = D.load_records(root)
    assert list(rec["dx"]) == ["nv", "mel"]
    assert list(rec["lesion_id"]) == ["a", "b"]  # no lesion_id column → the image id
    assert rec["age"].isna().all() and rec["sex"].isna().all()
    assert rec["path"].str.endswith((".png", ".jpeg")).all()


def test_images_override_and_unknown_values_become_nan(tmp_path):
    csv_dir, img_dir = tmp_path / "meta", tmp_path / "pix"
    csv_dir.mkdir()
    _img(img_dir / "deep" / "ISIC_1.jpg")
    pd.DataFrame({"lesion_id": ["L1"], "image_id": ["ISIC_1"], "dx": ["bkl"], "age": [""],
                  "sex": ["unknown"], "localization": ["unknown"]}).to_csv(
        csv_dir / "meta.csv", index=False)
    rec = D.load_records(csv_dir / "meta.csv", images=img_dir)
    assert rec.loc[0, "path"] == str((img_dir / "deep" / "ISIC_1.jpg").resolve())
    assert np.isnan(rec.loc[0, "age"]) and pd.isna(rec.loc[0, "sex"]) and pd.isna(
        rec.loc[0, "site"])


def _isic_folder(root: Path, dxs, *, bad_rows=()):
    truth = root / "ISIC2018_Task3_Training_GroundTruth"
    images = root / "ISIC2018_Task3_Training_Input"
    truth.mkdir(parents=True)
    rows = []
    for i, dx in enumerate(dxs):
        iid = f"ISIC_{i:07d}"
        _img(images / f"{iid}.jpg")
        row = {"image": iid, **{c: 0.0 for c in ISIC_COLUMNS}}
        row[dx.upper()] = 1.0
        if i in bad_rows:
            row["NV"] = 1.0 if dx != "nv" else 0.0
        rows.append(row)
    pd.DataFrame(rows).to_csv(truth / "ISIC2018_Task3_Training_GroundTruth.csv", index=False)
    return truth / "ISIC2018_Task3_Training_GroundTruth.csv"


def test_isic_layout_with_sibling_image_folder(tmp_path):
    csv = _isic_folder(tmp_path, ["mel", "nv", "vasc", "df"])
    for data, layout in ((csv, "auto"), (csv.parent, "isic"), (csv.parent, "auto"),
                         (tmp_path, "auto")):
        rec = D.load_records(data, layout=layout)
        assert list(rec["dx"]) == ["mel", "nv", "vasc", "df"]
        assert list(rec["melanoma"]) == [1, 0, 0, 0]
        assert all(Path(p).is_file() for p in rec["path"])
        assert (rec["lesion_id"] == rec["image_id"]).all()


def test_isic_lesion_groupings_are_used_when_present(tmp_path):
    csv = _isic_folder(tmp_path, ["mel", "mel", "nv"])
    pd.DataFrame({"image": ["ISIC_0000000", "ISIC_0000001", "ISIC_0000002"],
                  "lesion_id": ["IL_1", "IL_1", "IL_2"]}).to_csv(
        csv.parent / "ISIC2018_Task3_Training_LesionGroupings.csv", index=False)
    rec = D.load_records(csv)
    assert list(rec["lesion_id"]) == ["IL_1", "IL_1", "IL_2"]


def test_isic_rows_not_one_hot_are_listed(tmp_path):
    csv = _isic_folder(tmp_path, ["mel", "nv", "bcc", "df"], bad_rows=(0, 2))
    with pytest.raises(DataError, match="not exactly one-hot") as e:
        D.load_records(csv)
    assert "ISIC_0000000" in str(e.value) and "ISIC_0000002" in str(e.value)
    assert "ISIC_0000001" not in str(e.value)


def test_folders_layout_any_case(tmp_path):
    for dx, n in (("MEL", 2), ("nv", 3), ("Vasc", 1)):
        for i in range(n):
            _img(tmp_path / dx / f"{dx}_{i}.png", fmt="PNG")
    (tmp_path / "bcc").mkdir()  # an empty class is fine for loading
    for layout in ("folders", "auto"):
        rec = D.load_records(tmp_path, layout=layout)
        assert rec["dx"].value_counts().to_dict() == {"nv": 3, "mel": 2, "vasc": 1}


def test_folders_layout_rejects_unknown_class_folders(tmp_path):
    _img(tmp_path / "nv" / "a.jpg")
    _img(tmp_path / "melanoma" / "b.jpg")
    with pytest.raises(DataError, match="'melanoma' ×1"):
        D.load_records(tmp_path, layout="folders")


# --------------------------------------------------------------------------- bad input


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        D.load_records(tmp_path / "nope")


def test_unknown_layout_suggests(tmp_path):
    with pytest.raises(DataError, match="did you mean 'isic'"):
        D.load_records(tmp_path, layout="isc")


def test_auto_cannot_detect(tmp_path):
    (tmp_path / "random").mkdir()
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="Cannot tell the layout") as e:
        D.load_records(tmp_path)
    assert "ham10000" in str(e.value) and "folders" in str(e.value) and "random" in str(e.value)


def test_missing_columns_named(tmp_path):
    pd.DataFrame({"image_id": ["a"], "diagnosis": ["nv"]}).to_csv(tmp_path / "labels.csv",
                                                                 index=False)
    with pytest.raises(DataError, match="lacks the required column.*dx.*columns found: "
                                        "image_id, diagnosis"):
        D.load_records(tmp_path, layout="ham10000")


def test_all_problems_reported_together(tmp_path):
    rows = _rows(1) + [("L9", "ISIC_0000000", "nv"), ("L10", "X1", "melanoma"),
                       ("L11", "X2", "MELANOMA"), ("L12", "X3", "seb")]
    root = _ham_folder(tmp_path, rows)
    for iid in ("ISIC_0000003", "ISIC_0000004"):
        next(root.rglob(f"{iid}.jpg")).unlink()
    with pytest.raises(DataError) as e:
        D.load_records(root)
    msg = str(e.value)
    assert "\n" not in msg
    assert "3 rows have a diagnosis outside the seven codes" in msg
    assert "'melanoma' ×2" in msg and "'seb' ×1" in msg
    assert "ISIC_0000000" in msg and "more than once" in msg
    assert "2 of 11 images were not found" in msg and "ISIC_0000003" in msg
    assert "--images" in msg  # says how to fix


def test_missing_images_drop_and_keep(tmp_path):
    root = _ham_folder(tmp_path, _rows(1))
    next(root.rglob("ISIC_0000000.jpg")).unlink()
    assert len(D.load_records(root, missing_images="drop")) == 6
    kept = D.load_records(root, missing_images="keep")
    assert len(kept) == 7 and kept.loc[kept.image_id == "ISIC_0000000", "path"].item().endswith(
        "ISIC_0000000.jpg")


def test_missing_image_list_is_truncated(tmp_path):
    pd.DataFrame({"image_id": [f"I{i}" for i in range(9)], "dx": ["nv"] * 9}).to_csv(
        tmp_path / "labels.csv", index=False)
    with pytest.raises(DataError, match=r"I0, I1, I2, I3, I4 \(and 4 more\)"):
        D.load_records(tmp_path)


def test_no_images(tmp_path):
    (tmp_path / "nv").mkdir()
    with pytest.raises(DataError, match="No images"):
        D.load_records(tmp_path, layout="folders")
    pd.DataFrame(columns=["image_id", "dx"]).to_csv(tmp_path / "labels.csv", index=False)
    with pytest.raises(DataError, match="no rows"):
        D.load_records(tmp_path, layout="ham10000")


# --------------------------------------------------------------------------- splits


COUNTS = {"nv": 120, "mel": 30, "bkl": 25, "bcc": 12, "akiec": 8, "vasc": 4, "df": 3}


def test_split_is_grouped_stratified_and_close_to_fractions():
    rec = _records(COUNTS)
    out = D.split_records(rec, val_fraction=0.2, test_fraction=0.1, seed=3)
    assert set(out["split"]) == {"train", "val", "test"}
    assert (out.drop(columns="split") == rec).all().all()  # a copy, rows untouched
    assert "split" not in rec
    assert out.groupby("lesion_id")["split"].nunique().max() == 1  # no lesion in two splits
    for dx, n in COUNTS.items():
        sub = out[out["dx"] == dx]
        assert {"train", "val", "test"} <= set(sub["split"]), dx
        if n >= 20:
            share = sub["split"].value_counts(normalize=True)
            assert abs(share["val"] - 0.2) < 0.06 and abs(share["test"] - 0.1) < 0.06, dx
    share = out["split"].value_counts(normalize=True)
    assert abs(share["val"] - 0.2) < 0.04 and abs(share["test"] - 0.1) < 0.04


def test_split_deterministic_per_seed_and_independent_of_row_order():
    rec = _records(COUNTS)
    a = D.split_records(rec, seed=1).set_index("image_id")["split"]
    b = D.split_records(rec.sample(frac=1.0, random_state=9), seed=1).set_index(
        "image_id")["split"]
    c = D.split_records(rec, seed=2).set_index("image_id")["split"]
    assert a.sort_index().equals(b.sort_index())
    assert not a.sort_index().equals(c.sort_index())


def test_split_every_class_with_two_lesions_in_val():
    rec = _records({"nv": 50, "df": 2, "vasc": 2}, two_image_every=1)
    out = D.split_records(rec, val_fraction=0.1)
    for dx in ("df", "vasc"):
        assert set(out.loc[out.dx == dx, "split"]) == {"train", "val"}


def test_split_too_few_lesions_names_the_class():
    rec = _records({"nv": 40, "df": 2, "vasc": 1}, two_image_every=1)
    with pytest.raises(DataError, match="'df' \\(2 lesion") as e:
        D.split_records(rec, val_fraction=0.1, test_fraction=0.1)
    assert "'vasc' (1 lesion(s), 2 image(s))" in str(e.value)
    assert "nv" not in str(e.value).split("than that:")[1]


@pytest.mark.parametrize("kw, match", [
    ({"val_fraction": 1.0}, "val_fraction must be in"),
    ({"val_fraction": -0.1}, "val_fraction must be in"),
    ({"val_fraction": "x"}, "must be a number"),
    ({"val_fraction": 0.6, "test_fraction": 0.4}, "must be < 1"),
])
def test_split_validates_fractions(kw, match):
    with pytest.raises(ValueError, match=match):
        D.split_records(_records({"nv": 10}), **kw)


def test_split_val_zero_puts_everything_in_train():
    out = D.split_records(_records({"nv": 10, "df": 1}), val_fraction=0.0)
    assert set(out["split"]) == {"train"}


def test_write_read_splits_roundtrip(tmp_path):
    out = D.split_records(_records(COUNTS), test_fraction=0.1)
    path = tmp_path / "run" / "splits.csv"
    D.write_splits(out, path)
    header = path.read_text().splitlines()[0].split(",")
    assert header[:6] == list(D.SPLIT_COLUMNS)
    back = D.read_splits(path)
    assert list(back.columns) == [*D.RECORD_COLUMNS, "split"]
    pd.testing.assert_frame_equal(back, out[back.columns].reset_index(drop=True),
                                  check_dtype=False)
    assert not list(tmp_path.glob("run/.*"))  # no temp files left behind


def test_read_splits_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        D.read_splits(tmp_path / "splits.csv")
    pd.DataFrame({"image_id": ["a"], "dx": ["nv"]}).to_csv(tmp_path / "s.csv", index=False)
    with pytest.raises(DataError, match="lacks the column.*lesion_id, melanoma, path, split"):
        D.read_splits(tmp_path / "s.csv")
    pd.DataFrame({"image_id": ["a"], "lesion_id": ["a"], "dx": ["nv"], "melanoma": [0],
                  "path": ["/a.jpg"], "split": ["holdout"]}).to_csv(tmp_path / "s.csv",
                                                                   index=False)
    with pytest.raises(DataError, match="split outside train, val, test: holdout"):
        D.read_splits(tmp_path / "s.csv")


# --------------------------------------------------------------------------- balancing


def test_class_weights_methods():
    y = np.array([0] * 60 + [1] * 30 + [2] * 10)
    mf = D.class_weights(y, 4)
    freq = np.array([0.6, 0.3, 0.1])
    np.testing.assert_allclose(mf[:3], np.median(freq) / freq)
    assert mf[3] == 0.0  # absent class
    inv = D.class_weights(y, 4, method="inverse")
    np.testing.assert_allclose(inv[:3], 100 / (3 * np.array([60, 30, 10])))
    assert inv[3] == 0.0
    np.testing.assert_array_equal(D.class_weights(y, 4, method="none"), np.ones(4))
    sk = need("sklearn.utils.class_weight", "the dev extra installs scikit-learn")
    np.testing.assert_allclose(inv[:3], sk.compute_class_weight("balanced", classes=np.arange(3),
                                                                 y=y))
    with pytest.raises(ValueError, match="did you mean 'inverse'"):
        D.class_weights(y, 4, method="invers")
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        D.class_weights(y, 2)


def test_resample_indices_caps_oversampling():
    y = np.array([0] * 100 + [1] * 30 + [2] * 4)
    idx = D.resample_indices(y, cap=5.0, seed=0)
    counts = np.bincount(y[idx], minlength=3)
    assert counts.tolist() == [100, 100, 20]  # 30→100 (under the cap), 4→20 (capped at 5×)
    for c in range(3):  # every sample of a class is used
        assert set(idx[y[idx] == c]) == set(np.flatnonzero(y == c))
    assert not np.array_equal(idx[:20], np.sort(idx[:20]))  # shuffled
    np.testing.assert_array_equal(idx, D.resample_indices(y, cap=5.0, seed=0))
    assert not np.array_equal(idx, D.resample_indices(y, cap=5.0, seed=1))
    assert np.bincount(y[D.resample_indices(y, cap=1.0)]).tolist() == [100, 30, 4]
    with pytest.raises(ValueError, match="cap must be"):
        D.resample_indices(y, cap=0.5)


def test_describe_counts():
    out = D.split_records(_records(COUNTS), test_fraction=0.1)
    d = D.describe(out)
    assert d["n_images"] == len(out)
    assert d["n_lesions"] == sum(COUNTS.values())
    assert sum(d["splits"].values()) == len(out)
    for s in D.SPLITS:
        assert sum(d["class_counts"][s].values()) == d["splits"][s]
    assert d["class_counts"]["all"]["mel"] == (out.dx == "mel").sum()
    import json

    json.dumps(d)


# --------------------------------------------------------------------------- load_image


def _gradient(w, h):
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None].repeat(w, 1)
    return np.stack([x, y, np.full_like(x, 90)], axis=-1).astype(np.uint8)


def _reference(arr: np.ndarray, size: int) -> np.ndarray:
    """The contract written out independently: centre square crop, bilinear resize."""
    h, w = arr.shape[:2]
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    im = Image.fromarray(arr[top:top + s, left:left + s])
    return np.asarray(im.resize((size, size), Image.BILINEAR, reducing_gap=None))


@pytest.mark.parametrize("w, h", [(60, 40), (40, 60), (33, 33), (61, 40)])
def test_load_image_centre_crop_resize(tmp_path, w, h):
    arr = _gradient(w, h)
    Image.fromarray(arr).save(tmp_path / "g.png")
    out = D.load_image(tmp_path / "g.png", 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, _reference(arr, 16))


def test_load_image_applies_exif_orientation(tmp_path):
    arr = _gradient(40, 20)  # landscape as stored
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° CW when displayed
    im.save(tmp_path / "r.jpg", exif=exif, quality=100)
    plain = np.asarray(Image.open(tmp_path / "r.jpg").convert("RGB"))
    expected = _reference(np.rot90(plain, k=-1).copy(), 8)
    out = D.load_image(tmp_path / "r.jpg", 8)
    np.testing.assert_array_equal(out, expected)
    assert not np.array_equal(out, _reference(plain, 8))


def test_load_image_modes(tmp_path):
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[..., 3] = 0  # fully transparent: alpha is dropped, the colour kept
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(D.load_image(tmp_path / "rgba.png", 4)[0, 0], (200, 100, 50))

    Image.new("L", (10, 6), 77).save(tmp_path / "l.png")
    np.testing.assert_array_equal(D.load_image(tmp_path / "l.png", 4), np.full((4, 4, 3), 77))

    Image.new("LA", (10, 6), (77, 0)).save(tmp_path / "la.png")
    np.testing.assert_array_equal(D.load_image(tmp_path / "la.png", 4), np.full((4, 4, 3), 77))

    p = Image.new("P", (8, 8), 1)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    p.save(tmp_path / "p.png", transparency=0)
    np.testing.assert_array_equal(D.load_image(tmp_path / "p.png", 4)[1, 1], (10, 200, 30))

    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    red = D.load_image(tmp_path / "cmyk.jpg", 4)[2, 2].astype(int)
    assert red[0] > 200 and red[1] < 60 and red[2] < 60

    g16 = np.full((6, 6), 40000, dtype=np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    np.testing.assert_array_equal(D.load_image(tmp_path / "g16.png", 3),
                                  np.full((3, 3, 3), 40000 >> 8))


def test_load_image_bad_files(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match="bad.jpg"):
        D.load_image(tmp_path / "bad.jpg", 8)
    Image.fromarray(_gradient(64, 64)).save(tmp_path / "t.jpg", quality=90)
    blob = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="trunc.jpg.*truncated"):
        D.load_image(tmp_path / "trunc.jpg", 8)
    with pytest.raises(DataError, match="not found"):
        D.load_image(tmp_path / "missing.jpg", 8)


# --------------------------------------------------------------------------- cache


def test_cache_images_matches_load_image_and_is_reused(tmp_path, monkeypatch):
    paths = []
    for i in range(5):
        arr = np.roll(_gradient(30 + i, 24), i * 7, axis=1)
        Image.fromarray(arr).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    calls = []
    real = D.load_image
    monkeypatch.setattr(D, "load_image", lambda p, s: calls.append(p) or real(p, s))
    cache = tmp_path / "cache"
    a = D.cache_images(paths, 12, cache, workers=2, progress=False)
    assert a.shape == (5, 12, 12, 3) and a.dtype == np.uint8
    assert isinstance(a, np.memmap) and not a.flags.writeable
    for i, p in enumerate(paths):
        np.testing.assert_array_equal(a[i], real(p, 12))
    assert len(calls) == 5
    files = list(cache.glob("*.npy"))
    assert len(files) == 1 and not list(cache.glob(".*"))  # no temp files left
    mtime = files[0].stat().st_mtime_ns

    b = D.cache_images(paths, 12, cache, progress=False)
    assert len(calls) == 5  # nothing decoded the second time
    assert files[0].stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(a, b)

    D.cache_images(paths, 10, cache, progress=False)  # another size is another cache
    assert len(calls) == 10
    os.utime(paths[0], ns=(mtime + 10**9, mtime + 10**9))  # a touched file invalidates
    D.cache_images(paths, 12, cache, progress=False)
    assert len(calls) == 15 and len(list(cache.glob("*.npy"))) == 3


def test_cache_images_env_default_and_errors(tmp_path, monkeypatch):
    Image.fromarray(_gradient(9, 9)).save(tmp_path / "a.png")
    monkeypatch.setenv("DERMEDGE_CACHE", str(tmp_path / "envcache"))
    D.cache_images([str(tmp_path / "a.png")], 4, progress=False)
    assert len(list((tmp_path / "envcache").glob("*.npy"))) == 1
    with pytest.raises(DataError, match="do not exist: .*nope.png"):
        D.cache_images([str(tmp_path / "nope.png")], 4, progress=False)
    (tmp_path / "bad.png").write_bytes(b"xx")
    with pytest.raises(DataError, match="bad.png"):
        D.cache_images([str(tmp_path / "bad.png")], 4, progress=False)
    assert not list((tmp_path / "envcache").glob(".*"))  # the failed build left no temp file
    assert D.cache_images([], 4, progress=False).shape == (0, 4, 4, 3)


# --------------------------------------------------------------------------- real data


@pytest.mark.shared
def test_shared_full_metadata_split_is_lesion_grouped(shared_dir):
    rec = D.load_records(shared_dir / "data" / "HAM10000_metadata.csv", missing_images="keep")
    assert len(rec) == 10015
    assert rec["dx"].value_counts()["nv"] == 6705
    assert rec["lesion_id"].nunique() == 7470
    out = D.split_records(rec, val_fraction=0.15, test_fraction=0.15, seed=0)
    assert out.groupby("lesion_id")["split"].nunique().max() == 1
    share = pd.crosstab(out["dx"], out["split"], normalize="index")
    assert ((share["val"] - 0.15).abs() < 0.02).all()
    assert ((share["test"] - 0.15).abs() < 0.02).all()


@pytest.mark.shared
def test_shared_train_224_loads(shared_dir):
    rec = D.load_records(shared_dir / "data" / "ham10000_train_224")
    assert len(rec) == 5984
    assert rec["dx"].value_counts().to_dict() == {
        "nv": 4323, "bkl": 583, "mel": 491, "bcc": 264, "akiec": 183, "vasc": 80, "df": 60}
    assert rec["melanoma"].sum() == 491
    img = D.load_image(rec["path"].iloc[0], 64)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
