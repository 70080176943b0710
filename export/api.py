"""Plain functions behind the CLI: export a run, load a bundle, run a bundle.

``export_run`` writes the bundle even when validation fails (``result.passed`` is False and
``validation.json`` says ``"passed": false``); the CLI then exits 3. Bad input raises a
:class:`~export.errors.DermedgeError` before anything is written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.bundle import BUNDLE_FILES, dumps, export_card, sha256_bytes, usage_md, write_bundle
from export.config import QuantizationConfig, Tolerances
from export.litert import SIGNATURE, Bundle, LiteModel, load_bundle, run_tflite
from export.rundir import Run, load_images, open_run, representative_records, validation_records

__all__ = ["BundleResult", "export_run", "load_bundle", "run_tflite", "default_out",
           "keras_predict", "QuantizationConfig", "Tolerances", "Bundle", "LiteModel"]

VALIDATION_BATCH = 16
COMPACT_CHECK_IMAGES = 8  # calibration images the compacted file must reproduce bit for bit


@dataclass(frozen=True)
class BundleResult:
    """What ``export_run`` wrote."""

    path: Path
    mode: str
    passed: bool | None
    card: dict
    report: dict
    tflite_bytes: int
    seconds: float

    @property
    def failed(self) -> list[str]:
        return list(self.report.get("validation", {}).get("failed", []))


def default_out(run: Run | str | Path, mode: str) -> Path:
    name = run.name if isinstance(run, Run) else Path(run).name
    return Path("exports") / f"{name}-{mode}"


def _summary(v: dict, where: str | None) -> dict:
    """The card's short form of a ``validate.compare`` report."""
    return {"passed": v["passed"], "n": v["n"], "data": where, "failed": v["failed"],
            "diagnosis_agreement": v["heads"]["diagnosis"]["top1_agreement"],
            "melanoma_agreement": v["heads"]["melanoma"]["threshold_agreement"],
            "max_abs_diff": max(v["heads"]["diagnosis"]["max_abs_diff"],
                                v["heads"]["melanoma"]["max_abs_diff"]),
            "delta": {k: v["metrics"]["delta"][k] for k in
                      ("balanced_accuracy", "melanoma_auc", "melanoma_sensitivity")},
            "tolerances": v["tolerances"]}


def keras_predict(model, images: np.ndarray, batch_size: int = 32) -> dict[str, np.ndarray]:
    """The float model's outputs by name, in batches, no progress bar."""
    outs: dict[str, list] = {"melanoma": [], "diagnosis": []}
    for i in range(0, len(images), batch_size):
        res = model(np.asarray(images[i:i + batch_size], np.float32), training=False)
        for k in outs:
            outs[k].append(np.asarray(res[k], np.float32))
    return {k: np.concatenate(v) for k, v in outs.items()}


