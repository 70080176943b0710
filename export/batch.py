"""Fix a .tflite file's batch dimension to 1: the file a phone or a browser runs.

The converter writes a dynamic batch (``shape_signature`` ``[-1, S, S, 3]``). LiteRT.js refuses
it, and MediaPipe and Android Studio's ML Model Binding expect ``[1, S, S, 3]``. Only the
signature changes: every tensor whose leading dimension is dynamic gets 1, nothing is
re-quantized or renamed, and :func:`fix_batch` checks the rewritten file gives bit-identical
outputs before it is used. The Python runtime still resizes the input for batched validation
(a non-strict resize), so nothing else in the export changes.
"""

from __future__ import annotations

import numpy as np

from export.errors import ExportError

BATCH = 1


def _rewrite(tflite: bytes, batch: int) -> tuple[bytes, int]:
    from tensorflow.lite.tools import flatbuffer_utils as fbu

    try:
        model = fbu.read_model_from_bytearray(bytearray(tflite))
    except Exception as exc:  # noqa: BLE001 - flatbuffers raises many types on bad bytes
        raise ExportError(f"Cannot read the .tflite flatbuffer to fix its batch size "
                          f"({type(exc).__name__}: {exc}).") from exc
    changed = 0
    for subgraph in model.subgraphs:
        for tensor in subgraph.tensors:
            sig = tensor.shapeSignature
            if sig is not None and len(sig) and int(sig[0]) == -1:
                sig = np.array(sig, dtype=np.int32)
                sig[0] = batch
                tensor.shapeSignature = sig
                changed += 1
    if not changed:
        return tflite, 0
    return bytes(fbu.convert_object_to_bytearray(model)), changed


def batch_size(tflite: bytes) -> int | None:
    """The input ``image``'s batch dimension as the signature declares it (None if dynamic)."""
    from dermedge.labels import INPUT_NAME, SIGNATURE
    from dermedge.litert import make_interpreter

    interp = make_interpreter(tflite)
    detail = interp.get_signature_runner(SIGNATURE).get_input_details()[INPUT_NAME]
    sig = detail.get("shape_signature", detail["shape"])
    return None if int(sig[0]) < 0 else int(sig[0])


def fix_batch(tflite: bytes, images: np.ndarray, batch: int = BATCH) -> tuple[bytes, dict]:
    """``(model bytes with batch fixed, report)``; refuses a rewrite that changes any output."""
    from export.compact import same_outputs

    out, changed = _rewrite(tflite, batch)
    report = {"batch": batch, "tensors_changed": changed}
    if changed:
        ok, why = same_outputs(tflite, out, images[:1])
        if not ok:
            raise ExportError(f"Fixing the batch size to {batch} changed the model ({why}). "
                              "This is a bug in dermedge's export: please report it with the "
                              "run's model_card.json.")
    return out, report
