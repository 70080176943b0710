"""Optional cloud tier that runs a trainer run directory's ``model.keras`` directly.

Only for a server where TensorFlow + Keras are installed; Keras is imported lazily when such
a tier is loaded, never by the on-device path. Export the run (``python -m export tflite``)
to serve it without TensorFlow.
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from dermedge.card import CARD_FILE, read_card

from .errors import BundleError
from .imaging import center_crop_resize
from .tiers import tier_answer

KERAS_FILE = "model.keras"


class KerasTier:
    """Same interface as :class:`edge_demo.tiers.Tier` (prepare / predict / summary)."""

    mode = "keras"

    def __init__(self, run_dir: str | Path, *, name: str | None = None):
        path = Path(run_dir).expanduser()
        if not (path / KERAS_FILE).is_file():
            raise BundleError(f"{path} has no {KERAS_FILE}; pass a run directory written by"
                              " `trainer fit`, or an export bundle folder.")
        try:
            import keras
        except ImportError as exc:
            raise BundleError(
                f"The cloud tier {path} is a Keras run directory, which needs TensorFlow and"
                f" Keras ({exc}). Install them (pip install tensorflow-cpu keras), or export the"
                " run with `python -m export tflite RUN` and pass the bundle folder.") from exc
        if not (path / CARD_FILE).is_file():
            raise BundleError(f"{path} has no {CARD_FILE}; pass a run directory written by"
                              " `trainer fit`.")
        card = read_card(path, error=BundleError)  # validated: dermedge.card
        self.card = card
        self.bundle = path.resolve()
        self.name = name or str(card.name or path.name)
        data = (path / KERAS_FILE).read_bytes()
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.size_bytes = len(data)
        self.image_size = card.input_size
        self.labels = card.diagnosis_labels
        self.melanoma_threshold = card.melanoma_threshold
        try:
            self._model = keras.saving.load_model(path / KERAS_FILE, compile=False)
        except Exception as exc:  # noqa: BLE001 - any load failure is a bad run dir
            raise BundleError(f"Keras cannot load {path / KERAS_FILE} ({type(exc).__name__}:"
                              f" {exc}); the run directory is incomplete or corrupt.") from exc
        self._lock = threading.Lock()

    def prepare(self, image) -> np.ndarray:
        return center_crop_resize(image, self.image_size)

    def predict(self, rgb: np.ndarray) -> dict[str, Any]:
        x = np.asarray(rgb, np.float32)[None]
        t0 = time.perf_counter()
        with self._lock:
            out = self._model(x, training=False)
        latency = (time.perf_counter() - t0) * 1000.0
        mel = float(np.asarray(out["melanoma"]).reshape(-1)[0])
        probs = np.asarray(out["diagnosis"], np.float64).reshape(-1)
        return tier_answer(self.labels, mel, probs, latency)

    def warm_up(self) -> None:
        self.predict(np.zeros((self.image_size, self.image_size, 3), np.uint8))

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256, "mode": self.mode,
                "bundle": self.bundle.name, "image_size": self.image_size,
                "melanoma_threshold": self.melanoma_threshold}

    def describe(self) -> dict[str, Any]:
        return {**self.summary(), "size_bytes": self.size_bytes, "labels": list(self.labels),
                "card": self.card}


def load_cloud_tier(path: str | Path, *, pool_size: int = 1, num_threads: int = 1):
    """An export bundle (``model.tflite``) -> Tier; a run directory (``model.keras``) ->
    KerasTier (needs TensorFlow)."""
    from .tiers import MODEL_FILE, Tier

    p = Path(path).expanduser()
    if p.is_dir() and not (p / MODEL_FILE).exists() and (p / KERAS_FILE).is_file():
        return KerasTier(p)
    return Tier.from_bundle(p, pool_size=pool_size, num_threads=num_threads)
