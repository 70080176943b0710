"""Logit-adjusted losses (Menon et al., "Long-tail learning via logit adjustment", ICLR 2021).

The heads output probabilities ``p = softmax(z)``. During training the loss is the cross-entropy
of ``softmax(z + tau * log(prior))``: frequent classes get a head start they must beat by a
margin, so the model's own ``p`` estimates the class-balanced posterior that balanced accuracy
rewards, without the large, noisy per-sample weights of inverse-frequency weighting (df weighs
~70x nv on HAM10000). Inference is unchanged: the saved model still outputs ``softmax(z)``.

Written with ``keras.ops`` on the heads' probabilities, so it runs under every backend and the
saved inference model needs no custom objects.

Label smoothing under logit adjustment spreads its mass over the classes in proportion to the
adjusted prior (``softmax(tau * log(prior))``), not uniformly. The adjusted softmax is fitted to
the smoothed target, so the model's own logits are ``log(target) - tau * log(prior)``: a uniform
``eps / K`` divided by a rare class's prior is a large logit for every image (with 0.2 on
HAM10000's prior, an ``nv`` image is answered ``df``). Smoothing toward the prior keeps the
model's argmax the balanced one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from dermedge.labels import HEADS

if TYPE_CHECKING:
    from trainer.config import TrainConfig

EPS = 1e-7


def log_prior(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """``log`` of the class frequencies in ``labels``; absent classes get ``log(EPS)``."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes)
    freq = counts / max(1, counts.sum())
    return np.log(np.maximum(freq, EPS)).astype("float32")


def adjusted_categorical_crossentropy(log_prior_diag: np.ndarray, *, tau: float = 1.0,
                                      label_smoothing: float = 0.0):
    """Per-sample loss ``(y_true one-hot, p softmax) -> CE(softmax(log p + tau*log prior))``;
    ``label_smoothing`` mixes the target with the adjusted prior (module docstring)."""
    from keras import ops

    from dermedge.numerics import softmax

    shift = np.asarray(tau * np.asarray(log_prior_diag), dtype="float32")
    smooth_to = softmax(shift).astype("float32")

    def loss(y_true, y_pred):
        logits = ops.log(ops.clip(y_pred, EPS, 1.0)) + shift
        log_q = logits - ops.logsumexp(logits, axis=-1, keepdims=True)
        y = ops.cast(y_true, log_q.dtype)
        if label_smoothing:
            y = y * (1.0 - label_smoothing) + label_smoothing * smooth_to
        return -ops.sum(y * log_q, axis=-1)

    loss.__name__ = "logit_adjusted_categorical_crossentropy"
    return loss


def adjusted_binary_crossentropy(prior_positive: float, *, tau: float = 1.0):
    """Per-sample loss ``(y_true 0/1, p sigmoid) -> BCE(sigmoid(logit p + tau*log odds prior))``."""
    from keras import ops

    p = float(np.clip(prior_positive, EPS, 1 - EPS))
    shift = float(tau * np.log(p / (1 - p)))

    def loss(y_true, y_pred):
        q = ops.clip(y_pred, EPS, 1 - EPS)
        logit = ops.log(q) - ops.log(1.0 - q) + shift
        y = ops.cast(y_true, logit.dtype)
        # BCE from logits, stable for either sign.
        per = ops.maximum(logit, 0.0) - logit * y + ops.log(1.0 + ops.exp(-ops.abs(logit)))
        return ops.mean(per, axis=-1)

    loss.__name__ = "logit_adjusted_binary_crossentropy"
    return loss


def head_losses(train: TrainConfig, train_labels: np.ndarray) -> dict[str, Any]:
    """The two heads' training losses for ``train.class_balance``; ``logit_adjust`` shifts them
    by the class prior of ``train_labels`` (diagnosis indices of the train split)."""
    import keras

    from trainer.pipeline import MEL_INDEX, N_CLASSES

    if train.class_balance == "logit_adjust":
        tau = train.logit_adjust_tau
        return {"melanoma": adjusted_binary_crossentropy(
                    float(np.mean(np.asarray(train_labels) == MEL_INDEX)), tau=tau),
                "diagnosis": adjusted_categorical_crossentropy(
                    log_prior(train_labels, N_CLASSES), tau=tau,
                    label_smoothing=train.label_smoothing)}
    return {"melanoma": keras.losses.BinaryCrossentropy(),
            "diagnosis": keras.losses.CategoricalCrossentropy(
                label_smoothing=train.label_smoothing)}


def val_loss(losses: dict, mel_true, p_mel, y_true, probs, *,
             loss_weights: dict[str, float]) -> float:
    """The training loss (``losses``: :func:`head_losses`, without class weights) on validation
    predictions.

    A Keras ``Loss`` object is evaluated through ``.call`` (per-sample values): its ``__call__``
    divides by the replica count inside a distribution strategy's scope.
    """
    from trainer.pipeline import N_CLASSES

    targets = {"melanoma": np.asarray(mel_true, np.float32).reshape(-1, 1),
               "diagnosis": np.eye(N_CLASSES, dtype=np.float32)[y_true]}
    preds = {"melanoma": np.asarray(p_mel, np.float32).reshape(-1, 1),
             "diagnosis": np.asarray(probs, np.float32)}
    per_sample = {k: getattr(fn, "call", fn) for k, fn in losses.items()}
    return float(sum(loss_weights[k] * np.mean(np.asarray(per_sample[k](targets[k], preds[k])))
                     for k in HEADS))
