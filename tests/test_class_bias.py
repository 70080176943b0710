"""Class-bias correction: per-class diagnosis offsets fitted for the class-balanced log loss
recover a known drift, fold into the head exactly, and `trainer fit` / `trainer calibrate
--class-bias` / `trainer ensemble --class-bias` record them with cross-fitted figures."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ci import need

from dermedge.labels import DIAGNOSIS_LABELS
from dermedge.numerics import _balanced_nll, fit_class_bias
from trainer.calibration import apply_softmax, calibrate, class_bias_section


def _balanced_posteriors(n=30000, k=7, seed=0):
    """Logits that are the true posterior of balanced data (classes equally likely a priori:
    each row's class order is a random permutation) and labels drawn from them."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, k)) * 2
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = (p.cumsum(1) > rng.random((n, 1))).argmax(1)
    return z, y


def test_fit_recovers_a_known_per_class_drift():
    z, y = _balanced_posteriors()
    drift = np.array([0.0, 1.5, -0.5, -2.0, 0.7, 1.0, -0.4])  # what overfitting did
    probs = np.exp(z + drift) / np.exp(z + drift).sum(1, keepdims=True)
    b = fit_class_bias(probs, y)
    assert abs(b.mean()) < 1e-9  # offsets are defined up to a constant: reported centred
    np.testing.assert_allclose(b, -(drift - drift.mean()), atol=0.1)
    # with the offsets the balanced accuracy is back to that of the true posterior
    from dermedge.metrics import balanced_accuracy

    fixed = apply_softmax(probs, 1.0, b)
    assert balanced_accuracy(y, fixed.argmax(1), 7) == pytest.approx(
        balanced_accuracy(y, z.argmax(1), 7), abs=0.01)
    assert balanced_accuracy(y, probs.argmax(1), 7) < balanced_accuracy(y, z.argmax(1), 7) - 0.05
    # a systematic drift: offsets fitted on half the images fix the other half as well
    _, section, crossfit = class_bias_section(probs[None], y, 1.0, repeats=3)
    assert section["crossfit_halvings"] == 3 and crossfit.shape == probs.shape
    assert section["balanced_accuracy_after_crossfit"] == pytest.approx(
        section["balanced_accuracy_after"], abs=0.01)
    assert section["balanced_accuracy_after_crossfit"] > section["balanced_accuracy_before"] + 0.05


def test_fit_matches_a_general_optimiser_with_passes_and_a_temperature():
    optimize = need("scipy.optimize", "scikit-learn (the dev extra) installs scipy")
    rng = np.random.default_rng(3)
    z = rng.normal(size=(4, 300, 7)) * 1.5  # 4 passes averaged, as in an ensemble
    y = np.concatenate([np.arange(7), rng.integers(0, 7, 293)])
    probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    t = 1.7
    b = fit_class_bias(probs, y, t)
    zt = np.log(probs) / t
    w = 1.0 / (7 * np.bincount(y, minlength=7)[y])
    ref = optimize.minimize(lambda v: _balanced_nll(zt, y, w, v), np.zeros(7), jac=True,
                            method="L-BFGS-B", options={"gtol": 1e-10}).x
    np.testing.assert_allclose(b, ref - ref.mean(), atol=1e-4)
    # the analytic gradient is the loss's
    f, g = _balanced_nll(zt, y, w, b + 0.3)
    eps = 1e-6
    numeric = [(_balanced_nll(zt, y, w, b + 0.3 + eps * e)[0]
                - _balanced_nll(zt, y, w, b + 0.3 - eps * e)[0]) / (2 * eps) for e in np.eye(7)]
    np.testing.assert_allclose(g, numeric, atol=1e-7)


def test_a_split_without_some_class_is_skipped_with_the_reason():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(7), size=40)
    y = rng.integers(0, 6, 40)  # no vasc
    with pytest.raises(ValueError, match="missing"):
        fit_class_bias(probs, y)
    bias, section, crossfit = class_bias_section(probs[None], y, 1.0)
    assert bias is None and crossfit is None
    assert "vasc" in section["skipped"]


