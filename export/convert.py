"""Keras model → .tflite bytes, per quantization mode, with checks that the mode is real."""

from __future__ import annotations

import csv
import io as _io
import math
import re
import shutil
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dermedge.labels import SIGNATURE
from dermedge.litert import check_signature, make_interpreter, signature_io
from export.config import QuantizationConfig
from export.errors import ExportError, QuantizationCheckError

DEBUG_TOP = 10
DEBUG_SAMPLES = 32


@dataclass
class Converted:
    """The converted model plus what was checked about it."""

    tflite: bytes
    mode: str
    io: dict
    checks: dict
    representative_images: int = 0
    debug: dict | None = None
    denylisted: dict = field(default_factory=dict)
    compaction: dict | None = None  # export/compact.py's report, once compacted


def _tf():
    import tensorflow as tf

    return tf


def _representative_gen(images: np.ndarray):
    """float32 0–255 batches of one; the first image pins the input range to exactly [0, 255]."""
    def gen():
        for i, img in enumerate(images):
            x = np.asarray(img, np.float32)[None].copy()
            if i == 0:  # so a uint8 input gets scale 1, zero point 0: camera pixels as they are
                x[0, 0, 0, :] = 0.0
                x[0, 0, -1, :] = 255.0
            yield [x]
    return gen


def export_saved_model(model, directory: Path) -> Path:
    """The Keras model as a SavedModel whose ``serving_default`` returns the named dict."""
    model.export(str(directory), format="tf_saved_model", verbose=False)
    return directory


def _converter(saved_model: Path, config: QuantizationConfig, representative: np.ndarray | None):
    tf = _tf()
    conv = tf.lite.TFLiteConverter.from_saved_model(str(saved_model),
                                                    signature_keys=[SIGNATURE])
    if config.mode == "float16":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.target_spec.supported_types = [tf.float16]
    elif config.mode == "dynamic":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    elif config.mode == "int8":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = _representative_gen(representative)
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = getattr(tf, config.io_dtype)
        conv.inference_output_type = getattr(tf, config.out_dtype)
    return conv


def model_structure(tflite: bytes) -> dict:
    """Op names and tensor names/dtypes of a .tflite model (for checks and --keep-float)."""
    interp = make_interpreter(tflite)
    ops = [o["op_name"] for o in interp._get_ops_details()]  # noqa: SLF001 - no public API
    tensors = [(t["name"], np.dtype(t["dtype"]).name) for t in interp.get_tensor_details()]
    return {"ops": ops, "tensors": tensors}


def inspect_model(tflite: bytes) -> dict:
    """Signature I/O by name, op counts and tensor dtype counts."""
    interp = make_interpreter(tflite)
    io = signature_io(interp)
    check_signature(io)
    st = model_structure(tflite)
    dtypes = Counter(d for _, d in st["tensors"])
    # int32 tensors are biases, shapes and indices; they say nothing about the mode.
    counted = {k: v for k, v in dtypes.items() if k != "int32"}
    total = sum(counted.values()) or 1
    return {"io": io, "ops": dict(Counter(st["ops"])), "tensor_dtypes": dict(dtypes),
            "integer_tensor_fraction": round((counted.get("int8", 0) + counted.get("uint8", 0))
                                             / total, 4),
            "float16_tensors": dtypes.get("float16", 0)}


