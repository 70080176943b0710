"""The two-headed model: shapes, save/load, training, augmentation and freezing stages."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.backbones import get_backbone, list_backbones
from trainer.errors import DermedgeError, UnknownBackboneError
from trainer.model import (
    backbone_submodel,
    build_augmenter,
    build_model,
    count_params,
    set_trainable,
    training_model,
)

SIZE = 32


def _images(n=4, size=SIZE, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")


def _targets(n=4, seed=0):
    rng = np.random.default_rng(seed)
    dx = rng.integers(0, 7, n)
    return {"melanoma": (dx == 4).astype("float32")[:, None], "diagnosis": np.eye(7)[dx]}


def _compile(model, run_eagerly=False):
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss={"melanoma": "binary_crossentropy", "diagnosis": "categorical_crossentropy"},
        run_eagerly=run_eagerly,
    )


def _check_outputs(out, n):
    assert set(out) == {"melanoma", "diagnosis"}
    mel, dx = np.asarray(out["melanoma"]), np.asarray(out["diagnosis"])
    assert mel.shape == (n, 1) and dx.shape == (n, 7)
    assert mel.dtype == np.float32 and dx.dtype == np.float32
    assert np.all((mel >= 0) & (mel <= 1))
    np.testing.assert_allclose(dx.sum(axis=1), 1.0, atol=1e-5)


@pytest.fixture
def tiny():
    return build_model("tiny_cnn", input_size=SIZE, weights=None)


# --- structure ----------------------------------------------------------------------------------


def test_tiny_model_structure(tiny):
    assert tiny.name == "dermedge_tiny_cnn"
    assert [t.name for t in tiny.inputs] == ["image"]
    assert tuple(tiny.inputs[0].shape) == (None, SIZE, SIZE, 3)
    assert tiny.inputs[0].dtype == "float32"
    names = [layer.name for layer in tiny.layers]
    assert names[:3] == ["image", "preprocess_scale", "backbone"]
    assert {"pool", "dropout", "melanoma", "diagnosis"} <= set(names)
    assert tiny.get_layer("melanoma").compute_dtype == "float32"
    _check_outputs(tiny.predict(_images(), verbose=0), 4)


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_lite0", "efficientnet_lite1",
                                  "efficientnet_lite2"])
def test_mobile_backbones_build_at_min_size(name):
    spec = get_backbone(name)
    model = build_model(name, input_size=spec.min_size, weights=None)
    _check_outputs(model(_images(2, spec.min_size), training=False), 2)
    backbone = backbone_submodel(model)
    assert backbone.get_layer(spec.last_conv_layer).output.shape == backbone.output.shape


def test_default_input_size_comes_from_the_backbone():
    model = build_model("tiny_cnn", weights=None)
    assert tuple(model.inputs[0].shape) == (
        None,
        get_backbone("tiny_cnn").default_size,
        get_backbone("tiny_cnn").default_size,
        3,
    )


def test_n_classes_and_bad_arguments():
    model = build_model("tiny_cnn", input_size=SIZE, weights=None, n_classes=3)
    assert model.get_layer("diagnosis").units == 3
    with pytest.raises(DermedgeError, match="at least 75 px"):
        build_model("inception_resnet_v2", input_size=64, weights=None)
    with pytest.raises(DermedgeError, match="dropout"):
        build_model("tiny_cnn", input_size=SIZE, weights=None, dropout=1.5)
    with pytest.raises(DermedgeError, match="n_classes"):
        build_model("tiny_cnn", input_size=SIZE, weights=None, n_classes=1)
    with pytest.raises(DermedgeError, match="input_size"):
        build_model("tiny_cnn", input_size="64", weights=None)
    with pytest.raises(UnknownBackboneError, match="Did you mean 'resnet50'"):
        build_model("resnet_50", weights=None)


def test_mixed_precision_keeps_float32_io():
    import keras

    old = keras.config.dtype_policy().name
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = build_model("tiny_cnn", input_size=SIZE, weights=None)
    finally:
        keras.config.set_dtype_policy(old)
    assert model.get_layer("backbone").get_layer("block1_conv").compute_dtype == "float16"
    assert model.get_layer("preprocess_scale").compute_dtype == "float32"
    _check_outputs(model(_images(2), training=False), 2)


# --- train + save/load ---------------------------------------------------------------------------


def _train_save_load(model, size, tmp_path, fast=False):
    """One training step, save, reload; ``fast`` runs eagerly (tracing big graphs is slow)."""
    import keras

    x, y = _images(2, size), _targets(2)
    before = model.get_layer("diagnosis").kernel.numpy().copy()
    train = training_model(model, build_augmenter(seed=1))
    _compile(train, run_eagerly=fast)
    train.train_on_batch(x, y)
    assert not np.allclose(model.get_layer("diagnosis").kernel.numpy(), before)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)  # no custom_objects: built-in layers only
    if fast:
        want, got = model(x, training=False), loaded(x, training=False)
        want = {k: np.asarray(v) for k, v in want.items()}
        got = {k: np.asarray(v) for k, v in got.items()}
    else:
        want, got = model.predict(x, verbose=0), loaded.predict(x, verbose=0)
    _check_outputs(got, 2)
    for key in ("melanoma", "diagnosis"):
        np.testing.assert_allclose(got[key], want[key], atol=1e-6)
    assert [layer.name for layer in loaded.layers] == [layer.name for layer in model.layers]
    preprocess = [layer for layer in loaded.layers if layer.name.startswith("preprocess_")]
    assert preprocess and not any(layer.trainable for layer in preprocess)


def test_tiny_train_save_load(tiny, tmp_path):
    _train_save_load(tiny, SIZE, tmp_path)


def test_resnet50_train_save_load(tmp_path):
    model = build_model("resnet50", input_size=64, weights=None)
    assert model.get_layer("preprocess_caffe").trainable is False
    _train_save_load(model, 64, tmp_path, fast=True)


@pytest.mark.slow  # CI runs it in the slow line; keeps the default suite short
def test_inception_resnet_v2_train_save_load(tmp_path):
    model = build_model("inception_resnet_v2", input_size=75, weights=None)
    _train_save_load(model, 75, tmp_path, fast=True)


# --- augmentation -------------------------------------------------------------------------------


def test_augmenter_is_identity_at_inference_and_changes_pixels_in_training():
    aug = build_augmenter(seed=0)
    x = _images(3)
    np.testing.assert_array_equal(np.asarray(aug(x, training=False)), x)
    out = np.asarray(aug(x, training=True))
    assert out.shape == x.shape
    assert not np.allclose(out, x)
    assert out.min() >= 0 and out.max() <= 255


def test_augmenter_layers_and_zero_factors():
    full = [layer.name for layer in build_augmenter().layers]
    assert full == ["flip", "rotation", "translation", "zoom", "shear", "brightness", "contrast"]
    some = build_augmenter(flip=False, rotation=0, shear=0.0, contrast=0)
    assert [layer.name for layer in some.layers] == ["translation", "zoom", "brightness"]
    with pytest.raises(DermedgeError, match="rotation"):
        build_augmenter(rotation=2.0)


def test_training_model_shares_weights_and_is_identity_at_inference(tiny):
    train = training_model(tiny, build_augmenter(seed=0))
    assert train.get_layer(tiny.name) is tiny
    assert {id(w) for w in tiny.weights} <= {id(w) for w in train.weights}
    x = _images()
    direct, through = tiny(x, training=False), train(x, training=False)
    for key in ("melanoma", "diagnosis"):
        np.testing.assert_array_equal(np.asarray(through[key]), np.asarray(direct[key]))
    # Augmentation changes what the model sees in training (dropout 0 isolates it).
    model = build_model("tiny_cnn", input_size=SIZE, weights=None, dropout=0.0)
    for layer in model.layers:
        layer.trainable = False  # BN in inference mode: only the augmenter is stochastic
    train = training_model(model, build_augmenter(seed=0))
    a = np.asarray(train(x, training=True)["diagnosis"])
    b = np.asarray(model(x, training=True)["diagnosis"])
    assert not np.allclose(a, b)


# --- freezing -----------------------------------------------------------------------------------


def _bn_layers(model):
    import keras

    return [
        layer
        for layer in backbone_submodel(model).layers
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def test_set_trainable_stages(tiny):
    heads = sum(
        int(np.prod(w.shape)) for n in ("melanoma", "diagnosis") for w in tiny.get_layer(n).weights
    )
    total = count_params(tiny)["total"]

    set_trainable(tiny, "head")
    counts = count_params(tiny)
    assert counts == {"total": total, "trainable": heads, "non_trainable": total - heads}
    assert not backbone_submodel(tiny).trainable

    set_trainable(tiny, "finetune")
    all_counts = count_params(tiny)
    bn_params = sum(int(np.prod(w.shape)) for bn in _bn_layers(tiny) for w in bn.weights)
    assert all_counts["trainable"] == total - bn_params
    assert all(not bn.trainable for bn in _bn_layers(tiny))
    assert not tiny.get_layer("preprocess_scale").trainable

    set_trainable(tiny, "finetune", freeze_bn=False)
    bn_trainable = sum(
        int(np.prod(w.shape)) for bn in _bn_layers(tiny) for w in bn.trainable_weights
    )
    assert count_params(tiny)["trainable"] == all_counts["trainable"] + bn_trainable

    # Top 3 layers of tiny_cnn's backbone: block4_relu, block4_bn (kept frozen), block4_conv.
    set_trainable(tiny, "finetune", finetune_layers=3)
    conv4 = backbone_submodel(tiny).get_layer("block4_conv")
    assert count_params(tiny)["trainable"] == heads + int(np.prod(conv4.kernel.shape))
    assert not backbone_submodel(tiny).get_layer("block3_conv").trainable

    # The same by the name of the first layer to train.
    set_trainable(tiny, "finetune", finetune_layers="block4_conv")
    assert count_params(tiny)["trainable"] == heads + int(np.prod(conv4.kernel.shape))

    set_trainable(tiny, "head")  # back again: the backbone is frozen once more
    assert count_params(tiny)["trainable"] == heads


def test_set_trainable_rejects_bad_arguments(tiny):
    with pytest.raises(DermedgeError, match="Unknown training stage 'all'"):
        set_trainable(tiny, "all")
    with pytest.raises(DermedgeError, match="finetune_layers"):
        set_trainable(tiny, "finetune", finetune_layers=0)
    with pytest.raises(DermedgeError, match="Did you mean 'block4_conv'"):
        set_trainable(tiny, "finetune", finetune_layers="block4_cnv")


def test_head_stage_training_leaves_backbone_unchanged(tiny):
    set_trainable(tiny, "head")
    backbone_before = [w.numpy().copy() for w in backbone_submodel(tiny).weights]
    train = training_model(tiny, build_augmenter(seed=0))
    _compile(train)
    train.train_on_batch(_images(), _targets())
    for w, before in zip(backbone_submodel(tiny).weights, backbone_before, strict=True):
        np.testing.assert_array_equal(w.numpy(), before)


def test_every_registered_backbone_is_covered():
    covered = {"tiny_cnn", "mobilenet_v2", "efficientnet_lite0", "efficientnet_lite1",
               "efficientnet_lite2", "resnet50", "inception_resnet_v2"}
    assert covered == set(list_backbones())
