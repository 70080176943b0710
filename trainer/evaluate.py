"""``trainer evaluate``: score a run's model on its val/test split or any labelled dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dermedge.files import write_json, write_text
from dermedge.labels import DIAGNOSIS_LABELS, MELANOMA_DX
from dermedge.metrics import roc_curve
from trainer.data import cache_images, load_records, read_splits, write_isic_predictions
from trainer.errors import DataError, DermedgeError
from trainer.metadata import apply_prior, has_metadata
from trainer.metrics import card_metrics, choose_threshold, score
from trainer.run import load_run

__all__ = ["card_metrics", "choose_threshold", "evaluate", "score", "summary_table",
           "write_outputs"]

GALLERY_PER_CLASS = 4  # Grad-CAM gallery: cases per true class and kind (issue 7)


def write_outputs(out_dir: str | Path, records: pd.DataFrame, p_mel: np.ndarray,
                  probs: np.ndarray, metrics: dict[str, Any], *, predictions: bool = True,
                  report: bool = True, history: pd.DataFrame | None = None,
                  best_epoch: int | None = None,
                  gallery: dict[str, str] | str | None = None) -> None:
    """metrics.json, predictions*.csv, report.md and plots/ under ``out_dir``; ``gallery``
    (``{class: png}`` from ``trainer.explain.write_gallery``, or why it was skipped) is linked
    from report.md."""
    from trainer import plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", metrics)
    if predictions:
        ids = records["image_id"].astype(str).tolist()
        write_isic_predictions(ids, probs, out / "predictions.csv")
        full = pd.DataFrame({"image": ids, "dx": records["dx"].astype(str).to_numpy(),
                             "melanoma": (records["dx"].astype(str) == MELANOMA_DX)
                             .astype(int).to_numpy(),
                             "p_melanoma": p_mel,
                             "pred_dx": np.asarray(DIAGNOSIS_LABELS)[probs.argmax(axis=1)]})
        for i, lab in enumerate(DIAGNOSIS_LABELS):
            full[f"p_{lab}"] = probs[:, i]
        write_text(out / "predictions_full.csv", full.to_csv(index=False))
    if report:
        write_text(out / "report.md", report_markdown(metrics, gallery=gallery))
    pdir = out / "plots"
    if history is not None and len(history):
        plots.plot_curves(history, pdir / "curves.png", best_epoch=best_epoch)
    labels = metrics["labels"]
    plots.plot_confusion(metrics["confusion_matrix"], labels, pdir / "confusion_counts.png",
                         normalize=False)
    plots.plot_confusion(metrics["confusion_matrix"], labels, pdir / "confusion_normalized.png",
                         normalize=True)
    mel_true = (records["dx"].astype(str).to_numpy() == MELANOMA_DX).astype(np.int64)
    m = metrics["melanoma"]
    if 0 < mel_true.sum() < len(mel_true):
        fpr, tpr, _ = roc_curve(mel_true, p_mel)
        op = (m["sensitivity"], m["specificity"])
    else:  # ROC undefined with one class: draw the chance line only
        fpr, tpr, op = np.array([0.0, 1.0]), np.array([0.0, 1.0]), None
    plots.plot_roc(fpr, tpr, pdir / "roc_melanoma.png", auc=m["auc"], operating_point=op)


def _f(x: Any, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def report_markdown(m: dict[str, Any], *, gallery: dict[str, str] | str | None = None) -> str:
    mel = m["melanoma"]
    lines = [
        f"# Evaluation: {m.get('source', '')} ({m.get('split', '')}, n={m['n']}"
        + (", TTA" if m.get("tta") else "") + ")",
        "",
        "| metric | value |", "|---|---|",
        f"| accuracy | {_f(m['accuracy'])} |",
        f"| balanced multiclass accuracy | {_f(m['balanced_accuracy'])} |",
        f"| melanoma ROC AUC | {_f(mel['auc'])} |",
        f"| melanoma average precision | {_f(mel['average_precision'])} |",
        "",
        *_metadata_lines(m.get("metadata")),
        "## Diagnosis head, per class", "",
        "| class | recall | precision | F1 | support |", "|---|---|---|---|---|",
    ]
    for lab, r in m["per_class"].items():
        lines.append(f"| {lab} | {_f(r['recall'])} | {_f(r['precision'])} | {_f(r['f1'])} "
                     f"| {r['support']} |")
    lines += ["", f"## Melanoma head ({mel['n_positive']} melanomas)", "",
              "| operating point | threshold | sensitivity | specificity |", "|---|---|---|---|",
              f"| chosen on validation | {_f(mel['threshold'], 4)} | {_f(mel['sensitivity'])} "
              f"| {_f(mel['specificity'])} |"]
    for target, r in mel["at_sensitivity"].items():
        lines.append(f"| sensitivity >= {float(target):.0%} | {_f(r['threshold'], 4)} "
                     f"| {_f(r['sensitivity'])} | {_f(r['specificity'])} |")
    lines += ["", "## Confusion matrix (rows true, columns predicted)", "",
              "| | " + " | ".join(m["labels"]) + " |",
              "|---" * (len(m["labels"]) + 1) + "|"]
    for lab, row in zip(m["labels"], m["confusion_matrix"], strict=True):
        lines.append(f"| **{lab}** | " + " | ".join(str(v) for v in row) + " |")
    lines += _gallery_section(gallery)
    return "\n".join(lines) + "\n"


def _metadata_lines(meta: dict[str, Any] | None) -> list[str]:
    if not meta:
        return []
    if not meta.get("applied"):
        return [f"Patient metadata: not used ({meta.get('reason', 'none')}).", ""]
    io = meta["image_only"]
    return [f"Patient metadata (age/sex/site, weight {meta['weight']:g}) applied to "
            f"{meta['cases_with_metadata']} of {meta['n']} images; the image model alone: "
            f"balanced accuracy {_f(io['balanced_accuracy'])}, melanoma AUC "
            f"{_f(io['melanoma_auc'])}, accuracy {_f(io['accuracy'])} (`--no-metadata`).", ""]


def summary_table(m: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    mel = m["melanoma"]
    rows = [("images", str(m["n"])), ("accuracy", _f(m["accuracy"])),
            ("balanced accuracy", _f(m["balanced_accuracy"])),
            ("melanoma AUC", _f(mel["auc"])), ("melanoma AP", _f(mel["average_precision"])),
            (f"mel sens/spec @ {_f(mel['threshold'], 3)}",
             f"{_f(mel['sensitivity'])} / {_f(mel['specificity'])}")]
    for target, r in mel["at_sensitivity"].items():
        rows.append((f"mel spec @ sens {float(target):.0%}", _f(r["specificity"])))
    meta = m.get("metadata") or {}
    if meta.get("applied"):
        io = meta["image_only"]
        rows.append(("metadata", f"age/sex/site on {meta['cases_with_metadata']} of {meta['n']} "
                     f"images (image only: bal. acc {_f(io['balanced_accuracy'])}, AUC "
                     f"{_f(io['melanoma_auc'])})"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def evaluate(run_dir: str | Path, *, data: str | Path | None = None, layout: str = "auto",
             images: str | Path | None = None, split: str = "val", tta: bool = False,
             out: str | Path | None = None, batch_size: int = 64,
             cache_dir: str | Path | None = None, progress: bool = True,
             gallery: int = GALLERY_PER_CLASS, metadata: bool = True) -> dict[str, Any]:
    """Evaluate a run on its ``split`` (from splits.csv) or on ``data``; writes to ``out``
    (default ``<run>/eval-<split>`` or ``<run>/eval-<data folder name>``); returns the metrics.
    ``gallery``: Grad-CAM cases per true class and kind (correct / wrong) in ``gallery/``; 0: none.
    ``metadata``: apply the card's ``metadata_prior`` (``trainer metadata``) to images that
    carry age/sex/site; the image model's own figures stay under ``metrics["metadata"]``.
    """
    check_gallery(gallery)
    from trainer.pipeline import predict_arrays

    run = Path(run_dir).expanduser().resolve()
    model, card = load_run(run)
    size = card.input_size
    threshold = card.melanoma_threshold
    if data is not None:
        records = load_records(data, layout=layout, images=images)
        source, split_name = str(Path(data).expanduser().resolve()), "all"
        default_out = run / f"eval-{Path(data).expanduser().resolve().name}"
    else:
        if split not in ("train", "val", "test"):
            raise DataError(f"Unknown split {split!r}; use val, test or train (or --data).")
        all_records = read_splits(run / "splits.csv")
        records = all_records[all_records["split"] == split].reset_index(drop=True)
        if records.empty:
            have = sorted(all_records["split"].unique())
            raise DataError(f"The run's splits.csv has no {split!r} images (it has: "
                            f"{', '.join(have)}). Train with data.test_fraction > 0 for a test "
                            "split, or pass --data with a labelled test set.")
        source, split_name = card.get("data", {}).get("source", str(run)), split
        default_out = run / f"eval-{split}"
    if records.empty:
        raise DataError(f"No images to evaluate in {data}.")
    cached = cache_images(records["path"].tolist(), size, cache_dir, progress=progress)
    p_mel, probs = predict_arrays(model, cached, batch_size=batch_size, tta=tta)
    p_mel, probs, threshold, meta = _with_metadata(card, records, p_mel, probs, threshold,
                                                   metadata)
    metrics = score(records, p_mel, probs, threshold=threshold)
    metrics.update({"split": split_name, "source": source, "tta": bool(tta), "run": str(run),
                    "metadata": meta})
    out_dir = Path(out).expanduser().resolve() if out else default_out
    shown = gallery_step(out_dir, model, card, cached, records, probs, gallery)
    write_outputs(out_dir, records, p_mel, probs, metrics, gallery=shown)
    return metrics


def _with_metadata(card: dict[str, Any], records: pd.DataFrame, p_mel: np.ndarray,
                   probs: np.ndarray, threshold: float, use: bool):
    """The card's metadata tables applied where the records carry age/sex/site."""

    prior = card.get("metadata_prior")
    if not prior:
        return p_mel, probs, threshold, {
            "applied": False, "reason": "the run has no metadata tables (`trainer metadata RUN`)"}
    if not use:
        return p_mel, probs, threshold, {"applied": False, "reason": "--no-metadata"}
    if not has_metadata(records):
        return p_mel, probs, threshold, {"applied": False,
                                         "reason": "the images carry no age, sex or site"}
    image_only = card_metrics(score(records, p_mel, probs, threshold=threshold))
    p_mel, probs, used = apply_prior(prior, p_mel, probs, records)
    meta = {"applied": True, "weight": float(prior["weight"]), "n": int(len(records)),
            "cases_with_metadata": int((used > 0).sum()), "fields": list(prior["fields"]),
            "image_only": image_only}
    return p_mel, probs, float(prior["melanoma_threshold"]), meta


