"""The accuracy table of the recipes: what each trained run reaches on its lesion-grouped
validation split, as a float Keras model and as the int8 TFLite file a phone runs.

    python benchmarks/accuracy.py runs/effl0 runs/mnv2 runs/cloud [--exports exports]
                                  [--int8 effl0 mnv2] [--md benchmarks/accuracy.md]

For every run: ``trainer evaluate`` on the run's val split (the image model alone: single
pass, and with flip TTA unless the run is an ensemble, whose TTA is in the graph), the
cross-fitted balanced accuracy of its class offsets and the figure without them (the card's
``calibration.class_bias``), the figures
with patient metadata from the card (``trainer metadata``), the float32 export's size, and for
the runs named in ``--int8`` (default: every run that is not an ensemble) the validated int8
export (size, LiteRT balanced accuracy and melanoma AUC; in brackets, for runs with class
offsets, int8 vs float cross-fitted as the export's gate compares them, and whether the gates
passed). Bundles already in ``--exports``
that were made from the run as it is now are reused. Prints a table, writes JSON to
benchmarks/results/ and the markdown table to ``--md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from dermedge.files import write_json

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _bundle(run: Path, mode: str, exports: Path, representative: int):
    """An export bundle of ``run`` in ``mode``: reused when it carries this run's card as it
    is now (same run, same calibration), else exported afresh."""
    from export.api import QuantizationConfig, export_run

    out = exports / f"{run.name}-{mode}"
    card_path = out / "model_card.json"
    if card_path.is_file():
        card = json.loads(card_path.read_text())
        card.pop("export", None)
        if card == json.loads((run / "model_card.json").read_text()):
            return out, json.loads((out / "validation.json").read_text())
    cfg = (QuantizationConfig.int8(representative) if mode == "int8"
           else QuantizationConfig.float32())
    res = export_run(run, cfg, out)
    return res.path, res.report


def measure(run: Path, *, exports: Path, int8: bool, representative: int = 300) -> dict:
    from trainer.evaluate import evaluate
    from trainer.model import count_params
    from trainer.run import load_run

    model, card = load_run(run)
    ensemble = card.get("backbone") == "ensemble"
    row = {"run": str(run), "name": run.name, "backbone": card["backbone"],
           "members": [m["backbone"] for m in card.get("ensemble", {}).get("members", [])],
           "input": card["input"]["shape"][0], "params": count_params(model)["total"],
           "train_wall_s": (card["training"].get("members_wall_time_s")
                            if ensemble else card["training"].get("wall_time_s")),
           "calibration": card.get("calibration")}
    del model
    # The image model alone (what the TFLite file does on a phone without metadata) ...
    row["float"] = evaluate(run, out=run / "eval-val", progress=False, metadata=False)
    if not ensemble:
        row["float_tta"] = evaluate(run, tta=True, out=run / "eval-val-tta", progress=False,
                                   gallery=0, metadata=False)  # single pass has the gallery
    # ... and with the card's age/sex/site tables (`trainer metadata`), scored on the same split.
    prior = card.get("metadata_prior") or {}
    row["metadata"] = prior.get("metrics", {}).get("val")
    row["metadata_recall"] = prior.get("per_class_recall", {}).get("val")
    f32, _ = _bundle(run, "float32", exports, representative)
    row["float32_bytes"] = (f32 / "model.tflite").stat().st_size
    if int8:
        b8, report = _bundle(run, "int8", exports, representative)
        v = report["validation"]
        row["int8_bytes"] = (b8 / "model.tflite").stat().st_size
        row["int8"] = {"passed": v["passed"], "failed": v["failed"],
                       "balanced_accuracy": v["metrics"]["tflite"]["balanced_accuracy"],
                       "melanoma_auc": v["metrics"]["tflite"]["melanoma_auc"],
                       "diagnosis_agreement": v["heads"]["diagnosis"]["top1_agreement"],
                       "float_balanced_accuracy": v["metrics"]["float"]["balanced_accuracy"],
                       "float_melanoma_auc": v["metrics"]["float"]["melanoma_auc"],
                       # runs with class offsets: both models with offsets refitted on one
                       # half of val and scored on the other (the export's gate)
                       "crossfit": v["metrics"].get("balanced_accuracy_crossfit")}
    return row


def _f(x, fmt=".3f"):
    return "–" if x is None else format(x, fmt)


def _int8_bal(q: dict | None) -> str:
    if not q:
        return "–"
    cf = q.get("crossfit")
    return _f(q["balanced_accuracy"]) + (f" ({_f(cf['tflite'])} vs {_f(cf['float'])})"
                                         if cf else "")


def markdown(rows: list[dict]) -> str:
    from dermedge.labels import DIAGNOSIS_LABELS

    lines = [
        "| run | backbone | input | params | float32 MB | int8 MB | bal. acc "
        "| cross-fitted (without class offsets) | bal. acc TTA "
        "| int8 bal. acc (cross-fitted) | int8 gates | + metadata bal. acc | mel AUC "
        "| int8 mel AUC | + metadata mel AUC "
        "| sens @ 90% spec | ECE dx before → after | train wall (2 CPU) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f, t, q, m = r["float"], r.get("float_tta"), r.get("int8"), r.get("metadata") or {}
        cal = r.get("calibration") or {}
        ece = (f"{cal['ece_before']['diagnosis']:.3f} → "
               f"{cal['ece_after_crossfit']['diagnosis']:.3f}" if cal else
               _f(f.get("diagnosis_ece")))
        backbone = r["backbone"] + (f" ({' + '.join(r['members'])}, ×4 flips)"
                                    if r["members"] else "")
        bias = cal.get("class_bias") or {}
        crossfit = (f"{_f(bias.get('balanced_accuracy_after_crossfit'))} "
                    f"({_f(bias.get('balanced_accuracy_before'))})" if bias.get("offsets")
                    else "–")
        wall = r["train_wall_s"]
        lines.append(
            f"| {r['name']} | {backbone} | {r['input']} | {r['params'] / 1e6:.2f} M "
            f"| {r['float32_bytes'] / 1e6:.1f} | "
            f"{_f(r['int8_bytes'] / 1e6, '.1f') if q else '–'} "
            f"| **{f['balanced_accuracy']:.3f}** | {crossfit} "
            f"| {_f(t['balanced_accuracy']) if t else '–'} "
            f"| {_int8_bal(q)} "
            f"| {('pass' if q['passed'] else 'refused') if q else '–'} "
            f"| {_f(m.get('balanced_accuracy'))} | {f['melanoma']['auc']:.3f} "
            f"| {_f(q['melanoma_auc']) if q else '–'} | {_f(m.get('melanoma_auc'))} "
            f"| {_f(f['melanoma'].get('sensitivity_at_specificity_0.90'))} | {ece} "
            f"| {_f(wall / 60, '.0f') + ' min' if wall else '–'} |")
    lines += ["", "Per-class recall (float image model, single pass):", "",
              "| run | " + " | ".join(DIAGNOSIS_LABELS) + " |",
              "|---" * (len(DIAGNOSIS_LABELS) + 1) + "|"]
    for r in rows:
        pc = r["float"]["per_class"]
        lines.append(f"| {r['name']} | " + " | ".join(
            f"{pc[k]['recall']:.2f} ({pc[k]['support']})" for k in DIAGNOSIS_LABELS) + " |")
        if r.get("metadata_recall"):
            lines.append(f"| {r['name']} + metadata | " + " | ".join(
                f"{r['metadata_recall'][k]:.2f}" for k in DIAGNOSIS_LABELS) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--exports", type=Path, default=Path("exports"))
    p.add_argument("--int8", nargs="*", default=None,
                   help="run names to export and validate as int8 (default: every non-ensemble)")
    p.add_argument("--representative", type=int, default=300)
    p.add_argument("--md", type=Path, default=None, help="also write the table here")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from trainer.errors import DermedgeError
    from trainer.run import read_card

    rows = []
    try:
        for run in args.runs:
            run = run.resolve()
            ensemble = read_card(run).get("backbone") == "ensemble"
            int8 = (run.name in args.int8) if args.int8 is not None else not ensemble
            rows.append(measure(run, exports=args.exports.resolve(), int8=int8,
                                representative=args.representative))
    except DermedgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    table = markdown(rows)
    print(table)
    args.results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = args.results / f"accuracy-{stamp}.json"
    write_json(path, {"machine": platform.platform(), "cpus": os.cpu_count(), "rows": rows},
               allow_nan=True)
    print(f"wrote {path}")
    if args.md:
        args.md.write_text(table)
        print(f"wrote {args.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
