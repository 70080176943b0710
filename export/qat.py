"""Quantization-aware training (QAT) before int8 conversion, run in its own Python environment.

tensorflow-model-optimization (tfmot) 0.8 quantizes only tf-keras 2 models, tf-keras needs the
full ``tensorflow`` wheel (which cannot share a venv with the core's ``tensorflow-cpu``), and
importing tfmot sets ``TF_USE_LEGACY_KERAS=1`` in its process. So the QAT step runs in a worker
process (:mod:`export.qat_worker`) under a separate interpreter: ``python -m export qat-setup``
builds one under ``$DERMEDGE_CACHE``; ``--qat-python`` / ``$DERMEDGE_QAT_PYTHON`` name another.

This module is the core side and never imports tfmot or tf-keras: it flattens the Keras 3 model
into a JSON graph + weights (the nested ``backbone`` inlined), checks every layer can be
quantized, hands the worker the run's training split and settings, and checks what comes back.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections import Counter, deque
from pathlib import Path

import numpy as np

from export.config import QuantizationConfig
from export.errors import ExportError
from export.venvs import PinnedVenv

ENV_VAR = "DERMEDGE_QAT_PYTHON"
QAT_REQUIREMENTS: tuple[str, ...] = (
    "tensorflow==2.21.0", "tf-keras==2.21.0", "tensorflow-model-optimization==0.8.1",
    "keras==3.15.1", "numpy>=2.0,<3", "pandas>=2.2", "pillow>=10.4")
REBUILD_TOLERANCE = 1e-4  # max |Δp| between the Keras 3 model and its tf-keras rebuild
PROBE_IMAGES = 8
# Keras layers the worker rebuilds in tf-keras and tfmot quantizes (Rescaling gets an output-only
# quantize config in the worker; BatchNorm after a conv is quantized after it, as TFLite fuses it).
QAT_LAYERS = frozenset({
    "InputLayer", "Rescaling", "Conv2D", "DepthwiseConv2D", "BatchNormalization", "ReLU",
    "Activation", "Add", "Concatenate", "ZeroPadding2D", "MaxPooling2D", "AveragePooling2D",
    "GlobalAveragePooling2D", "Dropout", "Dense"})
QAT_ACTIVATIONS = frozenset({"linear", "relu", "relu6", "sigmoid", "softmax"})
WHY_NOT = {
    "CustomScaleLayer": "Inception-ResNet-v2 scales each residual branch with keras.applications' "
                        "CustomScaleLayer, a Keras-3-only layer with no tf-keras counterpart that "
                        "tensorflow-model-optimization knows how to quantize",
}


class QATError(ExportError):
    """Quantization-aware training cannot run or failed (bad environment, unsupported model)."""


# ----------------------------------------------------------------------------- environment
def qat_env_dir() -> Path:
    """The cached QAT venv: keyed by the Python version and the pinned requirements."""
    return QAT_ENV.directory()


def setup_hint() -> str:
    reqs = " ".join(f'"{r}"' for r in QAT_REQUIREMENTS)
    return (f"QAT runs in its own Python environment (tensorflow, tf-keras and "
            f"tensorflow-model-optimization, about 2.5 GB; they cannot be installed next to the "
            f"core's tensorflow-cpu). Create it once with `python -m export qat-setup` (a few "
            f"minutes with PyPI access; cached in {qat_env_dir()}), or make one yourself with "
            f"`python3.11 -m venv VENV && VENV/bin/pip install {reqs}` and pass --qat-python "
            f"VENV/bin/python (or set {ENV_VAR}).")


QAT_ENV = PinnedVenv("QAT", "qat", QAT_REQUIREMENTS, ENV_VAR, QATError, setup_hint)


def find_qat_python(explicit: str | os.PathLike | None = None) -> Path:
    """The QAT interpreter: ``explicit``, else ``$DERMEDGE_QAT_PYTHON``, else the cached venv."""
    for value, where in ((explicit, "--qat-python"), (os.environ.get(ENV_VAR), ENV_VAR)):
        if value:
            return QAT_ENV.explicit_python(value, where)
    py = QAT_ENV.cached_python()
    if py is None:
        raise QATError(f"No QAT environment found. {setup_hint()}")
    return py


def setup_qat_env(base_python: str | os.PathLike | None = None, *, force: bool = False,
                  log=None) -> Path:
    """Build (or reuse) the cached QAT venv; returns its python. Built aside, then renamed."""
    if QAT_ENV.cached_python() is not None and not force and log:
        log(f"QAT environment already set up: {QAT_ENV.cached_python()}")
    return QAT_ENV.build(base_python, force=force, log=log)


# ----------------------------------------------------------------------------- the graph
def _jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def graph_spec(model) -> dict:
    """The Keras 3 functional model as a flat layer list (nested functional models inlined).

    Each layer: ``name``, ``class_name``, ``module``, ``config`` (its ``get_config()``) and
    ``args``: its call arguments with every tensor replaced by ``{"ref": layer_name}``.
    """
    cfg = json.loads(json.dumps(model.get_config(), default=_jsonable))
    layers: list[dict] = []
    alias: dict[str, str] = {}

    def ref(kt: dict) -> str:
        name, node, index = kt["config"]["keras_history"]
        if node != 0 or index != 0:
            raise QATError(f"Layer {name!r} is shared or has several outputs (node {node}, "
                           f"tensor {index}); the QAT rebuild supports plain functional graphs.")
        return alias.get(name, name)

    def refs(obj):
        if isinstance(obj, dict) and obj.get("class_name") == "__keras_tensor__":
            return {"ref": ref(obj)}
        if isinstance(obj, list):
            return [refs(o) for o in obj]
        if isinstance(obj, dict):
            return {k: refs(v) for k, v in obj.items()}
        return obj

    def flat_refs(obj) -> list[str]:
        if isinstance(obj, dict) and "ref" in obj:
            return [obj["ref"]]
        if isinstance(obj, list):
            return [r for o in obj for r in flat_refs(o)]
        return []

    def walk(fcfg: dict, bound: dict[str, str]) -> None:
        for lay in fcfg["layers"]:
            name, cls = lay["name"], lay["class_name"]
            if cls == "InputLayer":
                if name in bound:
                    alias[name] = bound[name]
                else:
                    layers.append({"name": name, "class_name": cls, "module": lay.get("module"),
                                   "config": lay["config"], "args": []})
                continue
            nodes = lay.get("inbound_nodes") or []
            if len(nodes) != 1:
                raise QATError(f"Layer {name!r} ({cls}) is called {len(nodes)} times; the QAT "
                               "rebuild supports layers called once.")
            args = refs(nodes[0]["args"])
            kwargs = {k: v for k, v in (nodes[0].get("kwargs") or {}).items() if v is not None}
            if flat_refs(refs(kwargs)):
                raise QATError(f"Layer {name!r} ({cls}) takes tensors as keyword arguments; the "
                               "QAT rebuild does not support that.")
            if cls in ("Functional", "Model"):
                inner = lay["config"]
                inputs = [x[0] for x in _listify_refs(inner["input_layers"])]
                bound_inner = dict(zip(inputs, flat_refs(args), strict=True))
                walk(inner, bound_inner)
                outs = _listify_refs(inner["output_layers"])
                if len(outs) != 1:
                    raise QATError(f"The nested model {name!r} has {len(outs)} outputs; the QAT "
                                   "rebuild inlines single-output sub-models only.")
                alias[name] = alias.get(outs[0][0], outs[0][0])
                continue
            if name in {x["name"] for x in layers}:
                raise QATError(f"Two layers are named {name!r} (one inside a nested model); the "
                               "QAT rebuild copies weights by layer name and needs unique names.")
            layers.append({"name": name, "class_name": cls, "module": lay.get("module"),
                           "config": lay["config"], "args": args})

    walk(cfg, {})
    outputs = cfg["output_layers"]
    if not isinstance(outputs, dict):
        raise QATError("The model's outputs must be a dict of named heads (melanoma, diagnosis).")
    inputs = [x[0] for x in _listify_refs(cfg["input_layers"])]
    return {"layers": layers, "inputs": inputs,
            "outputs": {k: alias.get(v[0], v[0]) for k, v in outputs.items()}}


def _listify_refs(x) -> list[list]:
    """``["name", 0, 0]`` or ``[["name", 0, 0], ...]`` → a list of refs."""
    return [x] if x and isinstance(x[0], str) else list(x)


def layer_weights(model) -> dict[str, np.ndarray]:
    """Every layer's weights keyed ``LAYER/INDEX`` (nested models included)."""
    out, stack = {}, list(model.layers)
    while stack:
        lay = stack.pop(0)
        sub = getattr(lay, "layers", None)
        if sub:
            stack.extend(sub)
            continue
        for i, w in enumerate(lay.get_weights()):
            out[f"{lay.name}/{i:02d}"] = np.asarray(w)
    return out


