"""The metrics every stage shares, in pure numpy (no sklearn, no TensorFlow): classification
metrics (``trainer evaluate``'s ``metrics.json``, the export's validation gates, the benchmarks)
and the cross-fitted balanced accuracy the export's gate uses for runs with class offsets.

Binary metrics take ``y_true_binary`` (0/1) and ``scores`` (higher = more likely positive); a
sample is called positive iff ``score >= threshold``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from dermedge import numerics
from dermedge.numerics import fit_class_bias, log_probs

SENSITIVITY_TARGETS: tuple[float, ...] = (0.80, 0.90, 0.95)


def _binary(y_true_binary, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true_binary).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"y_true_binary and scores must have the same length; received "
                         f"{y.shape[0]} and {s.shape[0]}.")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError(f"y_true_binary must hold only 0/1; received values "
                         f"{np.unique(y)[:10].tolist()}.")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite numbers (found NaN or inf).")
    return y.astype(bool), s


def _labels(y, n_classes: int, name: str) -> np.ndarray:
    y = np.asarray(y).reshape(-1)
    if y.size and (not np.issubdtype(y.dtype, np.integer)):
        if not np.all(np.mod(y, 1) == 0):
            raise ValueError(f"{name} must hold integer class indices.")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"{name} must be class indices in [0, {n_classes}); received values "
                         f"from {y.min()} to {y.max()}.")
    return y


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts ``cm[true, pred]``, shape ``(n_classes, n_classes)``, int64."""
    t = _labels(y_true, n_classes, "y_true")
    p = _labels(y_pred, n_classes, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred must have the same length; received {t.size} and "
                         f"{p.size}.")
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(
        n_classes, n_classes).astype(np.int64)


def balanced_accuracy(y_true, y_pred, n_classes) -> float:
    """Mean recall over the classes present in ``y_true`` (the ISIC 2018 Task 3 metric), for
    class indices checked against ``n_classes``; computed by :mod:`dermedge.numerics`."""
    return numerics.balanced_accuracy(_labels(y_true, n_classes, "y_true"),
                                      _labels(y_pred, n_classes, "y_pred"))


def per_class_report(y_true, y_pred, labels: Sequence[str]) -> dict[str, dict]:
    """``{label: {recall, precision, f1, support}}``; undefined ratios are 0 (as sklearn)."""
    cm = confusion_matrix(y_true, y_pred, len(labels))
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    out = {}
    for i, lab in enumerate(labels):
        recall = tp[i] / support[i] if support[i] else 0.0
        precision = tp[i] / predicted[i] if predicted[i] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[str(lab)] = {"recall": float(recall), "precision": float(precision),
                         "f1": float(f1), "support": int(support[i])}
    return out


def _rank_average(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties get their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    boundaries = np.r_[True, xs[1:] != xs[:-1], True]
    idx = np.flatnonzero(boundaries)
    avg = (idx[:-1] + idx[1:] + 1) / 2.0  # mean of ranks start+1 .. end
    counts = np.diff(idx)
    ranks = np.empty_like(x, dtype=np.float64)
    ranks[order] = np.repeat(avg, counts)
    return ranks


def roc_auc(y_true_binary, scores) -> float:
    """Area under the ROC curve (Mann–Whitney, ties count ½); NaN when only one class."""
    y, s = _binary(y_true_binary, scores)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _rank_average(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _cumulative(y: np.ndarray, s: np.ndarray):
    """Counts of true/false positives at each distinct threshold, highest first."""
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), y_sorted.size - 1]
    tps = np.cumsum(y_sorted)[last].astype(np.float64)
    fps = (last + 1) - tps
    return fps, tps, s_sorted[last]


def roc_curve(y_true_binary, scores, *, drop_intermediate: bool = False):
    """``(fpr, tpr, thresholds)``, thresholds decreasing from ``inf`` (as sklearn).

    ``drop_intermediate=True`` drops collinear points the way sklearn does by default.
    """
    y, s = _binary(y_true_binary, scores)
    if y.size == 0:
        raise ValueError("roc_curve needs at least one sample.")
    fps, tps, thr = _cumulative(y, s)
    if drop_intermediate and fps.size > 2:
        keep = np.flatnonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])
        fps, tps, thr = fps[keep], tps[keep], thr[keep]
    fps, tps, thr = np.r_[0.0, fps], np.r_[0.0, tps], np.r_[np.inf, thr]
    n_pos, n_neg = tps[-1], fps[-1]
    fpr = fps / n_neg if n_neg else np.full_like(fps, np.nan)
    tpr = tps / n_pos if n_pos else np.full_like(tps, np.nan)
    return fpr, tpr, thr