def export_run(run_dir: str | Path, config: QuantizationConfig | None = None,
               out: str | Path | None = None, *, data: str | Path | None = None,
               split: str = "val", tolerances: Tolerances | None = None, debug: bool = False,
               validate: bool = True, log=None,
               qat_python: str | Path | None = None) -> BundleResult:
    """Convert ``run_dir``'s model per ``config``, validate it with LiteRT, write the bundle.

    With ``config.qat`` (``QuantizationConfig.int8_qat``) the model is fine-tuned with fake
    quantization in the QAT interpreter (``qat_python``, see export/qat.py) and the
    post-training int8 model is converted and validated too, for the side-by-side report.
    """
    from export.convert import convert_model
    from export.validate import compare, to_markdown

    t0 = time.perf_counter()
    say = log or (lambda msg: None)
    config = config or QuantizationConfig.float32()
    tolerances = tolerances or Tolerances.for_mode(config.mode)
    run = open_run(run_dir)
    label = "int8-qat" if config.qat is not None else config.mode
    out = Path(out) if out is not None else default_out(run, label)
    if debug and config.mode != "int8":
        from export.errors import ExportError

        raise ExportError("--debug runs the int8 quantization debugger; add --int8 or drop "
                          "--debug.")
    qat_exe = None
    if config.qat is not None:  # --- QAT (export/qat.py): fail fast without its environment
        from export.qat import QATError, find_qat_python

        if debug:
            raise QATError("--debug analyses post-training int8 layer by layer; it does not "
                           "apply to --qat. Drop one of them.")
        qat_exe = find_qat_python(qat_python)
    # Read everything that can fail on bad input before converting anything.
    rep = None
    if config.mode == "int8":
        rows = representative_records(run, config.representative_images, seed=config.seed)
        say(f"calibration: {len(rows)} train images, stratified by class")
        rep = load_images(rows["path"].tolist(), run.input_size)
    val_rows, where = (validation_records(run, data, split) if validate else (None, None))
    import tensorflow as tf

    model = run.load_model()
    if config.qat is not None:
        from export.qat import check_qat_support, graph_spec

        check_qat_support(graph_spec(model), run.card.get("backbone"))
    say(f"converting {run.name} ({run.card.get('backbone')}) to {config.mode}")
    bias = None
    conv = (convert_model(model, config, rep, debug=debug)
            if config.bias_correction not in ("on", "kernel") else None)
    if config.bias_correction != "off":  # on a second copy: validation compares with float
        conv, bias = _bias_corrected(run, model, config, rep, conv, debug, say)
    ptq = qat_info = None
    if config.qat is not None:  # --- QAT: the PTQ model above stays for the side-by-side
        from export.qat import run_qat

        ptq, ptq_bias, bias = conv, bias, None  # the shipped (QAT) model is not bias-corrected
        conv, qat_info = run_qat(run, model, config, rep, python=qat_exe, log=say)
    check = rep[:COMPACT_CHECK_IMAGES] if rep is not None else _noise(run.input_size)
    conv = _batch_fixed(conv, check)  # the file phones and browsers run: [1, S, S, 3]
    if ptq is not None:
        ptq = _batch_fixed(ptq, check)
    if config.compact:  # lossless: identical quantization vectors stored once
        conv = _compacted(conv, config, check, say)
        if ptq is not None:
            ptq = _compacted(ptq, config, check, say)
    report: dict = {"run": str(run.path), "mode": config.mode, "config": config.to_dict(),
                    "data": where, "checks": conv.checks, "denylisted": conv.denylisted}
    if bias is not None:
        report["bias_correction"] = bias
    if conv.compaction is not None:
        report["compaction"] = conv.compaction
    if conv.debug:
        report["debug"] = conv.debug
    if validate:
        say(f"validating on {len(val_rows)} images from {where}")
        images = load_images(val_rows["path"].tolist(), run.input_size)
        float_out = keras_predict(model, images)
        lite = LiteModel.load(conv.tflite)
        lite_out = lite.predict(images, batch_size=VALIDATION_BATCH)
        offsets = offsets_fitted_on(run, data, split)
        report["validation"] = compare(float_out, lite_out, val_rows["dx"].tolist(),
                                       val_rows["melanoma"].to_numpy(), run.diagnosis_labels,
                                       run.melanoma_threshold, tolerances,
                                       class_offsets=offsets)
        passed = report["validation"]["passed"]
        if ptq is not None:  # --- QAT: the PTQ model through the same gate
            ptq_out = LiteModel.load(ptq.tflite).predict(images, batch_size=VALIDATION_BATCH)
            report["ptq"] = {"validation": compare(
                float_out, ptq_out, val_rows["dx"].tolist(), val_rows["melanoma"].to_numpy(),
                run.diagnosis_labels, run.melanoma_threshold, tolerances,
                class_offsets=offsets)}
    else:
        report["validation"] = {"passed": None, "skipped": True, "n": 0, "gates": [],
                                "failed": []}
        passed = None
    v = report["validation"]
    summary = (_summary(v, where) if validate else
               {"passed": passed, "n": 0, "data": where, "failed": []})
    section = {"mode": config.mode, "signature": SIGNATURE,
               "inputs": conv.io["inputs"], "outputs": conv.io["outputs"],
               "representative_images": conv.representative_images,
               "keep_float": list(config.keep_float),
               "bias_correction": (None if bias is None else {
                   k: bias.get(k) for k in ("method", "rounding", "images", "layers_corrected",
                                            "output_error_vs_nearest", "seconds", "chosen",
                                            "selection", "skipped")}
                   | {"quantized_model": None if "quantized_model" not in bias else {
                       k: v for k, v in bias["quantized_model"].items()
                       if k != "layers_skipped"}}
                   | {"mode": config.bias_correction,
                      "layers_skipped": len(bias.get("layers_skipped", {}))}),
               "converter": {"tensorflow": tf.__version__, "path": "saved_model",
                             "optimizations": config.mode != "float32"},
               "compaction": conv.compaction,
               "checks": {k: conv.checks[k] for k in ("verified_mode", "integer_tensor_fraction",
                                                      "ops")},
               "validation": summary,
               "size_bytes": len(conv.tflite), "sha256": sha256_bytes(conv.tflite)}
    if ptq is not None:  # --- QAT: what was trained, and the PTQ model it is compared with
        ptq_section = {"size_bytes": len(ptq.tflite), "sha256": sha256_bytes(ptq.tflite),
                       "integer_tensor_fraction": ptq.checks["integer_tensor_fraction"],
                       "bias_correction": None if ptq_bias is None else {
                           k: ptq_bias.get(k) for k in ("chosen", "method", "seconds")}}
        report["ptq"] = {**ptq_section, **report.get("ptq", {})}  # full validation report
        if validate:
            ptq_section["validation"] = _summary(report["ptq"]["validation"], where)
        report["qat"] = qat_info
        section["qat"] = {k: qat_info.get(k) for k in (
            "target", "epochs", "steps_per_epoch", "lr", "optimizer", "batch_size", "class_balance",
            "augment", "train_images", "calibration_images", "frozen", "history",
            "rebuild_max_abs_diff", "versions", "seconds")}
        section["qat"]["ptq"] = ptq_section
    card = export_card(run.card, section)
    files = {
        "model.tflite": conv.tflite,
        "labels_diagnosis.txt": "\n".join(run.diagnosis_labels) + "\n",
        "labels_melanoma.txt": "\n".join(run.melanoma_labels) + "\n",
        "model_card.json": dumps(card),
        "validation.json": dumps(report),
        "validation.md": (to_markdown(report, f"{run.name} → {label}") + _qat_md(report)
                          if validate else f"# Validation: {run.name} → {label}\n\n"
                          "Skipped (--no-validate).\n"),
        "USAGE.md": usage_md(card),
    }
    assert set(files) == set(BUNDLE_FILES)  # internal invariant, not user input
    path = write_bundle(out, files)
    say(f"wrote {path} ({len(conv.tflite):,} bytes)")
    return BundleResult(path=path, mode=config.mode, passed=passed, card=card, report=report,
                        tflite_bytes=len(conv.tflite), seconds=time.perf_counter() - t0)