def check_qat_support(spec: dict, backbone: str | None = None) -> None:
    """Raise :class:`QATError` naming the layers QAT cannot handle, and why."""
    bad: Counter = Counter()
    for lay in spec["layers"]:
        cls, cfg = lay["class_name"], lay["config"]
        if cls not in QAT_LAYERS or not str(lay.get("module") or "").startswith("keras.layers"):
            bad[cls] += 1
        elif cls in ("Activation", "Conv2D", "DepthwiseConv2D", "Dense") and \
                str(cfg.get("activation", "linear")) not in QAT_ACTIVATIONS:
            bad[f"{cls}(activation={cfg.get('activation')})"] += 1
        elif any(cfg.get(k) is not None for k in cfg
                 if k.endswith(("_regularizer", "_constraint"))):
            bad[f"{cls} with a regularizer or constraint"] += 1
    if not bad:
        return
    what = ", ".join(f"{n} × {c}" for c, n in bad.most_common())
    why = "; ".join(WHY_NOT[c] for c in bad if c in WHY_NOT)
    name = f"backbone {backbone!r}" if backbone else "this model"
    raise QATError(f"QAT is not supported for {name}: it has layers the QAT rebuild cannot "
                   f"quantize ({what})" + (f" — {why}" if why else "") + ". Export it with "
                   "post-training int8 instead (drop --qat), or float16 for a server/cloud tier.")


