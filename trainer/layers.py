"""Keras layers the built-in set lacks. Used only in training (never saved in ``model.keras``,
so loading a run needs no custom objects)."""

from __future__ import annotations

import keras
from keras import ops


class RandomSaturationJitter(keras.layers.Layer):
    """Scales each image's saturation by a factor drawn from ``[1 - f, 1 + f]``, on 0-255
    pixels: ``gray + s * (x - gray)`` with the ITU-R BT.601 luma as gray, clipped to 0-255.

    keras.layers.RandomSaturation multiplies HSV saturation without keeping it <= 1, which
    pushes saturated dermoscopy colours out of gamut. keras.ops only: every backend.
    """

    def __init__(self, factor: float, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if not 0 <= factor <= 1:
            raise ValueError(f"saturation factor must be in [0, 1]; received {factor!r}.")
        self.factor = float(factor)
        self.seed = seed
        self.generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=None):
        if not training:
            return images
        n = ops.shape(images)[0]
        s = keras.random.uniform((n, 1, 1, 1), 1 - self.factor, 1 + self.factor,
                                 seed=self.generator, dtype=images.dtype)
        luma = ops.convert_to_tensor([0.299, 0.587, 0.114], dtype=images.dtype)
        gray = ops.sum(images * luma, axis=-1, keepdims=True)
        return ops.clip(gray + s * (images - gray), 0.0, 255.0)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "factor": self.factor, "seed": self.seed}
