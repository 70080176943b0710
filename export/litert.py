"""Running .tflite files and bundles with the LiteRT interpreter. No TensorFlow imports here."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from export.errors import BundleError

SIGNATURE = "serving_default"
INPUT_NAME = "image"
OUTPUT_NAMES: tuple[str, ...] = ("melanoma", "diagnosis")
# Named outputs a model may add (docs/ARTIFACTS.md): the input gate's atypicality score.
OPTIONAL_OUTPUTS: tuple[str, ...] = ("ood",)


def make_interpreter(model: bytes | str | Path, threads: int | None = None):
    from ai_edge_litert.interpreter import Interpreter

    kwargs = {"num_threads": int(threads)} if threads else {}
    try:
        if isinstance(model, (bytes, bytearray)):
            return Interpreter(model_content=bytes(model), **kwargs)
        return Interpreter(model_path=str(model), **kwargs)
    except (ValueError, RuntimeError) as exc:
        where = "the converted model" if isinstance(model, (bytes, bytearray)) else str(model)
        raise BundleError(f"LiteRT cannot load {where} ({exc}). The file is not a valid .tflite "
                          "model; re-export it.") from None


def _io(details: dict) -> dict:
    scale, zero = details.get("quantization", (0.0, 0))
    return {"dtype": np.dtype(details["dtype"]).name,
            "shape": [int(x) for x in details["shape"]],
            "quantization": {"scale": float(scale), "zero_point": int(zero)}}


def signature_io(interpreter) -> dict:
    """``{"inputs": {name: {...}}, "outputs": {name: {...}}}`` of ``serving_default``, by name."""
    sigs = interpreter.get_signature_list()
    if SIGNATURE not in sigs:
        raise BundleError(f"The model has no {SIGNATURE!r} signature (found: {sorted(sigs)}); "
                          "re-export it with `python -m export tflite`.")
    runner = interpreter.get_signature_runner(SIGNATURE)
    return {"inputs": {k: _io(v) for k, v in runner.get_input_details().items()},
            "outputs": {k: _io(v) for k, v in runner.get_output_details().items()}}


def check_signature(io: dict) -> None:
    """Input ``image`` and outputs ``melanoma``/``diagnosis`` (and optionally ``ood``), by name."""
    outs = set(io["outputs"])
    if (set(io["inputs"]) != {INPUT_NAME} or not set(OUTPUT_NAMES) <= outs
            or not outs <= set(OUTPUT_NAMES) | set(OPTIONAL_OUTPUTS)):
        raise BundleError(f"The {SIGNATURE} signature has inputs {sorted(io['inputs'])} and "
                          "outputs "
                          f"{sorted(io['outputs'])}; the contract needs input 'image' and outputs "
                          "'melanoma' and 'diagnosis' (and optionally 'ood').")


def quantize_input(images: np.ndarray, info: dict) -> np.ndarray:
    """Raw RGB 0–255 → the tensor dtype of the ``image`` input."""
    dtype = np.dtype(info["dtype"])
    if dtype == np.float32:
        return images.astype(np.float32)
    scale, zero = info["quantization"]["scale"], info["quantization"]["zero_point"]
    if dtype == np.uint8 and abs(scale - 1.0) < 1e-6 and zero == 0:
        return np.asarray(images, np.uint8)
    lo, hi = np.iinfo(dtype).min, np.iinfo(dtype).max
    q = np.round(np.asarray(images, np.float32) / scale + zero)
    return np.clip(q, lo, hi).astype(dtype)


def dequantize(values: np.ndarray, info: dict) -> np.ndarray:
    """``real = scale * (q - zero_point)`` for integer outputs; float outputs pass through."""
    if np.dtype(info["dtype"]).kind == "f":
        return values.astype(np.float32)
    scale, zero = info["quantization"]["scale"], info["quantization"]["zero_point"]
    return (scale * (values.astype(np.float32) - zero)).astype(np.float32)


@dataclass
class LiteModel:
    """A loaded .tflite model addressed by signature names (never by output index)."""

    interpreter: object
    io: dict = field(default_factory=dict)

    @classmethod
    def load(cls, model: bytes | str | Path, threads: int | None = None) -> LiteModel:
        interp = make_interpreter(model, threads)
        io = signature_io(interp)
        check_signature(io)
        return cls(interp, io)

    def predict(self, images: np.ndarray, batch_size: int = 1) -> dict[str, np.ndarray]:
        """uint8/float RGB 0–255 ``(N, S, S, 3)`` → ``{"melanoma": (N,1), "diagnosis": (N,K)}``
        (and ``"ood": (N,1)`` when the model has the input gate's output)."""
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        size = self.io["inputs"][INPUT_NAME]["shape"][1:]
        if list(images.shape[1:]) != list(size):
            raise ValueError(f"The model takes images of shape {size}; received "
                             f"{list(images.shape[1:])}. Resize with the card's input.resize.")
        runner = self.interpreter.get_signature_runner(SIGNATURE)
        out = {k: [] for k in (*OUTPUT_NAMES, *OPTIONAL_OUTPUTS) if k in self.io["outputs"]}
        for i in range(0, len(images), batch_size):
            x = quantize_input(images[i:i + batch_size], self.io["inputs"][INPUT_NAME])
            res = runner(**{INPUT_NAME: x})
            for k in out:
                out[k].append(dequantize(res[k], self.io["outputs"][k]))
        return {k: (np.concatenate(v) if v else np.zeros((0,), np.float32)) for k, v in out.items()}


@dataclass(frozen=True)
class Bundle:
    """An export bundle on disk (docs/ARTIFACTS.md)."""

    path: Path
    card: dict

    @property
    def model_path(self) -> Path:
        return self.path / "model.tflite"

    @property
    def input_size(self) -> int:
        return int(self.card["input"]["shape"][0])

    @property
    def diagnosis_labels(self) -> tuple[str, ...]:
        return tuple(self.card["heads"]["diagnosis"]["labels"])

    @property
    def melanoma_threshold(self) -> float:
        return float(self.card["heads"]["melanoma"]["threshold"])


def load_bundle(path: str | Path) -> Bundle:
    """Open a bundle folder and check its files are present."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"The bundle {path} does not exist or is not a folder. Pass the --out "
                          "folder of `python -m export tflite`.")
    missing = [f for f in ("model.tflite", "model_card.json", "labels_diagnosis.txt")
               if not (path / f).is_file()]
    if missing:
        raise BundleError(f"The bundle {path} lacks {', '.join(missing)}; re-export it.")
    try:
        card = json.loads((path / "model_card.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path / 'model_card.json'} is not valid JSON ({exc}); "
                          "re-export.") from None
    return Bundle(path.resolve(), card)


def run_tflite(bundle_or_model, images_uint8: np.ndarray, *, batch_size: int = 1,
               threads: int | None = None) -> dict[str, np.ndarray]:
    """Run a bundle, a .tflite path or model bytes on uint8 RGB images; outputs by name."""
    if isinstance(bundle_or_model, LiteModel):
        model = bundle_or_model
    else:
        if isinstance(bundle_or_model, Bundle):
            src = bundle_or_model.model_path
        elif isinstance(bundle_or_model, (str, Path)) and Path(bundle_or_model).is_dir():
            src = load_bundle(bundle_or_model).model_path
        else:
            src = bundle_or_model
        model = LiteModel.load(src, threads)
    return model.predict(images_uint8, batch_size=batch_size)