def qat_support(model, backbone: str | None = None) -> str | None:
    """``None`` when ``model`` can be QAT-ed, else the reason (the message of the error)."""
    try:
        check_qat_support(graph_spec(model), backbone)
    except QATError as exc:
        return str(exc)
    return None


# ----------------------------------------------------------------------------- the worker
def _training_settings(run) -> dict:
    """The run's augmentation, class balancing and loss settings, as ``trainer fit`` used them."""
    from export.training import ConfigError, RunConfig

    try:
        cfg = RunConfig.from_dict(run.card.get("config") or {})
    except ConfigError as exc:
        raise QATError(f"The run's recorded config (model_card.json → config) cannot be read "
                       f"({exc}); QAT reuses its augmentation and class weighting. Re-run "
                       "`trainer fit` with this version of dermedge.") from None
    t, a = cfg.train, cfg.augment
    augment = None
    if a.enabled:
        augment = {k: getattr(a, k) for k in ("flip", "rotation", "translation", "zoom", "shear",
                                              "brightness", "contrast", "saturation")}
    return {"batch_size": t.batch_size, "class_balance": t.class_balance,
            "logit_adjust_tau": t.logit_adjust_tau,
            "class_weight_method": t.class_weight_method, "resample_cap": t.resample_cap,
            "label_smoothing": t.label_smoothing, "loss_weights": dict(t.loss_weights),
            "optimizer": t.optimizer, "weight_decay": t.weight_decay, "seed": cfg.seed,
            "augment": augment, "cache_dir": cfg.data.cache_dir}


