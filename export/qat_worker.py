"""The QAT step, run by :mod:`export.qat` in the QAT interpreter:
``python -m export.qat_worker DIR``.

Importing tfmot sets ``TF_USE_LEGACY_KERAS=1``, so this runs in its own process. It rebuilds the
run's model flat in tf-keras from ``DIR/graph.json`` + ``weights.npz`` (checked against the
Keras 3 outputs in ``probe.npz``), inserts fake quantization (tfmot's default 8-bit scheme, with
depthwise kernels made per-channel as TFLite quantizes them), calibrates the ranges on the
representative images as post-training int8 does, fine-tunes on the train split with the
run's augmentation (``trainer.model.build_augmenter``, Keras 3, on numpy batches) and class
weights (``trainer.pipeline.CachedDataset``), converts with the same converter settings as
post-training int8 (``export.convert._converter``) and writes ``DIR/model.tflite`` and
``DIR/result.json``. Progress lines go to stdout; on a known failure ``result.json`` holds
``{"ok": false, "kind", "error"}``.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

from dermedge.files import write_bytes, write_json
from dermedge.labels import HEADS, INPUT_NAME, SIGNATURE

NEEDS = ("tensorflow", "tf_keras", "tensorflow_model_optimization", "keras", "pandas", "PIL")
CALIBRATION_BATCH = 16
BASE_LAYER_KWARGS = frozenset({"name", "trainable", "dtype"})


class WorkerError(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def say(msg: str) -> None:
    print(f"qat: {msg}", flush=True)


def _write(work: Path, result: dict) -> None:
    write_json(work / "result.json", result, default=float, allow_nan=True)


# ----------------------------------------------------------------------------- rebuild
def _policy_name(dtype) -> str:
    if isinstance(dtype, dict):
        dtype = (dtype.get("config") or {}).get("name", "float32")
    return "float32" if dtype in (None, "mixed_float16", "mixed_bfloat16") else str(dtype)


def make_layer(tfk, class_name: str, config: dict):
    """The tf-keras layer of the same class from a Keras 3 config; returns (layer, dropped keys).

    Initializers are dropped (the weights are copied afterwards); keys tf-keras does not know
    (e.g. Keras 3's ``lora_rank``) are dropped, reported when set to anything but a default-like
    value, and the output check catches any that mattered.
    """
    cls = getattr(tfk.layers, class_name, None)
    if cls is None:
        raise WorkerError("unsupported", f"tf-keras has no layer class {class_name!r}.")
    params = set(BASE_LAYER_KWARGS)
    for klass in cls.__mro__:  # e.g. BatchNormalization passes `renorm` on to its base class
        if "__init__" in vars(klass):
            params |= set(inspect.signature(klass.__init__).parameters) - {"self", "kwargs"}
    cfg, dropped = {}, []
    for k, v in config.items():
        if k == "dtype":
            cfg[k] = _policy_name(v)
        elif k.endswith("_initializer"):
            continue
        elif k not in params:
            if v not in (None, False, 0, [], {}):
                dropped.append(k)
        else:
            cfg[k] = v
    return cls(**cfg), dropped


def rebuild(tfk, spec: dict, weights) -> tuple:
    """The flat tf-keras functional model of ``spec`` with the weights copied by layer name."""
    tensors: dict = {}
    dropped: dict[str, list[str]] = {}
    built = []

    def resolve(obj):
        if isinstance(obj, dict) and "ref" in obj:
            return tensors[obj["ref"]]
        if isinstance(obj, list):
            return [resolve(o) for o in obj]
        return obj

    for node in spec["layers"]:
        name, cls, cfg = node["name"], node["class_name"], node["config"]
        if cls == "InputLayer":
            shape = cfg.get("batch_shape") or cfg.get("batch_input_shape")
            tensors[name] = tfk.Input(shape=tuple(shape[1:]), name=name,
                                      dtype=_policy_name(cfg.get("dtype")))
            continue
        try:
            layer, gone = make_layer(tfk, cls, cfg)
        except (TypeError, ValueError) as exc:
            raise WorkerError("rebuild", f"tf-keras cannot build layer {name!r} ({cls}) from its "
                              f"Keras 3 config: {exc}") from None
        for k in gone:
            dropped.setdefault(k, []).append(name)
        tensors[name] = layer(*resolve(node["args"]))
        built.append(layer)
    inputs = [tensors[n] for n in spec["inputs"]]
    outputs = {k: tensors[v] for k, v in spec["outputs"].items()}
    model = tfk.Model(inputs[0] if len(inputs) == 1 else inputs, outputs, name="dermedge_qat")
    for layer in built:
        n = len(layer.weights)
        arrays = [weights[f"{layer.name}/{i:02d}"] for i in range(n)
                  if f"{layer.name}/{i:02d}" in weights]
        if len(arrays) != n:
            raise WorkerError("rebuild", f"Layer {layer.name!r} has {n} weights in tf-keras but "
                              f"{len(arrays)} were saved from the Keras 3 model.")
        if n:
            try:
                layer.set_weights(arrays)
            except ValueError as exc:
                raise WorkerError("rebuild", f"The weights of layer {layer.name!r} do not fit its "
                                  f"tf-keras rebuild: {exc}") from None
    return model, dropped


def max_head_diff(outputs, reference) -> float:
    return max(float(np.max(np.abs(np.asarray(outputs[k]) - reference[k]))) for k in HEADS)


# ----------------------------------------------------------------------------- quantize
def quantize(tfk, tfmot, model):
    """tfmot's default 8-bit QAT model; Rescaling gets an output-only quantize config."""
    Q = tfmot.quantization.keras

    class OutputQuantizeConfig(Q.QuantizeConfig):
        """No weights to quantize; fake-quantize the output (what TFLite does for MUL/ADD)."""

        def get_weights_and_quantizers(self, layer):
            return []

        def get_activations_and_quantizers(self, layer):
            return []

        def set_quantize_weights(self, layer, quantize_weights):
            pass

        def set_quantize_activations(self, layer, quantize_activations):
            pass

        def get_output_quantizers(self, layer):
            return [Q.quantizers.MovingAverageQuantizer(num_bits=8, per_axis=False,
                                                        symmetric=False, narrow_range=False)]

        def get_config(self):
            return {}

    def annotate(layer):
        if isinstance(layer, tfk.layers.InputLayer):
            return layer
        if isinstance(layer, tfk.layers.Rescaling):
            return Q.quantize_annotate_layer(layer, quantize_config=OutputQuantizeConfig())
        return Q.quantize_annotate_layer(layer)

    annotated = tfk.models.clone_model(model, clone_function=annotate)
    try:
        with Q.quantize_scope({"OutputQuantizeConfig": OutputQuantizeConfig}):
            return Q.quantize_apply(annotated)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise WorkerError("unsupported", "tensorflow-model-optimization cannot quantize this "
                          f"model: {str(exc)[:400]}") from None


def _inner(layer):
    return getattr(layer, "layer", layer)  # a QuantizeWrapper's wrapped layer


def per_channel_depthwise(tf, tfk, tfmot, qmodel) -> int:
    """Quantize DepthwiseConv2D kernels per output channel, as TFLite (and PTQ) does.

    tfmot 0.8 takes the kernel's last axis as the channel axis, which for a depthwise kernel
    ``(kh, kw, C, multiplier)`` is the multiplier: every channel then shares one range
    (tensorflow/model-optimization#808), and the int8 model loses most of the resolution of
    its depthwise weights. Viewing the kernel as ``(kh, kw, 1, C·multiplier)`` (same memory
    order) gives each output channel its own range; returns how many layers were changed.
    """
    from tensorflow_model_optimization.python.core.quantization.keras import quant_ops

    Q = tfmot.quantization.keras

    class DepthwiseKernelQuantizer(Q.quantizers.Quantizer):
        def build(self, tensor_shape, name, layer):
            n = int(np.prod(tensor_shape[2:]))
            return {k: layer.add_weight(f"{name}_per_channel_{k[:3]}", shape=(n,),
                                        initializer=tfk.initializers.Constant(v),
                                        trainable=False)
                    for k, v in (("min_var", -6.0), ("max_var", 6.0))}

        def __call__(self, inputs, training, weights, **kwargs):
            shape = tf.shape(inputs)
            x = tf.reshape(inputs, [shape[0], shape[1], 1, -1])
            q = quant_ops.LastValueQuantize(x, weights["min_var"], weights["max_var"],
                                            per_channel=True, is_training=training, num_bits=8,
                                            narrow_range=True, symmetric=True)
            return tf.reshape(q, shape)

        def get_config(self):
            return {}

    changed = 0
    for layer in qmodel.layers:
        if not isinstance(_inner(layer), tfk.layers.DepthwiseConv2D):
            continue
        swapped = []
        for weight, _quantizer, _vars in layer._weight_vars:  # noqa: SLF001 - no public hook
            q = DepthwiseKernelQuantizer()
            swapped.append((weight, q, q.build(weight.shape, "depthwise_kernel", layer)))
        layer._weight_vars = swapped  # noqa: SLF001
        changed += 1
    return changed


def freeze(tfk, qmodel) -> list[str]:
    """BatchNorm in inference mode (as TFLite folds it) and the preprocessing layers frozen."""
    frozen = []
    for layer in qmodel.layers:
        inner = _inner(layer)
        if isinstance(inner, tfk.layers.BatchNormalization) or \
                inner.name.startswith("preprocess_"):
            layer.trainable = False
            frozen.append(inner.name)
    return frozen


def _range_vars(qmodel):
    return [v for v in qmodel.variables if re.search(r"_(min|max)$", v.name.split(":")[0])]


def _input_quantizer(qmodel):
    layer = next((lay for lay in qmodel.layers if type(lay).__name__ == "QuantizeLayer"), None)
    if layer is None:
        raise WorkerError("unsupported", "The QAT model has no input QuantizeLayer.")
    lo = [v for v in layer.weights if v.name.split(":")[0].endswith("_min")]
    hi = [v for v in layer.weights if v.name.split(":")[0].endswith("_max")]
    return lo[0], hi[0]


def pin_input_range(qmodel) -> None:
    """Input range exactly [0, 255]: a uint8 input then has scale 1, zero point 0 (raw pixels)."""
    lo, hi = _input_quantizer(qmodel)
    lo.assign(0.0)
    hi.assign(255.0)


def calibrate(tf, tfk, qmodel, images: np.ndarray) -> None:
    """Activation ranges = min/max over the representative images (what post-training int8's
    calibrator does), instead of tfmot's EMA from [-6, 6] that a few epochs cannot move."""
    from tensorflow_model_optimization.python.core.quantization.keras import quant_ops

    for v in _range_vars(qmodel):
        v.assign(tf.zeros_like(v))
    original = quant_ops.MovingAvgQuantize

    def all_values(inputs, min_var, max_var, per_channel=False, ema_decay=0.999,
                   name_prefix="MovingAvgQuantize", is_training=True, num_bits=8,
                   narrow_range=False, symmetric=False):
        if per_channel or not is_training:
            return original(inputs, min_var, max_var, per_channel=per_channel,
                            ema_decay=ema_decay, name_prefix=name_prefix,
                            is_training=is_training, num_bits=num_bits,
                            narrow_range=narrow_range, symmetric=symmetric)
        return quant_ops.AllValuesQuantize(inputs, min_var, max_var, is_training=True,
                                           num_bits=num_bits, narrow_range=narrow_range,
                                           symmetric=symmetric)

    dropouts = [_inner(lay) for lay in qmodel.layers
                if isinstance(_inner(lay), tfk.layers.Dropout)]
    rates = [d.rate for d in dropouts]
    quant_ops.MovingAvgQuantize = all_values
    try:
        for d in dropouts:
            d.rate = 0.0
        for i in range(0, len(images), CALIBRATION_BATCH):
            qmodel(np.asarray(images[i:i + CALIBRATION_BATCH], np.float32), training=True)
    finally:
        quant_ops.MovingAvgQuantize = original
        for d, r in zip(dropouts, rates, strict=True):
            d.rate = r
    pin_input_range(qmodel)


# ----------------------------------------------------------------------------- train
def _optimizer(tfk, job: dict):
    lr, wd = job["lr"], job.get("weight_decay") or None
    if job.get("optimizer") == "sgd":
        return tfk.optimizers.SGD(learning_rate=lr, momentum=0.9, nesterov=True, weight_decay=wd)
    if wd:
        return tfk.optimizers.AdamW(learning_rate=lr, weight_decay=wd)
    return tfk.optimizers.Adam(learning_rate=lr)


def train(tfk, qmodel, job: dict, teacher=None) -> tuple[list[dict], int]:
    """The fit loop: CachedDataset batches (class weights/resampling), Keras 3 augmenter.

    With a ``teacher`` (the float model) the targets are its outputs on the same augmented
    batch (distillation: QAT then learns to answer like the float model); otherwise the labels.
    """
    import keras

    from export.training import CachedDataset, build_augmenter

    keras.utils.set_random_seed(int(job["seed"]))
    images = np.load(job["train_images"], mmap_mode="r")
    labels = np.load(Path(job["work"]) / "labels.npy")
    data = CachedDataset(images, labels, batch_size=job["batch_size"], shuffle=True,
                         balance=job["class_balance"], weight_method=job["class_weight_method"],
                         resample_cap=job["resample_cap"], seed=int(job["seed"]),
                         steps_per_epoch=job["steps_per_epoch"])
    augmenter = (build_augmenter(**job["augment"], seed=int(job["seed"]))
                 if job.get("augment") else None)
    if teacher is not None:  # soft targets: cross-entropy to the float model's probabilities
        loss = {"melanoma": tfk.losses.BinaryCrossentropy(),
                "diagnosis": tfk.losses.CategoricalCrossentropy()}
    elif job["class_balance"] == "logit_adjust":  # the run's logit-adjusted losses (keras.ops)
        from export.training import TrainConfig, head_losses

        loss = head_losses(TrainConfig(class_balance="logit_adjust",
                                  logit_adjust_tau=job["logit_adjust_tau"],
                                  label_smoothing=job["label_smoothing"]), labels)
    else:
        loss = {"melanoma": tfk.losses.BinaryCrossentropy(),
                "diagnosis": tfk.losses.CategoricalCrossentropy(
                    label_smoothing=job["label_smoothing"])}
    qmodel.compile(optimizer=_optimizer(tfk, job), loss=loss,
                   loss_weights=dict(job["loss_weights"]))
    history = []
    for epoch in range(job["epochs"]):
        t0, sums = time.perf_counter(), {}
        for i in range(len(data)):
            x, y, w = data[i]
            if augmenter is not None:
                x = np.asarray(augmenter(x, training=True), np.float32)
            if teacher is not None:
                y = {k: np.asarray(v) for k, v in teacher(x, training=False).items()
                     if k in HEADS}
            logs = qmodel.train_on_batch(x, y, sample_weight=w, return_dict=True)
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        data.on_epoch_end()
        row = {"epoch": epoch + 1, "steps": len(data),
               **{k.replace("quant_", ""): v / len(data) for k, v in sums.items()},
               "seconds": round(time.perf_counter() - t0, 1)}
        history.append(row)
        say(f"epoch {epoch + 1}/{job['epochs']}: loss {row.get('loss', float('nan')):.4f} "
            f"({len(data)} steps, {row['seconds']:.0f} s)")
    return history, len(data)


# ----------------------------------------------------------------------------- convert
def convert(tf, qmodel, job: dict, representative: np.ndarray, work: Path) -> bytes:
    """SavedModel with a ``serving_default`` of input ``image`` and outputs by name, then the
    same converter settings as post-training int8."""
    from export.config import QuantizationConfig
    from export.convert import _converter

    size = int(job["input_size"])

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32,
                                                name=INPUT_NAME)])
    def serve(image):
        out = qmodel(image, training=False)
        return {k: out[k] for k in HEADS}

    sm = work / "saved_model"
    tf.saved_model.save(qmodel, str(sm), signatures={SIGNATURE: serve})
    config = QuantizationConfig.int8(len(representative), io_dtype=job["io_dtype"],
                                     output_dtype=job.get("output_dtype"))
    try:
        return _converter(sm, config, representative).convert()
    except Exception as exc:  # noqa: BLE001 - converter failures come in many types
        raise WorkerError("convert", f"The TFLite converter failed on the QAT model "
                          f"({type(exc).__name__}: {str(exc)[:400]}).") from None