def verify_mode(tflite: bytes, mode: str, io_dtype: str = "float32",
                out_dtype: str | None = None) -> dict:
    """Raise if the model is not what ``mode`` says (e.g. a dynamic-range model called int8).

    ``io_dtype`` / ``out_dtype``: the int8 model's input / output dtypes (outputs default to the
    input's).
    """
    info = inspect_model(tflite)
    io = info["io"]
    in_dt = {k: v["dtype"] for k, v in io["inputs"].items()}
    out_dt = {k: v["dtype"] for k, v in io["outputs"].items()}
    problems = []
    if mode == "int8":
        want_out = out_dtype or io_dtype
        bad = {k: v for k, v in in_dt.items() if v != io_dtype}
        bad.update({k: v for k, v in out_dt.items() if v != want_out})
        if bad:
            want = io_dtype if want_out == io_dtype else f"{io_dtype} in, {want_out} out"
            problems.append(f"its inputs/outputs should be {want} but are {bad}")
        if info["integer_tensor_fraction"] < 0.5:
            problems.append(f"only {info['integer_tensor_fraction']:.0%} of its non-index tensors "
                            "are integer (a full-integer model has most activations in int8; "
                            "this looks like a dynamic-range or float model)")
        if not any(n in info["ops"] for n in ("CONV_2D", "FULLY_CONNECTED", "DEPTHWISE_CONV_2D")):
            problems.append("it has no quantized compute ops")
    else:
        bad = {k: v for k, v in {**in_dt, **out_dt}.items() if v != "float32"}
        if bad:
            problems.append(f"a {mode} model should have float32 inputs/outputs; found {bad}")
        if mode == "float16" and info["float16_tensors"] == 0:
            problems.append("it holds no float16 weights")
        if mode == "dynamic" and info["tensor_dtypes"].get("int8", 0) == 0:
            problems.append("it holds no int8 weights")
        if mode == "float32" and (info["float16_tensors"] or info["tensor_dtypes"].get("int8")):
            problems.append("it holds quantized weights")
    if problems:
        raise QuantizationCheckError(f"The converted model is not a real {mode} model: "
                                     + "; ".join(problems) + ". Refusing to label it " + mode + ".")
    info["verified_mode"] = mode
    return info


def layer_names(model) -> list[str]:
    """All layer names, nested backbones included."""
    names, stack = [], list(model.layers)
    while stack:
        lay = stack.pop(0)
        names.append(lay.name)
        stack.extend(getattr(lay, "layers", []) or [])
    return names


def _layer_pattern(name: str) -> re.Pattern:
    # SavedModel export renames layer `conv1` to `conv1_1` inside `functional_1/...`.
    return re.compile(r"(^|/)" + re.escape(name) + r"(_\d+)?(/|;|$)")


def resolve_keep_float(keep: tuple[str, ...], float_tflite: bytes, layer_names: list[str]) -> dict:
    """Split ``--keep-float`` names into TFLite op types (``CONV_2D``) and node names."""
    st = model_structure(float_tflite)
    op_types = sorted(set(st["ops"]))
    ops, nodes, unknown = [], [], []
    for item in keep:
        if item in op_types or item.upper() in op_types and item.isupper():
            ops.append(item.upper())
            continue
        pat = _layer_pattern(item)
        hits = [n for n, _ in st["tensors"] if pat.search(n)]
        if hits:
            nodes.extend(hits)
        else:
            unknown.append(item)
    if unknown:
        import difflib

        pool = list(layer_names) + op_types
        hints = {u: difflib.get_close_matches(u, pool, n=3) for u in unknown}
        hint_s = "; ".join(f"{u!r}" + (f" (did you mean {', '.join(map(repr, h))}?)" if h else "")
                           for u, h in hints.items())
        raise ExportError(f"--keep-float names no layer or op of this model: {hint_s}. Give Keras "
                          f"layer names (e.g. {', '.join(layer_names[1:4])}) or TFLite op types "
                          f"({', '.join(op_types)}).")
    return {"ops": sorted(set(ops)), "nodes": sorted(set(nodes))}


def _check_keep_float_io(tflite: bytes, config: QuantizationConfig, deny: dict) -> None:
    io = signature_io(make_interpreter(tflite))
    want = {"inputs": config.io_dtype, "outputs": config.out_dtype}
    stuck = sorted(k for part in ("inputs", "outputs") for k, v in io[part].items()
                   if v["dtype"] != want[part])
    if stuck:
        flag = "--io float32" if "image" in stuck else "--output-io float32"
        raise ExportError(
            f"--keep-float {' '.join(config.keep_float)} leaves {', '.join(stuck)} in float "
            f"(the kept layer reads the model input or writes an output directly), so the "
            f"model cannot have {config.io_dtype} in / {config.out_dtype} out. Pass {flag}, or "
            "keep other layers in float.")


