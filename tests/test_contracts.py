"""dermedge's contracts layer: splits.csv, the typed run/bundle readers, the one LiteRT runner
(used by the export's validation and by the demo's tiers) and how light the layer stays."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from demo_fixtures import tiny_bundles

from dermedge.artifacts import read_bundle, read_run
from dermedge.card import ModelCard
from dermedge.errors import BundleError, DermedgeError, RunDirError
from dermedge.litert import LiteModel, run_tflite
from dermedge.splits import EXTRA_COLUMNS, SPLIT_COLUMNS, read_labelled, read_splits, write_splits

REPO = Path(__file__).resolve().parents[1]


def _row(i: int, split: str, path: str, **extra) -> dict:
    return {"image_id": f"ISIC_{i:07d}", "lesion_id": f"L{i}", "dx": ("nv", "mel")[i % 2],
            "melanoma": i % 2, "path": path, "split": split, **extra}


# ------------------------------------------------------------------------------ splits.csv
def test_splits_round_trip_with_patient_columns_and_relative_paths(tmp_path):
    run = tmp_path / "run"
    rows = [_row(0, "train", "images/a.jpg", age=55.0, sex="male", site="back"),
            _row(1, "val", "/abs/b.jpg", age=float("nan"), sex=None, site="")]
    write_splits(rows, run / "splits.csv")
    text = (run / "splits.csv").read_text()
    assert text.splitlines()[0] == ",".join([*SPLIT_COLUMNS, *EXTRA_COLUMNS])
    assert text.splitlines()[2].endswith(",val,,,")  # missing values are empty cells
    got = read_splits(run / "splits.csv")
    assert [r.path for r in got] == [str(run.absolute() / "images/a.jpg"), "/abs/b.jpg"]
    assert (got[0].age, got[0].sex, got[0].site, got[0].melanoma) == ("55.0", "male", "back", 0)
    # the run folder and its images move together: paths follow the file
    moved = shutil.move(str(run), tmp_path / "moved")
    assert read_splits(Path(moved) / "splits.csv")[0].path.startswith(str(moved))
    assert not list(Path(moved).glob(".*"))  # no temp files left by the writer


def test_splits_without_patient_columns_and_every_problem_named(tmp_path):
    path = tmp_path / "s.csv"
    write_splits([_row(0, "val", "/a.jpg")], path, extra=())
    assert path.read_text().splitlines()[0] == ",".join(SPLIT_COLUMNS)
    assert read_splits(path)[0].age == ""
    bad = [_row(0, "holdout", "/a.jpg"), {**_row(1, "val", "/b.jpg"), "dx": "cat"},
           {**_row(2, "val", "/c.jpg"), "image_id": "ISIC_0000000", "melanoma": 7}]
    write_splits(bad, path, extra=())
    with pytest.raises(DermedgeError) as err:
        read_splits(path)
    for needle in ("split outside train, val, test: holdout", "'cat' ×1",
                   "melanoma column must be 0 or 1", "1 image ids appear more than once"):
        assert needle in str(err.value), needle
    with pytest.raises(RunDirError, match="does not exist"):
        read_splits(tmp_path / "none.csv", error=RunDirError)


def test_calibrate_and_the_trainer_read_the_same_rows(tmp_path):
    """edge_demo calibrate and trainer.data both go through dermedge.splits."""
    from edge_demo.calibrate import read_samples
    from trainer.data import read_splits as trainer_read

    write_splits([_row(0, "val", "x/a.jpg"), _row(1, "train", "x/b.jpg")], tmp_path / "s.csv",
                 extra=())
    [sample] = read_samples(tmp_path / "s.csv", "val")
    table = trainer_read(tmp_path / "s.csv")
    assert str(sample.path) == table["path"][0] == str(tmp_path.absolute() / "x/a.jpg")
    assert read_labelled(tmp_path / "s.csv", "train")[0].dx == "mel"


# ------------------------------------------------------------------------------ readers
def test_read_run_and_read_bundle_name_what_is_missing(tmp_path):
    bundles = tiny_bundles()
    bundle = read_bundle(bundles["int8"])
    assert isinstance(bundle.card, ModelCard) and bundle.mode == "int8"
    assert bundle.card.input_size == 32 and bundle.card["export"]["mode"] == "int8"
    run = read_run(bundles["keras_run"])
    assert isinstance(run.card, ModelCard) and run.model_path.name == "model.keras"
    with pytest.raises(RunDirError, match="Run directory not found.*does not exist"):
        read_run(tmp_path / "none")
    (tmp_path / "run.partial").mkdir()
    with pytest.raises(RunDirError, match="--resume"):
        read_run(tmp_path / "run")
    with pytest.raises(BundleError, match="Bundle folder not found"):
        read_bundle(tmp_path / "none")
    copy = tmp_path / "b"
    shutil.copytree(bundles["int8"], copy)
    (copy / "labels_diagnosis.txt").write_text("a\nb\n")
    with pytest.raises(BundleError, match="labels_diagnosis.txt lists"):
        read_bundle(copy)
    card = json.loads((copy / "model_card.json").read_text())
    del card["export"]
    (copy / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(BundleError, match="export.mode is missing"):
        read_bundle(copy)


def test_the_typed_card_reads_like_its_json_but_cannot_be_changed():
    card = read_bundle(tiny_bundles()["int8"]).card
    card["heads"]["melanoma"]["threshold"] = 0.99  # a copy
    assert card.melanoma_threshold != 0.99 and card["heads"]["melanoma"]["threshold"] != 0.99
    assert card.get("metadata_prior") is None and "export" in card
    assert json.loads(card.to_json()) == card.to_dict() and set(card) == set(card.to_dict())


# ------------------------------------------------------------------------------ one runner
def test_one_litert_runner_serves_the_demo_and_the_export(tmp_path):
    """The demo's tier pools dermedge.litert.LiteModel, the runner the export validates with:
    same bundle, same pixels, the same dequantized answers."""
    from edge_demo.tiers import Tier

    bundles = tiny_bundles()
    pixels = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    for mode in ("int8", "float32"):
        tier = Tier.from_bundle(bundles[mode], pool_size=2)
        assert all(isinstance(m, LiteModel) for m in list(tier._pool.queue))
        ref = run_tflite(read_bundle(bundles[mode]), pixels)
        for i, rgb in enumerate(pixels):
            got = tier.predict(rgb)
            assert got["melanoma"] == pytest.approx(float(ref["melanoma"][i, 0]), abs=1e-6)
            assert [got["diagnosis"][k] for k in tier.labels] == pytest.approx(
                ref["diagnosis"][i].tolist(), abs=1e-6)


# ------------------------------------------------------------------------------ light layer
def test_dermedge_imports_neither_tensorflow_nor_pandas_nor_yaml():
    modules = sorted(p.stem for p in (REPO / "dermedge").glob("*.py") if p.stem != "__init__")
    code = ("import sys\n" + "".join(f"import dermedge.{m}\n" for m in modules)
            + "heavy = [m for m in ('tensorflow', 'keras', 'pandas', 'yaml', 'jax', 'flask', "
              "'ai_edge_litert', 'trainer', 'export', 'edge_demo') if m in sys.modules]\n"
              "print('HEAVY', heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr
