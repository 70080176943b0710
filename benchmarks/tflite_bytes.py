"""Where the bytes of .tflite files go: weights by dtype, quantization parameters (scales,
zero points), tensor names and the rest of the flatbuffer.

    python benchmarks/tflite_bytes.py exports/mnv2-int8 exports/mnv2-float32 [--json OUT]

Takes bundle folders or .tflite files; prints a table and writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DTYPES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 9: "int8", 7: "int16"}


def count(path: Path) -> dict:
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(path))
    by_dtype: dict[str, int] = {}
    scales = zero_points = per_channel_zero_points = names = 0
    for graph in model.subgraphs:
        for t in graph.tensors:
            data = model.buffers[t.buffer].data
            if data is not None and len(data):
                key = DTYPES.get(t.type, str(t.type))
                by_dtype[key] = by_dtype.get(key, 0) + len(data)
            names += len(t.name or b"")
            q = t.quantization
            if q is not None and q.scale is not None:
                scales += 4 * len(q.scale)
                n_zp = 0 if q.zeroPoint is None else len(q.zeroPoint)
                zero_points += 8 * n_zp
                if n_zp > 1:
                    per_channel_zero_points += 8 * n_zp
    size = path.stat().st_size
    known = sum(by_dtype.values()) + scales + zero_points + names
    return {"file": str(path), "size_bytes": size, "tensor_data": by_dtype,
            "quantization_scales": scales, "quantization_zero_points": zero_points,
            "per_channel_zero_points": per_channel_zero_points, "tensor_names": names,
            "other": size - known}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", type=Path, help="bundle folders or .tflite files")
    p.add_argument("--json", type=Path, default=None, help="JSON output (default: "
                   "benchmarks/results/tflite_bytes-<time>.json)")
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    rows = []
    for m in args.models:
        f = m / "model.tflite" if m.is_dir() else m
        if not f.is_file():
            print(f"error: {f} is not a .tflite file (pass a bundle folder or the file)",
                  file=sys.stderr)
            return 2
        rows.append(count(f))
    print(f"{'file':<40} {'size':>11} {'weights by dtype':<40} {'scales':>8} {'zero pts':>9} "
          f"{'(per-ch.)':>9} {'names':>7} {'other':>8}")
    for r in rows:
        w = ", ".join(f"{k} {v:,}" for k, v in sorted(r["tensor_data"].items()))
        print(f"{r['file'][-40:]:<40} {r['size_bytes']:>11,} {w:<40} "
              f"{r['quantization_scales']:>8,} {r['quantization_zero_points']:>9,} "
              f"{r['per_channel_zero_points']:>9,} {r['tensor_names']:>7,} {r['other']:>8,}")
    out = args.json or REPO / "benchmarks" / "results" / \
        f"tflite_bytes-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
