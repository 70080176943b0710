"""Probability calibration of both heads, folded into the model's weights.

Diagnosis: temperature scaling (Guo et al., 2017), ``z -> z / T``. Melanoma: Platt scaling,
``z -> z / T + c``: a temperature and a shift. The shift matters because the melanoma head is
trained with class weights, which move every logit by roughly the log of the weight ratio; a
temperature alone cannot undo that (benchmarks/recipes.md has the ECE figures). The diagnosis
head gets no per-class shift by default: that would move its argmax, and the class weights
that cause the shift are there for balanced accuracy.

Class-bias correction (opt-in, ``train.class_bias`` / ``trainer calibrate --class-bias``): one
logit offset per diagnosis class, ``z -> z / T + b``, fitted on the validation split to minimise
the *class-balanced* NLL (every class weighs the same however many images it has). It does move
the argmax, on purpose: training with a balanced loss on a few hundred images of a rare class
fits those images, and the model ends up predicting the rare classes more or less often on new
images than a balanced posterior would (the recipes over-predicted ``df`` and under-predicted
``bcc`` / ``vasc``). The offsets undo that drift. Because they are fitted on the split they are
scored on, the card also records balanced accuracy *cross-fitted* (offsets from one half of the
split, scored on the other), the honest figure for new images.

A head ``Dense(k, softmax|sigmoid)`` computes ``f(W x + b)``; both maps are the same layer with
``W / T`` and ``b / T + c``, so the calibrated model has the same graph, loads without custom
objects and survives every TFLite export mode. Argmax and ranking do not change: balanced
accuracy and AUC are untouched; only the probabilities (and so the calibration error and any
probability threshold) move.

The parameters are fitted by minimising the (unweighted) negative log-likelihood on the
validation split, recovering the logits from the probabilities: ``log p`` for the softmax (the
logits up to a per-row constant, which softmax ignores), ``logit(p)`` for the sigmoid.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from dermedge import numerics
from dermedge.artifacts import partial_dir
from dermedge.card import recalibrated
from dermedge.errors import RunDirError
from dermedge.files import write_json
from dermedge.labels import DIAGNOSIS_LABELS
from dermedge.metrics import CROSSFIT_REPEATS, balanced_accuracy_of
from dermedge.metrics import expected_calibration_error as ece
from dermedge.numerics import fit_class_bias, log_probs
from trainer.data import cache_images, read_splits
from trainer.evaluate import write_outputs
from trainer.metadata import score_on_val
from trainer.metrics import card_metrics, choose_threshold, score
from trainer.run import load_run, move_into_place, save_model

# Clips before the logs (float64): softmax outputs may underflow to 0; a sigmoid's 1 - p needs
# a margin from 1.
SIGMOID_EPS = 1e-12
# Temperatures searched: wide enough for any sane model, bounded so a degenerate split
# (one class, perfect separation) cannot send T to 0 or infinity.
T_MIN, T_MAX = 0.05, 20.0
# Melanoma logit shifts searched (log-odds): class weights of up to ~e^6 : 1 are undone.
SHIFT_MIN, SHIFT_MAX = -6.0, 6.0


def _sigmoid_logits(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), SIGMOID_EPS, 1 - SIGMOID_EPS)
    return np.log(p) - np.log1p(-p)


def softmax_nll(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    """NLL of ``mean over passes of softmax(logits / T)``; ``logits`` is (N, K) or (P, N, K)
    (P passes averaged: ensemble members, flips)."""
    p = _softmax(logits, temperature)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-300, None))))


def sigmoid_nll(logits: np.ndarray, y: np.ndarray, temperature: float,
                shift: float = 0.0) -> float:
    """NLL of ``mean over passes of sigmoid(logits / T + shift)``; ``logits`` is (N,) or
    (P, N)."""
    z = np.asarray(logits, np.float64)
    if z.ndim == 1:  # one pass: the numerically stable closed form
        z = z / temperature + shift
        return float(np.mean(np.logaddexp(0.0, z) - y * z))
    p = _sigmoid(z, temperature, shift)
    return float(-np.mean(y * np.log(np.clip(p, 1e-300, None))
                          + (1 - y) * np.log(np.clip(1 - p, 1e-300, None))))


def _softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    """``dermedge.numerics.softmax``, averaged over passes when ``logits`` is (P, N, K)."""
    p = numerics.softmax(logits, temperature)
    return p.mean(axis=0) if p.ndim == 3 else p


def _sigmoid(logits: np.ndarray, temperature: float, shift: float = 0.0) -> np.ndarray:
    p = 1.0 / (1.0 + np.exp(-(np.asarray(logits, np.float64) / temperature + shift)))
    return p.mean(axis=0) if p.ndim == 2 else p


def _golden(f, a: float, b: float, iters: int = 60) -> float:
    """Minimiser of a unimodal ``f`` on ``[a, b]`` by golden-section search."""
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return (a + b) / 2


def _minimise(f, lo: float = T_MIN, hi: float = T_MAX, iters: int = 60) -> float:
    """Golden-section search over log T (the NLL is unimodal in T for both heads)."""
    return math.exp(_golden(lambda u: f(math.exp(u)), math.log(lo), math.log(hi), iters))


def fit_temperature_softmax(probs: np.ndarray, y: np.ndarray) -> float:
    """T minimising the NLL of ``softmax(log probs / T)`` (averaged over passes, if ``probs``
    is (P, N, K)) for class indices ``y``."""
    y = np.asarray(y, np.int64).reshape(-1)
    if len(y) == 0:
        return 1.0
    z = log_probs(probs)
    return _minimise(lambda t: softmax_nll(z, y, t))


def fit_temperature_sigmoid(p: np.ndarray, y: np.ndarray) -> float:
    """T minimising the NLL of ``sigmoid(logit(p) / T)`` (averaged over passes, if ``p`` is
    (P, N)) for 0/1 outcomes ``y``."""
    y = np.asarray(y, np.float64).reshape(-1)
    if len(y) == 0 or y.min() == y.max():
        return 1.0  # one class only: nothing to calibrate against
    z = _sigmoid_logits(p)
    return _minimise(lambda t: sigmoid_nll(z, y, t))


def fit_platt_sigmoid(p: np.ndarray, y: np.ndarray, iters: int = 40) -> tuple[float, float]:
    """``(T, shift)`` minimising the NLL of ``sigmoid(logit(p) / T + shift)`` (averaged over
    passes, if ``p`` is (P, N)) for 0/1 outcomes ``y``. For one pass this is logistic
    regression on the logit, convex in ``(1/T, shift)``; the shift is searched in an outer
    golden section, the temperature in an inner one."""
    y = np.asarray(y, np.float64).reshape(-1)
    if len(y) == 0 or y.min() == y.max():
        return 1.0, 0.0  # one class only: nothing to calibrate against
    z = _sigmoid_logits(p)

    def best_t(shift: float) -> float:
        return _minimise(lambda t: sigmoid_nll(z, y, t, shift), iters=iters)

    shift = _golden(lambda c: sigmoid_nll(z, y, best_t(c), c), SHIFT_MIN, SHIFT_MAX, iters)
    return best_t(shift), shift


def apply_softmax(probs: np.ndarray, temperature: float,
                  bias: np.ndarray | None = None) -> np.ndarray:
    """Calibrated (N, K) probabilities from (N, K) or (P, N, K) per-pass probabilities
    (``softmax(log p / T + bias)`` per pass, then averaged)."""
    z = log_probs(probs)
    if bias is not None:
        z = z + np.asarray(bias, np.float64) * temperature
    return _softmax(z, temperature)


def apply_sigmoid(p: np.ndarray, temperature: float, shift: float = 0.0) -> np.ndarray:
    """Calibrated (N,) probabilities from (N,) or (P, N) per-pass probabilities."""
    return _sigmoid(_sigmoid_logits(p), temperature, shift)


def fold_temperatures(heads_of, temperatures: dict[str, float],
                      shifts: dict[str, float] | None = None) -> None:
    """Map each head's logits ``z -> z / T + shift`` in place: kernel ``/ T``, bias
    ``/ T + shift``. ``heads_of`` is a model whose head layers are named
    ``melanoma``/``diagnosis``, or a list of such models (the members of an ensemble, whose
    outputs are averaged)."""
    models = heads_of if isinstance(heads_of, list | tuple) else [heads_of]
    shifts = shifts or {}
    for model in models:
        for head, t in temperatures.items():
            layer = model.get_layer(head)  # the head layers carry the head names
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel / t, bias / t + shifts.get(head, 0.0)])


def fold_class_bias(heads_of, bias: np.ndarray) -> None:
    """Add ``bias`` (K,) to the diagnosis head's logits in place (its Dense bias), in a model
    or in every model of a list (ensemble members)."""
    models = heads_of if isinstance(heads_of, list | tuple) else [heads_of]
    for model in models:
        layer = model.get_layer("diagnosis")
        kernel, b = layer.get_weights()
        layer.set_weights([kernel, (b + np.asarray(bias, np.float64)).astype(b.dtype)])


def member_offsets(card: dict) -> np.ndarray | None:
    """The class offsets folded into a run (its card's ``calibration.class_bias``), or None."""

    offsets = ((card.get("calibration") or {}).get("class_bias") or {}).get("offsets")
    return None if not offsets else np.array([offsets[c] for c in DIAGNOSIS_LABELS])


def strip_class_bias(model, card: dict) -> bool:
    """Take a run's class offsets back out of its loaded ``model`` (exact: they were added to
    the diagnosis bias); returns whether it had any."""
    offsets = member_offsets(card)
    if offsets is not None:
        fold_class_bias(model, -offsets)
    return offsets is not None


def class_bias_section(probs: np.ndarray, y: np.ndarray, temperature: float, *, seed: int = 0,
                       fold_temperature=None, repeats: int = CROSSFIT_REPEATS):
    """Fit the class-bias offsets on all of ``y``, and cross-fitted: offsets from one half of
    the split score the other half, over ``repeats`` random halvings (seeded: the first is the
    halving ``calibrate`` uses for its cross-fitted calibration error), averaged.

    ``probs`` (P, N, K) are per-pass probabilities before ``temperature``;
    ``fold_temperature(mask)`` refits the temperature on a half (default: keep
    ``temperature``). Returns ``(offsets, card section, cross-fitted (N, K) probabilities of
    the first halving that kept every class on both sides)``: offsets ``None`` when the split
    lacks a class, probabilities ``None`` when no halving kept every class on both sides."""

    k = probs.shape[-1]
    counts = np.bincount(y, minlength=k)
    section: dict[str, Any] = {
        "method": "one logit offset per diagnosis class minimising the class-balanced NLL on "
                  "the validation split, added to the diagnosis head's bias",
        "fitted_on": "val",
    }
    missing = [DIAGNOSIS_LABELS[i] for i in np.flatnonzero(counts == 0)]
    if missing:
        section["skipped"] = (f"no validation images of {', '.join(missing)}: an offset "
                              "cannot be fitted for a class the split does not have")
        return None, section, None
    bias = fit_class_bias(probs, y, temperature)
    before = apply_softmax(probs, temperature)
    after = apply_softmax(probs, temperature, bias)
    rng = np.random.default_rng(seed)
    scores, first = [], None
    for _ in range(repeats):
        fold = rng.permutation(len(y)) % 2
        crossfit = np.empty(probs.shape[1:])
        for half in (0, 1):
            fit_on, test_on = fold != half, fold == half
            if (np.bincount(y[fit_on], minlength=k) == 0).any():
                crossfit = None
                break
            t = temperature if fold_temperature is None else fold_temperature(fit_on)
            crossfit[test_on] = apply_softmax(probs[:, test_on], t,
                                              fit_class_bias(probs[:, fit_on], y[fit_on], t))
        if crossfit is not None:
            scores.append(balanced_accuracy_of(y, crossfit))
            first = crossfit if first is None else first
    section.update({
        "offsets": {label: float(v) for label, v in zip(DIAGNOSIS_LABELS, bias, strict=True)},
        "balanced_accuracy_before": balanced_accuracy_of(y, before),
        "balanced_accuracy_after": balanced_accuracy_of(y, after),
        "balanced_accuracy_after_crossfit": float(np.mean(scores)) if scores else None,
        "balanced_accuracy_after_crossfit_sd": float(np.std(scores)) if scores else None,
        "crossfit_halvings": len(scores),
        "accuracy_before": float((before.argmax(-1) == y).mean()),
        "accuracy_after": float((after.argmax(-1) == y).mean()),
    })
    if not scores:
        section["crossfit_skipped"] = "no halving of the split kept every class on both sides"
    return bias, section, first


def calibrate(model, p_mel: np.ndarray, probs: np.ndarray, y: np.ndarray, mel: np.ndarray,
              *, seed: int = 0, class_bias: bool = False) -> dict[str, Any]:
    """Fit the diagnosis temperature and the melanoma temperature and shift on validation
    predictions, fold them into ``model`` (a model, or the list of ensemble members whose
    per-pass outputs are ``p_mel`` (P, N) / ``probs`` (P, N, K)), and report the expected
    calibration error before and after.

    ``ece_after`` is measured on the split the parameters were fitted on (optimistic);
    ``ece_after_crossfit`` fits on one half and measures on the other (two folds, seeded), an
    honest estimate of what the fitted parameters do on unseen images.

    ``class_bias``: also fit per-class diagnosis offsets (module docstring) and fold them in;
    the section's ``class_bias`` entry has them and balanced accuracy before / after /
    cross-fitted.
    """

    y = np.asarray(y, np.int64).reshape(-1)
    mel = np.asarray(mel, np.int64).reshape(-1)
    p_mel = np.asarray(p_mel, np.float64)
    probs = np.asarray(probs, np.float64)
    if probs.ndim == 2:  # one pass
        probs, p_mel = probs[None], p_mel.reshape(1, -1)
    t_diag = fit_temperature_softmax(probs, y)
    t_mel, c_mel = fit_platt_sigmoid(p_mel, mel)

    # Two-fold cross-fit: temperatures from one half, errors measured on the other.
    fold = np.random.default_rng(seed).permutation(len(y)) % 2
    cf_probs, cf_mel = np.empty(probs.shape[1:]), np.empty(p_mel.shape[1:])
    for k in (0, 1):
        fit_on, test_on = fold != k, fold == k
        td = fit_temperature_softmax(probs[:, fit_on], y[fit_on])
        tm, cm = fit_platt_sigmoid(p_mel[:, fit_on], mel[fit_on])
        cf_probs[test_on] = apply_softmax(probs[:, test_on], td)
        cf_mel[test_on] = apply_sigmoid(p_mel[:, test_on], tm, cm)

    bias, bias_section = None, None
    if class_bias:
        bias, bias_section, crossfit = class_bias_section(
            probs, y, t_diag, seed=seed,
            fold_temperature=lambda mask: fit_temperature_softmax(probs[:, mask], y[mask]))
        if crossfit is not None:  # the cross-fitted calibration error includes the offsets
            cf_probs = crossfit

    fold_temperatures(model, {"diagnosis": t_diag, "melanoma": t_mel}, {"melanoma": c_mel})
    if bias is not None:
        fold_class_bias(model, bias)
    before_probs, before_mel = probs.mean(axis=0), p_mel.mean(axis=0)
    after_probs = apply_softmax(probs, t_diag, bias)
    after_mel = apply_sigmoid(p_mel, t_mel, c_mel)
    zd, zm = log_probs(probs), _sigmoid_logits(p_mel)
    zd_after = zd if bias is None else zd + bias * t_diag
    section = {
        "method": "temperature scaling (diagnosis) and Platt scaling (melanoma: temperature "
                  "and logit shift), folded into the head weights",
        "fitted_on": "val",
        "n": int(len(y)),
        "temperature": {"diagnosis": t_diag, "melanoma": t_mel},
        "shift": {"diagnosis": 0.0, "melanoma": c_mel},
        "ece_before": {"diagnosis": ece(before_probs, y), "melanoma": ece(before_mel, mel)},
        "ece_after": {"diagnosis": ece(after_probs, y), "melanoma": ece(after_mel, mel)},
        "ece_after_crossfit": {"diagnosis": ece(cf_probs, y), "melanoma": ece(cf_mel, mel)},
        "nll_before": {"diagnosis": softmax_nll(zd, y, 1.0), "melanoma": sigmoid_nll(zm, mel, 1.0)},
        "nll_after": {"diagnosis": softmax_nll(zd_after, y, t_diag),
                      "melanoma": sigmoid_nll(zm, mel, t_mel, c_mel)},
    }
    if class_bias:
        section["class_bias"] = bias_section
    return section


def calibrate_run(run_dir, *, class_bias: bool = False, batch_size: int = 64,
                  progress: bool = True) -> dict[str, Any]:
    """Calibrate a finished run that was trained with ``train.calibrate: false`` (or before
    calibration existed): fit on its validation split, fold, and rewrite ``model.keras``, the
    melanoma threshold, ``metrics.json`` and the card. Returns the card's calibration section.

    ``class_bias``: also fit the per-class diagnosis offsets; on a run that is already
    calibrated without them, fit only the offsets, on top of its folded temperatures (the
    same fit ``train.class_bias`` makes during ``trainer fit``)."""
    import shutil
    from pathlib import Path

    from trainer.pipeline import MEL_INDEX, labels_from_dx, predict_arrays

    run = Path(run_dir).expanduser().resolve()
    model, card = load_run(run)
    existing = card.get("calibration")
    has_offsets = member_offsets(card) is not None
    if existing and (not class_bias or has_offsets):
        t = existing["temperature"]
        what = "calibrated with class offsets" if has_offsets else "calibrated"
        raise RunDirError(f"{run} is already {what} (temperatures diagnosis="
                          f"{t['diagnosis']:.3f}, melanoma={t['melanoma']:.3f}); calibrating "
                          "twice would fit on predictions that already use them."
                          + ("" if class_bias else " (--class-bias adds only the per-class "
                             "offsets to a calibrated run.)"))
    if card.backbone == "ensemble":
        raise RunDirError(f"{run} is an ensemble: rebuild it with `trainer ensemble` (which "
                          "calibrates; --class-bias for the offsets) instead.")
    records = read_splits(run / "splits.csv")
    val = records[records["split"] == "val"].reset_index(drop=True)
    images = cache_images(val["path"].tolist(), card.input_size, None, progress=progress)
    y = labels_from_dx(val["dx"])
    p_mel, probs = predict_arrays(model, images, batch_size=batch_size)
    seed = int(card.get("config", {}).get("seed", 0) or 0)
    if existing:  # temperatures already folded: the offsets alone, at T = 1
        bias, bias_section, crossfit = class_bias_section(probs[None], y, 1.0, seed=seed)
        if bias is None:
            raise RunDirError(f"{run}: {bias_section['skipped']}.")
        fold_class_bias(model, bias)
        bias_section["after_temperature_scaling"] = True
        section = dict(existing)
        section["class_bias"] = bias_section
        after = apply_softmax(probs, 1.0, bias)
        section["ece_after"] = {**existing["ece_after"], "diagnosis": ece(after, y)}
        section["nll_after"] = {**existing["nll_after"],
                                "diagnosis": softmax_nll(log_probs(after), y, 1.0)}
        if crossfit is not None:
            section["ece_after_crossfit"] = {**existing["ece_after_crossfit"],
                                             "diagnosis": ece(crossfit, y)}
    else:
        section = calibrate(model, p_mel, probs, y, y == MEL_INDEX, seed=seed,
                            class_bias=class_bias)
    p_mel, probs = predict_arrays(model, images, batch_size=batch_size)
    spec = card.get("config", {}).get("train", {}).get("melanoma_threshold", "youden")
    threshold = choose_threshold(val, p_mel, spec)
    metrics = score(val, p_mel, probs, threshold=threshold)
    old = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() \
        else {}
    metrics.update({k: old[k] for k in ("split", "source", "best_epoch") if k in old})
    metrics["tta"] = False
    scores = None
    if card.get("metadata_prior"):  # same tables; its val scores used the old answers

        scores = score_on_val(card["metadata_prior"], val, p_mel, probs, threshold, spec)
    card = recalibrated(card, calibration=section, melanoma_threshold=threshold,
                        metrics_val=card_metrics(metrics), metadata_scores=scores)
    # Rewrite a copy and swap it in: an interruption leaves the run as it was.
    work = partial_dir(run)
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(run, work)
    try:
        save_model(model, work)
        write_outputs(work, val, p_mel, probs, metrics, predictions=False, report=False)
        write_json(work / "model_card.json", card.to_dict())
        move_into_place(work, run, overwrite=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return section
