"""export/biascorr.py: int8 grid rounding and empirical bias correction, and their CLI/bundle."""

from __future__ import annotations

import json

import numpy as np
import pytest
from export_fixtures import make_run_dir

from export.api import QuantizationConfig, export_run
from export.biascorr import channel_axis, correct_biases, round_to_int8_grid
from export.cli import main
from export.errors import ExportError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:tensorflow.lite.*")


def test_round_to_int8_grid_matches_tflite_per_channel_scheme():
    rng = np.random.default_rng(0)
    k = rng.normal(0, 1, (3, 3, 8, 5)).astype(np.float32)
    k[..., 2] *= 100.0   # channels with very different ranges keep their own scales
    k[..., 4] = 0.0      # an all-zero channel stays zero (no division by zero)
    q = round_to_int8_grid(k, -1)
    scale = np.abs(k).max(axis=(0, 1, 2)) / 127
    for c in range(4):
        steps = q[..., c] / scale[c]
        np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
        assert np.abs(steps).max() == pytest.approx(127, abs=1e-3)
        assert np.abs(q[..., c] - k[..., c]).max() <= scale[c] / 2 + 1e-6
    assert not q[..., 4].any()
    # depthwise kernels (kh, kw, channels, 1) are quantized per channel, axis 2
    dw = rng.normal(0, 1, (3, 3, 6, 1)).astype(np.float32)
    dw[:, :, 0] *= 50.0
    qd = round_to_int8_grid(dw, 2)
    s1 = np.abs(dw[:, :, 1]).max() / 127
    assert np.abs(qd[:, :, 1] - dw[:, :, 1]).max() <= s1 / 2 + 1e-6


def _tiny_model(no_bn_conv: bool = False):
    """image -> Rescaling -> backbone(conv/BN/ReLU, depthwise/BN/ReLU, conv+bias) -> heads."""
    import keras
    from keras import layers

    inp = keras.Input((16, 16, 3))
    x = layers.Conv2D(8, 3, padding="same", use_bias=False, name="c1")(inp)
    x = layers.BatchNormalization(name="c1_bn")(x)
    x = layers.ReLU(6.0)(x)
    x = layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)
    x = layers.BatchNormalization(name="dw_bn")(x)
    x = layers.ReLU(6.0)(x)
    x = layers.Conv2D(6, 1, use_bias=True, name="c2")(x)
    if no_bn_conv:
        x = layers.ReLU()(layers.Conv2D(4, 1, use_bias=False, name="c3")(x))
    backbone = keras.Model(inp, x, name="backbone")
    image = keras.Input((16, 16, 3), name="image")
    h = backbone(layers.Rescaling(1 / 127.5, -1.0, name="preprocess_scale")(image))
    h = layers.GlobalAveragePooling2D()(h)
    model = keras.Model(image, {"melanoma": layers.Dense(1, activation="sigmoid",
                                                         name="melanoma")(h),
                                "diagnosis": layers.Dense(7, activation="softmax",
                                                          name="diagnosis")(h)})
    rng = np.random.default_rng(1)
    for lay in backbone.layers:  # BN statistics unlike the defaults, so shifts matter
        if isinstance(lay, layers.BatchNormalization):
            g, b, m, v = lay.get_weights()
            lay.set_weights([g * rng.uniform(0.5, 2, g.shape), b, rng.normal(0, 0.5, m.shape),
                             rng.uniform(0.01, 0.5, v.shape)])
    return model, backbone


def _channel_means(model, backbone, name, images):
    import keras

    x = np.asarray(model.get_layer("preprocess_scale")(images.astype(np.float32)))
    out = keras.Model(backbone.input, backbone.get_layer(name).output)(x)
    return np.asarray(out).mean(axis=(0, 1, 2))


