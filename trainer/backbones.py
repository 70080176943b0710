"""Backbones chosen by name, each carrying the preprocessing it was trained with.

A backbone builds an unpooled, top-less feature extractor named ``"backbone"`` that takes
already-preprocessed input; ``preprocessing_layers(mode)`` gives the built-in Keras layers
that map raw RGB 0-255 to that input inside the model graph.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.errors import DermedgeError, UnknownBackboneError

if TYPE_CHECKING:
    import keras

Weights = str | os.PathLike | None

# ImageNet channel means in BGR order, as keras.applications "caffe" preprocessing uses them.
CAFFE_BGR_MEAN: tuple[float, float, float] = (103.939, 116.779, 123.68)

PREPROCESSING_FORMULAS: dict[str, str] = {
    "tf": "x / 127.5 - 1",
    "caffe": "RGB->BGR, x - [103.939, 116.779, 123.68]",
    "effnet_lite": "(x - 127) / 128",
    "unit": "x / 255",
}
PREPROCESS_PREFIX = "preprocess_"


@dataclass(frozen=True)
class Backbone:
    name: str
    default_size: int
    min_size: int
    preprocessing: str
    last_conv_layer: str
    description: str
    mobile: bool
    # Where weights="imagenet" comes from: "keras" (the keras.applications download), "dermedge"
    # (built once by `trainer weights NAME`, trainer/weights.py) or None (no pretrained weights).
    imagenet: str | None
    factory: Callable[[tuple[int, int, int], Weights], keras.Model] = field(
        repr=False, compare=False
    )

    @property
    def preprocessing_formula(self) -> str:
        return PREPROCESSING_FORMULAS[self.preprocessing]

    def resolve_weights(self, weights: Weights) -> str | None:
        """None, or what the factory loads: 'imagenet' for a Keras download, else a file path."""
        weights = _check_weights(self.name, weights)
        if weights != "imagenet":
            return weights
        if self.imagenet == "dermedge":
            from trainer.weights import resolve

            return str(resolve(self.name))
        if self.imagenet is None:
            raise DermedgeError(f"Backbone '{self.name}' has no pretrained weights; received "
                                "weights='imagenet'. Use weights=None (random init).")
        return weights

    def build(self, input_shape: tuple[int, int, int], weights: Weights) -> keras.Model:
        """The feature extractor (no top, not pooled), named ``"backbone"``."""
        import keras

        input_shape = tuple(int(d) for d in input_shape)
        if len(input_shape) != 3 or input_shape[2] != 3:
            raise DermedgeError(
                f"Backbone '{self.name}' needs an RGB input shape (H, W, 3); "
                f"received {input_shape}."
            )
        if min(input_shape[:2]) < self.min_size:
            raise DermedgeError(
                f"Backbone '{self.name}' needs inputs of at least "
                f"{self.min_size}x{self.min_size} px; "
                f"received {input_shape[0]}x{input_shape[1]}. Use input_size >= {self.min_size} "
                f"(default {self.default_size})."
            )
        weights = self.resolve_weights(weights)
        base = self.factory(input_shape, weights)
        # Rewrap so the sub-model has the stable name every consumer looks up.
        return keras.Model(base.inputs[0], base.outputs[0], name="backbone")


def _check_weights(backbone: str, weights: Weights) -> str | None:
    if weights is None:
        return None
    if not isinstance(weights, (str, os.PathLike)):
        raise DermedgeError(
            f"weights for backbone '{backbone}' must be None, 'imagenet' or a file path; "
            f"received {weights!r}."
        )
    weights = os.fspath(weights)
    if weights == "imagenet":
        return weights
    if not Path(weights).is_file():
        raise DermedgeError(
            f"Weights file for backbone '{backbone}' not found: {weights}. Pass an existing "
            f"file, 'imagenet' (downloads the standard Keras weights) or None (random init)."
        )
    return weights


def _keras_app(fn_name: str, **kwargs) -> Callable[[tuple[int, int, int], Weights], keras.Model]:
    def factory(input_shape, weights):
        import keras

        fn = getattr(keras.applications, fn_name)
        return fn(include_top=False, weights=weights, input_shape=input_shape, **kwargs)

    return factory


def _efficientnet_lite(variant: int):
    def factory(input_shape, weights):
        from trainer.efficientnet_lite import efficientnet_lite

        return efficientnet_lite(variant, input_shape, include_top=False, weights=weights)

    return factory


def _tiny_cnn(input_shape, weights):
    import keras
    from keras import layers

    if weights is not None:
        raise DermedgeError(
            f"Backbone 'tiny_cnn' has no pretrained weights; received weights={weights!r}. "
            "Use weights=None (it is a small random-init CNN for tests and the quickstart)."
        )
    inputs = keras.Input(shape=input_shape, name="input")
    x = inputs
    for i, filters in enumerate((16, 32, 64, 128), start=1):
        x = layers.Conv2D(
            filters, 3, strides=2, padding="same", use_bias=False, name=f"block{i}_conv"
        )(x)
        x = layers.BatchNormalization(name=f"block{i}_bn")(x)
        x = layers.ReLU(name=f"block{i}_relu")(x)
    return keras.Model(inputs, x, name="tiny_cnn")


REGISTRY: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone(
            name="resnet50",
            imagenet="keras",
            default_size=224,
            min_size=32,
            preprocessing="caffe",
            last_conv_layer="conv5_block3_out",
            description="ResNet-50 (keras.applications), 23.6M params; strong server baseline.",
            mobile=False,
            factory=_keras_app("ResNet50"),
        ),
        Backbone(
            name="inception_resnet_v2",
            imagenet="keras",
            default_size=299,
            min_size=75,
            preprocessing="tf",
            last_conv_layer="conv_7b_ac",
            description="Inception-ResNet-v2 (keras.applications), 54M params; ISIC-2018 era "
            "server model.",
            mobile=False,
            factory=_keras_app("InceptionResNetV2"),
        ),
        Backbone(
            name="mobilenet_v2",
            imagenet="keras",
            default_size=224,
            min_size=32,
            preprocessing="tf",
            last_conv_layer="out_relu",
            description="MobileNetV2 alpha=1.0 (keras.applications), 2.3M params; on-device.",
            mobile=True,
            factory=_keras_app("MobileNetV2", alpha=1.0),
        ),
        *(
            Backbone(
                name=f"efficientnet_lite{n}",
                default_size=size,
                min_size=32,
                preprocessing="effnet_lite",
                last_conv_layer="top_activation",
                description=f"EfficientNet-Lite{n} (ReLU6, no SE; quantizes well), {params} "
                "params; on-device. ImageNet weights: `trainer weights "
                f"efficientnet_lite{n}` builds them once.",
                mobile=True,
                imagenet="dermedge",
                factory=_efficientnet_lite(n),
            )
            for n, size, params in ((0, 224, "3.4M"), (1, 240, "4.2M"), (2, 260, "4.8M"))
        ),
        Backbone(
            name="tiny_cnn",
            default_size=64,
            min_size=32,
            preprocessing="unit",
            last_conv_layer="block4_relu",
            description="4 conv blocks (16-32-64-128), random init; for tests and the "
            "quickstart only, not for real use.",
            mobile=True,
            imagenet=None,
            factory=_tiny_cnn,
        ),
    )
}


def list_backbones() -> list[str]:
    return sorted(REGISTRY)


def get_backbone(name: str) -> Backbone:
    """Look up a backbone by name; unknown names get a suggestion."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        pass
    available = ", ".join(list_backbones())
    close = difflib.get_close_matches(str(name).lower(), list(REGISTRY), n=1, cutoff=0.6)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise UnknownBackboneError(f"Unknown backbone '{name}'.{hint} Available: {available}.")


