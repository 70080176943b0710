"""A tier is one loaded export bundle run with the LiteRT interpreter.

The input contract comes from the bundle's ``model_card.json`` (docs/ARTIFACTS.md): the
model takes raw RGB 0-255 pixels named ``image``; integer inputs are quantized and integer
outputs dequantized with the tensor's own scale/zero-point; heads are read by name.
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

from dermedge.card import read_card

from .errors import BundleError
from .imaging import RESIZE_MODES, center_crop_resize

MODEL_FILE = "model.tflite"
CARD_FILE = "model_card.json"
LABELS_FILE = "labels_diagnosis.txt"
INPUT_NAME = "image"
HEADS: tuple[str, ...] = ("melanoma", "diagnosis")
# Optional named outputs a bundle may add (docs/ARTIFACTS.md): "ood", the input gate's
# atypicality score in [0, 1]; bundles without it load, and the gate then checks quality only.
OPTIONAL_OUTPUTS: tuple[str, ...] = ("ood",)


@dataclass(frozen=True)
class TensorContract:
    """One signature tensor: dtype and (scale, zero_point); scale 0 means not quantized."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    scale: float
    zero_point: int

    @classmethod
    def from_details(cls, name: str, d: dict[str, Any]) -> TensorContract:
        scale, zp = d.get("quantization", (0.0, 0))
        return cls(name, np.dtype(d["dtype"]), tuple(int(x) for x in d["shape"]),
                   float(scale), int(zp))

    @property
    def quantized(self) -> bool:
        return np.issubdtype(self.dtype, np.integer) and self.scale > 0

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype.name, "shape": list(self.shape),
                "quantization": {"scale": self.scale, "zero_point": self.zero_point}}


def _read_card(bundle: Path) -> dict[str, Any]:
    path = bundle / CARD_FILE
    if not path.is_file():
        raise BundleError(
            f"The bundle {bundle} has no {CARD_FILE}. Point to a folder written by"
            " `python -m export tflite` (it holds model.tflite, model_card.json and labels).")
    return read_card(path, error=BundleError).to_dict()  # validated: dermedge.card


def _validation_passed(card: dict[str, Any]) -> bool | None:
    """The export's validation verdict from the card (None when it was not validated)."""
    v = (card.get("export") or {}).get("validation") or {}
    return v.get("passed") if v.get("n") else None


def _check_sha256(card: dict[str, Any], model_bytes: bytes, path: Path) -> None:
    """The card records the sha256 of the model it describes; another file must not load."""
    want = (card.get("export") or {}).get("sha256")
    if not want:
        return
    got = hashlib.sha256(model_bytes).hexdigest()
    if got != str(want).lower():
        raise BundleError(
            f"{path} does not match its {CARD_FILE}: its sha256 is {got[:12]}... but the card"
            f" records {str(want)[:12]}... (the file was replaced, truncated or edited after"
            " the export). Restore the exported file or re-export the bundle.")


def validation_refusal(flag: str, bundle: Path, card: dict[str, Any]) -> str:
    """Why a bundle whose card says its export validation failed is not served by default."""
    v = (card.get("export") or {}).get("validation") or {}
    failed = v.get("failed") or ["(the card does not list them)"]
    return (f"The {flag} bundle {bundle} failed its export validation against the float model;"
            f" failed gates: {'; '.join(str(f) for f in failed)}. Its answers can differ from"
            " the model that was evaluated. Re-export it (see its validation.md), or start with"
            " --allow-unvalidated to serve it anyway, for comparison only.")


def _card_get(card: dict, path: str, where: Path) -> Any:
    node: Any = card
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            raise BundleError(
                f"{where / CARD_FILE} lacks `{path}` (see docs/ARTIFACTS.md for the card"
                " schema); re-export the bundle with the current exporter.")
        node = node[key]
    return node


def tier_answer(labels, p_melanoma: float, probs, latency_ms: float) -> dict:
    """The per-tier answer every tier returns: probabilities keyed by label, top class, latency."""
    diagnosis = {lab: float(p) for lab, p in zip(labels, probs, strict=True)}
    top = max(diagnosis, key=diagnosis.__getitem__)
    return {"melanoma": float(p_melanoma), "diagnosis": diagnosis,
            "top": {"label": top, "probability": diagnosis[top]},
            "latency_ms": round(latency_ms, 3)}


