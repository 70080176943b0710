"""dermedge edge demo: the phone-to-cloud fallback flow as a Flask service and a page.

Runs on the LiteRT interpreter, numpy, Pillow, Flask and waitress only, reading export bundles
through ``dermedge``; it never imports ``export``, and imports ``trainer`` (with TensorFlow and
Keras) only for Grad-CAM heatmaps (:mod:`edge_demo.explain`, ``--explain RUN``). A Keras run
directory as the cloud tier (:mod:`edge_demo.keras_tier`) imports Keras itself, when it loads.
So the demo installs and starts without TensorFlow (tests/test_layers.py holds it to this).
"""

__version__ = "0.1.0"
