"""Temperature and Platt scaling: the fits recover a known temperature and shift, folding them
into the heads is exact, and `trainer fit` / `trainer calibrate` record them in the run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ci import need

from trainer.calibration import (
    apply_sigmoid,
    apply_softmax,
    calibrate,
    fit_platt_sigmoid,
    fit_temperature_sigmoid,
    fit_temperature_softmax,
    fold_temperatures,
)


def _synthetic(n=20000, k=7, seed=0):
    """Logits whose softmax/sigmoid is the true posterior, and labels drawn from it."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, k)) * 2
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = (p.cumsum(1) > rng.random((n, 1))).argmax(1)
    zm = rng.normal(size=n) * 2
    m = (rng.random(n) < 1 / (1 + np.exp(-zm))).astype(np.int64)
    return z, y, zm, m


@pytest.mark.parametrize("true_t", [0.5, 1.0, 3.0])
def test_fit_recovers_the_temperature_that_miscalibrated_the_scores(true_t):
    z, y, zm, m = _synthetic()
    # Scores computed at 1/true_t the right temperature: T = true_t undoes it.
    probs = np.exp(z * true_t) / np.exp(z * true_t).sum(1, keepdims=True)
    p_mel = 1 / (1 + np.exp(-zm * true_t))
    assert fit_temperature_softmax(probs, y) == pytest.approx(true_t, rel=0.05)
    assert fit_temperature_sigmoid(p_mel, m) == pytest.approx(true_t, rel=0.08)
    # apply_* with that temperature gives back the true posterior
    np.testing.assert_allclose(apply_softmax(probs, true_t), np.exp(z) / np.exp(z).sum(1,
                               keepdims=True), atol=1e-6)
    np.testing.assert_allclose(apply_sigmoid(p_mel, true_t), 1 / (1 + np.exp(-zm)), atol=1e-6)


@pytest.mark.parametrize(("true_t", "true_shift"), [(1.0, 0.0), (0.5, -2.0), (2.0, 1.5)])
def test_platt_recovers_temperature_and_shift(true_t, true_shift):
    _, _, zm, m = _synthetic(n=40000)
    # What class weighting does to a sigmoid head: every logit moved by a constant (and scaled).
    p_mel = 1 / (1 + np.exp(-(zm - true_shift) * true_t))
    t, shift = fit_platt_sigmoid(p_mel, m)
    assert t == pytest.approx(true_t, rel=0.08)
    assert shift == pytest.approx(true_shift, abs=0.08)
    np.testing.assert_allclose(apply_sigmoid(p_mel, t, shift), 1 / (1 + np.exp(-zm)), atol=0.03)
    # a temperature alone cannot undo a shift: its NLL stays higher
    from trainer.calibration import _sigmoid_logits, sigmoid_nll

    z = _sigmoid_logits(p_mel)
    t_only = fit_temperature_sigmoid(p_mel, m)
    if true_shift:
        assert sigmoid_nll(z, m, t, shift) < sigmoid_nll(z, m, t_only) - 0.005
    assert fit_platt_sigmoid(np.full(10, 0.3), np.zeros(10)) == (1.0, 0.0)


def test_multi_pass_fit_and_one_class_melanoma():
    z, y, _, _ = _synthetic(n=4000)
    probs = np.exp(3 * z) / np.exp(3 * z).sum(1, keepdims=True)
    # two identical passes average to the same scores: same temperature
    assert fit_temperature_softmax(np.stack([probs, probs]), y) == pytest.approx(
        fit_temperature_softmax(probs, y), rel=1e-6)
    assert fit_temperature_sigmoid(np.full(10, 0.3), np.zeros(10)) == 1.0