def offsets_fitted_on(run: Run, data, split: str) -> np.ndarray | None:
    """The run's class offsets (in its diagnosis-label order) when the images being validated
    on are the ones they were fitted on (its own ``split``), else None."""
    section = (run.card.get("calibration") or {}).get("class_bias") or {}
    offsets = section.get("offsets")
    if not offsets or data is not None or section.get("fitted_on", "val") != split:
        return None
    return np.array([offsets[c] for c in run.diagnosis_labels], dtype=np.float64)


def _bias_corrected(run, model, config, rep, plain, debug, say):
    """Convert a bias-corrected copy; with a ``plain`` conversion ("auto"), keep the better.

    "Better" is judged against the float model on the calibration images (train split), never
    on the held-out images the gates use.
    """
    from export.biascorr import DEFAULT_IMAGES, correct_biases
    from export.convert import convert_model
    from export.errors import ExportError

    corrected = run.load_model()
    n_bc = min(len(rep), DEFAULT_IMAGES)
    say(f"bias correction: rounding kernels to int8, correcting on {n_bc} train images")
    try:
        bias = correct_biases(corrected, rep[:n_bc], keep_float=config.keep_float,
                              rounding=config.weight_rounding,
                              backbone_layer=run.backbone_layer, log=say)
    except ExportError as exc:
        if plain is None:  # "on" / "kernel" was asked for explicitly
            raise
        say(f"bias correction skipped: {exc}")
        return plain, {"chosen": "plain", "skipped": str(exc)}
    conv = convert_model(corrected, config, rep, debug=debug)
    del corrected
    if config.bias_correction != "kernel":  # "kernel": the Keras-level stage alone
        conv, bias["quantized_model"] = _correct_quantized(model, config, conv, rep[:n_bc], say)
    if plain is None:
        bias["chosen"] = "corrected"
        return conv, bias
    ref = keras_predict(model, rep)["diagnosis"]
    score = {}
    for name, c in (("plain", plain), ("corrected", conv)):
        p = LiteModel.load(c.tflite).predict(rep, batch_size=VALIDATION_BATCH)["diagnosis"]
        score[name] = {"diagnosis_agreement": float(np.mean(p.argmax(1) == ref.argmax(1))),
                       "mean_abs_diff": float(np.abs(p - ref).mean())}
    key = {k: (v["diagnosis_agreement"], -v["mean_abs_diff"]) for k, v in score.items()}
    chosen = "corrected" if key["corrected"] >= key["plain"] else "plain"
    bias.update(chosen=chosen, selection={"images": len(rep), "on": "calibration images "
                                          "(train split)", **score})
    say(f"bias correction: calibration-set agreement plain "
        f"{score['plain']['diagnosis_agreement']:.4f} vs corrected "
        f"{score['corrected']['diagnosis_agreement']:.4f}; keeping {chosen}")
    return (conv if chosen == "corrected" else plain), bias