def test_calibrate_folds_the_offsets_into_the_head_exactly():
    from trainer.model import build_model
    from trainer.pipeline import predict_arrays

    keras = need("keras", "the train extra installs it")
    keras.utils.set_random_seed(0)
    model = build_model("tiny_cnn", input_size=32, weights=None)
    head = model.get_layer("diagnosis")
    k, b0 = head.get_weights()
    head.set_weights([k * 10, b0 + np.array([3.0, 0, 0, 0, 0, -1.0, 0], np.float32)])
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (96, 32, 32, 3)).astype(np.uint8)
    y = np.concatenate([np.arange(7), rng.integers(0, 7, 89)])
    p_mel, probs = predict_arrays(model, x)
    report = calibrate(model, p_mel, probs, y, (y == 4).astype(np.int64), class_bias=True)
    section = report["class_bias"]
    offsets = np.array([section["offsets"][c] for c in DIAGNOSIS_LABELS])
    _, probs2 = predict_arrays(model, x)
    np.testing.assert_allclose(probs2, apply_softmax(probs, report["temperature"]["diagnosis"],
                                                     offsets), atol=2e-5)
    assert section["balanced_accuracy_after"] == pytest.approx(
        json_balanced(y, probs2), abs=1e-9)
    # what the offsets minimise, the class-balanced log loss, went down (balanced accuracy, a
    # step function of it, need not follow on a handful of images)
    w = 1.0 / (7 * np.bincount(y, minlength=7)[y])
    t_only = apply_softmax(probs, report["temperature"]["diagnosis"])
    assert (_balanced_nll(np.log(probs2)[None], y, w, np.zeros(7))[0]
            < _balanced_nll(np.log(t_only)[None], y, w, np.zeros(7))[0] - 1e-3)
    assert report["shift"]["diagnosis"] == 0.0  # the offsets have their own entry
    # the calibration errors describe the model as it is now, offsets included
    from dermedge.metrics import expected_calibration_error as ece

    assert report["ece_after"]["diagnosis"] == pytest.approx(ece(probs2, y), abs=1e-5)


def json_balanced(y, probs):
    from dermedge.metrics import balanced_accuracy

    return balanced_accuracy(y, probs.argmax(1), 7)


# --- in a run ---------------------------------------------------------------------------------
from test_fit import tiny_config, toy_data_fixture  # noqa: E402,F401 - session fixture


def test_fit_with_class_bias_and_trainer_calibrate_adds_it_once(toy_data, tmp_path, capsys):
    from trainer.cli import main
    from trainer.fit import fit
    from trainer.run import load_run

    cfg = tiny_config(toy_data, tmp_path / "cache", **{"train.epochs": 1,
                                                       "train.class_bias": True})
    result = fit(cfg, tmp_path / "fit", verbose=0)
    section = result.card["calibration"]["class_bias"]
    assert set(section["offsets"]) == set(DIAGNOSIS_LABELS)
    metrics = json.loads((tmp_path / "fit" / "metrics.json").read_text())
    assert metrics["balanced_accuracy"] == pytest.approx(section["balanced_accuracy_after"],
                                                         abs=1e-6)

    # a run calibrated without offsets gets them from `trainer calibrate --class-bias`, and
    # the same figures as a fit that made them (same predictions, same fit)
    cfg = tiny_config(toy_data, tmp_path / "cache", **{"train.epochs": 1})
    run = tmp_path / "run"
    fit(cfg, run, verbose=0)
    _, before_card = load_run(run)
    assert main(["calibrate", str(run), "--class-bias"]) == 0
    out = capsys.readouterr().out
    assert "class offsets: akiec" in out and "cross-fitted" in out
    _, card = load_run(run)
    added = card["calibration"]["class_bias"]
    assert added["after_temperature_scaling"] is True
    assert card["calibration"]["temperature"] == before_card["calibration"]["temperature"]
    for key in ("balanced_accuracy_before", "balanced_accuracy_after"):
        assert added[key] == pytest.approx(section[key], abs=0.02)
    after = json.loads((run / "metrics.json").read_text())
    assert after["balanced_accuracy"] == pytest.approx(added["balanced_accuracy_after"],
                                                       abs=1e-6)
    assert card["metrics"]["val"]["balanced_accuracy"] == pytest.approx(
        after["balanced_accuracy"], abs=1e-4)
    # the metadata tables stay; their validation scores are those of the new answers
    prior = card["metadata_prior"]
    assert prior["fields"] == before_card["metadata_prior"]["fields"]
    assert prior["metrics"]["val_image_only"]["balanced_accuracy"] == pytest.approx(
        after["balanced_accuracy"], abs=1e-9)
    # twice is refused, and the run is left as it was
    model_bytes = (run / "model.keras").read_bytes()
    assert main(["calibrate", str(run), "--class-bias"]) == 2
    assert "already calibrated with class offsets" in " ".join(capsys.readouterr().err.split())
    assert (run / "model.keras").read_bytes() == model_bytes
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


