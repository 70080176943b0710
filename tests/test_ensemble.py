"""`trainer ensemble`: built-in flip layers, the mean over members x flips, an ordinary run
directory that export reads, and the errors for members that do not belong together."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml
from ci import need
from PIL import Image

keras = need("keras", "the train extra installs it: pip install -e '.[train,demo,dev]'")

from test_fit import tiny_config, toy_data_fixture, trained_run_fixture  # noqa: E402,F401

from dermedge.labels import DIAGNOSIS_LABELS  # noqa: E402
from trainer.cli import main  # noqa: E402
from trainer.ensemble import build_ensemble, ensemble_runs, flip  # noqa: E402
from trainer.errors import DermedgeError  # noqa: E402
from trainer.pipeline import predict_arrays  # noqa: E402
from trainer.run import RUN_FILES, load_run  # noqa: E402


def test_flip_layers_are_exact():
    size = 8
    image = keras.Input((size, size, 3))
    model = keras.Model(image, [flip(image, "h", size, "h"), flip(image, "v", size, "v")])
    x = np.random.default_rng(0).integers(0, 256, (2, size, size, 3)).astype("float32")
    h, v = model.predict_on_batch(x)
    np.testing.assert_array_equal(h, x[:, :, ::-1])
    np.testing.assert_array_equal(v, x[:, ::-1])


@pytest.fixture(scope="module")
def two_runs(trained_run, toy_data, tmp_path_factory):
    """The session's tiny run plus a second one on the same split with another seed."""
    from trainer.fit import fit

    out = tmp_path_factory.mktemp("member") / "r2"
    cfg = tiny_config(toy_data, tmp_path_factory.getbasetemp() / "cache",
                      **{"seed": 7, "train.epochs": 1})
    return [trained_run.run_dir, fit(cfg, out, verbose=0).run_dir]


def test_ensemble_is_the_mean_over_members_and_flips(two_runs, tmp_path):
    card = ensemble_runs(two_runs, tmp_path / "ens", calibrate=False, progress=False)
    run = tmp_path / "ens"
    assert all((run / f).is_file() for f in RUN_FILES)
    assert card["backbone"] == "ensemble" and card["ensemble"]["passes"] == 8
    assert [m["run"] for m in card["ensemble"]["members"]] == [str(r) for r in two_runs]
    assert card["calibration"] is None and card["input"]["shape"] == [32, 32, 3]

    model, _ = load_run(run)  # no custom objects needed
    x = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3)).astype(np.uint8)
    p_mel, probs = predict_arrays(model, x)
    want_mel, want_probs = [], []
    for member_dir in two_runs:
        member, _ = load_run(member_dir)
        m, d = predict_arrays(member, x, tta=True)
        want_mel.append(m)
        want_probs.append(d)
    np.testing.assert_allclose(p_mel, np.mean(want_mel, 0), atol=1e-5)
    np.testing.assert_allclose(probs, np.mean(want_probs, 0), atol=1e-5)

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n"] == card["data"]["splits"]["val"] and metrics["tta"] is True
    # the toy data has age/sex/site: the ensemble counts its own metadata tables and scores
    # them on its (averaged) validation answers
    prior = card["metadata_prior"]
    assert prior["metrics"]["val_image_only"]["balanced_accuracy"] == pytest.approx(
        metrics["balanced_accuracy"], abs=1e-9)
    assert prior["val"]["images"] == metrics["n"]
    # export reads it like any run
    from export.rundir import open_run

    exported = open_run(run).load_model()
    assert set(exported.output) == {"melanoma", "diagnosis"}