def average_precision(y_true_binary, scores) -> float:
    """Σ (R_k − R_{k−1}) · P_k over distinct thresholds (sklearn's step-wise AP); NaN if no
    positives."""
    y, s = _binary(y_true_binary, scores)
    n_pos = int(y.sum())
    if n_pos == 0:
        return math.nan
    fps, tps, _ = _cumulative(y, s)
    precision = tps / (tps + fps)
    recall = tps / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def sens_spec_at(y_true_binary, scores, threshold) -> tuple[float, float]:
    """(sensitivity, specificity) calling ``score >= threshold`` positive; NaN when undefined."""
    y, s = _binary(y_true_binary, scores)
    pred = s >= float(threshold)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    sens = float((pred & y).sum() / n_pos) if n_pos else math.nan
    spec = float((~pred & ~y).sum() / n_neg) if n_neg else math.nan
    return sens, spec


def threshold_for_sensitivity(y_true_binary, scores, target: float) -> float:
    """The largest threshold whose sensitivity is ≥ ``target`` (a score of a positive)."""
    target = float(target)
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1]; received {target!r}.")
    y, s = _binary(y_true_binary, scores)
    pos = np.sort(s[y])[::-1]
    if pos.size == 0:
        return math.nan
    k = max(1, math.ceil(target * pos.size - 1e-9))  # positives that must score >= threshold
    return float(pos[k - 1])


def threshold_youden(y_true_binary, scores) -> float:
    """The threshold maximising Youden's J = sensitivity + specificity − 1 (the highest such
    threshold on ties); NaN when only one class is present."""
    fpr, tpr, thr = roc_curve(y_true_binary, scores)
    if np.isnan(fpr).any() or np.isnan(tpr).any():
        return math.nan
    j = (tpr - fpr)[1:]
    return float(thr[1:][int(np.argmax(j))])


def sensitivity_at_specificity(y_true_binary, scores, specificity: float) -> float:
    """The best sensitivity over thresholds whose specificity is ≥ ``specificity``."""
    fpr, tpr, _ = roc_curve(y_true_binary, scores)
    if np.isnan(fpr).any() or np.isnan(tpr).any():
        return math.nan
    ok = (1.0 - fpr) >= float(specificity) - 1e-12
    return float(tpr[ok].max())


def expected_calibration_error(probs_or_conf, y_true, n_bins=15) -> float:
    """ECE with ``n_bins`` equal-width bins ``(lo, hi]`` (0 goes to the first bin).

    2-D ``probs`` ``(N, K)`` + class indices: top-label ECE (confidence = max prob, outcome =
    argmax correct). 1-D ``p`` + 0/1 outcomes: ECE of a binary probability (e.g. P(melanoma)).
    """
    p = np.asarray(probs_or_conf, dtype=np.float64)
    y = np.asarray(y_true).reshape(-1)
    if int(n_bins) < 1:
        raise ValueError(f"n_bins must be ≥ 1; received {n_bins!r}.")
    if p.ndim == 2:
        conf = p.max(axis=1)
        outcome = (p.argmax(axis=1) == _labels(y, p.shape[1], "y_true")).astype(np.float64)
    elif p.ndim == 1:
        conf = p
        if y.size and not np.isin(y, (0, 1)).all():
            raise ValueError("with 1-D probabilities y_true must hold 0/1 outcomes.")
        outcome = y.astype(np.float64)
    else:
        raise ValueError(f"probs_or_conf must be 1-D or 2-D; received shape {p.shape}.")
    if conf.shape[0] != outcome.shape[0]:
        raise ValueError(f"probs_or_conf and y_true must have the same length; received "
                         f"{conf.shape[0]} and {outcome.shape[0]}.")
    if conf.size == 0:
        return math.nan
    edges = np.linspace(0.0, 1.0, int(n_bins) + 1)
    bins = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, int(n_bins) - 1)
    sum_conf = np.bincount(bins, weights=conf, minlength=n_bins)
    sum_out = np.bincount(bins, weights=outcome, minlength=n_bins)
    return float(np.sum(np.abs(sum_out - sum_conf)) / conf.size)