@pytest.mark.parametrize("rounding", ["nearest", "adaptive"])
def test_correction_puts_kernels_on_grid_and_removes_each_channels_mean_shift(rounding):
    model, backbone = _tiny_model()
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (24, 16, 16, 3), dtype=np.uint8)
    convs = ["c1", "dw", "c2"]
    carrier = {"c1": "c1_bn", "dw": "dw_bn", "c2": "c2"}  # where each correction lands
    before = {n: _channel_means(model, backbone, carrier[n], images) for n in convs}
    kernels = {n: backbone.get_layer(n).get_weights()[0].copy() for n in convs}
    # rounding alone shifts the channel means of the last layer
    rounded, rb = _tiny_model()
    rounded.set_weights(model.get_weights())
    for n in convs:
        lay = rb.get_layer(n)
        lay.set_weights([round_to_int8_grid(lay.get_weights()[0], channel_axis(lay))]
                        + lay.get_weights()[1:])
    shift_rounded = np.abs(_channel_means(rounded, rb, "c2", images) - before["c2"]).max()

    report = correct_biases(model, images, rounding=rounding)
    assert report["layers_corrected"] == 3 and report["layers_skipped"] == {}
    assert report["images"] == 24 and report["max_abs_shift"] > 0
    assert report["rounding"] == rounding
    for n in convs:
        lay = backbone.get_layer(n)
        k = lay.get_weights()[0]
        nearest = round_to_int8_grid(kernels[n], channel_axis(lay))
        if rounding == "nearest":
            np.testing.assert_array_equal(k, nearest)
        else:
            # The same grid TFLite will compute (max |w| per channel unchanged), and every
            # weight on the grid point just below or above its float value.
            axis = channel_axis(lay) % k.ndim
            red = tuple(i for i in range(k.ndim) if i != axis)
            scale = np.abs(kernels[n]).max(axis=red, keepdims=True) / 127
            np.testing.assert_allclose(np.abs(k).max(axis=red, keepdims=True), scale * 127,
                                       rtol=1e-6)
            steps = k / scale
            np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
            assert np.all(np.abs(steps - kernels[n] / scale) < 1 + 1e-4)
        after = _channel_means(model, backbone, carrier[n], images)
        # the BN / bias absorbs the shift: the means match float to float32 precision
        np.testing.assert_allclose(after, before[n], atol=1e-4 * max(1, np.abs(before[n]).max()))
    assert shift_rounded > 1e-4, "the test model should show a shift to correct"
    if rounding == "adaptive":
        assert report["output_error_vs_nearest"]["max"] <= 1.0


@pytest.mark.parametrize("kind, kwargs", [
    ("Conv2D", {"filters": 4, "kernel_size": 3, "strides": 2, "padding": "same"}),
    ("Conv2D", {"filters": 4, "kernel_size": 3, "strides": 1, "padding": "valid"}),
    ("Conv2D", {"filters": 4, "kernel_size": 1, "strides": 1, "padding": "same"}),
    ("DepthwiseConv2D", {"kernel_size": 5, "strides": 2, "padding": "same"}),
    ("DepthwiseConv2D", {"kernel_size": 3, "strides": 1, "padding": "same"}),
])
@pytest.mark.parametrize("size", [9, 10])
def test_input_stats_reproduce_the_layer_output(kind, kwargs, size):
    """The gram and mean patch are of the exact patches the layer multiplies (TF "same"
    padding, strides): kernel x mean patch is the mean output, and d G d^T the mean squared
    output change of a kernel change d."""
    import keras

    from export.biascorr import _kernel_rows, _output_error, input_stats

    rng = np.random.default_rng(size)
    x = rng.normal(size=(3, size, size, 5)).astype("float32")
    layer = getattr(keras.layers, kind)(use_bias=False, **kwargs)
    y = np.asarray(layer(x))
    depthwise = kind == "DepthwiseConv2D"
    gram, mean_patch = input_stats(layer, [x[:2], x[2:]])
    rows = _kernel_rows(layer.get_weights()[0], depthwise)
    flat = mean_patch.T if depthwise else mean_patch.reshape(-1)
    mean = np.sum(rows * flat, axis=1) if depthwise else rows @ flat
    np.testing.assert_allclose(mean, y.reshape(-1, y.shape[-1]).mean(0), atol=1e-5)
    # a kernel change d changes the output by conv(x, d): its mean square is d G d^T
    d = rng.normal(size=rows.shape).astype("float32")
    from export.biascorr import _from_rows

    changed = getattr(keras.layers, kind)(use_bias=False, **kwargs)
    changed(x)
    changed.set_weights([_from_rows(d, layer.get_weights()[0].shape, depthwise)])
    dy = np.asarray(changed(x)).reshape(-1, y.shape[-1])
    np.testing.assert_allclose(_output_error(d, gram), (dy ** 2).mean(0), rtol=1e-4)


