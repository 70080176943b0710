"""Write a .tflite file once more with identical arrays stored once (lossless).

The TFLite converter writes every tensor's quantization parameters as vectors of their own.
Per-channel int8 weights and their int32 biases each carry one int64 zero point per output
channel, all zero for symmetric weights, so a MobileNetV2 file holds 34,000 zero points
(273 KB, 10 % of the file) that are a handful of distinct vectors repeated. FlatBuffers lets
any number of tables point at the same vector (the format's shared-string mechanism, which
the verifier accepts), so this module re-serialises the model with every numeric vector
(zero points, scales, shapes, operator index lists) written once and referenced from each
user. Constant tensor data (the byte buffers) is never shared: two tensors never alias the
same weights, whatever a delegate assumes. Nothing is re-quantized or renamed: every table
and value reads back the same, and :func:`compact` checks that the compacted file gives
bit-identical outputs before it is used.

Constant buffers are aligned to 16 bytes, as the converter writes them (the object-API writer
in ``flatbuffer_utils`` aligns them only to their element size).
"""

from __future__ import annotations

import hashlib

import numpy as np

from export.errors import ExportError

BUFFER_ALIGNMENT = 16
_TFLITE_FILE_IDENTIFIER = b"TFL3"


def _builder_class():
    import flatbuffers

    class SharingBuilder(flatbuffers.Builder):
        """A FlatBuffers builder whose numeric vectors are written once per distinct content."""

        def __init__(self, size: int):
            super().__init__(size)
            self.memo: dict[tuple, int] = {}
            self.vectors = self.shared = 0

        def CreateNumpyVector(self, x):  # noqa: N802 - FlatBuffers' method name
            x = np.ascontiguousarray(x)
            if x.ndim != 1 or x.dtype.kind not in "biuf":
                return super().CreateNumpyVector(x)
            if x.dtype == np.uint8:  # constant tensor data: never aliased between tensors
                return self._bytes(x.tobytes())
            le = x if x.dtype.str[0] in "<|" else x.byteswap().view(x.dtype.newbyteorder("<"))
            payload = le.tobytes()
            key = (le.dtype.str, x.size, hashlib.sha256(payload).digest())
            self.vectors += 1
            if key in self.memo:
                self.shared += 1
                return self.memo[key]
            self.memo[key] = self._write(payload, x.itemsize, x.size, x.dtype.alignment)
            return self.memo[key]

        def _bytes(self, payload: bytes) -> int:
            align = BUFFER_ALIGNMENT if len(payload) >= BUFFER_ALIGNMENT else 1
            return self._write(payload, 1, len(payload), align)

        def _write(self, payload: bytes, itemsize: int, n: int, align: int) -> int:
            self.StartVector(itemsize, n, align)
            self.head -= len(payload)
            self.Bytes[self.head:self.head + len(payload)] = payload
            self.vectorNumElems = n
            return self.EndVector()

    return SharingBuilder


def share_vectors(tflite: bytes) -> tuple[bytes, dict]:
    """``(compacted model bytes, report)``: the same model with identical vectors stored once."""
    from tensorflow.lite.tools import flatbuffer_utils as fbu

    try:
        model = fbu.read_model_from_bytearray(bytearray(tflite))
    except Exception as exc:  # noqa: BLE001 - flatbuffers raises many types on bad bytes
        raise ExportError(f"Cannot read the .tflite flatbuffer to compact it "
                          f"({type(exc).__name__}: {exc}).") from exc
    if any((b.offset or 0) > 1 for b in model.buffers):
        # Models over 2 GB keep buffers after the flatbuffer (offset/size); not rewritten here.
        return tflite, {"size_before": len(tflite), "size_after": len(tflite), "bytes_saved": 0,
                        "vectors": 0, "vectors_shared": 0,
                        "reason": "buffers stored outside the flatbuffer (a model over 2 GB)"}
    builder = _builder_class()(max(1024, len(tflite)))
    builder.Finish(model.Pack(builder), file_identifier=_TFLITE_FILE_IDENTIFIER)
    out = bytes(builder.Output())
    return out, {"size_before": len(tflite), "size_after": len(out),
                 "bytes_saved": len(tflite) - len(out), "vectors": builder.vectors,
                 "vectors_shared": builder.shared}


def same_outputs(a: bytes, b: bytes, images: np.ndarray) -> tuple[bool, str]:
    """Whether two .tflite files give bit-identical outputs (by signature name) on ``images``."""
    from dermedge.litert import LiteModel

    try:
        ma, mb = LiteModel.load(a), LiteModel.load(b)
        ra, rb = ma.predict(images, batch_size=len(images)), mb.predict(images,
                                                                   batch_size=len(images))
    except Exception as exc:  # noqa: BLE001 - a runtime that rejects the file is a "no"
        return False, f"the compacted model does not run ({type(exc).__name__}: {exc})"
    if ma.io != mb.io:
        return False, "the input/output signature (names, dtypes, quantization) differs"
    for name in ra:
        if ra[name].dtype != rb[name].dtype or not np.array_equal(ra[name], rb[name]):
            return False, f"output {name!r} differs"
    return True, "bit-identical outputs"


def compact(tflite: bytes, images: np.ndarray) -> tuple[bytes, dict]:
    """Compact ``tflite`` and keep the result only if it runs bit-identically on ``images``.

    Returns ``(model bytes to ship, report)``; the report's ``applied`` says which was kept.
    """
    out, report = share_vectors(tflite)
    if report["bytes_saved"] <= 0:
        return tflite, {"reason": "nothing to share", **report, "applied": False,
                        "size_after": len(tflite), "bytes_saved": 0}
    ok, why = same_outputs(tflite, out, images)
    report.update(applied=ok, checked_images=int(len(images)), check=why)
    if not ok:  # never ship a file that answers differently; keep the converter's bytes
        return tflite, {**report, "size_after": len(tflite), "bytes_saved": 0}
    return out, report
