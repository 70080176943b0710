"""export/gate.py on its own: the ood density, its int8 head, and the threshold rules."""

from __future__ import annotations

import numpy as np
import pytest

from dermedge.metrics import wilson
from export import gate

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:tensorflow.lite.*")

DIM, SUB = 24, 3


def _data(n: int, seed: int, off: float = 0.0) -> np.ndarray:
    """Features on a 3-dim subspace plus small isotropic noise; ``off``: pushed off it."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(np.random.default_rng(0).normal(size=(DIM, DIM)))[0]
    x = rng.normal(size=(n, SUB)) * [3.0, 2.0, 1.5] @ basis[:, :SUB].T
    # the residual about 6 int8 input steps wide, as the real pooled features' is
    x += 0.5 * rng.normal(size=(n, DIM)) + off * basis[:, SUB]
    return (x + 2.0).astype(np.float32)


def test_the_density_flags_what_lies_off_the_subspace():
    fit = gate.fit_ood(_data(400, 1), _data(200, 2), budget=0.01, components=SUB)
    near, off = fit.ood(_data(200, 3)), fit.ood(_data(200, 4, off=5.0))
    assert np.mean(near > 0.5) < 0.05 and np.mean(off > 0.5) == 1.0
    assert abs(np.mean(fit.ood(_data(200, 2)) > 0.5) - 0.01) <= 0.005  # centred at the budget
    assert fit.describe()["components"] == SUB


def test_int8_head_agrees_with_float_and_far_photos_do_not_saturate():
    """The anchor column keeps the logit's int8 range open: a photo far off the subspace
    scores near 1 in int8 too, not at the calibration images' largest score."""
    import keras
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    fit = gate.fit_ood(_data(400, 1), _data(200, 2), budget=0.01, components=SUB)
    inp = keras.Input((DIM,), name="image")
    pool = keras.layers.Activation("linear", name="pool")(inp)
    base = keras.Model(inp, {"melanoma": keras.layers.Dense(1, activation="sigmoid",
                                                            name="melanoma")(pool),
                             "diagnosis": keras.layers.Dense(7, activation="softmax",
                                                             name="diagnosis")(pool)})
    model = gate.with_ood_output(base, fit, int8=True)
    calib = _data(100, 5)
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([x[None]] for x in calib)
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_output_type = tf.uint8
    run = Interpreter(model_content=conv.convert()).get_signature_runner()
    q = run.get_output_details()["ood"]["quantization"]

    def int8(x):
        return np.array([q[0] * (float(run(image=v[None])["ood"][0, 0]) - q[1]) for v in x])

    near, far = _data(100, 6), _data(20, 7, off=15.0)
    f_near = np.asarray(model(near)["ood"]).ravel()
    np.testing.assert_allclose(int8(near), f_near, atol=0.05)
    assert int8(far).min() > 0.98 and np.asarray(model(far)["ood"]).min() > 0.98
    assert int8(calib).max() < 0.98  # the calibration images alone would cap the range here
    summed = gate.with_ood_output(base, fit, int8=False)  # the float modes' head
    np.testing.assert_allclose(np.asarray(summed(near)["ood"]).ravel(), f_near, atol=1e-5)


def test_thresholds_take_the_more_lenient_of_default_and_quantile():
    n = 1000
    measures = [{"side": 224.0, "mean_luma": 150.0 - 100 * (i < 3), "dark_share": 0.0,
                 "clipped_share": 0.0, "sharpness": 1.0 + i / 100} for i in range(n)]
    ood = np.linspace(0, 1, n)
    t = gate.choose_thresholds(measures, ood, image_size=224)
    assert t["min_side"] == 224.0
    assert t["mean_luma_min"] == 60.0  # the default: the 0.5 % quantile (150) is stricter
    assert t["sharpness_min"] == pytest.approx(1.04)  # the quantile: the default (2.5) would
    # refuse 15 %
    assert t["ood_max"] == pytest.approx(ood[990])  # 1 % of the validation images
    refused = gate.refusals(measures, ood, t)
    r = gate.rates(refused)
    assert r["n"] == n and r["per_check"]["too_dark"]["refused"] == 3  # 50 < 60
    assert r["per_check"]["blurry"]["refused"] == 4 and r["per_check"]["not_dermoscopy"][
        "refused"] == 9
    assert r["total"]["rate"] <= 0.05 and r["total"]["ci95"][0] <= r["total"]["rate"]
    assert wilson(0, 10) == [0.0, pytest.approx(0.2775, abs=1e-4)]