def test_adaptive_rounding_beats_nearest_on_correlated_inputs():
    from export.biascorr import _grid_scale, _output_error, adaptive_round

    rng = np.random.default_rng(0)
    k, c = 64, 32
    a = rng.normal(size=(4096, k)) @ rng.normal(size=(k, k)) * 0.3 + rng.normal(size=(4096, k))
    gram = a.T @ a / len(a)
    w = rng.normal(size=(c, k))
    scale = _grid_scale(w)
    q = adaptive_round(w, scale, gram)
    nearest = np.clip(np.round(w / scale[:, None]), -127, 127) * scale[:, None]
    steps = q / scale[:, None]
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-4)
    assert np.all(np.abs(steps - w / scale[:, None]) < 1 + 1e-6)  # floor or ceil only
    np.testing.assert_allclose(np.abs(q).max(axis=1), np.abs(w).max(axis=1), rtol=1e-6)
    per_channel = _output_error(q - w, gram) / _output_error(nearest - w, gram)
    assert per_channel.max() <= 1.0 + 1e-9  # never worse than nearest, channel by channel
    assert _output_error(q - w, gram).sum() < 0.8 * _output_error(nearest - w, gram).sum()


def test_unknown_rounding_is_refused():
    model, _ = _tiny_model()
    with pytest.raises(ExportError, match="Unknown weight rounding"):
        correct_biases(model, np.zeros((2, 16, 16, 3), np.uint8), rounding="stochastic")


def test_layers_without_a_place_for_the_correction_are_skipped_and_left_untouched():
    model, backbone = _tiny_model(no_bn_conv=True)
    k3 = backbone.get_layer("c3").get_weights()[0].copy()
    images = np.random.default_rng(3).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    report = correct_biases(model, images, keep_float=("dw",))
    assert report["layers_corrected"] == 2
    assert set(report["layers_skipped"]) == {"c3", "dw"}
    assert "no bias" in report["layers_skipped"]["c3"]
    assert "keep-float" in report["layers_skipped"]["dw"]
    np.testing.assert_array_equal(backbone.get_layer("c3").get_weights()[0], k3)


def test_a_model_without_a_backbone_is_refused_clearly():
    import keras

    inp = keras.Input((8, 8, 3), name="image")
    model = keras.Model(inp, keras.layers.Conv2D(2, 1)(inp))
    with pytest.raises(ExportError, match="backbone"):
        correct_biases(model, np.zeros((2, 8, 8, 3), np.uint8))


def test_config_rejects_bias_correction_outside_int8_ptq():
    assert QuantizationConfig.int8(30).bias_correction == "auto"
    assert QuantizationConfig.float32().bias_correction == "off"
    # QAT's side-by-side PTQ model is the default post-training export
    assert QuantizationConfig.int8_qat(30).bias_correction == "auto"
    with pytest.raises(ExportError, match="float16"):
        QuantizationConfig("float16", bias_correction="on")
    with pytest.raises(ExportError, match="Unknown bias correction"):
        QuantizationConfig.int8(30, bias_correction="yes")


def test_config_weight_rounding_choices():
    assert QuantizationConfig.int8(30).weight_rounding == "adaptive"  # the default
    assert QuantizationConfig.int8(30, weight_rounding="nearest").weight_rounding == "nearest"
    # without bias correction the converter rounds to nearest, and the config says so
    assert QuantizationConfig.int8(30, bias_correction="off").weight_rounding == "nearest"
    assert QuantizationConfig.int8_qat(30).weight_rounding == "adaptive"  # its PTQ comparator
    assert QuantizationConfig.int8(30, weight_rounding="adaptive").weight_rounding == "adaptive"
    with pytest.raises(ExportError, match="did you mean 'adaptive'"):
        QuantizationConfig.int8(30, weight_rounding="adaptiv")
    with pytest.raises(ExportError, match="bias correction is off"):
        QuantizationConfig.int8(30, bias_correction="off", weight_rounding="adaptive")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run_dir(tmp_path_factory.mktemp("runs"), size=32)


