"""export/qcorrect.py: bias correction measured on the converted int8 model itself."""

from __future__ import annotations

import numpy as np
import pytest
from export_fixtures import smooth_images

from export.config import QuantizationConfig
from export.errors import ExportError


@pytest.fixture(scope="module")
def converted():
    import keras

    from export.convert import convert_model
    from trainer.model import build_model

    keras.utils.set_random_seed(3)
    model = build_model("tiny_cnn", input_size=32, weights=None)
    images = smooth_images(64)
    q = convert_model(model, QuantizationConfig.int8(32), images[:32]).tflite
    f = convert_model(model, QuantizationConfig.float32()).tflite
    return q, f, images


def _errors(q: bytes, f: bytes, images, names) -> np.ndarray:
    from export.qcorrect import channel_means

    got, want = channel_means(q, images, names), channel_means(f, images, names)
    return np.array([np.abs(got[n] - want[n]).mean() for n in names])


def _data(buffer) -> bytes:
    return b"" if buffer.data is None else bytes(bytearray(buffer.data))


def _scales(tensor) -> list:
    qp = tensor.quantization
    return [] if qp is None or qp.scale is None else list(qp.scale)


def test_correction_shrinks_each_conv_mean_error_and_only_touches_biases(converted):
    from tensorflow.lite.tools import flatbuffer_utils as fbu

    from export.convert import verify_mode
    from export.qcorrect import correct_quantized_biases

    q, f, images = converted
    fixed, report = correct_quantized_biases(q, f, images[:32], batch=8)
    assert report["layers_corrected"] >= 2 and report["biases_changed"] > 0
    assert report["images"] == 32
    verify_mode(fixed, "int8", "uint8")  # still a real int8 model with uint8 I/O

    before_m, after_m = (fbu.read_model_from_bytearray(bytearray(b)) for b in (q, fixed))
    changed = []
    for i, (tb, ta) in enumerate(zip(before_m.subgraphs[0].tensors,
                                     after_m.subgraphs[0].tensors, strict=True)):
        assert _scales(tb) == _scales(ta)
        da = _data(after_m.buffers[ta.buffer])
        db = _data(before_m.buffers[tb.buffer])
        if da != db:
            changed.append(i)
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=q)
    biases = {int(o["inputs"][2]) for o in it._get_ops_details()  # noqa: SLF001
              if o["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D")}
    assert changed and set(changed) <= biases  # weights, scales and other tensors untouched

    td = {t["index"]: t["name"] for t in it.get_tensor_details()}
    names = [td[int(o["outputs"][0])] for o in it._get_ops_details()  # noqa: SLF001
             if o["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D")]
    held_out = images[32:]  # the correction must generalise beyond its own images
    before, after = _errors(q, f, held_out, names), _errors(fixed, f, held_out, names)
    assert after.sum() < 0.8 * before.sum(), (before, after)


def test_correction_refuses_models_without_int8_convs(converted):
    from export.qcorrect import correct_quantized_biases

    _, f, images = converted
    with pytest.raises(ExportError, match="no int8 conv layer"):
        correct_quantized_biases(f, f, images[:16], batch=8)
    with pytest.raises(ExportError, match="needs calibration images"):
        correct_quantized_biases(converted[0], f, images[:0])