def _source_dir(root: Path) -> Path:
    """A folder holding only links to our packages, for the worker's PYTHONPATH."""
    src = root / "src"
    src.mkdir()
    here = Path(__file__).resolve().parents[1]
    for pkg in ("dermedge", "trainer", "export"):
        (src / pkg).symlink_to(here / pkg, target_is_directory=True)
    return src


def run_qat(run, model, config: QuantizationConfig, representative: np.ndarray, *,
            python: str | os.PathLike | None = None, log=None):
    """Fine-tune ``model`` with fake quantization in the QAT worker and convert it to int8.

    Returns ``(Converted, info)``: the verified int8 model and what the worker did.
    """
    from export.convert import Converted, verify_mode
    from export.training import cache_images, labels_from_dx, predict_arrays

    say = log or (lambda msg: None)
    if config.qat is None or config.mode != "int8":
        raise QATError("run_qat needs an int8 config with QAT settings "
                       "(QuantizationConfig.int8_qat).")
    exe = find_qat_python(python)
    spec = graph_spec(model)
    check_qat_support(spec, run.card.backbone)
    settings = _training_settings(run)
    splits = run.splits()
    train = splits[splits["split"] == "train"].reset_index(drop=True)
    if len(train) == 0:
        raise QATError(f"{run.path / 'splits.csv'} has no train rows; QAT fine-tunes on the "
                       "run's training split.")
    cache_dir = settings.pop("cache_dir")  # the run's, if it exists on this machine
    images = cache_images(train["path"].tolist(), run.input_size,
                          cache_dir if cache_dir and Path(cache_dir).is_dir() else None,
                          progress=False)
    probe = np.asarray(representative[:PROBE_IMAGES], np.uint8)
    p_mel, probs = predict_arrays(model, probe)
    tmp = Path(tempfile.mkdtemp(prefix="dermedge-qat-"))
    try:
        src = _source_dir(tmp)
        np.save(tmp / "representative.npy", np.asarray(representative, np.uint8))
        np.save(tmp / "labels.npy", labels_from_dx(train["dx"]))
        np.savez(tmp / "weights.npz", **layer_weights(model))
        np.savez(tmp / "probe.npz", x=probe, melanoma=p_mel.reshape(-1, 1), diagnosis=probs)
        (tmp / "graph.json").write_text(json.dumps(spec))
        train_images = getattr(images, "filename", None)
        if not train_images:
            train_images = str(tmp / "train_images.npy")
            np.save(train_images, np.asarray(images))
        job = {**settings, "train_images": str(train_images), "input_size": run.input_size,
               "io_dtype": config.io_dtype, "output_dtype": config.out_dtype,
               "epochs": config.qat.epochs,
               "steps_per_epoch": config.qat.steps_per_epoch, "lr": config.qat.lr,
               "target": config.qat.target,
               "rebuild_tolerance": REBUILD_TOLERANCE, "backbone": run.card.backbone}
        (tmp / "job.json").write_text(json.dumps(job, indent=2))
        say(f"QAT: {config.qat.epochs} epoch(s) on {len(train)} train images in {exe}")
        result = _run_worker(exe, tmp, src, say)
        tflite = (tmp / "model.tflite").read_bytes()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    checks = verify_mode(tflite, "int8", config.io_dtype, config.out_dtype)
    conv = Converted(tflite=tflite, mode="int8", io=checks.pop("io"), checks=checks,
                     representative_images=len(representative))
    result["python"] = str(exe)
    return conv, result