@pytest.fixture(scope="module")
def float_metrics(run_dir, tmp_path_factory) -> dict:
    """The float Keras model's metrics on the val split, as a float32 export reports them."""
    res = export_run(run_dir, QuantizationConfig.float32(), tmp_path_factory.mktemp("f32") / "b")
    return res.report["validation"]["metrics"]["float"]


@pytest.mark.parametrize("choice", ["auto", "on", "kernel", "off"])
def test_int8_export_records_the_bias_correction_in_card_and_report(run_dir, tmp_path, choice,
                                                                     float_metrics):
    res = export_run(run_dir, QuantizationConfig.int8(20, bias_correction=choice),
                     tmp_path / choice)
    bc = res.card["export"]["bias_correction"]
    report = json.loads((res.path / "validation.json").read_text())
    md = (res.path / "validation.md").read_text()
    if choice == "off":
        assert bc is None and "bias_correction" not in report
        assert "Bias correction" not in md
        assert res.report["validation"]["metrics"]["float"] == float_metrics
        return
    assert bc["mode"] == choice and bc["layers_corrected"] > 0
    assert report["bias_correction"]["layers_corrected"] == bc["layers_corrected"]
    # second stage, on the converted int8 model (export/qcorrect.py); "kernel" skips it
    qm = bc["quantized_model"]
    if choice == "kernel":
        assert qm is None and bc["chosen"] == "corrected" and bc["selection"] is None
        assert "quantized_model" not in report["bias_correction"]
        return
    assert qm["stage"] == "quantized_model" and qm["layers_corrected"] > 0
    assert qm["images"] == 16  # 20 calibration images, whole batches of 16
    assert isinstance(report["bias_correction"]["quantized_model"]["layers_skipped"], dict)
    assert "Bias correction" in md
    if choice == "on":
        assert bc["chosen"] == "corrected" and bc["selection"] is None
    else:
        sel = bc["selection"]
        assert bc["chosen"] in ("plain", "corrected") and sel["images"] == 20
        for k in ("plain", "corrected"):
            assert 0 <= sel[k]["diagnosis_agreement"] <= 1
        better = max(("plain", "corrected"), key=lambda k: (sel[k]["diagnosis_agreement"],
                                                            -sel[k]["mean_abs_diff"]))
        assert bc["chosen"] == better
    # validation always compares with the untouched float model, never the corrected copy
    assert res.report["validation"]["metrics"]["float"] == float_metrics


def test_cli_bias_correction_flag(run_dir, tmp_path, capsys):
    rc = main(["tflite", str(run_dir), "--float16", "--bias-correction", "on",
               "--out", str(tmp_path / "f16")])
    assert rc == 2 and not (tmp_path / "f16").exists()
    assert "--bias-correction on only applies to post-training --int8" in capsys.readouterr().err
    rc = main(["tflite", str(run_dir), "--int8", "--representative", "20", "--bias-correction",
               "off", "--out", str(tmp_path / "off")])
    assert rc in (0, 3)
    card = json.loads((tmp_path / "off" / "model_card.json").read_text())
    assert card["export"]["bias_correction"] is None


def test_cli_weight_rounding_flag(run_dir, tmp_path, capsys):
    rc = main(["tflite", str(run_dir), "--dynamic", "--weight-rounding", "adaptive",
               "--out", str(tmp_path / "dyn")])
    assert rc == 2 and not (tmp_path / "dyn").exists()
    assert "--weight-rounding adaptive only applies to post-training --int8" in \
        capsys.readouterr().err
    rc = main(["tflite", str(run_dir), "--int8", "--representative", "20", "--bias-correction",
               "on", "--out", str(tmp_path / "ada")])
    assert rc in (0, 3)
    bc = json.loads((tmp_path / "ada" / "model_card.json").read_text())["export"]["bias_correction"]
    assert bc["rounding"] == "adaptive" and bc["chosen"] == "corrected"  # the default rounding
    assert bc["layers_corrected"] > 0
    rc = main(["tflite", str(run_dir), "--int8", "--representative", "20", "--bias-correction",
               "on", "--weight-rounding", "nearest", "--out", str(tmp_path / "near")])
    assert rc in (0, 3)
    card = json.loads((tmp_path / "near" / "model_card.json").read_text())
    bc = card["export"]["bias_correction"]
    assert bc["rounding"] == "nearest" and bc["output_error_vs_nearest"] is None