# --- Grad-CAM gallery (trainer.explain; issue 7) --------------------------------------------

def check_gallery(per_class: int) -> None:
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 0:
        raise DermedgeError(f"gallery must be a number of cases per class >= 0 (0: no gallery);"
                            f" received {per_class!r}.")


def gallery_step(out_dir: Path, model, card: dict[str, Any], images: np.ndarray,
                 records: pd.DataFrame, probs: np.ndarray,
                 per_class: int) -> dict[str, str] | str | None:
    """Write ``gallery/<class>.png`` (Grad-CAM needs the TensorFlow backend; under another
    backend the report says it was skipped)."""
    if not per_class:
        return None
    import keras

    if keras.backend.backend() != "tensorflow":
        return (f"skipped: Grad-CAM needs the TensorFlow backend, this run used "
                f"{keras.backend.backend()!r}; rerun with KERAS_BACKEND=tensorflow.")
    from trainer.explain import unexplainable, write_gallery

    why_not = unexplainable(card)
    if why_not:
        return f"skipped: {why_not} for their galleries."

    return write_gallery(out_dir, model, card, images, records, probs, per_class=per_class)


def _gallery_section(gallery: dict[str, str] | str | None) -> list[str]:
    if gallery is None:
        return []
    lines = ["", "## Grad-CAM gallery", ""]
    if isinstance(gallery, str):
        return lines + [f"Gallery {gallery}"]
    lines.append("Per true class, the most confident correct and wrong cases; each crop is "
                 "shown next to the Grad-CAM heatmap of the class the model predicted. Look "
                 "for heat on the lesion, not on the skin, rulers, hairs or the vignette.")
    lines.append("")
    lines += [f"- [{lab}]({path})" for lab, path in gallery.items()]
    return lines
