"""The contracts between dermedge's stages: numpy and Pillow only, never TensorFlow, pandas or
YAML (the LiteRT interpreter and Keras are imported lazily, by the functions that run a model).

``trainer``, ``export`` and ``edge_demo`` share these and nothing else of each other
(tests/test_layers.py holds them to it):

* :mod:`dermedge.labels`: the diagnosis labels, the head names, the input name, the signature;
* :mod:`dermedge.image`: the image contract (the reference decode, crop and resize);
* :mod:`dermedge.card`: the typed model card, one builder and one reader;
* :mod:`dermedge.artifacts`: a run directory and an export bundle, read and checked;
* :mod:`dermedge.splits`: ``splits.csv``, one reader and one writer;
* :mod:`dermedge.litert`: the one LiteRT runner (the export validates with it, the demo serves);
* :mod:`dermedge.metrics`, :mod:`dermedge.numerics`: the metrics the export's gates use;
* :mod:`dermedge.files`: atomic writes and the cache folder;
* :mod:`dermedge.cli`: what every command line shares; :mod:`dermedge.errors`: the errors.
"""
