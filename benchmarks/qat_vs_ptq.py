"""Float vs post-training int8 (PTQ) vs quantization-aware int8 (QAT) of one run, side by side.

    python benchmarks/qat_vs_ptq.py RUN [--out DIR] [--qat-epochs 2] [--qat-steps N]
                                    [--qat-lr 1e-5] [--representative 300] [--qat-python PY]

One ``export_run`` with ``QuantizationConfig.int8_qat`` (it converts and validates the PTQ model
too, on the same held-out images, against the same float model); prints the table and writes
JSON to benchmarks/results/qat_vs_ptq-<run>-<timestamp>.json. Needs the QAT environment
(``python -m export qat-setup``).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dermedge.files import write_json  # noqa: E402
from export.api import QuantizationConfig, export_run  # noqa: E402
from export.bench import table  # noqa: E402
from export.config import DEFAULT_QAT_EPOCHS, DEFAULT_QAT_LR  # noqa: E402
from export.errors import DermedgeError  # noqa: E402

COLUMNS = [("model", "model", ""), ("bal acc", "balanced_accuracy", ".4f"),
           ("Δ bal acc", "d_balanced_accuracy", "+.4f"), ("mel AUC", "melanoma_auc", ".4f"),
           ("Δ mel AUC", "d_melanoma_auc", "+.4f"), ("mel sens", "melanoma_sensitivity", ".4f"),
           ("dx agree", "diagnosis_agreement", ".4f"), ("mel agree", "melanoma_agreement", ".4f"),
           ("size MB", "size_mb", ".2f"), ("gates", "gates", "")]


def _row(name: str, v: dict, size: int) -> dict:
    t, d = v["metrics"]["tflite"], v["metrics"]["delta"]
    return {"model": name, "balanced_accuracy": t["balanced_accuracy"],
            "d_balanced_accuracy": d["balanced_accuracy"], "melanoma_auc": t["melanoma_auc"],
            "d_melanoma_auc": d["melanoma_auc"],
            "melanoma_sensitivity": t["melanoma_sensitivity"],
            "diagnosis_agreement": v["heads"]["diagnosis"]["top1_agreement"],
            "melanoma_agreement": v["heads"]["melanoma"]["threshold_agreement"],
            "size_mb": size / 1e6, "gates": "passed" if v["passed"] else "FAILED",
            "failed": v["failed"]}


def compare_qat(run: str | Path, out: Path, *, epochs: int = DEFAULT_QAT_EPOCHS,
                steps: int | None = None, lr: float = DEFAULT_QAT_LR,
                representative: int = 300, qat_python: str | None = None) -> dict:
    cfg = QuantizationConfig.int8_qat(representative, epochs=epochs, steps_per_epoch=steps, lr=lr)
    t = time.perf_counter()
    res = export_run(run, cfg, out / f"{Path(run).name}-int8-qat", qat_python=qat_python,
                     log=lambda m: print(f"[export] {m}", file=sys.stderr, flush=True))
    q, p = res.report["validation"], res.report["ptq"]["validation"]
    f = q["metrics"]["float"]
    rows = [{"model": "float (Keras)", "balanced_accuracy": f["balanced_accuracy"],
             "d_balanced_accuracy": 0.0, "melanoma_auc": f["melanoma_auc"], "d_melanoma_auc": 0.0,
             "melanoma_sensitivity": f["melanoma_sensitivity"], "diagnosis_agreement": 1.0,
             "melanoma_agreement": 1.0, "size_mb": None, "gates": ""},
            _row("PTQ int8", p, res.report["ptq"]["size_bytes"]),
            _row("QAT int8", q, res.tflite_bytes)]
    qat = res.report["qat"]
    return {"run": str(Path(run).resolve()), "bundle": str(res.path), "n": q["n"],
            "data": res.report["data"], "rows": rows,
            "qat": {k: qat.get(k) for k in ("epochs", "steps_per_epoch", "lr", "history",
                                            "train_images", "calibration_images", "seconds",
                                            "fake_quant_max_abs_diff", "versions")},
            "qat_minus_ptq": {k: rows[2][k] - rows[1][k] for k in
                              ("balanced_accuracy", "melanoma_auc")},
            "seconds": time.perf_counter() - t}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--out", type=Path, default=Path("exports"))
    p.add_argument("--qat-epochs", type=int, default=DEFAULT_QAT_EPOCHS)
    p.add_argument("--qat-steps", type=int, default=None)
    p.add_argument("--qat-lr", type=float, default=DEFAULT_QAT_LR)
    p.add_argument("--qat-python", default=None)
    p.add_argument("--representative", type=int, default=300)
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        res = compare_qat(args.run, args.out, epochs=args.qat_epochs, steps=args.qat_steps,
                          lr=args.qat_lr, representative=args.representative,
                          qat_python=args.qat_python)
    except DermedgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    q = res["qat"]
    print(f"{res['n']} images from {res['data']}; QAT {q['epochs']} epoch(s) × "
          f"{q['steps_per_epoch']} steps at lr {q['lr']:g} on {q['train_images']} train images "
          f"({q['seconds']:.0f} s in the worker)")
    print(table(res["rows"], COLUMNS))
    d = res["qat_minus_ptq"]
    print(f"QAT − PTQ: balanced accuracy {d['balanced_accuracy']:+.4f}, melanoma AUC "
          f"{d['melanoma_auc']:+.4f}")
    args.results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = args.results / f"qat_vs_ptq-{Path(args.run).name}-{stamp}.json"
    write_json(path, {**res, "machine": platform.platform(), "processor": platform.processor(),
                      "cpus": os.cpu_count()}, allow_nan=True)
    print(f"wrote {path}")
    return 0 if res["rows"][2]["gates"] == "passed" else 3


if __name__ == "__main__":
    sys.exit(main())
