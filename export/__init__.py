"""dermedge export: a trained run directory → validated TFLite bundles.

Importing this package imports neither Keras nor TensorFlow; the modules that need them
import them lazily. The public functions live in :mod:`export.api`.
"""

__version__ = "0.1.0"