def _correct_quantized(model, config, conv, images, say):
    """Second stage: the activation-quantization mean shift, measured on the int8 model itself
    against the float32 TFLite model (export/qcorrect.py)."""
    from dataclasses import replace

    from export.convert import convert_model, verify_mode
    from export.errors import ExportError
    from export.qcorrect import correct_quantized_biases

    say(f"int8 bias correction: measuring the converted model against float on {len(images)} "
        "train images")
    reference = convert_model(model, QuantizationConfig.float32()).tflite
    try:
        tflite, report = correct_quantized_biases(conv.tflite, reference, images, log=say)
    except ExportError as exc:  # e.g. a model whose convs the converter folded away
        say(f"int8 bias correction skipped: {exc}")
        return conv, {"stage": "quantized_model", "skipped": str(exc), "layers_corrected": 0}
    checks = verify_mode(tflite, config.mode, config.io_dtype, config.out_dtype)
    return replace(conv, tflite=tflite, io=checks.pop("io"), checks=checks), report


def _noise(size: int, n: int = 4) -> np.ndarray:
    """Deterministic uint8 images for the compaction check of a model with no calibration set
    (any input serves: the check is that two files compute the same numbers)."""
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _batch_fixed(conv, images):
    """``conv`` with its signature's batch fixed to 1 (export/batch.py), outputs unchanged."""
    from dataclasses import replace

    from export.batch import fix_batch

    tflite, _ = fix_batch(conv.tflite, images)
    return replace(conv, tflite=tflite)


def _compacted(conv, config, images, say):
    """``conv`` with its file compacted (export/compact.py) if that is lossless on ``images``.

    The compacted file reads back table for table the same and its signature was compared, so
    the conversion's checks and I/O details still hold."""
    from dataclasses import replace

    from export.compact import compact

    tflite, report = compact(conv.tflite, images)
    if report["applied"]:
        say(f"compacted: identical quantization vectors stored once, "
            f"{report['size_before']:,} → {report['size_after']:,} bytes "
            f"(checked bit-identical on {report['checked_images']} images)")
    elif report.get("check"):
        say(f"compaction not applied: {report['check']}")
    return replace(conv, tflite=tflite, compaction=report)


def _qat_md(report: dict) -> str:
    if "ptq" not in report:
        return ""
    from export.qat import qat_markdown

    return qat_markdown(report)
