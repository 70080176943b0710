"""Logit-adjusted losses (trainer/losses.py): values, and what their minimiser is."""

from __future__ import annotations

import numpy as np
import pytest
from ci import need

keras = need("keras", "the train extra installs it: pip install -e '.[train,demo,dev]'")

from trainer.config import ConfigError, RunConfig  # noqa: E402
from trainer.losses import (  # noqa: E402
    adjusted_binary_crossentropy,
    adjusted_categorical_crossentropy,
    log_prior,
)

PRIOR_COUNTS = [30, 50, 110, 10, 110, 670, 20]  # HAM10000-like shares


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_log_prior_is_the_log_class_frequency():
    y = np.repeat(np.arange(7), PRIOR_COUNTS)
    lp = log_prior(y, 7)
    np.testing.assert_allclose(np.exp(lp), np.array(PRIOR_COUNTS) / sum(PRIOR_COUNTS), rtol=1e-6)
    assert log_prior(np.array([0, 0, 1]), 3)[2] < -15  # an absent class is (almost) impossible


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_categorical_loss_is_cross_entropy_of_the_shifted_logits(smoothing):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(6, 7)).astype("float32")
    y = np.eye(7, dtype="float32")[rng.integers(0, 7, 6)]
    lp = log_prior(np.repeat(np.arange(7), PRIOR_COUNTS), 7)
    got = np.asarray(adjusted_categorical_crossentropy(lp, tau=1.0, label_smoothing=smoothing)(
        y, _softmax(z)))
    target = y * (1 - smoothing) + smoothing * np.exp(lp) / np.exp(lp).sum()  # toward the prior
    want = -(target * np.log(_softmax(z + lp))).sum(axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_tau_zero_is_plain_cross_entropy():
    rng = np.random.default_rng(1)
    p = _softmax(rng.normal(size=(5, 7))).astype("float32")
    y = np.eye(7, dtype="float32")[rng.integers(0, 7, 5)]
    lp = log_prior(np.repeat(np.arange(7), PRIOR_COUNTS), 7)
    got = np.asarray(adjusted_categorical_crossentropy(lp, tau=0.0)(y, p))
    plain = keras.losses.CategoricalCrossentropy(reduction=None)(y, p)
    np.testing.assert_allclose(got, np.asarray(plain), rtol=1e-5)

    pm = np.array([[0.1], [0.7], [0.99]], "float32")
    ym = np.array([[0.0], [1.0], [1.0]], "float32")
    got_b = np.asarray(adjusted_binary_crossentropy(0.1, tau=0.0)(ym, pm))
    plain_b = keras.losses.BinaryCrossentropy(reduction=None)(ym, pm)
    np.testing.assert_allclose(got_b, np.asarray(plain_b), rtol=1e-4)


def test_binary_loss_shifts_the_logit_by_the_prior_log_odds():
    pm = np.array([[0.05], [0.5], [0.95]], "float32")
    ym = np.array([[1.0], [0.0], [1.0]], "float32")
    got = np.asarray(adjusted_binary_crossentropy(0.2, tau=1.0)(ym, pm))
    q = 1 / (1 + np.exp(-(np.log(pm / (1 - pm)) + np.log(0.2 / 0.8))))
    want = -(ym * np.log(q) + (1 - ym) * np.log(1 - q)).ravel()
    np.testing.assert_allclose(got, want, rtol=1e-5)


def _constant_predictor(loss, labels, steps=400):
    """Train a model that sees no features (only its bias) on ``labels``; its softmax is what
    the loss's minimiser predicts for an uninformative input."""
    keras.utils.set_random_seed(0)
    x = np.zeros((len(labels), 1), "float32")
    y = np.eye(7, dtype="float32")[labels]
    inp = keras.Input((1,))
    model = keras.Model(inp, keras.layers.Dense(7, activation="softmax")(inp))
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss=loss)
    # ``steps`` full-batch steps as one epoch over the batch repeated in order (the same
    # updates as ``steps`` epochs, without Keras's per-epoch overhead)
    model.fit(np.tile(x, (steps, 1)), np.tile(y, (steps, 1)), batch_size=len(labels), epochs=1,
              shuffle=False, verbose=0)
    return np.asarray(model.predict_on_batch(x[:1]))[0]


def test_minimiser_is_the_balanced_posterior_not_the_prior():
    """What makes logit adjustment a class-balancing method: with nothing to go on, plain
    cross-entropy predicts the training prior (always 'nv'); the adjusted loss predicts every
    class equally, the Bayes answer for balanced accuracy."""
    labels = np.repeat(np.arange(7), PRIOR_COUNTS)
    prior = np.array(PRIOR_COUNTS) / sum(PRIOR_COUNTS)
    plain = _constant_predictor(keras.losses.CategoricalCrossentropy(), labels)
    adjusted = _constant_predictor(adjusted_categorical_crossentropy(log_prior(labels, 7)), labels)
    np.testing.assert_allclose(plain, prior, atol=0.02)
    np.testing.assert_allclose(adjusted, np.full(7, 1 / 7), atol=0.02)


@pytest.mark.parametrize("cls", [5, 3])  # nv (67 % of the prior), df (1 %)
def test_label_smoothing_keeps_the_true_class_on_top(cls):
    """Smoothing mass is spread by the prior, so dividing the prior back out (what the model's
    own softmax does) leaves every other class the same small share. Spread uniformly, it
    would come back as 1/prior: on an all-`nv` input the model would answer `df`."""
    lp = log_prior(np.repeat(np.arange(7), PRIOR_COUNTS), 7)
    p = _constant_predictor(adjusted_categorical_crossentropy(lp, label_smoothing=0.2),
                            np.full(40, cls))
    assert p.argmax() == cls, p
    others = np.delete(p, cls)
    np.testing.assert_allclose(others, others.mean(), rtol=0.05)
    assert p[cls] > 3 * others.max()


def test_pipeline_gives_unit_weights_under_logit_adjustment():
    from trainer.pipeline import CachedDataset

    y = np.repeat(np.arange(7), [3, 4, 5, 2, 6, 20, 2])
    ds = CachedDataset(np.zeros((len(y), 4, 4, 3), np.uint8), y, batch_size=8,
                       balance="logit_adjust", seed=0)
    for i in range(len(ds)):
        _, _, w = ds[i]
        assert (w["diagnosis"] == 1).all() and (w["melanoma"] == 1).all()


def test_head_losses_follow_the_config_and_the_train_prior():
    from trainer.losses import head_losses as losses

    y = np.repeat(np.arange(7), PRIOR_COUNTS)
    cfg = RunConfig().replace(**{"train.class_balance": "logit_adjust",
                                 "train.logit_adjust_tau": 0.5,
                                 "train.label_smoothing": 0.0})
    fns = losses(cfg.train, y)
    assert fns["diagnosis"].__name__ == "logit_adjusted_categorical_crossentropy"
    p = np.full((1, 7), 1 / 7, "float32")
    onehot = np.eye(7, dtype="float32")[[5]]
    # tau 0.5: the shifted logits are 0.5 * log prior, so the loss on 'nv' is -log softmax of it
    want = -np.log(_softmax(0.5 * log_prior(y, 7)[None]))[0, 5]
    np.testing.assert_allclose(np.asarray(fns["diagnosis"](onehot, p)), [want], rtol=1e-5)
    plain = losses(RunConfig().train, y)
    assert isinstance(plain["diagnosis"], keras.losses.CategoricalCrossentropy)


def test_negative_tau_is_refused():
    with pytest.raises(ConfigError, match="logit_adjust_tau"):
        RunConfig().replace(**{"train.logit_adjust_tau": -1.0})
