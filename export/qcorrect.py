"""Bias correction on the converted int8 model itself (second stage of ``--bias-correction``).

export/biascorr.py corrects the mean shift that *weight* rounding causes, on the Keras model,
before conversion. What it cannot see is the shift added by *activation* quantization (every
tensor rounded to its int8 step and clipped to its calibrated range), which accumulates through
the network. This stage measures it where it happens: it runs the converted int8 model and the
float32 TFLite model of the same network on calibration images, and, layer by layer in
execution order, moves each conv's per-channel output-mean error into that conv's int32 bias
(empirical bias correction, Nagel et al. 2019, applied to the fully quantized model). Each
layer is measured after the layers before it were corrected, so errors do not compound.

Only integers change: ``bias_q += round(-error / bias_scale)`` per output channel, where
``bias_scale = input_scale * weight_scale`` is the bias tensor's own quantization scale; no
scale, zero point, weight or op changes, so the file stays the same model to every runtime.
Layers are matched between the two models by output tensor name (the converter gives the int8
op the float op's name); a layer without a match, without an int32 bias or left in float
(``--keep-float``) is skipped and listed.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from export.errors import ExportError

OPS = ("CONV_2D", "DEPTHWISE_CONV_2D")
BATCH = 8  # images per invoke: every intermediate tensor is kept, so memory grows with it


def _interpreter(model: bytes, batch: int):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    # No delegate: XNNPACK fuses ops and never writes the intermediate tensors back.
    it = Interpreter(model_content=bytes(model), experimental_preserve_all_tensors=True,
                     experimental_op_resolver_type=OpResolverType.
                     BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    d = it.get_input_details()[0]
    it.resize_tensor_input(d["index"], [batch, *d["shape"][1:]])
    it.allocate_tensors()
    return it, d


def channel_means(model: bytes, images: np.ndarray, names: list[str],
                  batch: int = BATCH) -> dict[str, np.ndarray]:
    """Per-channel mean of each named tensor (dequantized) over ``images`` (uint8 NHWC)."""
    it, d = _interpreter(model, batch)
    tensors = {t["name"]: t for t in it.get_tensor_details()}
    total = {n: 0.0 for n in names}
    count = dict.fromkeys(names, 0)
    n_full = len(images) - len(images) % batch
    for s in range(0, n_full, batch):
        it.set_tensor(d["index"], np.asarray(images[s:s + batch]).astype(d["dtype"]))
        it.invoke()
        for n in names:
            t = tensors[n]
            v = it.get_tensor(t["index"]).astype(np.float64)
            scale, zero = t["quantization"]
            if np.issubdtype(t["dtype"], np.integer) and scale > 0:
                v = scale * (v - zero)
            v = v.reshape(-1, v.shape[-1])
            total[n] = total[n] + v.sum(axis=0)
            count[n] += v.shape[0]
    return {n: total[n] / max(1, count[n]) for n in names}


def correct_quantized_biases(int8_model: bytes, float_model: bytes, images: np.ndarray, *,
                             batch: int = BATCH,
                             log: Callable[[str], None] | None = None) -> tuple[bytes, dict]:
    """``(corrected int8 model bytes, report)``; see the module docstring."""
    from ai_edge_litert.interpreter import Interpreter
    from tensorflow.lite.tools import flatbuffer_utils as fbu

    t0 = time.perf_counter()
    images = np.asarray(images)
    batch = max(1, min(int(batch), len(images)))
    if len(images) == 0:
        raise ExportError("Quantized-model bias correction needs calibration images.")
    q = Interpreter(model_content=bytes(int8_model))
    f = Interpreter(model_content=bytes(float_model))
    qt = {t["index"]: t for t in q.get_tensor_details()}
    float_names = {t["name"] for t in f.get_tensor_details()}
    model = fbu.read_model_from_bytearray(bytearray(int8_model))
    if len(model.subgraphs) != 1:
        raise ExportError("Quantized-model bias correction expects a single-subgraph model.")
    sg = model.subgraphs[0]
    buffer_users: dict[int, int] = {}
    for t in sg.tensors:
        buffer_users[t.buffer] = buffer_users.get(t.buffer, 0) + 1

    layers, skipped = [], {}
    for op in q._get_ops_details():  # noqa: SLF001 - op list in execution order; no public API
        if op["op_name"] not in OPS:
            continue
        out = qt[int(op["outputs"][0])]
        name = out["name"]
        bias_idx = int(op["inputs"][2]) if len(op["inputs"]) > 2 else -1
        why = None
        if not np.issubdtype(out["dtype"], np.integer):
            why = "kept in float"
        elif name not in float_names:
            why = "no tensor of this name in the float model"
        elif bias_idx < 0 or qt[bias_idx]["dtype"] != np.int32:
            why = "no int32 bias"
        elif buffer_users.get(sg.tensors[bias_idx].buffer, 0) != 1:
            why = "bias buffer shared with another tensor"
        if why:
            skipped[name] = why
        else:
            layers.append((name, bias_idx))
    if not layers:
        raise ExportError("Quantized-model bias correction found no int8 conv layer to correct.")

    target = channel_means(float_model, images, [n for n, _ in layers], batch)
    current = bytes(int8_model)
    before, changed = [], []
    for k, (name, bias_idx) in enumerate(layers):
        got = channel_means(current, images, [name], batch)[name]
        err = got - target[name]
        bt = sg.tensors[bias_idx]
        scale = np.broadcast_to(np.asarray(bt.quantization.scale, dtype=np.float64), err.shape)
        buf = model.buffers[bt.buffer]
        bias = np.frombuffer(bytes(bytearray(buf.data)), dtype=np.int32).astype(np.int64)
        step = np.round(-err / scale).astype(np.int64)
        new = np.clip(bias + step, np.iinfo(np.int32).min, np.iinfo(np.int32).max)
        buf.data = np.frombuffer(new.astype(np.int32).tobytes(), dtype=np.uint8)
        before.append(float(np.abs(err).mean() / (np.abs(target[name]).mean() + 1e-12)))
        changed.append(int(np.count_nonzero(step)))
        current = bytes(fbu.convert_object_to_bytearray(model))
        if log and (k + 1) % 10 == 0:
            log(f"int8 bias correction: {k + 1}/{len(layers)} layers")
    report = {"stage": "quantized_model", "images": int(len(images) - len(images) % batch),
              "layers_corrected": len(layers), "layers_skipped": skipped,
              "relative_mean_error_before": {"median": float(np.median(before)),
                                             "max": float(np.max(before))},
              "biases_changed": int(sum(changed)),
              "seconds": round(time.perf_counter() - t0, 1)}
    return current, report