# ----------------------------------------------------------------------------- main
def run(work: Path) -> dict:
    t_start = time.perf_counter()
    job = json.loads((work / "job.json").read_text())
    job["work"] = str(work)
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot  # sets TF_USE_LEGACY_KERAS=1 (this process)
    import tf_keras as tfk

    tf.get_logger().setLevel("ERROR")
    versions = {"tensorflow": tf.__version__, "tf_keras": tfk.__version__,
                "tensorflow_model_optimization": tfmot.__version__,
                "python": sys.version.split()[0]}
    say(f"tensorflow {versions['tensorflow']}, tf-keras {versions['tf_keras']}, "
        f"tfmot {versions['tensorflow_model_optimization']}")
    spec = json.loads((work / "graph.json").read_text())
    with np.load(work / "weights.npz") as z:
        weights = {k: z[k] for k in z.files}
    with np.load(work / "probe.npz") as z:
        probe = {k: z[k] for k in z.files}
    model, dropped = rebuild(tfk, spec, weights)
    x_probe = probe["x"].astype(np.float32)
    diff = max_head_diff(model(x_probe, training=False), probe)
    if not diff <= job["rebuild_tolerance"]:
        raise WorkerError("rebuild", f"the flat tf-keras rebuild of the model differs from the "
                          f"Keras 3 model by {diff:.2e} (limit {job['rebuild_tolerance']:g}) on "
                          f"{len(x_probe)} images; config keys dropped in the rebuild: "
                          f"{dropped or 'none'}.")
    say(f"rebuilt {len(spec['layers'])} layers flat in tf-keras, max |Δp| vs Keras 3 {diff:.1e}")
    qmodel = quantize(tfk, tfmot, model)
    n_depthwise = per_channel_depthwise(tf, tfk, tfmot, qmodel)
    frozen = freeze(tfk, qmodel)
    representative = np.load(work / "representative.npy")
    calibrate(tf, tfk, qmodel, representative)
    fq_before = max_head_diff(qmodel(x_probe, training=False), probe)
    say(f"fake-quant ranges calibrated on {len(representative)} images; max |Δp| vs float "
        f"{fq_before:.3f}")
    distill = job.get("target", "distill") == "distill"
    history, steps = train(tfk, qmodel, job, teacher=model if distill else None)
    if distill:  # the teacher must still be the float model (quantize_apply works on a clone)
        teacher_diff = max_head_diff(model(x_probe, training=False), probe)
        if not teacher_diff <= job["rebuild_tolerance"]:
            raise WorkerError("train", f"the float teacher changed during QAT (max |Δp| "
                              f"{teacher_diff:.2e}); its outputs are the distillation targets.")
    pin_input_range(qmodel)
    fq_after = max_head_diff(qmodel(x_probe, training=False), probe)
    t_conv = time.perf_counter()
    tflite = convert(tf, qmodel, job, representative, work)
    write_bytes(work / "model.tflite", tflite)
    say(f"converted to int8 ({len(tflite):,} bytes) in {time.perf_counter() - t_conv:.0f} s")
    return {"ok": True, "versions": versions, "rebuild_max_abs_diff": diff,
            "dropped_config_keys": dropped, "frozen_layers": len(frozen),
            "depthwise_per_channel_layers": n_depthwise,
            "frozen": "BatchNormalization (inference mode, as TFLite folds it) and preprocessing",
            "calibration_images": int(len(representative)),
            "fake_quant_max_abs_diff": {"calibrated": fq_before, "after_training": fq_after},
            "target": "distill" if distill else "labels",
            "epochs": job["epochs"], "steps_per_epoch": steps, "lr": job["lr"],
            "optimizer": job.get("optimizer"), "batch_size": job["batch_size"],
            "class_balance": job["class_balance"], "augment": job.get("augment"),
            "train_images": int(len(np.load(job["train_images"], mmap_mode="r"))),
            "history": history, "seconds": round(time.perf_counter() - t_start, 1)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python -m export.qat_worker WORKDIR (written by export.qat)",
              file=sys.stderr)
        return 2
    work = Path(argv[0])
    missing = [m for m in NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        _write(work, {"ok": False, "kind": "environment",
                      "error": f"the QAT interpreter {sys.executable} lacks "
                               f"{', '.join(missing)}."})
        return 4
    try:
        result = run(work)
    except WorkerError as exc:
        _write(work, {"ok": False, "kind": exc.kind, "error": str(exc)})
        return 3
    _write(work, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