class Tier:
    """One export bundle, loaded once; ``predict`` is safe to call from several threads.

    A small pool of interpreters (one per concurrent caller, ``pool_size``) avoids a global
    lock: LiteRT interpreters are not thread-safe, but separate instances are.
    """

    def __init__(self, name: str, bundle: Path, card: dict[str, Any], model_bytes: bytes,
                 *, pool_size: int = 1, num_threads: int = 1):
        self.name = name
        self.bundle = bundle
        self.card = card
        self.sha256 = hashlib.sha256(model_bytes).hexdigest()
        self.size_bytes = len(model_bytes)
        self._model_bytes = model_bytes
        self._num_threads = int(num_threads)
        self.signature = str(card.get("export", {}).get("signature", "serving_default"))
        shape = _card_get(card, "input.shape", bundle)
        if not (isinstance(shape, list) and len(shape) == 3 and shape[0] == shape[1]):
            raise BundleError(
                f"{bundle / CARD_FILE}: input.shape must be [S, S, 3]; received {shape!r}.")
        self.image_size = int(shape[0])
        self.resize = str(card.get("input", {}).get("resize", "center_crop_resize"))
        if self.resize not in RESIZE_MODES:
            raise BundleError(
                f"{bundle / CARD_FILE}: input.resize={self.resize!r} is not supported; this"
                f" demo knows {list(RESIZE_MODES)}.")
        self.labels = tuple(str(x) for x in _card_get(card, "heads.diagnosis.labels", bundle))
        labels_txt = bundle / LABELS_FILE
        if labels_txt.is_file():
            file_labels = tuple(x.strip() for x in labels_txt.read_text().splitlines()
                                if x.strip())
            if file_labels != self.labels:
                raise BundleError(
                    f"{labels_txt} lists {list(file_labels)} but the card's"
                    f" heads.diagnosis.labels are {list(self.labels)}; re-export the bundle.")
        thr = card.get("heads", {}).get("melanoma", {}).get("threshold")
        self.melanoma_threshold = float(thr) if thr is not None else 0.5

        first = self._new_interpreter()
        runner = first.get_signature_runner(self.signature)
        in_details = runner.get_input_details()
        out_details = runner.get_output_details()
        if INPUT_NAME not in in_details:
            raise BundleError(
                f"{bundle / MODEL_FILE}: signature {self.signature!r} has inputs"
                f" {sorted(in_details)}, not {INPUT_NAME!r}; re-export the bundle.")
        missing = [h for h in HEADS if h not in out_details]
        if missing:
            raise BundleError(
                f"{bundle / MODEL_FILE}: signature {self.signature!r} has outputs"
                f" {sorted(out_details)}; missing {missing}. Outputs must be named"
                " 'melanoma' and 'diagnosis' (docs/ARTIFACTS.md); re-export the bundle.")
        self.input = TensorContract.from_details(INPUT_NAME, in_details[INPUT_NAME])
        self.outputs = {h: TensorContract.from_details(h, out_details[h])
                        for h in (*HEADS, *OPTIONAL_OUTPUTS) if h in out_details}
        if self.input.shape[1:] != (self.image_size, self.image_size, 3):
            raise BundleError(
                f"{bundle}: the card says input.shape {shape} but model.tflite takes"
                f" {list(self.input.shape)}; the card does not belong to this model.")
        n_diag = int(np.prod(self.outputs["diagnosis"].shape[1:]))
        if n_diag != len(self.labels):
            raise BundleError(
                f"{bundle}: the diagnosis output has {n_diag} values but the card lists"
                f" {len(self.labels)} labels; the card does not belong to this model.")
        self.mode = str(card.get("export", {}).get("mode") or self._infer_mode())
        self._pool: queue.Queue = queue.Queue()
        self._pool.put((first, runner))
        for _ in range(max(1, int(pool_size)) - 1):
            it = self._new_interpreter()
            self._pool.put((it, it.get_signature_runner(self.signature)))

    @classmethod
    def from_bundle(cls, bundle: str | Path, *, name: str | None = None, pool_size: int = 1,
                    num_threads: int = 1, allow_unvalidated: bool = True,
                    flag: str = "bundle") -> Tier:
        """Load ``bundle`` (a folder written by ``python -m export tflite``); with
        ``allow_unvalidated=False`` a card whose export validation failed is refused first."""
        path = Path(bundle).expanduser()
        if not path.is_dir():
            hint = " (it is a file; pass the folder that holds it)" if path.is_file() else ""
            raise BundleError(
                f"Bundle folder not found: {path}{hint}. Pass the folder written by"
                " `python -m export tflite`, e.g. --device exports/mnv2-int8.")
        card = _read_card(path)
        model_path = path / MODEL_FILE
        if not model_path.is_file():
            raise BundleError(f"The bundle {path} has no {MODEL_FILE}; re-export it.")
        try:
            model_bytes = model_path.read_bytes()
        except OSError as exc:
            raise BundleError(f"Cannot read {model_path} ({exc.strerror}). Check the file's"
                              " permissions, or re-export the bundle.") from exc
        _check_sha256(card, model_bytes, model_path)
        tier_name = name or str(card.get("name") or path.name)
        if _validation_passed(card) is False and not allow_unvalidated:
            raise BundleError(validation_refusal(flag, path, card))
        if _validation_passed(card) is False:
            logging.getLogger("edge_demo").warning(
                "The bundle %s failed its export validation against the float model (see its "
                "validation.md).", path)
        return cls(tier_name, path.resolve(), card, model_bytes, pool_size=pool_size,
                   num_threads=num_threads)

    def _new_interpreter(self):
        from ai_edge_litert.interpreter import Interpreter

        try:
            it = Interpreter(model_content=self._model_bytes, num_threads=self._num_threads)
            it.allocate_tensors()
            it.get_signature_runner(self.signature)
        except Exception as exc:  # noqa: BLE001 - LiteRT raises ValueError/RuntimeError
            raise BundleError(
                f"LiteRT cannot load {self.bundle / MODEL_FILE} with signature"
                f" {self.signature!r} ({type(exc).__name__}: {exc}). The file is corrupt or"
                " not a TFLite model; re-export the bundle.") from exc
        return it

    def _infer_mode(self) -> str:
        if self.input.quantized or self.outputs["diagnosis"].quantized:
            return "int8"
        return "float32"

    @contextmanager
    def _runner(self) -> Iterator[Any]:
        item = self._pool.get()
        try:
            yield item[1]
        finally:
            self._pool.put(item)

    def prepare(self, image) -> np.ndarray:
        """A decoded RGB PIL image -> the ``(S, S, 3)`` uint8 array the card asks for."""
        return center_crop_resize(image, self.image_size)

    def _feed(self, rgb: np.ndarray) -> np.ndarray:
        x = np.asarray(rgb)
        if x.shape != (self.image_size, self.image_size, 3):
            raise ValueError(
                f"{self.name} expects a ({self.image_size}, {self.image_size}, 3) RGB array;"
                f" received shape {x.shape}. Use Tier.prepare() on the decoded image.")
        spec = self.input
        if (x.dtype == np.uint8 and spec.dtype == np.uint8
                and (not spec.quantized or (spec.scale == 1.0 and spec.zero_point == 0))):
            return x[None]  # camera pixels are already the model's uint8 input
        x = x[None].astype(np.float32)
        if np.issubdtype(spec.dtype, np.integer):
            if spec.quantized:
                x = np.round(x / spec.scale) + spec.zero_point
            info = np.iinfo(spec.dtype)
            return np.clip(x, info.min, info.max).astype(spec.dtype)
        return x.astype(spec.dtype)

    def _read(self, head: str, value: np.ndarray) -> np.ndarray:
        spec = self.outputs[head]
        v = np.asarray(value)
        if np.issubdtype(v.dtype, np.integer):
            v = spec.scale * (v.astype(np.float32) - spec.zero_point) if spec.quantized else v
        return np.clip(np.asarray(v, dtype=np.float64).reshape(-1), 0.0, 1.0)

    def predict(self, rgb: np.ndarray) -> dict[str, Any]:
        """``(S, S, 3)`` uint8 -> ``{"melanoma", "diagnosis": {label: p}, "top", "latency_ms"}``."""
        feed = self._feed(rgb)
        t0 = time.perf_counter()
        with self._runner() as run:
            out = run(**{INPUT_NAME: feed})
        latency = (time.perf_counter() - t0) * 1000.0
        mel = float(self._read("melanoma", out["melanoma"])[0])
        probs = self._read("diagnosis", out["diagnosis"])
        answer = tier_answer(self.labels, mel, probs, latency)
        if self.has_ood:
            answer["ood"] = float(self._read("ood", out["ood"])[0])
        return answer

    @property
    def has_ood(self) -> bool:
        """Whether the model has the input gate's ``ood`` output."""
        return "ood" in self.outputs

    def warm_up(self) -> None:
        """Run every pooled interpreter once so the first request is not the slow one."""
        items = [self._pool.get() for _ in range(self._pool.qsize())]
        try:
            zeros = self._feed(np.zeros((self.image_size, self.image_size, 3), np.uint8))
            for _, run in items:
                run(**{INPUT_NAME: zeros})
        finally:
            for item in items:
                self._pool.put(item)

    def summary(self) -> dict[str, Any]:
        """Name, version and contract, for responses (no filesystem paths)."""
        return {"name": self.name, "sha256": self.sha256, "mode": self.mode,
                "bundle": self.bundle.name, "image_size": self.image_size,
                "melanoma_threshold": round(self.melanoma_threshold, 4),
                "validation_passed": _validation_passed(self.card),
                "synthetic": bool((self.card.get("data") or {}).get("synthetic", False))}

    def describe(self) -> dict[str, Any]:
        """The summary plus the card and tensor contract, for ``GET /api/v1/models``."""
        return {**self.summary(), "size_bytes": self.size_bytes, "signature": self.signature,
                "input": self.input.to_dict(),
                "outputs": {h: c.to_dict() for h, c in self.outputs.items()},
                "labels": list(self.labels), "card": self.card}
