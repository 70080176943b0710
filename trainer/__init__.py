"""dermedge trainer: data, backbones, model, fit, evaluate and the run directory.

Importing this package imports neither Keras nor TensorFlow; modules that need them
import them lazily, so data tools work (and start fast) without the training stack.
"""

__version__ = "0.1.0"
