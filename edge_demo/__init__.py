"""dermedge edge demo: the phone-to-cloud fallback flow as a Flask service and a page.

Runs on the LiteRT interpreter, numpy, Pillow, Flask and waitress only: it never imports
TensorFlow, Keras, ``trainer`` or ``export``, so it installs and starts without them.
"""

__version__ = "0.1.0"
