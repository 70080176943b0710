"""What quantization-aware training shares with ``trainer fit``: the only door from ``export``
into ``trainer``.

QAT fine-tunes the run's model as it was trained, so it reads the run's settings
(``RunConfig``), batches and weights the classes the same way (the image cache and
``CachedDataset``), augments with the same layers and uses the same losses. Everything else
``export`` reads from a run comes from its artifacts (dermedge.artifacts, dermedge.splits).

Loads Keras: import it only where QAT runs (export.qat's worker side and export.qat_worker).
"""

from trainer.config import ConfigError, RunConfig, TrainConfig
from trainer.data import cache_images
from trainer.losses import head_losses
from trainer.model import build_augmenter
from trainer.pipeline import CachedDataset, labels_from_dx, predict_arrays

__all__ = ["CachedDataset", "ConfigError", "RunConfig", "TrainConfig", "build_augmenter",
           "cache_images", "head_losses", "labels_from_dx", "predict_arrays"]
