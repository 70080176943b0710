"""The one LiteRT runner: a .tflite model addressed by its signature's names, with integer
inputs quantized and integer outputs dequantized by each tensor's own scale and zero point.

The export validates what it wrote through it, ``export bench`` times it, and the demo's tiers
answer requests with it (a pool of :class:`LiteModel`, one per concurrent caller). numpy and the
LiteRT interpreter only: no TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dermedge.artifacts import Bundle, read_bundle
from dermedge.errors import BundleError
from dermedge.labels import HEADS, INPUT_NAME, OPTIONAL_OUTPUTS, SIGNATURE


def make_interpreter(model: bytes | str | Path, threads: int | None = None, *,
                     name: str | None = None, allocate: bool = False):
    """A LiteRT interpreter on a .tflite file or its bytes (``name`` says which in errors);
    ``allocate`` sizes its tensors now, so a broken model fails here, not on first use."""
    from ai_edge_litert.interpreter import Interpreter

    kwargs = {"num_threads": int(threads)} if threads else {}
    try:
        if isinstance(model, (bytes, bytearray)):
            interp = Interpreter(model_content=bytes(model), **kwargs)
        else:
            interp = Interpreter(model_path=str(model), **kwargs)
        if allocate:
            interp.allocate_tensors()
        return interp
    except (ValueError, RuntimeError) as exc:
        where = name or ("the converted model" if isinstance(model, (bytes, bytearray))
                         else str(model))
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
    if (set(io["inputs"]) != {INPUT_NAME} or not set(HEADS) <= outs
            or not outs <= {*HEADS, *OPTIONAL_OUTPUTS}):
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
    if dtype == np.uint8 and ((abs(scale - 1.0) < 1e-6 and zero == 0) or scale == 0):
        return np.asarray(images, np.uint8)
    lo, hi = np.iinfo(dtype).min, np.iinfo(dtype).max
    q = np.asarray(images, np.float32)
    if scale:  # an integer input without quantization parameters takes the pixels as they are
        q = np.round(q / scale + zero)
    return np.clip(q, lo, hi).astype(dtype)


def dequantize(values: np.ndarray, info: dict) -> np.ndarray:
    """``real = scale * (q - zero_point)`` for integer outputs; float outputs pass through."""
    if np.dtype(info["dtype"]).kind == "f":
        return values.astype(np.float32)
    scale, zero = info["quantization"]["scale"], info["quantization"]["zero_point"]
    if not scale:  # not quantized: the integers are the values
        return values.astype(np.float32)
    return (scale * (values.astype(np.float32) - zero)).astype(np.float32)


@dataclass
class LiteModel:
    """A loaded .tflite model addressed by signature names (never by output index). One
    instance is one interpreter: not thread-safe, so concurrent callers each use their own."""

    interpreter: object
    io: dict = field(default_factory=dict)
    runner: object = None  # the signature runner, made once (it is reused for every call)

    @classmethod
    def load(cls, model: bytes | str | Path, threads: int | None = None, *,
             name: str | None = None) -> LiteModel:
        """Load and check the signature (input ``image``, outputs by head name)."""
        interp = make_interpreter(model, threads, name=name, allocate=True)
        io = signature_io(interp)
        check_signature(io)
        return cls(interp, io, interp.get_signature_runner(SIGNATURE))

    @property
    def input_shape(self) -> list[int]:
        return self.io["inputs"][INPUT_NAME]["shape"]

    def feed(self, images: np.ndarray) -> np.ndarray:
        """A batch ``(N, S, S, 3)`` of RGB 0–255 as the input tensor's dtype."""
        return quantize_input(images, self.io["inputs"][INPUT_NAME])

    def invoke(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """One run of the signature on a batch :meth:`feed` prepared; raw outputs by name."""
        return self.runner(**{INPUT_NAME: x})

    @property
    def outputs(self) -> tuple[str, ...]:
        """The model's output names: the heads, then the optional ones it has (``ood``)."""
        return tuple(k for k in (*HEADS, *OPTIONAL_OUTPUTS) if k in self.io["outputs"])

    def read(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The raw outputs of :meth:`invoke` dequantized, by output name."""
        return {k: dequantize(raw[k], self.io["outputs"][k]) for k in self.outputs}

    def predict(self, images: np.ndarray, batch_size: int = 1) -> dict[str, np.ndarray]:
        """uint8/float RGB 0–255 ``(N, S, S, 3)`` → ``{"melanoma": (N,1), "diagnosis": (N,K)}``
        (and ``"ood": (N,1)`` when the model has the input gate's output)."""
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        size = self.input_shape[1:]
        if list(images.shape[1:]) != list(size):
            raise ValueError(f"The model takes images of shape {size}; received "
                             f"{list(images.shape[1:])}. Resize with the card's input.resize.")
        out = {k: [] for k in self.outputs}
        for i in range(0, len(images), batch_size):
            res = self.read(self.invoke(self.feed(images[i:i + batch_size])))
            for k in out:
                out[k].append(res[k])
        return {k: (np.concatenate(v) if v else np.zeros((0,), np.float32)) for k, v in out.items()}


def run_tflite(bundle_or_model, images_uint8: np.ndarray, *, batch_size: int = 1,
               threads: int | None = None) -> dict[str, np.ndarray]:
    """Run a bundle, a .tflite path or model bytes on uint8 RGB images; outputs by name."""
    if isinstance(bundle_or_model, LiteModel):
        model = bundle_or_model
    else:
        if isinstance(bundle_or_model, Bundle):
            src = bundle_or_model.model_path
        elif isinstance(bundle_or_model, (str, Path)) and Path(bundle_or_model).is_dir():
            src = read_bundle(bundle_or_model).model_path
        else:
            src = bundle_or_model
        model = LiteModel.load(src, threads)
    return model.predict(images_uint8, batch_size=batch_size)
