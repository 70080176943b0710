"""Backbone registry, in-graph preprocessing and the EfficientNet-Lite0 builder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ci import need

from trainer import backbones
from trainer.backbones import get_backbone, list_backbones, preprocessing_layers
from trainer.errors import DermedgeError, UnknownBackboneError

EXPECTED = {"resnet50", "inception_resnet_v2", "mobilenet_v2", "efficientnet_lite0",
            "efficientnet_lite1", "efficientnet_lite2", "tiny_cnn"}


def _pixels(n=2, size=8, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")


def _apply(mode, x):
    import keras

    inp = keras.Input(x.shape[1:])
    y = inp
    for layer in preprocessing_layers(mode):
        y = layer(y)
    return keras.Model(inp, y)(x, training=False)


# --- registry -------------------------------------------------------------------------------


def test_registry_lists_every_backbone():
    assert set(list_backbones()) == EXPECTED
    assert list_backbones() == sorted(list_backbones())
    for name in EXPECTED:
        b = get_backbone(name)
        assert b.name == name
        assert b.min_size <= b.default_size
        assert b.preprocessing in backbones.PREPROCESSING_FORMULAS
        assert b.description


def test_registry_defaults_match_the_spec():
    assert get_backbone("resnet50").preprocessing == "caffe"
    assert get_backbone("inception_resnet_v2").default_size == 299
    assert get_backbone("inception_resnet_v2").min_size == 75
    assert get_backbone("mobilenet_v2").preprocessing == "tf"
    assert get_backbone("efficientnet_lite0").preprocessing == "effnet_lite"
    assert get_backbone("tiny_cnn").preprocessing == "unit"
    assert get_backbone("mobilenet_v2").mobile and not get_backbone("resnet50").mobile


def test_unknown_backbone_suggests_the_close_name():
    with pytest.raises(UnknownBackboneError) as info:
        get_backbone("mobilenetv2")
    msg = str(info.value)
    assert "Unknown backbone 'mobilenetv2'" in msg
    assert "Did you mean 'mobilenet_v2'?" in msg
    assert "Available: efficientnet_lite0, efficientnet_lite1" in msg
    assert isinstance(info.value, DermedgeError)


def test_unknown_backbone_without_close_match_lists_available():
    with pytest.raises(UnknownBackboneError) as info:
        get_backbone("vgg")
    assert "Did you mean" not in str(info.value)
    assert "tiny_cnn" in str(info.value)


# --- preprocessing ---------------------------------------------------------------------------


def test_tf_preprocessing_matches_keras_applications():
    from keras.applications import mobilenet_v2

    x = _pixels()
    np.testing.assert_allclose(
        np.asarray(_apply("tf", x)), mobilenet_v2.preprocess_input(x.copy()), atol=1e-6
    )


def test_caffe_preprocessing_matches_keras_applications():
    from keras.applications import resnet50

    x = _pixels()
    np.testing.assert_allclose(
        np.asarray(_apply("caffe", x)), resnet50.preprocess_input(x.copy()), atol=1e-4
    )


def test_effnet_lite_and_unit_preprocessing():
    x = _pixels()
    np.testing.assert_allclose(np.asarray(_apply("effnet_lite", x)), (x - 127) / 128, atol=1e-6)
    np.testing.assert_allclose(np.asarray(_apply("unit", x)), x / 255, atol=1e-6)


@pytest.mark.parametrize("mode", sorted(backbones.PREPROCESSING_FORMULAS))
def test_preprocessing_layers_are_frozen_float32_and_prefixed(mode):
    layers = preprocessing_layers(mode)
    assert layers
    for layer in layers:
        assert layer.name.startswith("preprocess_")
        assert not layer.trainable
        assert layer.compute_dtype == "float32"
        assert type(layer).__module__.startswith("keras.")  # built-in: no custom objects


def test_unknown_preprocessing_mode():
    with pytest.raises(DermedgeError, match="Unknown preprocessing mode 'torch'"):
        preprocessing_layers("torch")


# --- building and weights ---------------------------------------------------------------------


def test_tiny_cnn_builds_unpooled_backbone():
    b = get_backbone("tiny_cnn")
    model = b.build((32, 32, 3), None)
    assert model.name == "backbone"
    assert tuple(model.output.shape) == (None, 2, 2, 128)
    assert model.get_layer(b.last_conv_layer).output.shape == model.output.shape


def test_tiny_cnn_rejects_weights():
    with pytest.raises(DermedgeError, match="tiny_cnn' has no pretrained weights"):
        get_backbone("tiny_cnn").build((32, 32, 3), "imagenet")


def test_build_rejects_small_input():
    with pytest.raises(DermedgeError, match="at least 75x75"):
        get_backbone("inception_resnet_v2").build((64, 64, 3), None)


def test_missing_weights_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.h5"
    with pytest.raises(DermedgeError, match="nope.h5"):
        get_backbone("mobilenet_v2").build((32, 32, 3), str(missing))


def test_efficientnet_lite0_architecture():
    from trainer.efficientnet_lite import efficientnet_lite0, expected_keys

    model = efficientnet_lite0((64, 64, 3), include_top=True)
    names = {layer.name for layer in model.layers}
    assert {"stem_conv", "stem_bn", "block0_dwconv", "block15_project_bn", "top_conv"} <= names
    assert "block0_expand_conv" not in names  # expand ratio 1 in the first stage
    assert "block16_dwconv" not in names  # 16 blocks: 0..15
    # Residual adds only where stride 1 and in == out: 16 blocks minus the 7 stage entries
    # except stage 5 (80 -> 112, stride 1, no add) -> 9 adds.
    assert sum(name.endswith("_add") for name in names) == 9
    assert tuple(model.output.shape) == (None, 1000)
    assert len(expected_keys(model)) == len(model.weights)
    # Known size of EfficientNet-Lite0 with its 1000-class top.
    assert model.count_params() == 4_694_024


def test_npz_round_trip_and_mismatch_errors(tmp_path):
    from trainer.efficientnet_lite import efficientnet_lite0, expected_keys, load_npz_weights

    src = efficientnet_lite0((32, 32, 3))
    arrays = {k: np.asarray(v.numpy()) + 0.5 for k, (_, v) in expected_keys(src).items()}
    good = tmp_path / "good.npz"
    np.savez(good, **arrays)
    dst = efficientnet_lite0((32, 32, 3), weights=good)
    for key, (_, var) in expected_keys(dst).items():
        np.testing.assert_array_equal(var.numpy(), arrays[key])

    missing = dict(arrays)
    del missing["block7_dwconv/kernel"]
    np.savez(tmp_path / "missing.npz", **missing)
    with pytest.raises(DermedgeError, match="block7_dwconv/kernel"):
        load_npz_weights(dst, tmp_path / "missing.npz")

    bad = dict(arrays)
    bad["top_conv/kernel"] = np.zeros((1, 1, 320, 1000), dtype="float32")
    np.savez(tmp_path / "bad.npz", **bad)
    with pytest.raises(DermedgeError, match=r"top_conv/kernel.*\(1, 1, 320, 1000\)"):
        load_npz_weights(dst, tmp_path / "bad.npz")

    (tmp_path / "junk.npz").write_text("not an archive")
    with pytest.raises(DermedgeError, match="junk.npz"):
        load_npz_weights(dst, tmp_path / "junk.npz")


# --- real ImageNet weights (../shared) ----------------------------------------------------------


def _center_crop(path: Path, size: int) -> np.ndarray:
    from PIL import Image

    img = Image.open(path).convert("RGB")
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    img = img.crop((left, top, left + s, top + s)).resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype="float32")[None]


@pytest.mark.shared
def test_efficientnet_lite0_imagenet_weights_classify_a_natural_image(shared_dir):
    """Exact loading, and Grace Hopper's portrait (matplotlib's sample) is a 'military uniform'."""
    import matplotlib.cbook

    from trainer.efficientnet_lite import efficientnet_lite0, expected_keys

    npz = shared_dir / "weights" / "efficientnet_lite0_imagenet.npz"
    model = efficientnet_lite0((224, 224, 3), include_top=True, weights=npz)
    with np.load(npz) as ref:
        for key, (_, var) in expected_keys(model).items():
            np.testing.assert_array_equal(var.numpy(), ref[key])

    hopper = Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    x = (_center_crop(hopper, 224) - 127) / 128
    probs = np.asarray(model(x, training=False))[0]
    assert probs.min() >= 0 and abs(probs.sum() - 1) < 1e-4
    military_uniform = 652  # ImageNet class index (the classic TF label_image example)
    assert int(np.argmax(probs)) == military_uniform
    assert probs[military_uniform] > 0.2


@pytest.mark.shared
def test_mobilenet_v2_shared_h5_loads(shared_dir):
    import h5py

    h5 = shared_dir / "weights" / "mobilenet_v2_1.0_224_no_top_imagenet.h5"
    backbone = get_backbone("mobilenet_v2").build((224, 224, 3), str(h5))
    assert backbone.count_params() == 2_257_984
    with h5py.File(h5, "r") as f:
        kernel = f["Conv1/Conv1/kernel"][()]
        gamma = f["bn_Conv1/bn_Conv1/gamma"][()]
    np.testing.assert_array_equal(backbone.get_layer("Conv1").kernel.numpy(), kernel)
    np.testing.assert_array_equal(backbone.get_layer("bn_Conv1").gamma.numpy(), gamma)


@pytest.mark.parametrize("mode", sorted(backbones.PREPROCESSING_FORMULAS))
def test_preprocessing_converts_to_tflite_exactly(mode, tmp_path):
    """The in-graph preprocessing survives SavedModel -> TFLite with the same numbers."""
    import keras

    tf = need("tensorflow", "the train extra installs it")
    litert = need("ai_edge_litert.interpreter", "the core install has it")

    image = keras.Input((8, 8, 3), name="image")
    y = image
    for layer in preprocessing_layers(mode):
        y = layer(y)
    model = keras.Model(image, {"out": keras.layers.Identity(name="out")(y)})
    model.export(tmp_path / "sm", format="tf_saved_model", verbose=False)
    flatbuffer = tf.lite.TFLiteConverter.from_saved_model(str(tmp_path / "sm")).convert()
    runner = litert.Interpreter(model_content=flatbuffer).get_signature_runner()
    x = _pixels(1)
    got = runner(image=x)
    assert set(got) == {"out"}
    np.testing.assert_allclose(got["out"], np.asarray(model(x)["out"]), atol=1e-5)