def _jsonable(x):
    """Floats that are NaN/inf become None so the dict dumps as strict JSON."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, float | np.floating):
        return float(x) if math.isfinite(x) else None
    return x


def classification_metrics(y_true: np.ndarray, probs_diag: np.ndarray, mel_true: np.ndarray,
                           p_mel: np.ndarray, labels: Sequence[str], *,
                           mel_threshold: float) -> dict:
    """Everything ``trainer evaluate`` writes to ``metrics.json`` (JSON-able; NaN → null)."""
    probs = np.asarray(probs_diag, dtype=np.float64)
    labels = [str(lab) for lab in labels]
    if probs.ndim != 2 or probs.shape[1] != len(labels):
        raise ValueError(f"probs_diag must have shape (N, {len(labels)}); received {probs.shape}.")
    y = _labels(y_true, len(labels), "y_true")
    if y.size != probs.shape[0]:
        raise ValueError(f"y_true has {y.size} entries but probs_diag has {probs.shape[0]} rows.")
    mel_y, mel_p = _binary(mel_true, p_mel)
    if mel_y.size != y.size:
        raise ValueError(f"mel_true/p_mel have {mel_y.size} entries, y_true has {y.size}.")
    y_pred = probs.argmax(axis=1)
    cm = confusion_matrix(y, y_pred, len(labels))
    sens, spec = sens_spec_at(mel_y, mel_p, mel_threshold)
    at_sens = {}
    for target in SENSITIVITY_TARGETS:
        thr = threshold_for_sensitivity(mel_y, mel_p, target)
        s_, sp_ = sens_spec_at(mel_y, mel_p, thr) if math.isfinite(thr) else (math.nan,) * 2
        at_sens[f"{target:.2f}"] = {"threshold": thr, "sensitivity": s_, "specificity": sp_}
    out = {
        "n": int(y.size),
        "labels": labels,
        "accuracy": float(np.mean(y_pred == y)) if y.size else math.nan,
        "balanced_accuracy": balanced_accuracy(y, y_pred, len(labels)),
        "per_class": per_class_report(y, y_pred, labels),
        "confusion_matrix": cm.tolist(),
        "diagnosis_ece": expected_calibration_error(probs, y),
        "melanoma": {
            "n_positive": int(mel_y.sum()),
            "auc": roc_auc(mel_y, mel_p),
            "average_precision": average_precision(mel_y, mel_p),
            "threshold": float(mel_threshold),
            "sensitivity": sens,
            "specificity": spec,
            "at_sensitivity": at_sens,
            "sensitivity_at_specificity_0.90": sensitivity_at_specificity(mel_y, mel_p, 0.90),
            "ece": expected_calibration_error(mel_p, mel_y),
        },
    }
    return _jsonable(out)


# ---------------------------------------------------------- class offsets, cross-fitted
CROSSFIT_REPEATS = 10


def balanced_accuracy_of(y: np.ndarray, probs: np.ndarray) -> float:
    return numerics.balanced_accuracy(y, probs.argmax(axis=-1))


def crossfit_pair(reference: np.ndarray, other: np.ndarray, y: np.ndarray, offsets: np.ndarray,
                  *, seed: int = 0, repeats: int = CROSSFIT_REPEATS) -> dict[str, Any] | None:
    """Balanced accuracy of two models of the same network (a float model and its quantized
    copy, say) whose diagnosis outputs ``reference`` / ``other`` (N, K) both carry class
    ``offsets`` (K,) that were fitted on these very images, cross-fitted.

    In sample, the comparison depends on where the offsets, chosen for exactly these labels,
    put the class boundaries among these images: a copy that answers a few near-ties
    differently can lose (or gain) more than a quantization gate's tolerance with errors
    that know nothing of the labels (measured by benchmarks/offsets_gate.py). So the offsets
    are taken out of
    both (exact for ``reference``: ``log p - offsets``), refitted from ``reference`` on one
    half of the images and applied to **both** models on the other half, as
    ``class_bias_section`` scores the float model; over ``repeats`` seeded halvings.
    Returns ``{"reference", "other"}`` (mean balanced accuracies), ``"drop"`` (mean of
    ``reference - other`` per halving), ``"drop_sd"`` and ``"halvings"``; None when no
    halving kept every class on both sides."""
    y = np.asarray(y, np.int64).reshape(-1)
    offsets = np.asarray(offsets, np.float64).reshape(-1)
    zr = log_probs(reference) - offsets
    zo = log_probs(other) - offsets
    pr = numerics.softmax(zr)
    k = zr.shape[-1]
    rng = np.random.default_rng(seed)
    ref_scores, other_scores = [], []
    for _ in range(repeats):
        fold = rng.permutation(len(y)) % 2
        a, b = np.empty_like(zr), np.empty_like(zo)
        for half in (0, 1):
            fit_on, test_on = fold != half, fold == half
            if (np.bincount(y[fit_on], minlength=k) == 0).any():
                break
            bias = fit_class_bias(pr[fit_on], y[fit_on])
            a[test_on], b[test_on] = zr[test_on] + bias, zo[test_on] + bias
        else:
            ref_scores.append(balanced_accuracy_of(y, a))
            other_scores.append(balanced_accuracy_of(y, b))
    if not ref_scores:
        return None
    drops = np.array(ref_scores) - np.array(other_scores)
    return {"reference": float(np.mean(ref_scores)), "other": float(np.mean(other_scores)),
            "drop": float(drops.mean()), "drop_sd": float(drops.std()),
            "halvings": len(ref_scores)}


Z95 = 1.959964


def wilson(k: float, n: float, z: float = Z95) -> list[float] | None:
    """The 95 % Wilson score interval of ``k`` successes in ``n`` (None when n is 0)."""
    if not n:
        return None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [0.0 if k <= 0 else max(0.0, centre - half), 1.0 if k >= n else min(1.0, centre + half)]