def _run_worker(exe: Path, workdir: Path, src: Path, say) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "TF_USE_LEGACY_KERAS")}
    env.update({"PYTHONPATH": str(src), "PYTHONNOUSERSITE": "1", "KERAS_BACKEND": "tensorflow",
                "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"})
    err_path = workdir / "worker.stderr"
    with open(err_path, "w") as err, subprocess.Popen(
            [str(exe), "-m", "export.qat_worker", str(workdir)], stdout=subprocess.PIPE,
            stderr=err, text=True, env=env, cwd=workdir) as proc:
        try:
            for line in proc.stdout:
                if line.strip():
                    say(line.rstrip())
            proc.wait()
        except BaseException:  # e.g. Ctrl-C: stop the worker before the temp dir goes
            proc.kill()
            proc.wait()
            raise
    result_path = workdir / "result.json"
    result = json.loads(result_path.read_text()) if result_path.is_file() else None
    if proc.returncode == 0 and result and result.get("ok") and \
            (workdir / "model.tflite").is_file():
        return result
    tail = "\n".join(deque(err_path.read_text(errors="replace").splitlines(), maxlen=8))
    if result and result.get("error"):
        hint = f" {setup_hint()}" if result.get("kind") == "environment" else ""
        raise QATError(f"QAT failed: {result['error']}{hint}")
    raise QATError(f"The QAT worker ({exe}) exited with code {proc.returncode} without a "
                   f"result. Its last output: {tail[-800:] or '(none)'}")


# ----------------------------------------------------------------------------- reporting
def side_by_side(float_m: dict, ptq: dict, qat: dict) -> list[dict]:
    """Rows ``metric, float, ptq, qat`` from two ``validate.compare`` reports."""
    rows = []
    for k in ("balanced_accuracy", "accuracy", "melanoma_auc", "melanoma_sensitivity",
              "melanoma_specificity"):
        rows.append({"metric": k, "float": float_m[k], "ptq": ptq["metrics"]["tflite"][k],
                     "qat": qat["metrics"]["tflite"][k]})
    for name, head, key in (("diagnosis_agreement", "diagnosis", "top1_agreement"),
                            ("melanoma_agreement", "melanoma", "threshold_agreement"),
                            ("diagnosis_max_abs_diff", "diagnosis", "max_abs_diff"),
                            ("melanoma_max_abs_diff", "melanoma", "max_abs_diff")):
        rows.append({"metric": name, "float": None, "ptq": ptq["heads"][head][key],
                     "qat": qat["heads"][head][key]})
    return rows


def _f(x) -> str:
    return "—" if x is None else f"{x:.4f}"


def qat_markdown(report: dict) -> str:
    """The PTQ-vs-QAT section appended to validation.md."""
    q, p = report["validation"], report["ptq"]["validation"]
    info = report["qat"]
    lines = ["", "## Quantization-aware training vs post-training int8", "",
             f"Both int8 models on the same {q['n']} images, against the same float Keras model. "
             f"QAT: {info['epochs']} epoch(s) × {info['steps_per_epoch']} steps at lr "
             f"{info['lr']:g} on the train split (the run's augmentation and class weights), "
             "fake-quant ranges calibrated on the representative images first.", "",
             "| metric | float (Keras) | PTQ int8 | QAT int8 |", "|---|---|---|---|"]
    for r in side_by_side(q["metrics"]["float"], p, q):
        lines.append(f"| {r['metric']} | {_f(r['float'])} | {_f(r['ptq'])} | {_f(r['qat'])} |")
    lines += ["", f"PTQ gates: **{'passed' if p['passed'] else 'FAILED'}**"
              + (" (" + "; ".join(p["failed"]) + ")" if p["failed"] else "")
              + f"; QAT gates: **{'passed' if q['passed'] else 'FAILED'}**."]
    worse = [k for k in ("balanced_accuracy", "melanoma_auc")
             if None not in (q["metrics"]["tflite"][k], p["metrics"]["tflite"][k])
             and q["metrics"]["tflite"][k] < p["metrics"]["tflite"][k]]
    if worse:
        lines += ["", f"Note: QAT is below PTQ on {', '.join(worse)} here; QAT also fine-tunes "
                  "the weights, so on a small validation set it can move either way. Ship the "
                  "one that validates better."]
    return "\n".join(lines) + "\n"
