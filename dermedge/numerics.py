"""Numerics every stage shares (numpy only: the demo imports them without TensorFlow)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# Clip before the log: softmax outputs may underflow to 0.
SOFTMAX_EPS = 1e-300


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


def log_probs(probs: np.ndarray) -> np.ndarray:
    """Probabilities -> logits (log p, clipped): softmax of the result gives ``probs`` back."""
    return np.log(np.clip(np.asarray(probs, np.float64), SOFTMAX_EPS, 1.0))


def _balanced_nll(z: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray):
    """Class-balanced NLL of ``mean over passes of softmax(z + b)`` and its gradient in ``b``;
    ``z`` is (P, N, K), ``w`` the per-image weights (1 / (classes * class count))."""
    a = z + b
    a = a - a.max(axis=-1, keepdims=True)
    q = np.exp(a)
    q /= q.sum(axis=-1, keepdims=True)  # (P, N, K) per-pass probabilities
    rows = np.arange(len(y))
    qy = q[:, rows, y]  # (P, N)
    p_y = np.clip(qy.mean(axis=0), 1e-300, None)
    f = float(-(w * np.log(p_y)).sum())
    # d p_y / d b = mean_p q_py (e_y - q_p)
    d = -(qy[..., None] * q).mean(axis=0)
    d[rows, y] += qy.mean(axis=0)
    g = -((w / p_y)[:, None] * d).sum(axis=0)
    return f, g


def fit_class_bias(probs: np.ndarray, y: np.ndarray, temperature: float = 1.0, *,
                   iters: int = 2000, tol: float = 1e-9) -> np.ndarray:
    """Per-class logit offsets ``b`` (K,), mean 0, minimising the class-balanced NLL of
    ``mean over passes of softmax(log probs / T + b)`` (``probs`` (N, K) or (P, N, K)) for
    class indices ``y``. Every class must occur in ``y``: a class without images would have its
    offset pushed to minus infinity. Gradient descent with backtracking (the one-pass loss is
    convex in ``b``; K parameters)."""
    y = np.asarray(y, np.int64).reshape(-1)
    z = log_probs(probs)
    z = (z if z.ndim == 3 else z[None]) / temperature
    k = z.shape[-1]
    counts = np.bincount(y, minlength=k)
    if (counts == 0).any():
        raise ValueError("class-bias fitting needs every class in the labels; missing: "
                         f"{np.flatnonzero(counts == 0).tolist()}")
    w = 1.0 / (k * counts[y])
    b = np.zeros(k)
    f, g = _balanced_nll(z, y, w, b)
    step = 1.0
    for _ in range(iters):
        while True:
            nb = b - step * g
            nf, ng = _balanced_nll(z, y, w, nb)
            if nf <= f - 0.5 * step * float(g @ g) or step < 1e-12:
                break
            step /= 2
        converged = f - nf < tol
        b, f, g = nb, nf, ng
        step *= 2
        if converged:
            break
    return b - b.mean()
