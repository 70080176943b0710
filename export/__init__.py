"""dermedge export: a trained run directory → validated TFLite bundles.

Reads runs through ``dermedge`` (the typed card, ``splits.csv``, the LiteRT runner); reaches
into ``trainer`` only through :mod:`export.training`, what quantization-aware training must
share with training. Importing this package imports neither Keras nor TensorFlow; the modules
that need them import them lazily. The public functions live in :mod:`export.api`.
"""

__version__ = "0.1.0"
