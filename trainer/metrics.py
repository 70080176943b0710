"""Metrics on records (tables with a ``dx`` column): ``metrics.json``, the card's headline
figures and the melanoma operating threshold. The metrics themselves are dermedge.metrics."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from dermedge.labels import DIAGNOSIS_LABELS, MELANOMA_DX
from dermedge.metrics import classification_metrics, threshold_for_sensitivity, threshold_youden
from trainer.config import melanoma_threshold_spec

if TYPE_CHECKING:
    import pandas as pd

# ---------------------------------------------------------- a labelled set (records with ``dx``)
def score(records: pd.DataFrame, p_mel: np.ndarray, probs: np.ndarray, *,
          threshold: float) -> dict[str, Any]:
    """``dermedge.metrics.classification_metrics`` for records with a ``dx`` column."""
    index = {d: i for i, d in enumerate(DIAGNOSIS_LABELS)}
    y = np.array([index[str(d)] for d in records["dx"]], dtype=np.int64)
    mel = (records["dx"].astype(str).to_numpy() == MELANOMA_DX).astype(np.int64)
    return classification_metrics(y, probs, mel, p_mel, list(DIAGNOSIS_LABELS),
                                  mel_threshold=float(threshold))


def card_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of ``metrics`` that a model card carries under ``metrics.val``."""
    mel = metrics["melanoma"]
    return {
        "accuracy": metrics["accuracy"],
        "balanced_accuracy": metrics["balanced_accuracy"],
        "melanoma_auc": mel["auc"],
        "melanoma_average_precision": mel["average_precision"],
        "melanoma_sensitivity": mel["sensitivity"],
        "melanoma_specificity": mel["specificity"],
        "melanoma_threshold": mel["threshold"],
        "sensitivity_at_specificity_0.90": mel.get("sensitivity_at_specificity_0.90"),
        "diagnosis_ece": metrics.get("diagnosis_ece"),
        "melanoma_ece": mel.get("ece"),
    }


def choose_threshold(records: pd.DataFrame, p_mel: np.ndarray, spec: str | float) -> float:
    """The melanoma operating threshold on a (validation) set, from ``train.melanoma_threshold``."""
    kind, value = melanoma_threshold_spec(spec)
    mel = (records["dx"].astype(str).to_numpy() == MELANOMA_DX).astype(np.int64)
    if kind == "fixed":
        return float(value)
    if kind == "youden":
        t = threshold_youden(mel, p_mel)
    else:
        t = threshold_for_sensitivity(mel, p_mel, value)
    if not math.isfinite(t):  # no melanoma (or only melanoma) in the split
        return 0.5
    # The optimum is one of the scores; move it halfway to the next lower score. Same decisions
    # on this split, but no case sits exactly on the threshold, where float round-off (or a
    # float16/int8 export) would flip it.
    below = np.asarray(p_mel, dtype=np.float64)
    below = below[below < t]
    if below.size:
        t = (t + float(below.max())) / 2.0
    # Kept inside (0, 1): a saturated sigmoid score of exactly 0 or 1 is not a usable threshold.
    return float(np.clip(t, 1e-6, 1 - 1e-6))
