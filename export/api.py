"""Plain functions behind the CLI: export a run, load a bundle, run a bundle.

``export_run`` writes the bundle even when validation fails (``result.passed`` is False and
``validation.json`` says ``"passed": false``); the CLI then exits 3. Bad input raises a
:class:`~export.errors.DermedgeError` before anything is written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dermedge.card import ModelCard, with_export, with_section
from dermedge.labels import HEADS, OOD, SIGNATURE
from dermedge.litert import LiteModel
from export.bundle import BUNDLE_FILES, dumps, sha256_bytes, usage_md, write_bundle
from export.config import QuantizationConfig, Tolerances
from export.refused import REFUSED_NOTICE, refused_notice
from export.rundir import (
    Run,
    load_images,
    open_run,
    representative_records,
    stratified_sample,
    validation_records,
)
from export.tflite_metadata import mediapipe_python, with_metadata
from export.validate import to_markdown

__all__ = ["BundleResult", "export_run", "default_out", "keras_predict", "QuantizationConfig",
           "Tolerances"]

VALIDATION_BATCH = 16
COMPACT_CHECK_IMAGES = 8  # calibration images the compacted file must reproduce bit for bit


@dataclass(frozen=True)
class BundleResult:
    """What ``export_run`` wrote."""

    path: Path
    mode: str
    passed: bool | None
    card: ModelCard
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
    """The float model's outputs by name (the heads, and ``ood`` when it has one), in
    batches, no progress bar."""
    names = [*HEADS] + ([OOD] if OOD in model.output else [])
    outs: dict[str, list] = {k: [] for k in names}
    for i in range(0, len(images), batch_size):
        res = model(np.asarray(images[i:i + batch_size], np.float32), training=False)
        for k in outs:
            outs[k].append(np.asarray(res[k], np.float32))
    return {k: np.concatenate(v) for k, v in outs.items()}


def export_run(run_dir: str | Path, config: QuantizationConfig | None = None,
               out: str | Path | None = None, *, data: str | Path | None = None,
               split: str = "val", tolerances: Tolerances | None = None, debug: bool = False,
               validate: bool = True, log=None,
               qat_python: str | Path | None = None, gate: bool = True) -> BundleResult:
    """Convert ``run_dir``'s model per ``config``, validate it with LiteRT, write the bundle.

    ``gate`` (the default): add the input gate's ``ood`` output and measure the gate's
    thresholds on the validation images (export/gate.py; the card's ``gate`` section). A QAT
    export, or one without validation, measures the quality thresholds only when it can and
    has no ``ood`` output; the card says why.

    With ``config.qat`` (``QuantizationConfig.int8_qat``) the model is fine-tuned with fake
    quantization in the QAT interpreter (``qat_python``, see export/qat.py) and the
    post-training int8 model is converted and validated too, for the side-by-side report.

    The steps, in order: check the request and read its inputs -> :func:`_convert` (PTQ, bias
    correction, QAT) -> :func:`_finish_file` (batch 1, compaction, metadata) on each candidate
    -> :func:`_validate` -> :func:`_card_section` -> write the bundle.
    """
    t0 = time.perf_counter()
    say = log or (lambda msg: None)
    config = config or QuantizationConfig.float32()
    tolerances = tolerances or Tolerances.for_mode(config.mode)
    run = open_run(run_dir)
    label = "int8-qat" if config.qat is not None else config.mode
    out = Path(out) if out is not None else default_out(run, label)
    qat_exe = _check_request(config, debug, qat_python)
    md_python = mediapipe_python(log=say)  # the metadata writer's venv, built on first use
    rep, val_rows, where = _read_inputs(run, config, data, split, validate, say)
    model = run.load_model()
    fit, gate_note = None, None
    if gate:
        fit, gate_note = _fit_ood(run, model, config, val_rows, say)
    load = run.load_model
    if fit is not None:
        from export.gate import with_ood_output

        int8 = config.mode == "int8"
        model = with_ood_output(model, fit, int8=int8)

        def load():
            return with_ood_output(run.load_model(), fit, int8=int8)
    shipped, ptq, qat_info = _convert(run, model, config, rep, debug=debug, qat_exe=qat_exe,
                                      say=say, load=load)
    check = rep[:COMPACT_CHECK_IMAGES] if rep is not None else _noise(run.input_size)
    shipped = _file_steps(shipped, config, check, say)
    ptq = _file_steps(ptq, config, check, say) if ptq is not None else None
    gate_section, gate_check = None, None
    if gate:
        gate_section, gate_check = _measure_gate(run, model, shipped, fit, val_rows, where,
                                                 tolerances, gate_note, say)
    meta_card = run.card if gate_section is None else with_section(run.card, "gate", gate_section)
    shipped = _metadata_step(shipped, meta_card, check, say, md_python)
    ptq = _metadata_step(ptq, meta_card, check, say, md_python) if ptq is not None else None
    report = _report(run, config, where, shipped)
    passed = _validate(report, run, model, shipped, ptq, val_rows, tolerances,
                       data=data, split=split, validate=validate, say=say)
    if gate_check is not None and validate:
        passed = _add_gate_check(report, gate_check)
    section = _card_section(config, shipped, ptq, qat_info, report, where, validate=validate,
                            passed=passed)
    card = with_export(run.card, section)  # validated by dermedge.card
    if gate_section is not None:
        card = with_section(card, "gate", gate_section)
    files = {
        "model.tflite": shipped.conv.tflite,
        "labels_diagnosis.txt": "\n".join(run.diagnosis_labels) + "\n",
        "labels_melanoma.txt": "\n".join(run.melanoma_labels) + "\n",
        "model_card.json": dumps(card.to_dict()),
        "validation.json": dumps(report),
        "validation.md": (to_markdown(report, f"{run.name} → {label}") + _qat_md(report)
                          if validate else f"# Validation: {run.name} → {label}\n\n"
                          "Skipped (--no-validate).\n"),
        "USAGE.md": usage_md(card),
    }
    assert set(files) == set(BUNDLE_FILES)  # internal invariant, not user input
    if passed is False:  # written with the bundle, so a refused folder is never unmarked
        files[REFUSED_NOTICE] = refused_notice(report["validation"]["failed"])
    path = write_bundle(out, files)
    size = len(shipped.conv.tflite)
    say(f"wrote {path} ({size:,} bytes)")
    return BundleResult(path=path, mode=config.mode, passed=passed, card=card, report=report,
                        tflite_bytes=size, seconds=time.perf_counter() - t0)


@dataclass(frozen=True)
class _Candidate:
    """One converted model on its way into the bundle (``conv``: export.convert's result) and
    its bias-correction report."""

    conv: Any
    bias: dict | None = None


def _check_request(config: QuantizationConfig, debug: bool, qat_python) -> str | None:
    """Option combinations that cannot work, before any work; the QAT interpreter if asked."""
    if debug and config.mode != "int8":
        from export.errors import ExportError

        raise ExportError("--debug runs the int8 quantization debugger; add --int8 or drop "
                          "--debug.")
    if config.qat is None:
        return None
    from export.qat import QATError, find_qat_python

    if debug:
        raise QATError("--debug analyses post-training int8 layer by layer; it does not "
                       "apply to --qat. Drop one of them.")
    return find_qat_python(qat_python)  # fail fast without the QAT environment


def _read_inputs(run: Run, config: QuantizationConfig, data, split: str, validate: bool, say):
    """``(calibration images or None, validation rows or None, where they come from)``: all
    that can fail on bad input, read before converting anything."""
    rep = None
    if config.mode == "int8":
        rows = representative_records(run, config.representative_images, seed=config.seed)
        say(f"calibration: {len(rows)} train images, stratified by class")
        rep = load_images(rows["path"].tolist(), run.input_size)
    val_rows, where = validation_records(run, data, split) if validate else (None, None)
    return rep, val_rows, where


def _convert(run: Run, model, config: QuantizationConfig, rep, *, debug: bool, qat_exe,
             say, load=None) -> tuple[_Candidate, _Candidate | None, dict | None]:
    """The conversion steps: post-training conversion, then bias correction (int8), then QAT.

    ``load``: a fresh copy of ``model`` (bias correction edits one); default the run's model.
    Returns ``(shipped, ptq, qat_info)``. Without QAT ``ptq`` and ``qat_info`` are None; with
    it the QAT model ships (not bias-corrected) and the PTQ model stays for the comparison.
    """
    from export.convert import convert_model

    if config.qat is not None:
        from export.qat import check_qat_support, graph_spec

        check_qat_support(graph_spec(model), run.card.backbone)
    say(f"converting {run.name} ({run.card.backbone}) to {config.mode}")
    conv, bias = (convert_model(model, config, rep, debug=debug)
                  if config.bias_correction not in ("on", "kernel") else None), None
    if config.bias_correction != "off":  # on a second copy: validation compares with float
        conv, bias = _bias_corrected(run, model, config, rep, conv, debug, say,
                                     load or run.load_model)
    if config.qat is None:
        return _Candidate(conv, bias), None, None
    from export.qat import run_qat

    qat_conv, qat_info = run_qat(run, model, config, rep, python=qat_exe, log=say)
    return _Candidate(qat_conv), _Candidate(conv, bias), qat_info


def _file_steps(c: _Candidate, config: QuantizationConfig, check: np.ndarray,
                say) -> _Candidate:
    """The file steps, each output-preserving: batch 1 -> compaction (then the gate's
    thresholds are measured on it, then :func:`_metadata_step`)."""
    conv = _batch_fixed(c.conv, check)  # the file phones and browsers run: [1, S, S, 3]
    if config.compact:  # lossless: identical quantization vectors stored once
        conv = _compacted(conv, config, check, say)
    return _Candidate(conv, c.bias)


def _metadata_step(c: _Candidate, card: dict, check: np.ndarray, say, md_python) -> _Candidate:
    """TFLite Model Metadata (export/tflite_metadata.py), after compaction, before validation;
    ``card`` holds the gate's thresholds when they were measured."""
    return _Candidate(with_metadata(c.conv, card, check, say, python=md_python), c.bias)


def _fit_ood(run: Run, model, config: QuantizationConfig, val_rows, say):
    """``(OodFit or None, why not)``: the ood density on the train split's pooled features,
    centred on the validation split (export/gate.py)."""
    from export import gate

    if OOD in model.output:
        return None, None  # the run's model computes it itself: measured as it is
    if config.mode == "dynamic":
        return None, ("No 'ood' output: dynamic-range quantization quantizes the ood head's"
                      " inputs on the fly and loses its residual term; export int8, float16 or"
                      " float32 for it. The quality thresholds were measured.")
    if config.qat is not None:
        return None, ("No 'ood' output: QAT exports do not carry it yet (export without --qat"
                      " for the full gate); the quality thresholds were measured.")
    if val_rows is None:
        return None, ("No 'ood' output and no measured thresholds: the gate is measured on"
                      " the validation images (drop --no-validate).")
    if gate.feature_model(model) is None:
        return None, (f"No 'ood' output: the model has no '{gate.POOL_LAYER}' layer (an"
                      " ensemble); the quality thresholds were measured.")
    budget = next(c["budget"] for c in gate.rules()["checks"] if c["value"] == gate.OOD)
    splits = run.splits()
    train = splits[splits["split"] == "train"]
    rows = stratified_sample(train, min(gate.FIT_IMAGES, len(train)), seed=config.seed)
    say(f"input gate: fitting the ood density on {len(rows)} train images"
        f" ({gate.COMPONENTS} components)")
    feats = np.concatenate([gate.features(model, load_images(rows["path"].iloc[i:i + 256]
                                                             .tolist(), run.input_size))
                            for i in range(0, len(rows), 256)])
    val = gate.features(model, load_images(val_rows["path"].tolist(), run.input_size))
    return gate.fit_ood(feats, val, budget), None


def _measure_gate(run: Run, model, shipped: _Candidate, fit, val_rows, where,
                  tolerances: Tolerances, note, say):
    """``(the card's gate section, the validation's gate check or None)``: thresholds and
    refusal rates on the validation images, with the shipped model's own ``ood``."""
    from export import gate

    if val_rows is None:
        return gate.section(thresholds={}, measured={}, fit=None, where=None, agreement=None,
                            note=note), None
    paths = val_rows["path"].tolist()
    measures = gate.photo_measures(paths)
    ood_lite = ood_float = None
    if OOD in model.output:
        images = load_images(paths, run.input_size)
        ood_float = keras_predict(model, images)[OOD].reshape(-1)
        ood_lite = LiteModel.load(shipped.conv.tflite).predict(
            images, batch_size=VALIDATION_BATCH)[OOD].reshape(-1)
    thresholds = gate.choose_thresholds(measures, ood_lite, run.input_size)
    measured = gate.rates(gate.refusals(measures, ood_lite, thresholds))
    check = (None if ood_lite is None else
             gate.agreement(measures, ood_float, ood_lite, thresholds, tolerances.gate_agreement))
    say(f"input gate: thresholds {thresholds}; refuses {measured['total']['refused']} of"
        f" {measured['n']} validation images")
    return gate.section(thresholds=thresholds, measured=measured, fit=fit, where=where,
                        agreement=check, note=note), check


def _add_gate_check(report: dict, check: dict) -> bool:
    """The gate's decision agreement as one more validation gate; the new verdict."""
    from export.validate import describe_gate

    v = report["validation"]
    if check["limit"] is not None and check["decision_agreement"] is not None:
        g = {"name": "gate_agreement", "value": check["decision_agreement"],
             "limit": check["limit"], "passed": check["passed"], "kind": "min"}
        v["gates"].append(g)
        if not g["passed"]:
            v["failed"].append(describe_gate(g))
    v["gate"] = check
    v["passed"] = not v["failed"]
    return v["passed"]


def _report(run: Run, config: QuantizationConfig, where, shipped: _Candidate) -> dict:
    """validation.json's header: what was converted, how, and what each step recorded."""
    conv = shipped.conv
    report: dict = {"run": str(run.path), "mode": config.mode, "config": config.to_dict(),
                    "data": where, "checks": conv.checks, "denylisted": conv.denylisted}
    if shipped.bias is not None:
        report["bias_correction"] = shipped.bias
    if conv.compaction is not None:
        report["compaction"] = conv.compaction
    if conv.debug:
        report["debug"] = conv.debug
    return report


def _validate(report: dict, run: Run, model, shipped: _Candidate, ptq: _Candidate | None,
              val_rows, tolerances: Tolerances, *, data, split: str, validate: bool,
              say) -> bool | None:
    """LiteRT vs the float Keras model on the validation rows, through the gates (the PTQ
    model too, with QAT); fills ``report`` and returns the verdict (None: not validated)."""
    from export.validate import compare

    if not validate:
        report["validation"] = {"passed": None, "skipped": True, "n": 0, "gates": [],
                                "failed": []}
        return None
    where = report["data"]
    say(f"validating on {len(val_rows)} images from {where}")
    images = load_images(val_rows["path"].tolist(), run.input_size)
    float_out = keras_predict(model, images)
    offsets = offsets_fitted_on(run, data, split)

    def gate(c: _Candidate) -> dict:
        out = LiteModel.load(c.conv.tflite).predict(images, batch_size=VALIDATION_BATCH)
        return compare(float_out, out, val_rows["dx"].tolist(),
                       val_rows["melanoma"].to_numpy(), run.diagnosis_labels,
                       run.melanoma_threshold, tolerances, class_offsets=offsets)

    report["validation"] = gate(shipped)
    if ptq is not None:  # QAT: the PTQ model through the same gates
        report["ptq"] = {"validation": gate(ptq)}
    return report["validation"]["passed"]


def _card_section(config: QuantizationConfig, shipped: _Candidate, ptq: _Candidate | None,
                  qat_info: dict | None, report: dict, where, *, validate: bool,
                  passed: bool | None) -> dict:
    """The bundle card's ``export`` section (docs/ARTIFACTS.md)."""
    import tensorflow as tf

    conv, bias = shipped.conv, shipped.bias
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
               "compaction": conv.compaction, "metadata": conv.checks.get("metadata"),
               "checks": {k: conv.checks[k] for k in ("verified_mode", "integer_tensor_fraction",
                                                      "ops")},
               "validation": summary,
               "size_bytes": len(conv.tflite), "sha256": sha256_bytes(conv.tflite)}
    if ptq is not None:  # QAT: what was trained, and the PTQ model it is compared with
        ptq_bias = ptq.bias
        ptq_section = {"size_bytes": len(ptq.conv.tflite), "sha256": sha256_bytes(ptq.conv.tflite),
                       "integer_tensor_fraction": ptq.conv.checks["integer_tensor_fraction"],
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
    return section


def offsets_fitted_on(run: Run, data, split: str) -> np.ndarray | None:
    """The run's class offsets (in its diagnosis-label order) when the images being validated
    on are the ones they were fitted on (its own ``split``), else None."""
    section = (run.card.get("calibration") or {}).get("class_bias") or {}
    offsets = section.get("offsets")
    if not offsets or data is not None or section.get("fitted_on", "val") != split:
        return None
    return np.array([offsets[c] for c in run.diagnosis_labels], dtype=np.float64)


def _bias_corrected(run, model, config, rep, plain, debug, say, load):
    """Convert a bias-corrected copy; with a ``plain`` conversion ("auto"), keep the better.

    "Better" is judged against the float model on the calibration images (train split), never
    on the held-out images the gates use.
    """
    from export.biascorr import DEFAULT_IMAGES, correct_biases
    from export.convert import convert_model
    from export.errors import ExportError

    corrected = load()
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
