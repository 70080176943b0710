"""The two-headed classifier: raw RGB 0-255 in, ``{"melanoma", "diagnosis"}`` out.

``build_model`` gives the inference model (what ``model.keras`` holds); ``training_model``
wraps it with the augmenter for ``fit`` and shares its weights.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from dermedge.labels import INPUT_NAME
from trainer.backbones import PREPROCESS_PREFIX, get_backbone, preprocessing_layers
from trainer.errors import DermedgeError

if TYPE_CHECKING:
    import keras

BACKBONE_NAME = "backbone"
STAGES = ("head", "finetune")


def build_model(
    backbone: str,
    *,
    input_size: int | None = None,
    weights: str | os.PathLike | None = "imagenet",
    dropout: float = 0.2,
    n_classes: int = 7,
) -> keras.Model:
    """Build the inference model for ``backbone`` taking ``(N, S, S, 3)`` float32 pixels 0-255."""
    import keras
    from keras import layers

    spec = get_backbone(backbone)
    size = spec.default_size if input_size is None else input_size
    if isinstance(size, bool) or not isinstance(size, int):
        raise DermedgeError(f"input_size must be an integer number of pixels; received {size!r}.")
    if size < spec.min_size:
        raise DermedgeError(
            f"input_size={size} is too small for backbone '{spec.name}', which needs at least "
            f"{spec.min_size} px (default {spec.default_size}). Use a larger input_size."
        )
    if not 0.0 <= float(dropout) < 1.0:
        raise DermedgeError(f"dropout must be in [0, 1); received {dropout!r}.")
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 2:
        raise DermedgeError(f"n_classes must be an integer >= 2; received {n_classes!r}.")

    image = keras.Input((size, size, 3), name=INPUT_NAME, dtype="float32")
    x = image
    for layer in preprocessing_layers(spec.preprocessing):
        x = layer(x)
    x = spec.build((size, size, 3), weights)(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dropout(float(dropout), name="dropout")(x)
    # float32 heads: probabilities stay accurate under a mixed-precision policy.
    diagnosis = layers.Dense(n_classes, activation="softmax", name="diagnosis", dtype="float32")(x)
    melanoma = layers.Dense(1, activation="sigmoid", name="melanoma", dtype="float32")(x)
    return keras.Model(
        image, {"melanoma": melanoma, "diagnosis": diagnosis}, name=f"dermedge_{spec.name}"
    )


def build_augmenter(
    *,
    flip: bool = True,
    rotation: float = 0.5,
    translation: float = 0.1,
    zoom: float = 0.15,
    shear: float = 0.1,
    brightness: float = 0.15,
    contrast: float = 0.15,
    saturation: float = 0.0,
    seed: int | None = None,
) -> keras.Sequential:
    """Random geometric and photometric augmentation on 0-255 pixels, active only in training.

    ``rotation`` is a fraction of a full turn (0.5 = +-180 deg: dermoscopy has no "up").
    A factor of 0 leaves that layer out.
    """
    import keras
    from keras import layers

    factors = {
        "rotation": rotation,
        "translation": translation,
        "zoom": zoom,
        "shear": shear,
        "brightness": brightness,
        "contrast": contrast,
        "saturation": saturation,
    }
    for name, value in factors.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise DermedgeError(
                f"augmentation {name} must be a number in [0, 1]; received {value!r}."
            )

    def s(i):
        return None if seed is None else seed + i

    common = {"dtype": "float32"}
    geo = {"fill_mode": "reflect", "interpolation": "bilinear", **common}
    aug: list[keras.layers.Layer] = []
    if flip:
        aug.append(layers.RandomFlip("horizontal_and_vertical", seed=s(0), name="flip", **common))
    if rotation:
        aug.append(layers.RandomRotation(rotation, seed=s(1), name="rotation", **geo))
    if translation:
        aug.append(
            layers.RandomTranslation(translation, translation, seed=s(2), name="translation", **geo)
        )
    if zoom:
        aug.append(layers.RandomZoom(zoom, seed=s(3), name="zoom", **geo))
    if shear and hasattr(layers, "RandomShear"):
        aug.append(layers.RandomShear(shear, shear, seed=s(4), name="shear", **geo))
    if brightness:
        aug.append(
            layers.RandomBrightness(
                brightness, value_range=(0, 255), seed=s(5), name="brightness", **common
            )
        )
    if contrast:
        aug.append(
            layers.RandomContrast(
                contrast, value_range=(0, 255), seed=s(6), name="contrast", **common
            )
        )
    if saturation:
        from trainer.layers import RandomSaturationJitter

        aug.append(RandomSaturationJitter(saturation, seed=s(7), name="saturation", **common))
    return keras.Sequential(aug, name="augmenter")


def training_model(model: keras.Model, augmenter: keras.Model) -> keras.Model:
    """``image -> augmenter -> model``, what ``fit`` compiles; shares all weights with ``model``."""
    import keras

    shape = tuple(model.inputs[0].shape[1:])
    image = keras.Input(shape, name=INPUT_NAME, dtype="float32")
    x = augmenter(image) if augmenter is not None and augmenter.layers else image
    outputs = model(x)
    return keras.Model(image, dict(outputs), name=f"{model.name}_train")


def backbone_submodel(model: keras.Model) -> keras.Model:
    """The ``"backbone"`` feature extractor inside a model from ``build_model``."""
    try:
        return model.get_layer(BACKBONE_NAME)
    except ValueError as e:
        raise DermedgeError(
            f"Model '{model.name}' has no '{BACKBONE_NAME}' sub-model; was it made by "
            "trainer.model.build_model?"
        ) from e


def _is_batchnorm(layer) -> bool:
    from keras import layers

    return isinstance(layer, layers.BatchNormalization)


def set_trainable(
    model: keras.Model,
    stage: str,
    *,
    finetune_layers: int | str = "all",
    freeze_bn: bool = True,
) -> None:
    """Freeze/unfreeze for a training stage; recompile afterwards.

    ``"head"``: backbone frozen, heads trainable. ``"finetune"``: the backbone trainable from
    ``finetune_layers`` up: ``"all"``, a number of top layers, or the name of the first
    trainable layer (e.g. ``"block4_expand_conv"``: the stem and early stages stay frozen, which
    also skips their backward pass). BatchNormalization layers stay frozen (so they run in
    inference mode) when ``freeze_bn``. Preprocessing is always frozen.
    """
    if stage not in STAGES:
        raise DermedgeError(f"Unknown training stage '{stage}'. Use one of: {', '.join(STAGES)}.")
    backbone = backbone_submodel(model)
    body = [layer for layer in backbone.layers if not isinstance(layer, _input_layer_cls())]
    if stage == "finetune":
        n = _n_finetune(body, finetune_layers)
    else:
        n = 0

    model.trainable = True  # recursive: resets every layer, then freeze below
    backbone.trainable = n > 0
    if 0 < n < len(body):
        for layer in body[: len(body) - n]:
            layer.trainable = False
    if freeze_bn:
        for layer in body:
            if _is_batchnorm(layer):
                layer.trainable = False
    for layer in model.layers:
        if layer.name.startswith(PREPROCESS_PREFIX):
            layer.trainable = False


def finetune_count(model: keras.Model, finetune_layers: int | str) -> int:
    """How many top backbone layers ``finetune_layers`` makes trainable; raises on a bad spec."""
    backbone = backbone_submodel(model)
    body = [layer for layer in backbone.layers if not isinstance(layer, _input_layer_cls())]
    return _n_finetune(body, finetune_layers)


def _n_finetune(body: list, finetune_layers: int | str) -> int:
    """How many top layers of the backbone ``body`` a ``finetune_layers`` spec makes trainable."""
    if finetune_layers == "all":
        return len(body)
    if isinstance(finetune_layers, int) and not isinstance(finetune_layers, bool):
        if finetune_layers > 0:
            return min(finetune_layers, len(body))
    elif isinstance(finetune_layers, str) and finetune_layers:
        names = [layer.name for layer in body]
        if finetune_layers in names:
            return len(body) - names.index(finetune_layers)
        import difflib

        close = difflib.get_close_matches(finetune_layers, names, n=1, cutoff=0.6)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise DermedgeError(
            f"finetune_layers={finetune_layers!r} is not a layer of this backbone.{hint} "
            f"Layers run from '{names[0]}' to '{names[-1]}'."
        )
    raise DermedgeError(
        "finetune_layers must be 'all', a positive number of top backbone layers, or the name "
        f"of the first backbone layer to train; received {finetune_layers!r}."
    )


def _input_layer_cls():
    from keras.layers import InputLayer

    return InputLayer


def count_params(model: keras.Model) -> dict[str, int]:
    """``{"total", "trainable", "non_trainable"}`` parameter counts."""
    import numpy as np

    def n(weights):
        seen, total = set(), 0
        for w in weights:
            if id(w) not in seen:
                seen.add(id(w))
                total += int(np.prod(w.shape))
        return total

    trainable = n(model.trainable_weights)
    non_trainable = n(model.non_trainable_weights)
    return {
        "total": trainable + non_trainable,
        "trainable": trainable,
        "non_trainable": non_trainable,
    }