def test_config_and_ensemble_refuse_offsets_without_calibration(toy_data, tmp_path):
    from trainer.config import ConfigError
    from trainer.ensemble import ensemble_runs
    from trainer.errors import DermedgeError

    with pytest.raises(ConfigError, match="train.calibrate: true"):
        tiny_config(toy_data, tmp_path / "cache", **{"train.class_bias": True,
                                                     "train.calibrate": False}).validate()
    with pytest.raises(DermedgeError, match="--class-bias"):
        ensemble_runs([tmp_path / "a"], tmp_path / "out", calibrate=False, class_bias=True)
    assert not (tmp_path / "out").exists()


# --- int8 vs float when the offsets were fitted on the validation images ------------------------
def _val_like(seed=0):
    """Posterior logits and labels with the validation split's class counts (9 df, 12 vasc)."""
    rng = np.random.default_rng(seed)
    counts = [27, 40, 87, 9, 74, 648, 12]
    y = np.repeat(np.arange(7), counts)
    z = rng.normal(size=(len(y), 7))
    z[np.arange(len(y)), y] += 1.5  # informative but unsure: many near-ties
    return z, y


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_crossfit_pair_scores_both_models_with_offsets_they_were_not_fitted_on():
    from dermedge.metrics import crossfit_pair

    z, y = _val_like()
    b = fit_class_bias(_softmax(z), y)
    reference = _softmax(z + b)  # the float model, offsets fitted on these labels
    same = crossfit_pair(reference, reference, y, b)
    assert same["drop"] == 0.0 and same["reference"] == same["other"]
    assert same["halvings"] == 10
    # the reference's cross-fitted score is the card's (same halvings, same refits)
    _, section, _ = class_bias_section(_softmax(z)[None], y, 1.0)
    assert same["reference"] == pytest.approx(section["balanced_accuracy_after_crossfit"],
                                              abs=1e-9)
    # the offsets fitted on these labels play no part: both models with them or without them
    # (a copy that answers near-ties differently, as quantization does) score the same
    rng = np.random.default_rng(1)
    noise = rng.normal(scale=0.15, size=z.shape)
    with_b = crossfit_pair(reference, _softmax(z + b + noise), y, b)
    without = crossfit_pair(_softmax(z), _softmax(z + noise), y, np.zeros(7))
    for key in ("reference", "other", "drop", "drop_sd"):
        assert with_b[key] == pytest.approx(without[key], abs=1e-9)
    assert with_b["drop"] != 0.0
    # real damage is not hidden: a copy that has lost one class
    damaged = z + b
    damaged[:, 1] -= 10.0  # bcc is never answered any more
    hurt = crossfit_pair(reference, _softmax(damaged), y, b)
    assert hurt["drop"] > 0.05


