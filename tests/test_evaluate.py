"""``trainer evaluate`` on a run's own split and on an ISIC-format labelled set."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from ci import need

need("keras", "the train extra installs it: pip install -e '.[train,demo,dev]'")

from test_fit import toy_data_fixture, trained_run_fixture  # noqa: E402,F401 - session fixtures

from dermedge.errors import RunDirError  # noqa: E402
from dermedge.labels import DIAGNOSIS_LABELS, DX_TO_ISIC, ISIC_COLUMNS  # noqa: E402
from trainer.errors import DataError  # noqa: E402
from trainer.evaluate import evaluate  # noqa: E402

ISIC_HEADER = ["image", *ISIC_COLUMNS]


def test_evaluate_val_split_matches_fit_metrics(trained_run):
    run = trained_run.run_dir
    m = evaluate(run, progress=False, metadata=False)
    out = run / "eval-val"
    fit_metrics = json.loads((run / "metrics.json").read_text())
    assert m["balanced_accuracy"] == pytest.approx(fit_metrics["balanced_accuracy"], abs=1e-9)
    assert m["melanoma"]["threshold"] == fit_metrics["melanoma"]["threshold"]
    assert m["metadata"] == {"applied": False, "reason": "--no-metadata"}
    for name in ("metrics.json", "predictions.csv", "predictions_full.csv", "report.md",
                 "plots/confusion_counts.png", "plots/confusion_normalized.png",
                 "plots/roc_melanoma.png"):
        assert (out / name).is_file(), name
    pred = pd.read_csv(out / "predictions.csv")
    assert list(pred.columns) == ISIC_HEADER
    np.testing.assert_allclose(pred[list(ISIC_COLUMNS)].sum(axis=1), 1.0, atol=1e-5)
    full = pd.read_csv(out / "predictions_full.csv")
    assert {"image", "dx", "melanoma", "p_melanoma", "pred_dx"} <= set(full.columns)
    assert len(full) == m["n"] == len(pred)
    report = (out / "report.md").read_text()
    for needle in ("balanced multiclass accuracy", "melanoma ROC AUC", "sensitivity >= 90%",
                   "| mel |"):
        assert needle in report
    # the report's balanced accuracy is the recomputed mean recall
    recalls = [r["recall"] for r in m["per_class"].values() if r["support"] > 0]
    assert m["balanced_accuracy"] == pytest.approx(np.mean(recalls))


def test_evaluate_isic_ground_truth_set_with_tta(trained_run, tmp_path):
    splits = pd.read_csv(trained_run.run_dir / "splits.csv")
    val = splits[splits["split"] == "val"].head(20)
    images = tmp_path / "ISIC_test_images"
    images.mkdir()
    for p in val["path"]:
        (images / pd.io.common.os.path.basename(p)).symlink_to(p)
    gt = pd.DataFrame({"image": val["image_id"]})
    for c in ISIC_COLUMNS:
        gt[c] = (val["dx"].map(DX_TO_ISIC) == c).astype(float).to_numpy()
    gt.to_csv(tmp_path / "ISIC_GroundTruth.csv", index=False)

    out = tmp_path / "eval"
    m = evaluate(trained_run.run_dir, data=tmp_path / "ISIC_GroundTruth.csv", images=images,
                 tta=True, out=out, progress=False)
    assert m["n"] == 20 and m["tta"] is True
    pred = pd.read_csv(out / "predictions.csv")
    assert list(pred.columns) == ISIC_HEADER
    assert pred["image"].tolist() == val["image_id"].tolist()
    probs = pred[list(ISIC_COLUMNS)].to_numpy()
    assert ((probs >= 0) & (probs <= 1)).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert sum(r["support"] for r in m["per_class"].values()) == 20
    assert list(m["per_class"]) == list(DIAGNOSIS_LABELS)


def test_evaluate_errors(trained_run, tmp_path):
    with pytest.raises(RunDirError, match="not found"):
        evaluate(tmp_path / "nope")
    with pytest.raises(DataError, match="test"):
        evaluate(trained_run.run_dir, split="test")
    with pytest.raises(DataError, match="does not exist"):
        evaluate(trained_run.run_dir, data=tmp_path / "missing")


def test_operating_threshold_sits_between_scores_not_on_one():
    """The chosen melanoma threshold keeps the optimum's decisions but no score lies on it."""
    import numpy as np
    import pandas as pd

    from dermedge.metrics import sens_spec_at, threshold_youden
    from trainer.evaluate import choose_threshold

    rng = np.random.default_rng(0)
    dx = np.where(rng.random(200) < 0.2, "mel", "nv")
    y = (dx == "mel").astype(int)
    p = np.clip(rng.normal(0.3 + 0.4 * y, 0.15), 0, 1)
    records = pd.DataFrame({"dx": dx})
    t = choose_threshold(records, p, "youden")
    assert not np.isclose(p, t, atol=1e-9).any()
    assert sens_spec_at(y, p, t) == sens_spec_at(y, p, threshold_youden(y, p))
