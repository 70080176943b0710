"""The contracts between dermedge's stages: numpy/Pillow only, never TensorFlow.

``trainer``, ``export`` and ``edge_demo`` each import from here and from nowhere else across
stages: the image contract (:mod:`dermedge.image`) and the shared errors
(:mod:`dermedge.errors`).
"""