def test_calibrate_folds_into_the_heads_exactly_and_reports_ece():
    keras = need("keras", "the train extra installs it")
    from trainer.model import build_model
    from trainer.pipeline import predict_arrays

    model = build_model("tiny_cnn", input_size=32, weights=None)
    head = model.get_layer("diagnosis")
    k, b = head.get_weights()
    head.set_weights([k * 40, b])  # sharpen: an overconfident head
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 32, 32, 3)).astype(np.uint8)
    p_mel, probs = predict_arrays(model, x)
    y = rng.integers(0, 7, 64)  # labels unrelated to the scores: T must grow to flatten them
    mel = (y == 4).astype(np.int64)
    report = calibrate(model, p_mel, probs, y, mel)
    t = report["temperature"]
    assert t["diagnosis"] > 1.5
    p2, probs2 = predict_arrays(model, x)
    np.testing.assert_allclose(probs2, apply_softmax(probs, t["diagnosis"]), atol=2e-5)
    np.testing.assert_allclose(p2, apply_sigmoid(p_mel, t["melanoma"],
                                                 report["shift"]["melanoma"]), atol=2e-5)
    assert report["shift"]["diagnosis"] == 0.0  # a per-class shift would move the argmax
    np.testing.assert_array_equal(probs2.argmax(1), probs.argmax(1))
    assert report["ece_after"]["diagnosis"] < report["ece_before"]["diagnosis"]
    assert report["nll_after"]["diagnosis"] <= report["nll_before"]["diagnosis"]
    assert set(report["ece_after_crossfit"]) == {"diagnosis", "melanoma"}
    assert isinstance(keras.saving.serialize_keras_object(model), dict)


def test_fold_into_several_members():
    from trainer.model import build_model

    members = [build_model("tiny_cnn", input_size=32, weights=None) for _ in range(2)]
    before = [m.get_layer("melanoma").get_weights()[0].copy() for m in members]
    bias = [m.get_layer("melanoma").get_weights()[1].copy() for m in members]
    fold_temperatures(members, {"melanoma": 2.0}, {"melanoma": -1.5})
    for m, k, b in zip(members, before, bias, strict=True):
        np.testing.assert_allclose(m.get_layer("melanoma").get_weights()[0], k / 2.0)
        np.testing.assert_allclose(m.get_layer("melanoma").get_weights()[1], b / 2.0 - 1.5)


# --- in a run ---------------------------------------------------------------------------------
from test_fit import tiny_config, toy_data_fixture  # noqa: E402,F401 - session fixture


def test_fit_calibrates_and_trainer_calibrate_refuses_twice(toy_data, tmp_path):
    from trainer.cli import main
    from trainer.fit import fit

    cfg = tiny_config(toy_data, tmp_path / "cache", **{"train.epochs": 1})
    result = fit(cfg, tmp_path / "run", verbose=0)
    card = result.card
    c = card["calibration"]
    assert c["fitted_on"] == "val" and c["n"] == card["data"]["splits"]["val"]
    assert all(0.05 <= v <= 20 for v in c["temperature"].values())
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # the run's metrics are those of the calibrated model
    assert metrics["diagnosis_ece"] == pytest.approx(c["ece_after"]["diagnosis"], abs=1e-4)
    assert card["metrics"]["val"]["diagnosis_ece"] == metrics["diagnosis_ece"]

    assert main(["calibrate", str(tmp_path / "run")]) == 2  # already calibrated


def test_trainer_calibrate_on_an_uncalibrated_run(toy_data, tmp_path, capsys):
    from trainer.cli import main
    from trainer.fit import fit
    from trainer.run import load_run

    cfg = tiny_config(toy_data, tmp_path / "cache", **{"train.epochs": 1,
                                                       "train.calibrate": False})
    run = tmp_path / "run"
    result = fit(cfg, run, verbose=0)
    assert result.card["calibration"] is None
    before = json.loads((run / "metrics.json").read_text())
    assert main(["calibrate", str(run)]) == 0
    assert "temperatures diagnosis" in capsys.readouterr().out
    _, card = load_run(run)
    after = json.loads((run / "metrics.json").read_text())
    assert card["calibration"]["temperature"]["diagnosis"] > 0
    # ranking and argmax are unchanged by a temperature
    assert after["balanced_accuracy"] == before["balanced_accuracy"]
    assert after["melanoma"]["auc"] == pytest.approx(before["melanoma"]["auc"], abs=1e-3)
    assert card["heads"]["melanoma"]["threshold"] == after["melanoma"]["threshold"]
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())