def test_export_gate_uses_the_crossfitted_drop_only_for_offsets_fitted_on_those_images():
    from types import SimpleNamespace

    from export.api import offsets_fitted_on
    from export.config import Tolerances
    from export.validate import compare, to_markdown

    z, y = _val_like()
    b = fit_class_bias(_softmax(z), y)
    rng = np.random.default_rng(2)
    pf, pl = _softmax(z + b), _softmax(z + b + rng.normal(scale=0.15, size=z.shape))
    dx = [DIAGNOSIS_LABELS[i] for i in y]
    mel = (y == 4).astype(np.int64)
    outs = ({"diagnosis": pf, "melanoma": pf[:, 4]}, {"diagnosis": pl, "melanoma": pl[:, 4]})
    tol = Tolerances(balanced_accuracy_drop=0.01)
    plain = compare(*outs, dx, mel, DIAGNOSIS_LABELS, 0.5, tol)
    fair = compare(*outs, dx, mel, DIAGNOSIS_LABELS, 0.5, tol, class_offsets=b)
    gate = {g["name"]: g for g in fair["gates"]}["balanced_accuracy_drop"]
    cf = fair["metrics"]["balanced_accuracy_crossfit"]
    assert gate["basis"] == "cross-fitted" and gate["value"] == pytest.approx(max(0, cf["drop"]))
    plain_gate = {g["name"]: g for g in plain["gates"]}["balanced_accuracy_drop"]
    assert "basis" not in plain_gate and "balanced_accuracy_crossfit" not in plain["metrics"]
    assert plain_gate["value"] == pytest.approx(max(0, -plain["metrics"]["delta"]
                                                    ["balanced_accuracy"]))
    # a disabled balanced-accuracy gate stays absent, and no other gate takes its basis
    off = compare(*outs, dx, mel, DIAGNOSIS_LABELS, 0.5, Tolerances(balanced_accuracy_drop=None),
                  class_offsets=b)
    assert "balanced_accuracy_drop" not in {g["name"] for g in off["gates"]}
    assert not any("basis" in g for g in off["gates"])
    # the in-sample figures stay in the report; validation.md names the basis
    assert fair["metrics"]["delta"] == plain["metrics"]["delta"]
    md = to_markdown({"validation": fair, "mode": "int8", "data": "val"}, "t")
    assert "balanced_accuracy_drop (cross-fitted)" in md
    assert "balanced_accuracy, cross-fitted" in md
    # a class with one image cannot be on both sides of a halving: the in-sample gate, saying so
    df = DIAGNOSIS_LABELS.index("df")
    keep = np.flatnonzero(y != df).tolist() + [int(np.flatnonzero(y == df)[0])]
    small = compare({"diagnosis": pf[keep], "melanoma": pf[keep, 4]},
                    {"diagnosis": pl[keep], "melanoma": pl[keep, 4]}, [dx[i] for i in keep],
                    mel[keep], DIAGNOSIS_LABELS, 0.5, tol, class_offsets=b)
    g = {g["name"]: g for g in small["gates"]}["balanced_accuracy_drop"]
    assert "basis" not in g and "could not be cross-fitted" in g["note"]
    assert "balanced_accuracy_crossfit" not in small["metrics"]
    # which runs get it: offsets fitted on the split being validated, the run's own images
    run = SimpleNamespace(diagnosis_labels=tuple(reversed(DIAGNOSIS_LABELS)), card={
        "calibration": {"class_bias": {"fitted_on": "val", "offsets": dict(
            zip(DIAGNOSIS_LABELS, b.tolist(), strict=True))}}})
    np.testing.assert_allclose(offsets_fitted_on(run, None, "val"), b[::-1])  # label order
    assert offsets_fitted_on(run, "other/labelled/set", "val") is None
    assert offsets_fitted_on(run, None, "train") is None
    run.card["calibration"]["class_bias"] = {"skipped": "no vasc"}
    assert offsets_fitted_on(run, None, "val") is None