def test_calibrated_ensemble_via_cli(two_runs, tmp_path, capsys):
    out = tmp_path / "ens"
    assert main(["ensemble", *map(str, two_runs), "--out", str(out), "--no-tta",
                 "--class-bias"]) == 0
    assert "ensemble of 2 runs x 1 views" in capsys.readouterr().out
    card = json.loads((out / "model_card.json").read_text())
    assert card["ensemble"]["tta"] == ["identity"] and card["ensemble"]["passes"] == 2
    cal = card["calibration"]
    assert cal["n"] == card["data"]["splits"]["val"]
    # the class offsets are folded into every member: the saved ensemble scores what the
    # card says the offsets reach
    assert set(cal["class_bias"]["offsets"]) == set(DIAGNOSIS_LABELS)
    assert card["metrics"]["val"]["balanced_accuracy"] == pytest.approx(
        cal["class_bias"]["balanced_accuracy_after"], abs=1e-4)
    assert yaml.safe_load((out / "config.yaml").read_text())["ensemble"]["class_bias"] is True
    assert card["ensemble"]["member_offsets_removed"] == []
    assert card["metrics"]["val"]["diagnosis_ece"] == pytest.approx(
        cal["ece_after"]["diagnosis"], abs=1e-4)
    # the member runs on disk are untouched by the folding
    for r in two_runs:
        assert load_run(r)[1]["calibration"] == json.loads(
            (r / "model_card.json").read_text())["calibration"]
    # --out exists now
    assert main(["ensemble", *map(str, two_runs), "--out", str(out)]) == 2
    # evaluate works on it like on any run; its gallery is skipped with the reason
    assert main(["evaluate", str(out), "--out", str(tmp_path / "ev"), "--gallery", "1"]) == 0
    assert not (tmp_path / "ev" / "gallery").exists()
    assert "no single feature map" in (tmp_path / "ev" / "report.md").read_text()
    # and `trainer explain` refuses it with the same reason, writing nothing
    photo = tmp_path / "photo.png"
    Image.new("RGB", (40, 30), (180, 120, 100)).save(photo)
    assert main(["explain", str(out), str(photo), "--out", str(tmp_path / "x")]) == 2
    assert "no single feature map" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_members_that_do_not_belong_together(two_runs, tmp_path, capsys):
    with pytest.raises(DermedgeError, match="same run is given twice"):
        ensemble_runs([two_runs[0], two_runs[0]], tmp_path / "e1")
    other = tmp_path / "other"
    shutil.copytree(two_runs[1], other)
    splits = pd.read_csv(other / "splits.csv")
    i = splits.index[splits["split"] == "val"][0]
    splits.loc[i, "split"] = "train"
    splits.to_csv(other / "splits.csv", index=False)
    with pytest.raises(DermedgeError, match="different split"):
        ensemble_runs([two_runs[0], other], tmp_path / "e2", progress=False)
    assert main(["ensemble", str(two_runs[0]), str(tmp_path / "missing"), "--out",
                 str(tmp_path / "e3")]) == 2
    assert "Run directory not found" in capsys.readouterr().err
    assert not (tmp_path / "e2").exists() and not (tmp_path / "e3").exists()
    with pytest.raises(DermedgeError, match="at least one member"):
        build_ensemble([], 32)


def test_class_bias_ensemble_replaces_the_members_own_offsets(two_runs, tmp_path):
    """A member calibrated with offsets enters a --class-bias ensemble without them: the
    ensemble's "before" is the member's score before its own offsets."""
    member = tmp_path / "member"
    shutil.copytree(two_runs[0], member)
    plain = json.loads((member / "metrics.json").read_text())["balanced_accuracy"]
    assert main(["calibrate", str(member), "--class-bias"]) == 0
    offsets = load_run(member)[1]["calibration"]["class_bias"]["offsets"]
    assert any(abs(v) > 1e-3 for v in offsets.values())
    card = ensemble_runs([member], tmp_path / "ens", tta=False, class_bias=True, progress=False)
    assert card["ensemble"]["member_offsets_removed"] == [str(member)]
    section = card["calibration"]["class_bias"]
    assert section["balanced_accuracy_before"] == pytest.approx(plain, abs=1e-9)
    # the member run on disk keeps its offsets
    assert load_run(member)[1]["calibration"]["class_bias"]["offsets"] == offsets
