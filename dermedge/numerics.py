"""Numerics every stage shares (numpy only: the demo imports them without TensorFlow)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def balanced_accuracy(y_true: Sequence, y_pred: Sequence) -> float:
    """Mean recall over the classes present in ``y_true`` (the ISIC 2018 Task 3 metric).

    Labels may be class indices or names; a predicted class absent from ``y_true`` only costs
    the recall of the classes it was confused with. ``nan`` for no labels.
    """
    y, p = np.asarray(y_true).reshape(-1), np.asarray(y_pred).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"y_true and y_pred must have the same length; received {y.size} and "
                         f"{p.size}.")
    classes = np.unique(y)
    if classes.size == 0:
        return math.nan
    return float(np.mean([np.mean(p[y == c] == c) for c in classes]))


def softmax(logits, temperature: float = 1.0) -> np.ndarray:
    """``softmax(logits / temperature)`` over the last axis, in float64, overflow-safe."""
    z = np.asarray(logits, np.float64) / float(temperature)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def sigmoid(logits) -> np.ndarray:
    """The logistic function in float64."""
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))