def preprocessing_layers(mode: str) -> list[keras.layers.Layer]:
    """Built-in, frozen Keras layers mapping raw RGB 0-255 to the backbone's input.

    Only built-in layers, so ``model.keras`` loads without custom objects and converts to
    TFLite. They compute in float32 even under a mixed-precision policy.
    """
    from keras import layers

    if mode == "tf":
        out = [
            layers.Rescaling(
                1 / 127.5, offset=-1.0, name=PREPROCESS_PREFIX + "scale", dtype="float32"
            )
        ]
    elif mode == "unit":
        out = [layers.Rescaling(1 / 255.0, name=PREPROCESS_PREFIX + "scale", dtype="float32")]
    elif mode == "effnet_lite":
        out = [
            layers.Rescaling(
                1 / 128.0, offset=-127 / 128.0, name=PREPROCESS_PREFIX + "scale", dtype="float32"
            )
        ]
    elif mode == "caffe":
        out = [_caffe_layer()]
    else:
        known = ", ".join(PREPROCESSING_FORMULAS)
        raise DermedgeError(f"Unknown preprocessing mode '{mode}'. Available: {known}.")
    for layer in out:
        layer.trainable = False
    return out


def _caffe_layer() -> keras.layers.Layer:
    """A frozen 1x1 conv whose kernel swaps RGB->BGR and whose bias subtracts the BGR mean."""
    import numpy as np
    from keras import layers

    conv = layers.Conv2D(3, 1, use_bias=True, dtype="float32", name=PREPROCESS_PREFIX + "caffe")
    conv.build((None, None, None, 3))
    kernel = np.zeros((1, 1, 3, 3), dtype="float32")
    for out_c in range(3):
        kernel[0, 0, 2 - out_c, out_c] = 1.0  # output channel 0 (B) reads input channel 2
    bias = -np.asarray(CAFFE_BGR_MEAN, dtype="float32")
    conv.set_weights([kernel, bias])
    return conv
