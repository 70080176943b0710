"""Compare float32 / float16 / dynamic / int8 exports of one run side by side, in one process.

    python benchmarks/export_modes.py RUN [--out DIR] [--runs 50] [--threads N]
                                      [--representative 300] [--float-heads]

Converts every mode (validated on the run's val split), int8 three ways: as trained
(``int8-plain``, ``--bias-correction off``), bias-corrected with nearest rounding
(``int8-nearest``, ``--weight-rounding nearest``) and the default export (``int8``: bias
correction with adaptive rounding); with ``--float-heads`` also ``int8-floatheads``. Every file
is written as the exporter ships it (compacted, export/compact.py). Benchmarks each with LiteRT
in this one process, prints a table and writes JSON to
benchmarks/results/export_modes-<run>-<timestamp>.json.
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
from export.bench import bench, table  # noqa: E402
from export.errors import DermedgeError  # noqa: E402

COLUMNS = [("mode", "mode", ""), ("size MB", "size_mb", ".2f"), ("size ×", "size_ratio", ".3f"),
           ("median ms", "median_ms", ".2f"), ("p90 ms", "p90_ms", ".2f"),
           ("latency ×", "latency_ratio", ".3f"), ("export s", "convert_s", ".0f"),
           ("dx agree", "diagnosis_agreement", ".4f"),
           ("mel agree", "melanoma_agreement", ".4f"), ("bal acc", "balanced_accuracy", ".4f"),
           ("mel AUC", "melanoma_auc", ".4f"), ("valid", "passed", "")]


def compare_modes(run: str | Path, out: Path, *, runs: int = 50, threads: int | None = None,
                  representative: int = 300, float_heads: bool = False) -> list[dict]:
    rows = []
    configs = {"float32": QuantizationConfig.float32(), "float16": QuantizationConfig.float16(),
               "dynamic": QuantizationConfig.dynamic(),
               "int8-plain": QuantizationConfig.int8(representative, bias_correction="off"),
               "int8-nearest": QuantizationConfig.int8(representative,
                                                       weight_rounding="nearest"),
               # the default: --bias-correction auto, --weight-rounding adaptive
               "int8": QuantizationConfig.int8(representative)}
    if float_heads:  # --int8 --float-heads: uint8 input, heads in float, float32 out
        configs["int8-floatheads"] = QuantizationConfig.int8(representative, float_heads=True)
    for label, cfg in configs.items():
        t = time.perf_counter()
        res = export_run(run, cfg, out / f"{Path(run).name}-{label}")
        convert_s = time.perf_counter() - t
        b = bench(res.path, runs=runs, warmup=min(10, runs), threads=threads)
        v = res.report["validation"]
        rows.append({**b, "mode": label, "bundle": str(res.path), "convert_s": convert_s,
                     "size_mb": b["size_bytes"] / 1e6, "passed": res.passed,
                     "failed": v["failed"],
                     "diagnosis_agreement": v["heads"]["diagnosis"]["top1_agreement"],
                     "melanoma_agreement": v["heads"]["melanoma"]["threshold_agreement"],
                     "balanced_accuracy": v["metrics"]["tflite"]["balanced_accuracy"],
                     "melanoma_auc": v["metrics"]["tflite"]["melanoma_auc"],
                     "float_balanced_accuracy": v["metrics"]["float"]["balanced_accuracy"],
                     "float_melanoma_auc": v["metrics"]["float"]["melanoma_auc"]})
    base = rows[0]
    for r in rows:
        r["size_ratio"] = r["size_bytes"] / base["size_bytes"]
        r["latency_ratio"] = r["median_ms"] / base["median_ms"]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--out", type=Path, default=Path("exports"))
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--representative", type=int, default=300)
    p.add_argument("--float-heads", action="store_true",
                   help="also int8 with --float-heads")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        rows = compare_modes(args.run, args.out, runs=args.runs, threads=args.threads,
                             representative=args.representative, float_heads=args.float_heads)
    except DermedgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(table(rows, COLUMNS))
    args.results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = args.results / f"export_modes-{Path(args.run).name}-{stamp}.json"
    write_json(path, {"run": str(Path(args.run).resolve()), "machine": platform.platform(),
                      "processor": platform.processor(), "cpus": os.cpu_count(),
                      "threads": args.threads, "rows": rows}, allow_nan=True)
    print(f"wrote {path}")
    return 0 if all(r["passed"] for r in rows) else 3


if __name__ == "__main__":
    sys.exit(main())
