"""A tier is one loaded export bundle run with the LiteRT interpreter.

The bundle is read and checked by :func:`dermedge.artifacts.read_bundle` (its typed card says
the input contract, docs/ARTIFACTS.md) and run by :class:`dermedge.litert.LiteModel`, the runner
the export validates with: the model takes raw RGB 0-255 pixels named ``image``; integer inputs
are quantized and integer outputs dequantized with the tensor's own scale/zero-point; heads are
read by name.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dermedge.artifacts import TFLITE_FILE, read_bundle
from dermedge.card import CARD_FILE, ModelCard
from dermedge.labels import INPUT_NAME, OOD
from dermedge.litert import LiteModel, dequantize

from .errors import BundleError
from .imaging import RESIZE_MODES, center_crop_resize

MODEL_FILE = TFLITE_FILE


@dataclass(frozen=True)
class TensorContract:
    """One signature tensor: dtype and (scale, zero_point); scale 0 means not quantized."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    scale: float
    zero_point: int

    @classmethod
    def from_io(cls, name: str, spec: dict[str, Any]) -> TensorContract:
        """From a :class:`dermedge.litert.LiteModel` ``io`` entry."""
        q = spec["quantization"]
        return cls(name, np.dtype(spec["dtype"]), tuple(spec["shape"]), float(q["scale"]),
                   int(q["zero_point"]))

    @property
    def quantized(self) -> bool:
        return np.issubdtype(self.dtype, np.integer) and self.scale > 0

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype.name, "shape": list(self.shape),
                "quantization": {"scale": self.scale, "zero_point": self.zero_point}}


def _validation_passed(card: ModelCard) -> bool | None:
    """The export's validation verdict from the card (None when it was not validated)."""
    v = (card.export or {}).get("validation") or {}
    return v.get("passed") if v.get("n") else None


def _check_sha256(card: ModelCard, model_bytes: bytes, path: Path) -> None:
    """The card records the sha256 of the model it describes; another file must not load."""
    want = (card.export or {}).get("sha256")
    if not want:
        return
    got = hashlib.sha256(model_bytes).hexdigest()
    if got != str(want).lower():
        raise BundleError(
            f"{path} does not match its {CARD_FILE}: its sha256 is {got[:12]}... but the card"
            f" records {str(want)[:12]}... (the file was replaced, truncated or edited after"
            " the export). Restore the exported file or re-export the bundle.")


def validation_refusal(flag: str, bundle: Path, card: ModelCard) -> str:
    """Why a bundle whose card says its export validation failed is not served by default."""
    v = (card.export or {}).get("validation") or {}
    failed = v.get("failed") or ["(the card does not list them)"]
    return (f"The {flag} bundle {bundle} failed its export validation against the float model;"
            f" failed gates: {'; '.join(str(f) for f in failed)}. Its answers can differ from"
            " the model that was evaluated. Re-export it (see its validation.md), or start with"
            " --allow-unvalidated to serve it anyway, for comparison only.")


def tier_answer(labels, p_melanoma: float, probs, latency_ms: float) -> dict:
    """The per-tier answer every tier returns: probabilities keyed by label, top class, latency."""
    diagnosis = {lab: float(p) for lab, p in zip(labels, probs, strict=True)}
    top = max(diagnosis, key=diagnosis.__getitem__)
    return {"melanoma": float(p_melanoma), "diagnosis": diagnosis,
            "top": {"label": top, "probability": diagnosis[top]},
            "latency_ms": round(latency_ms, 3)}


