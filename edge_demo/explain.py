"""Optional Grad-CAM heatmaps for the demo: ``edge-demo serve --explain RUN_DIR``.

Grad-CAM needs gradients, so it runs on a ``trainer fit`` run directory's float
``model.keras`` through ``trainer.explain`` (TensorFlow + Keras). Those are imported only
when explanations are enabled; without ``--explain`` the demo never imports them, and a
request with ``?explain=1`` gets a 501 that says how to enable it.
"""

from __future__ import annotations

import base64
import threading
import time
from pathlib import Path
from typing import Any

from dermedge.errors import DermedgeError
from dermedge.labels import HEADS

from .errors import BundleError, EdgeDemoError, RequestError
from .imaging import center_crop_resize

MAX_SIDE = 512  # longest side of the returned overlay PNG
_ON = {"1": "diagnosis", "true": "diagnosis", "yes": "diagnosis", "on": "diagnosis",
       "diagnosis": "diagnosis", "melanoma": "melanoma"}
_OFF = {"", "0", "false", "no", "off"}
NOT_ENABLED = ("Heatmaps are not enabled on this server. Start it with `edge-demo serve ... "
               "--explain RUN_DIR` (a `trainer fit` run directory with model.keras; needs "
               "TensorFlow and Keras: pip install -e .), or leave out ?explain.")


def explain_head(value: str | None) -> str | None:
    """The ``?explain=`` query value -> the head to explain, or None when off."""
    if value is None or value.strip().lower() in _OFF:
        return None
    head = _ON.get(value.strip().lower())
    if head is None:
        raise RequestError(f"explain={value!r} is not understood. Use explain=1 (the diagnosis"
                           " class of the answer), explain=melanoma, or leave it out.",
                           status=400, code="bad_explain")
    return head


class Explainer:
    """Grad-CAM on a run directory's ``model.keras``, loaded once; thread-safe."""

    def __init__(self, run_dir: str | Path):
        path = Path(run_dir).expanduser()
        if not (path / "model.keras").is_file() or not (path / "model_card.json").is_file():
            raise BundleError(f"--explain {path}: not a run directory (needs model.keras and "
                              "model_card.json). Pass the --out folder of a finished `trainer "
                              "fit`; export bundles (.tflite) cannot give Grad-CAM gradients.")
        try:
            from trainer.explain import GradCAM
            from trainer.run import load_run

            try:
                model, card = load_run(path)
                labels = card.diagnosis_labels
                self._gradcam = GradCAM(model, labels, backbone=card.backbone)
            except (DermedgeError, KeyError) as exc:
                raise BundleError(f"--explain {path}: {exc}") from exc
        except ImportError as exc:
            raise EdgeDemoError(
                f"--explain needs TensorFlow, Keras and the dermedge trainer ({exc}): Grad-CAM "
                "runs on the float Keras model. Install them (pip install -e . in the dermedge "
                "checkout), or start the server without --explain.") from exc
        self.run = path.resolve()
        self.name = str(card.name or path.name)
        self.labels = tuple(str(v) for v in labels)
        self.image_size = self._gradcam.size
        self.layer = self._gradcam.layer
        self._lock = threading.Lock()

    def explain(self, image, head: str = "diagnosis", label: str | None = None
                ) -> dict[str, Any]:
        """Heatmap overlay for an upright RGB PIL ``image``; ``label``: the diagnosis class to
        explain (the answer's; the explain model's own top class when it lacks that label)."""
        from trainer.explain import heatmap_on_photo, png_bytes

        x = center_crop_resize(image, self.image_size)[None]
        cls = label if head == "diagnosis" and label in self.labels else None
        t0 = time.perf_counter()
        with self._lock:
            e = self._gradcam(x, head, cls)
        ms = (time.perf_counter() - t0) * 1000.0
        _, picture = heatmap_on_photo(image, e.cams[0], max_side=MAX_SIDE)
        data = base64.b64encode(png_bytes(picture)).decode("ascii")
        return {"head": head, "class": e.classes[0],
                "probability": float(e.probabilities[0]), "layer": e.layer,
                "model": self.name, "width": int(picture.shape[1]),
                "height": int(picture.shape[0]), "gradcam_ms": round(ms, 3),
                "png": "data:image/png;base64," + data}

    def warm_up(self) -> None:
        """Trace both heads' Grad-CAM at start-up, not on the first requests."""
        from PIL import Image

        blank = Image.new("RGB", (self.image_size, self.image_size))
        for head in HEADS:
            self.explain(blank, head)

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "run": self.run.name, "layer": self.layer,
                "image_size": self.image_size, "mode": "keras-gradcam"}