def _debug_report(debugger, top: int = DEBUG_TOP) -> dict:
    buf = _io.StringIO()
    debugger.layer_statistics_dump(buf)
    rows = list(csv.DictReader(_io.StringIO(buf.getvalue())))
    layers = []
    for r in rows:
        try:
            scale = float(r.get("scale") or "nan")
            mse = float(r.get("mean_squared_error") or "nan")
        except ValueError:
            continue
        rmse = math.sqrt(mse) if mse >= 0 else float("nan")
        layers.append({"op": r.get("op_name"), "tensor": r.get("tensor_name"),
                       "rmse": rmse, "scale": scale,
                       "rmse_over_scale": rmse / scale if scale > 0 else float("nan"),
                       "max_abs_error": float(r.get("max_abs_error") or "nan")})
    layers = [x for x in layers if not math.isnan(x["rmse_over_scale"])]
    layers.sort(key=lambda x: -x["rmse_over_scale"])
    return {"metric": "rmse/scale (quantization error in units of the tensor's step; ~0.29 is "
                      "ideal rounding error)",
            "layers_analysed": len(layers), "top": layers[:top]}


def convert_model(model, config: QuantizationConfig, representative: np.ndarray | None = None,
                  *, debug: bool = False, workdir: str | Path | None = None) -> Converted:
    """Convert a Keras model (through a SavedModel) and verify the result's mode and names."""
    tf = _tf()
    if config.mode == "int8" and (representative is None or len(representative) == 0):
        raise ExportError("int8 conversion needs representative images (uint8 (N, S, S, 3)).")
    tmp = Path(tempfile.mkdtemp(prefix="dermedge-sm-", dir=workdir))
    try:
        sm = export_saved_model(model, tmp / "saved_model")
        conv = _converter(sm, config, representative)
        deny: dict = {}
        report = None
        if config.mode == "int8" and (debug or config.keep_float):
            float_tflite = tf.lite.TFLiteConverter.from_saved_model(str(sm)).convert()
            if config.keep_float:
                deny = resolve_keep_float(config.keep_float, float_tflite, layer_names(model))
            n_dbg = min(len(representative), DEBUG_SAMPLES)
            options = tf.lite.experimental.QuantizationDebugOptions(
                denylisted_ops=deny.get("ops") or None, denylisted_nodes=deny.get("nodes") or None)
            with warnings.catch_warnings():
                # The debugger runs tf.lite.Interpreter internally, which warns it is deprecated.
                warnings.filterwarnings("ignore", category=UserWarning,
                                        module=r"tensorflow\.lite\..*")
                debugger = tf.lite.experimental.QuantizationDebugger(
                    converter=conv, debug_dataset=_representative_gen(representative[:n_dbg]),
                    debug_options=options)
                if debug:
                    debugger.run()
                    report = _debug_report(debugger)
            if config.keep_float:
                from tensorflow.lite.python.convert import mlir_quantize
                from tensorflow.lite.python.util import modify_model_io_type

                q = mlir_quantize(debugger.calibrated_model, fully_quantize=False,
                                  denylisted_ops=deny.get("ops") or None,
                                  denylisted_nodes=deny.get("nodes") or None)
                tflite = modify_model_io_type(q, getattr(tf, config.io_dtype),
                                              getattr(tf, config.out_dtype))
                _check_keep_float_io(tflite, config, deny)
            else:
                tflite = _converter(sm, config, representative).convert()
        else:
            tflite = conv.convert()
    except (ExportError, QuantizationCheckError):
        raise
    except Exception as exc:  # noqa: BLE001 - converter failures come in many types
        raise ExportError(f"The TFLite converter failed for mode {config.mode} "
                          f"({type(exc).__name__}: {str(exc)[:500]}).") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    checks = verify_mode(tflite, config.mode, config.io_dtype, config.out_dtype)
    return Converted(tflite=tflite, mode=config.mode, io=checks.pop("io"), checks=checks,
                     representative_images=len(representative) if config.mode == "int8" else 0,
                     debug=report, denylisted=deny)