class Tier:
    """One export bundle, loaded once; ``predict`` is safe to call from several threads.

    A small pool of runners (one per concurrent caller, ``pool_size``) avoids a global lock:
    LiteRT interpreters are not thread-safe, but separate instances are.
    """

    def __init__(self, name: str, bundle: Path, card: ModelCard, model_bytes: bytes,
                 *, pool_size: int = 1, num_threads: int = 1):
        self.name = name
        self.bundle = bundle
        self.card = card
        self.sha256 = hashlib.sha256(model_bytes).hexdigest()
        self.size_bytes = len(model_bytes)
        self._model_bytes = model_bytes
        self._num_threads = int(num_threads)
        self.signature = str((card.export or {}).get("signature"))
        self.image_size = card.input_size
        self.resize = card.input.resize
        if self.resize not in RESIZE_MODES:
            raise BundleError(
                f"{bundle / CARD_FILE}: input.resize={self.resize!r} is not supported; this"
                f" demo knows {list(RESIZE_MODES)}.")
        self.labels = card.diagnosis_labels
        self.melanoma_threshold = card.melanoma_threshold

        first = self._new_model()
        self.input = TensorContract.from_io(INPUT_NAME, first.io["inputs"][INPUT_NAME])
        self.outputs = {h: TensorContract.from_io(h, first.io["outputs"][h])
                        for h in first.outputs}  # the heads, and ``ood`` when present
        if self.input.shape[1:] != (self.image_size, self.image_size, 3):
            raise BundleError(
                f"{bundle}: the card says input.shape {list(card.input.shape)} but model.tflite"
                f" takes {list(self.input.shape)}; the card does not belong to this model.")
        n_diag = int(np.prod(self.outputs["diagnosis"].shape[1:]))
        if n_diag != len(self.labels):
            raise BundleError(
                f"{bundle}: the diagnosis output has {n_diag} values but the card lists"
                f" {len(self.labels)} labels; the card does not belong to this model.")
        self.mode = str((card.export or {}).get("mode") or self._infer_mode())
        self._pool: queue.Queue = queue.Queue()
        self._pool.put(first)
        for _ in range(max(1, int(pool_size)) - 1):
            self._pool.put(self._new_model())

    @classmethod
    def from_bundle(cls, bundle: str | Path, *, name: str | None = None, pool_size: int = 1,
                    num_threads: int = 1, allow_unvalidated: bool = True,
                    flag: str = "bundle") -> Tier:
        """Load ``bundle`` (a folder written by ``python -m export tflite``); with
        ``allow_unvalidated=False`` a card whose export validation failed is refused first."""
        found = read_bundle(bundle)
        path, card = found.path, found.card
        try:
            model_bytes = found.model_path.read_bytes()
        except OSError as exc:
            raise BundleError(f"Cannot read {found.model_path} ({exc.strerror}). Check the "
                              "file's permissions, or re-export the bundle.") from exc
        _check_sha256(card, model_bytes, found.model_path)
        tier_name = name or found.name
        if _validation_passed(card) is False and not allow_unvalidated:
            raise BundleError(validation_refusal(flag, path, card))
        if _validation_passed(card) is False:
            logging.getLogger("edge_demo").warning(
                "The bundle %s failed its export validation against the float model (see its "
                "validation.md).", path)
        return cls(tier_name, path, card, model_bytes, pool_size=pool_size,
                   num_threads=num_threads)

    def _new_model(self) -> LiteModel:
        return LiteModel.load(self._model_bytes, self._num_threads,
                              name=str(self.bundle / MODEL_FILE))

    def _infer_mode(self) -> str:
        if self.input.quantized or self.outputs["diagnosis"].quantized:
            return "int8"
        return "float32"

    @contextmanager
    def _runner(self) -> Iterator[LiteModel]:
        model = self._pool.get()
        try:
            yield model
        finally:
            self._pool.put(model)

    def prepare(self, image) -> np.ndarray:
        """A decoded RGB PIL image -> the ``(S, S, 3)`` uint8 array the card asks for."""
        return center_crop_resize(image, self.image_size)

    def _feed(self, model: LiteModel, rgb: np.ndarray) -> np.ndarray:
        x = np.asarray(rgb)
        if x.shape != (self.image_size, self.image_size, 3):
            raise ValueError(
                f"{self.name} expects a ({self.image_size}, {self.image_size}, 3) RGB array;"
                f" received shape {x.shape}. Use Tier.prepare() on the decoded image.")
        return model.feed(x[None])

    def _read(self, head: str, value: np.ndarray) -> np.ndarray:
        v = dequantize(np.asarray(value), self.outputs[head].to_dict())
        return np.clip(np.asarray(v, dtype=np.float64).reshape(-1), 0.0, 1.0)

    def predict(self, rgb: np.ndarray) -> dict[str, Any]:
        """``(S, S, 3)`` uint8 -> ``{"melanoma", "diagnosis": {label: p}, "top", "latency_ms"}``."""
        with self._runner() as model:
            feed = self._feed(model, rgb)
            t0 = time.perf_counter()
            out = model.invoke(feed)
            latency = (time.perf_counter() - t0) * 1000.0
        mel = float(self._read("melanoma", out["melanoma"])[0])
        probs = self._read("diagnosis", out["diagnosis"])
        answer = tier_answer(self.labels, mel, probs, latency)
        if self.has_ood:
            answer[OOD] = float(self._read(OOD, out[OOD])[0])
        return answer

    @property
    def has_ood(self) -> bool:
        """Whether the model has the input gate's ``ood`` output."""
        return OOD in self.outputs

    def warm_up(self) -> None:
        """Run every pooled interpreter once so the first request is not the slow one."""
        models = [self._pool.get() for _ in range(self._pool.qsize())]
        try:
            for model in models:
                model.invoke(self._feed(model, np.zeros((self.image_size, self.image_size, 3),
                                                        np.uint8)))
        finally:
            for model in models:
                self._pool.put(model)

    def summary(self) -> dict[str, Any]:
        """Name, version and contract, for responses (no filesystem paths)."""
        return {"name": self.name, "sha256": self.sha256, "mode": self.mode,
                "bundle": self.bundle.name, "image_size": self.image_size,
                "melanoma_threshold": round(self.melanoma_threshold, 4),
                "validation_passed": _validation_passed(self.card),
                "synthetic": self.card.synthetic}

    def describe(self) -> dict[str, Any]:
        """The summary plus the card and tensor contract, for ``GET /api/v1/models``."""
        return {**self.summary(), "size_bytes": self.size_bytes, "signature": self.signature,
                "input": self.input.to_dict(),
                "outputs": {h: c.to_dict() for h, c in self.outputs.items()},
                "labels": list(self.labels), "card": self.card.to_dict()}
