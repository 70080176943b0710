"""dermedge.metrics against scikit-learn (a dev dependency) and against hand-worked cases."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from ci import need

from dermedge import metrics as M
from dermedge.labels import DIAGNOSIS_LABELS

skm = need("sklearn.metrics", "the dev extra installs scikit-learn")


def _sk_balanced(y, pred):
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true" is expected here
        warnings.simplefilter("ignore", UserWarning)
        return skm.balanced_accuracy_score(y, pred)

TOL = 1e-9
K = len(DIAGNOSIS_LABELS)


def _random_case(seed: int, n: int = 400, ties: bool = False):
    rng = np.random.default_rng(seed)
    prior = np.array([0.04, 0.05, 0.11, 0.02, 0.11, 0.65, 0.02])
    y = rng.choice(K, size=n, p=prior)
    logits = rng.normal(size=(n, K)) + 1.5 * np.eye(K)[y]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    mel = (y == DIAGNOSIS_LABELS.index("mel")).astype(int)
    p_mel = 1 / (1 + np.exp(-(rng.normal(size=n) + 1.2 * mel)))
    if ties:
        p_mel = np.round(p_mel, 1)
    return y, probs, mel, p_mel


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
def test_binary_metrics_match_sklearn(seed, ties):
    _, _, mel, p = _random_case(seed, ties=ties)
    assert M.roc_auc(mel, p) == pytest.approx(skm.roc_auc_score(mel, p), abs=TOL)
    assert M.average_precision(mel, p) == pytest.approx(
        skm.average_precision_score(mel, p), abs=TOL)
    for drop in (False, True):
        ours = M.roc_curve(mel, p, drop_intermediate=drop)
        ref = skm.roc_curve(mel, p, drop_intermediate=drop)
        for a, b in zip(ours, ref, strict=True):
            np.testing.assert_allclose(a, b, atol=TOL)


@pytest.mark.parametrize("seed", [0, 1])
def test_multiclass_metrics_match_sklearn(seed):
    y, probs, _, _ = _random_case(seed)
    pred = probs.argmax(axis=1)
    np.testing.assert_array_equal(M.confusion_matrix(y, pred, K),
                                  skm.confusion_matrix(y, pred, labels=range(K)))
    assert M.balanced_accuracy(y, pred, K) == pytest.approx(
        _sk_balanced(y, pred), abs=TOL)
    rep = M.per_class_report(y, pred, DIAGNOSIS_LABELS)
    p, r, f, s = skm.precision_recall_fscore_support(y, pred, labels=range(K), zero_division=0)
    for i, lab in enumerate(DIAGNOSIS_LABELS):
        assert rep[lab]["precision"] == pytest.approx(p[i], abs=TOL)
        assert rep[lab]["recall"] == pytest.approx(r[i], abs=TOL)
        assert rep[lab]["f1"] == pytest.approx(f[i], abs=TOL)
        assert rep[lab]["support"] == s[i]


def test_balanced_accuracy_ignores_absent_classes():
    y = np.array([0, 0, 1, 1, 1, 1])
    pred = np.array([0, 1, 1, 1, 0, 1])
    # recall 0.5 for class 0, 0.75 for class 1; classes 2..6 are absent and do not count
    assert M.balanced_accuracy(y, pred, K) == pytest.approx(0.625)
    assert M.balanced_accuracy(y, pred, K) == pytest.approx(_sk_balanced(y, pred))


def test_roc_auc_single_class_is_nan_and_ties_count_half():
    assert math.isnan(M.roc_auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert M.roc_auc([0, 1], [0.5, 0.5]) == 0.5
    assert M.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)


def test_sens_spec_and_thresholds():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.7, 0.4, 0.6, 0.7, 0.8, 0.9])
    # positive iff score >= threshold
    assert M.sens_spec_at(y, s, 0.7) == (pytest.approx(3 / 5), pytest.approx(3 / 4))
    assert M.sens_spec_at(y, s, 0.4) == (pytest.approx(1.0), pytest.approx(3 / 4))
    t80 = M.threshold_for_sensitivity(y, s, 0.80)
    assert t80 == pytest.approx(0.6)  # 4/5 positives >= 0.6; any higher threshold loses one
    assert M.sens_spec_at(y, s, t80)[0] >= 0.8
    assert M.sens_spec_at(y, s, np.nextafter(t80, 1.0))[0] < 0.8
    assert M.threshold_for_sensitivity(y, s, 1.0) == pytest.approx(0.4)
    # Youden: J at 0.4 = 1 - 1/4 = 0.75 is the maximum
    assert M.threshold_youden(y, s) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="target sensitivity"):
        M.threshold_for_sensitivity(y, s, 1.5)


@pytest.mark.parametrize("seed", [0, 3])
def test_threshold_properties_random(seed):
    _, _, mel, p = _random_case(seed, ties=True)
    for target in (0.8, 0.9, 0.95):
        t = M.threshold_for_sensitivity(mel, p, target)
        assert M.sens_spec_at(mel, p, t)[0] >= target
        higher = p[p > t]
        if higher.size:
            assert M.sens_spec_at(mel, p, higher.min())[0] < target
    fpr, tpr, thr = skm.roc_curve(mel, p, drop_intermediate=False)
    j = M.threshold_youden(mel, p)
    sens, spec = M.sens_spec_at(mel, p, j)
    assert sens + spec - 1 == pytest.approx(np.max(tpr - fpr), abs=TOL)
    best = M.sensitivity_at_specificity(mel, p, 0.90)
    assert best == pytest.approx(np.max(tpr[(1 - fpr) >= 0.90]), abs=TOL)


def test_ece_known_values():
    # one bin holds all: conf 0.8 each, 3 of 4 correct → |0.75 - 0.8| = 0.05
    probs = np.array([[0.8, 0.2], [0.8, 0.2], [0.2, 0.8], [0.8, 0.2]])
    y = np.array([0, 0, 1, 1])
    assert M.expected_calibration_error(probs, y, n_bins=10) == pytest.approx(0.05)
    # perfectly calibrated binary probabilities in two bins
    p = np.array([0.25] * 4 + [0.75] * 4)
    outcome = np.array([1, 0, 0, 0, 1, 1, 1, 0])
    assert M.expected_calibration_error(p, outcome, n_bins=4) == pytest.approx(0.0)
    # 0 and 1 are valid confidences
    assert M.expected_calibration_error(np.array([0.0, 1.0]), np.array([0, 1])) == 0.0


def test_classification_metrics_schema_and_values():
    y, probs, mel, p = _random_case(5)
    out = M.classification_metrics(y, probs, mel, p, DIAGNOSIS_LABELS, mel_threshold=0.5)
    json.dumps(out, allow_nan=False)  # strict JSON
    assert out["n"] == len(y)
    assert out["labels"] == list(DIAGNOSIS_LABELS)
    pred = probs.argmax(axis=1)
    assert out["accuracy"] == pytest.approx(skm.accuracy_score(y, pred), abs=TOL)
    assert out["balanced_accuracy"] == pytest.approx(_sk_balanced(y, pred), abs=TOL)
    assert np.array(out["confusion_matrix"]).shape == (K, K)
    assert set(out["per_class"]) == set(DIAGNOSIS_LABELS)
    assert 0 <= out["diagnosis_ece"] <= 1
    m = out["melanoma"]
    assert m["auc"] == pytest.approx(skm.roc_auc_score(mel, p), abs=TOL)
    assert m["average_precision"] == pytest.approx(skm.average_precision_score(mel, p), abs=TOL)
    tn, fp, fn, tp = skm.confusion_matrix(mel, (p >= 0.5).astype(int)).ravel()
    assert m["sensitivity"] == pytest.approx(tp / (tp + fn), abs=TOL)
    assert m["specificity"] == pytest.approx(tn / (tn + fp), abs=TOL)
    assert set(m["at_sensitivity"]) == {"0.80", "0.90", "0.95"}
    for key, row in m["at_sensitivity"].items():
        assert row["sensitivity"] >= float(key)
    assert 0 <= m["sensitivity_at_specificity_0.90"] <= 1
    assert 0 <= m["ece"] <= 1


def test_classification_metrics_single_class_gives_null_not_nan():
    y = np.zeros(5, dtype=int)
    probs = np.tile(np.eye(K)[0], (5, 1))
    out = M.classification_metrics(y, probs, np.zeros(5), np.full(5, 0.1), DIAGNOSIS_LABELS,
                                   mel_threshold=0.5)
    json.dumps(out, allow_nan=False)
    assert out["melanoma"]["auc"] is None
    assert out["balanced_accuracy"] == 1.0


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="same length"):
        M.roc_auc([0, 1, 1], [0.2, 0.3])
    with pytest.raises(ValueError, match="0/1"):
        M.roc_auc([0, 2], [0.2, 0.3])
    with pytest.raises(ValueError, match=r"\[0, 7\)"):
        M.confusion_matrix([0, 7], [0, 1], 7)
    with pytest.raises(ValueError, match="shape"):
        M.classification_metrics([0], np.ones((1, 3)), [0], [0.1], DIAGNOSIS_LABELS,
                                 mel_threshold=0.5)
