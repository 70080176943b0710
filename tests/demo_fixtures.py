"""Tiny export bundles (32 px) for the edge_demo tests and the load benchmark.

Builds a small Keras 3 functional model with the project's contract (input ``image`` raw
RGB 0-255, outputs ``melanoma`` (1) and ``diagnosis`` (7)) and converts it with the TFLite
converter to float32 and full-int8 (uint8 in/out); the card comes from the real builders
(``dermedge.card.build_card`` + ``with_export``), so it is the one ``python -m export tflite``
writes. Uses TensorFlow, which only tests and benchmarks may import. The bundle made by the
real ``trainer fit`` -> ``python -m export`` chain is conftest.py's ``chain_bundle``.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from dermedge.card import build_card, with_export

LABELS = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
SIZE = 32
THRESHOLD = 0.31


def _model(seed: int):
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input((SIZE, SIZE, 3), name="image", dtype="float32")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inp)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(x)
    x = keras.layers.Conv2D(8, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    diagnosis = keras.layers.Dense(7, activation="softmax", name="diagnosis")(x)
    melanoma = keras.layers.Dense(1, activation="sigmoid", name="melanoma")(x)
    return keras.Model(inp, {"melanoma": melanoma, "diagnosis": diagnosis})


def _convert(model, mode: str) -> bytes:
    import tensorflow as tf

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    if mode == "int8":
        rng = np.random.default_rng(0)

        def representative():
            for _ in range(16):
                yield [rng.uniform(0, 255, (1, SIZE, SIZE, 3)).astype("float32")]

        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = representative
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = tf.uint8
        conv.inference_output_type = tf.uint8
    return conv.convert()


def _details(model_bytes: bytes) -> dict:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=model_bytes)
    sig = it.get_signature_list()["serving_default"]
    if sorted(sig["outputs"]) != ["diagnosis", "melanoma"] or sig["inputs"] != ["image"]:
        raise RuntimeError(f"unexpected TFLite signature {sig}")
    run = it.get_signature_runner("serving_default")

    def spec(d):
        scale, zp = d["quantization"]
        return {"dtype": np.dtype(d["dtype"]).name, "shape": [int(v) for v in d["shape"]],
                "quantization": {"scale": float(scale), "zero_point": int(zp)}}

    return {"inputs": {k: spec(v) for k, v in run.get_input_details().items()},
            "outputs": {k: spec(v) for k, v in run.get_output_details().items()}}


def write_bundle(folder: Path, model_bytes: bytes, mode: str, name: str) -> Path:
    """Write model.tflite + model_card.json + labels the way `python -m export tflite` does."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.tflite").write_bytes(model_bytes)
    (folder / "labels_diagnosis.txt").write_text("\n".join(LABELS) + "\n")
    (folder / "labels_melanoma.txt").write_text("melanoma\n")
    card = with_export(_card(name), {
        "mode": mode, "signature": "serving_default", **_details(model_bytes),
        "size_bytes": len(model_bytes), "sha256": hashlib.sha256(model_bytes).hexdigest()})
    (folder / "model_card.json").write_text(card.to_json())
    return folder


def _card(name: str) -> dict:
    return build_card(
        name=name, created="2026-01-01T00:00:00+00:00", backbone="tiny_test_cnn", weights=None,
        input_size=SIZE, preprocessing={"in_model": True, "mode": "tf",
                                        "formula": "x / 127.5 - 1"},
        melanoma_threshold=THRESHOLD, diagnosis_labels=LABELS,
        data={"source": "synthetic", "layout": "test"}, synthetic=True, config={},
        training={}, metrics_val={}, versions={}).to_dict()


def _card_only(folder: Path, name: str) -> Path:
    card = _card(name)
    (folder / "model_card.json").write_text(json.dumps(card, indent=2))
    return folder


@functools.cache
def tiny_bundles() -> dict[str, Path]:
    """``{"int8": dir, "float32": dir}``, built once per process in a temp folder."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    root = Path(tempfile.mkdtemp(prefix="edge_demo_bundles_"))
    atexit.register(shutil.rmtree, root, True)
    device_model, cloud_model = _model(0), _model(1)
    run = root / "tiny-run"  # a run directory of the cloud model (for the Keras cloud tier)
    run.mkdir()
    cloud_model.save(run / "model.keras")
    (run / "labels.txt").write_text("\n".join(LABELS) + "\n")
    return {
        "keras_run": _card_only(run, "tiny-run"),
        "int8": write_bundle(root / "tiny-int8", _convert(device_model, "int8"), "int8",
                             "tiny-int8"),
        "float32": write_bundle(root / "tiny-float32", _convert(cloud_model, "float32"),
                                "float32", "tiny-float32"),
        # the device model in float: the reference for the int8 (de)quantization checks
        "int8_reference": write_bundle(root / "tiny-int8-ref", _convert(device_model,
                                       "float32"), "float32", "tiny-int8-ref"),
    }


def jpeg_bytes(size=(64, 48), seed: int = 0, mode: str = "RGB", fmt: str = "JPEG",
               **save_kw) -> bytes:
    """A small synthetic photo-like image (a smooth blob on skin tone plus noise)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    blob = np.exp(-(((xx - w / 2) / (w / 4)) ** 2 + ((yy - h / 2) / (h / 4)) ** 2))
    base = np.array([200, 160, 140]) - blob[..., None] * np.array([120, 100, 90])
    arr = np.clip(base + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(arr)
    if mode != "RGB":
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, fmt, **save_kw)
    return buf.getvalue()


META_THRESHOLD = 0.42


def demo_prior() -> dict:
    """Metadata tables (trainer.metadata) where face + 70s + female points to melanoma."""
    import pandas as pd

    from trainer.metadata import fit_prior

    rows = [("nv", 35, "male", "back")] * 30 + [("mel", 75, "female", "face")] * 10 + \
        [("bkl", 65, "male", "face")] * 10 + [("bcc", 70, "male", "scalp")] * 5
    prior = fit_prior(pd.DataFrame(rows, columns=["dx", "age", "sex", "site"]), weight=1.0)
    prior["melanoma_threshold"] = META_THRESHOLD
    return prior


def with_metadata_tables(bundle: Path, dest: Path) -> Path:
    """A copy of ``bundle`` whose card carries :func:`demo_prior`."""
    shutil.copytree(bundle, dest)
    card = json.loads((dest / "model_card.json").read_text())
    card["metadata_prior"] = demo_prior()
    (dest / "model_card.json").write_text(json.dumps(card))
    return dest
