"""The converted model vs the float Keras model on a labelled set, under explicit gates."""

from __future__ import annotations

import math

import numpy as np

from export.config import Tolerances


def _f(x) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


# Float top-1 minus top-2 probability: where an answer flips tells a near-tie (inherent to an
# unsure float model) from a confident answer the quantized model got wrong.
MARGIN_EDGES = (0.0, 0.05, 0.1, 0.2, 0.4, 1.0)


def agreement_by_margin(pf: np.ndarray, pl: np.ndarray) -> list[dict]:
    """Top-1 agreement of ``pl`` with ``pf`` (N, K) per bin of the float model's margin."""
    top2 = np.sort(pf, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    agree = pf.argmax(1) == pl.argmax(1)
    rows = []
    for lo, hi in zip(MARGIN_EDGES[:-1], MARGIN_EDGES[1:], strict=True):
        m = (margin >= lo) & ((margin < hi) if hi < 1.0 else (margin <= hi))
        rows.append({"margin": [lo, hi], "n": int(m.sum()),
                     "agreement": float(agree[m].mean()) if m.any() else None})
    return rows


def _metrics(y, probs, mel_y, p_mel, labels, threshold) -> dict:
    from dermedge.metrics import classification_metrics

    return classification_metrics(y, probs, mel_y, p_mel, labels, mel_threshold=threshold)


def compare(float_out: dict, lite_out: dict, dx: list[str], mel_true, labels: tuple[str, ...],
            threshold: float, tolerances: Tolerances, *,
            class_offsets: np.ndarray | None = None) -> dict:
    """Agreement, |Δp| and metric deltas per head, and every gate with its verdict.

    ``class_offsets`` (K, in ``labels`` order): the run's per-class diagnosis offsets, when
    they were fitted on these very images (``trainer calibrate --class-bias``). Then the
    balanced-accuracy gate uses the **cross-fitted** drop (dermedge.metrics.crossfit_pair):
    in sample, where the offsets put the class boundaries among these very images swings the
    drop of a quantized copy either way by more than the tolerance, however label-blind its
    errors. Both figures are reported."""
    idx = {lab: i for i, lab in enumerate(labels)}
    y = np.array([idx[d] for d in dx], dtype=np.int64)
    mel_y = np.asarray(mel_true, dtype=np.int64).reshape(-1)
    pf_d, pl_d = np.asarray(float_out["diagnosis"]), np.asarray(lite_out["diagnosis"])
    pf_m, pl_m = (np.asarray(float_out["melanoma"]).reshape(-1),
                  np.asarray(lite_out["melanoma"]).reshape(-1))
    mf = _metrics(y, pf_d, mel_y, pf_m, labels, threshold)
    ml = _metrics(y, pl_d, mel_y, pl_m, labels, threshold)
    d_abs, m_abs = np.abs(pf_d - pl_d), np.abs(pf_m - pl_m)
    heads = {
        "diagnosis": {
            "top1_agreement": float(np.mean(pf_d.argmax(1) == pl_d.argmax(1))),
            "agreement_by_margin": agreement_by_margin(pf_d, pl_d),
            "max_abs_diff": float(d_abs.max()), "mean_abs_diff": float(d_abs.mean()),
        },
        "melanoma": {
            "threshold": float(threshold),
            "threshold_agreement": float(np.mean((pf_m >= threshold) == (pl_m >= threshold))),
            "max_abs_diff": float(m_abs.max()), "mean_abs_diff": float(m_abs.mean()),
        },
    }

    def pick(m):
        return {"balanced_accuracy": _f(m["balanced_accuracy"]),
                "accuracy": _f(m["accuracy"]),
                "melanoma_auc": _f(m["melanoma"]["auc"]),
                "melanoma_sensitivity": _f(m["melanoma"]["sensitivity"]),
                "melanoma_specificity": _f(m["melanoma"]["specificity"]),
                "per_class_recall": {k: _f(v["recall"]) for k, v in m["per_class"].items()}}

    f, lt = pick(mf), pick(ml)
    delta = {k: (None if f[k] is None or lt[k] is None else lt[k] - f[k])
             for k in f if k != "per_class_recall"}
    delta["per_class_recall"] = {
        k: (None if f["per_class_recall"][k] is None or lt["per_class_recall"][k] is None
            else lt["per_class_recall"][k] - f["per_class_recall"][k])
        for k in f["per_class_recall"]}

    gates = []

    def gate(name, value, limit, kind, **extra):
        if limit is None:
            return
        if value is None:
            gates.append({"name": name, "value": None, "limit": limit, "passed": True,
                          "note": "not computable on this set (e.g. one class only); skipped"})
            return
        ok = value >= limit if kind == "min" else value <= limit
        gates.append({"name": name, "value": value, "limit": limit, "passed": bool(ok),
                      "kind": kind, **extra})

    t = tolerances
    gate("diagnosis_agreement", heads["diagnosis"]["top1_agreement"], t.diagnosis_agreement, "min")
    gate("melanoma_agreement", heads["melanoma"]["threshold_agreement"], t.melanoma_agreement,
         "min")
    def drop(k):
        return None if delta[k] is None else max(0.0, -delta[k])

    crossfit = None
    if class_offsets is not None:
        from dermedge.metrics import crossfit_pair

        crossfit = crossfit_pair(pf_d, pl_d, y, class_offsets)
    if crossfit is not None:
        crossfit = {"float": crossfit["reference"], "tflite": crossfit["other"],
                    "drop": crossfit["drop"], "drop_sd": crossfit["drop_sd"],
                    "halvings": crossfit["halvings"],
                    "why": "the run's class offsets were fitted on these images: refitted on "
                           "one half from the float model, both models scored on the other"}
        gate("balanced_accuracy_drop", max(0.0, crossfit["drop"]), t.balanced_accuracy_drop,
             "max", basis="cross-fitted")
    else:
        uncrossed = {} if class_offsets is None else {
            "note": "in sample: no halving of these images kept every class on both sides, so "
                    "the offsets could not be cross-fitted"}
        gate("balanced_accuracy_drop", drop("balanced_accuracy"), t.balanced_accuracy_drop,
             "max", **uncrossed)
    gate("melanoma_auc_drop", drop("melanoma_auc"), t.melanoma_auc_drop, "max")
    gate("melanoma_sensitivity_drop", drop("melanoma_sensitivity"), t.melanoma_sensitivity_drop,
         "max")
    gate("max_abs_diff", max(heads["diagnosis"]["max_abs_diff"], heads["melanoma"]["max_abs_diff"]),
         t.max_abs_diff, "max")
    failed = [g for g in gates if not g["passed"]]
    metrics = {"float": f, "tflite": lt, "delta": delta}
    if crossfit is not None:
        metrics["balanced_accuracy_crossfit"] = crossfit
    return {"passed": not failed, "n": int(len(y)), "heads": heads, "metrics": metrics,
            "gates": gates, "failed": [describe_gate(g) for g in failed],
            "tolerances": t.to_dict()}


def describe_gate(g: dict) -> str:
    if g["kind"] == "min":
        return (f"{g['name']} = {g['value']:.4f} is below the minimum {g['limit']:.4f} "
                f"(short by {g['limit'] - g['value']:.4f})")
    return (f"{g['name']} = {g['value']:.4f} exceeds the maximum {g['limit']:.4f} "
            f"(over by {g['value'] - g['limit']:.4f})")


def _fmt(x, nd=4) -> str:
    return "n/a" if x is None else f"{x:+.{nd}f}" if isinstance(x, float) and x < 0 else (
        f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def to_markdown(report: dict, title: str) -> str:
    """validation.md: the verdict first, then gates, heads, metrics and per-class recall."""
    v = report["validation"]
    lines = [f"# Validation: {title}", "",
             f"**{'PASSED' if v['passed'] else 'FAILED'}** — mode `{report['mode']}`, "
             f"{v['n']} images from {report['data']}, LiteRT vs the float Keras model.", ""]
    if v["failed"]:
        lines += ["Failed gates:", ""] + [f"* {s}" for s in v["failed"]] + [""]
    bc = report.get("bias_correction")
    if bc and bc.get("skipped"):
        lines += [f"Bias correction was skipped: {bc['skipped']}", ""]
    elif bc:
        sel = bc.get("selection")
        how = (f" Converted with and without it; agreement with float on the {sel['images']} "
               f"calibration images: {sel['plain']['diagnosis_agreement']:.4f} without, "
               f"{sel['corrected']['diagnosis_agreement']:.4f} with; this bundle is the "
               f"**{bc['chosen']}** model." if sel else " This bundle is the corrected model.")
        lines += [f"Bias correction ({bc['method']}): {bc['layers_corrected']} layers corrected "
                  f"on {bc['images']} images, {len(bc['layers_skipped'])} skipped, "
                  f"{bc['seconds']} s.{how} `--bias-correction off` turns it off.", ""]
    lines += ["## Gates", "", "| gate | value | limit | |", "|---|---|---|---|"]
    for g in v["gates"]:
        lim = ("≥ " if g.get("kind") == "min" else "≤ ") + f"{g['limit']}"
        name = g["name"] + (f" ({g['basis']})" if g.get("basis") else "")
        lines.append(f"| {name} | {_fmt(g['value'])} | {lim} | "
                     f"{'ok' if g['passed'] else '**FAIL**'} |")
    h = v["heads"]
    lines += ["", "## Heads", "", "| head | agreement | max abs Δp | mean abs Δp |",
              "|---|---|---|---|",
              f"| diagnosis (top-1) | {h['diagnosis']['top1_agreement']:.4f} | "
              f"{h['diagnosis']['max_abs_diff']:.4f} | {h['diagnosis']['mean_abs_diff']:.5f} |",
              f"| melanoma (≥ {h['melanoma']['threshold']:.3f}) | "
              f"{h['melanoma']['threshold_agreement']:.4f} | {h['melanoma']['max_abs_diff']:.4f} | "
              f"{h['melanoma']['mean_abs_diff']:.5f} |"]
    by_margin = h["diagnosis"].get("agreement_by_margin")
    if by_margin:
        lines += ["", "Diagnosis agreement by the float model's top-1 − top-2 margin (flips at "
                  "small margins are near-ties; flips at large ones are real damage):", "",
                  "| margin | images | agreement |", "|---|---|---|"]
        lines += [f"| {b['margin'][0]:.2f}–{b['margin'][1]:.2f} | {b['n']} | "
                  f"{'n/a' if b['agreement'] is None else format(b['agreement'], '.4f')} |"
                  for b in by_margin]
    lines += ["", "## Metrics", "", "| metric | float (Keras) | TFLite | Δ |", "|---|---|---|---|"]
    m = v["metrics"]
    for k in ("balanced_accuracy", "accuracy", "melanoma_auc", "melanoma_sensitivity",
              "melanoma_specificity"):
        lines.append(f"| {k} | {_fmt(m['float'][k])} | {_fmt(m['tflite'][k])} | "
                     f"{_fmt(m['delta'][k])} |")
    cf = m.get("balanced_accuracy_crossfit")
    if cf:
        lines.append(f"| balanced_accuracy, cross-fitted | {_fmt(cf['float'])} | "
                     f"{_fmt(cf['tflite'])} | {_fmt(-cf['drop'])} ± {cf['drop_sd']:.4f} |")
        lines += ["", "The run's class offsets were fitted on these images, so the plain "
                  "comparison depends on where they put the class boundaries among exactly "
                  "these labels: a quantized copy that answers a few near-ties differently can "
                  "lose (or gain) more than the tolerance with errors that know nothing of the "
                  "labels. The gate uses the cross-fitted figure instead: the offsets refitted "
                  "from the float model on one half of the images, both models scored on the "
                  f"other, {cf['halvings']} random halvings (mean ± SD of the difference)."]
    lines += ["", "Per-class recall:", "", "| class | float | TFLite | Δ |", "|---|---|---|---|"]
    for k in m["float"]["per_class_recall"]:
        lines.append(f"| {k} | {_fmt(m['float']['per_class_recall'][k])} | "
                     f"{_fmt(m['tflite']['per_class_recall'][k])} | "
                     f"{_fmt(m['delta']['per_class_recall'][k])} |")
    dbg = report.get("debug")
    if dbg:
        lines += ["", "## Quantization debugger: layers with the largest error", "",
                  f"Metric: {dbg['metric']}; {dbg['layers_analysed']} layers analysed.",
                  "",
                  "| # | op | tensor | rmse/scale | rmse | max abs error |",
                  "|---|---|---|---|---|---|"]
        for i, r in enumerate(dbg["top"], 1):
            lines.append(f"| {i} | {r['op']} | `{r['tensor']}` | {r['rmse_over_scale']:.3f} | "
                         f"{r['rmse']:.4g} | {r['max_abs_error']:.4g} |")
    return "\n".join(lines) + "\n"
