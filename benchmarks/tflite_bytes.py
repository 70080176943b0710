"""Where the bytes of .tflite files go: weights by dtype, quantization parameters (scales,
zero points, as stored: a vector shared by several tensors counts once), tensor names and the
rest of the flatbuffer.

    python benchmarks/tflite_bytes.py exports/mnv2-int8 exports/mnv2-float32 [--json OUT]

Takes bundle folders or .tflite files; prints a table and writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from dermedge.files import write_json

REPO = Path(__file__).resolve().parents[1]
DTYPES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 9: "int8", 7: "int16"}


def _vector(table, field: int) -> tuple[int, int] | None:
    """(position, element count) of a table's vector field, read from the flatbuffer itself."""
    tab = table._tab  # noqa: SLF001 - positions are what tell shared vectors apart
    o = tab.Offset(4 + 2 * field)
    return None if o == 0 else (tab.Vector(o), tab.VectorLen(o))


def count(path: Path) -> dict:
    """Bytes stored per kind. A vector several tensors share (export/compact.py) counts once;
    ``*_listed`` counts it once per tensor, as a file without sharing would store it."""
    from tensorflow.lite.python import schema_py_generated as fb

    buf = path.read_bytes()
    model = fb.Model.GetRootAs(buf, 0)
    by_dtype: dict[str, int] = {}
    seen_data: set[int] = set()
    stored = {"scales": {}, "zero_points": {}, "per_channel_zero_points": {}}
    listed = {"scales": 0, "zero_points": 0, "per_channel_zero_points": 0}
    names = 0
    for g in range(model.SubgraphsLength()):
        graph = model.Subgraphs(g)
        for i in range(graph.TensorsLength()):
            t = graph.Tensors(i)
            b = model.Buffers(t.Buffer())
            data = _vector(b, 0)
            if data is not None and data[1] and data[0] not in seen_data:
                seen_data.add(data[0])
                key = DTYPES.get(t.Type(), str(t.Type()))
                by_dtype[key] = by_dtype.get(key, 0) + data[1]
            names += len(t.Name() or b"")
            q = t.Quantization()
            if q is None:
                continue
            for kind, field, width in (("scales", 2, 4), ("zero_points", 3, 8)):
                v = _vector(q, field)
                if v is None or v[1] == 0:
                    continue
                kinds = [kind] + (["per_channel_zero_points"]
                                  if kind == "zero_points" and v[1] > 1 else [])
                for k in kinds:
                    stored[k][v[0]] = width * v[1]
                    listed[k] += width * v[1]
    size = path.stat().st_size
    totals = {k: sum(v.values()) for k, v in stored.items()}
    known = sum(by_dtype.values()) + totals["scales"] + totals["zero_points"] + names
    return {"file": str(path), "size_bytes": size, "tensor_data": by_dtype,
            "quantization_scales": totals["scales"],
            "quantization_zero_points": totals["zero_points"],
            "per_channel_zero_points": totals["per_channel_zero_points"],
            "quantization_scales_listed": listed["scales"],
            "quantization_zero_points_listed": listed["zero_points"],
            "tensor_names": names, "other": size - known}


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
          f"{'(per-ch.)':>9} {'zp listed':>10} {'names':>7} {'other':>8}")
    for r in rows:
        w = ", ".join(f"{k} {v:,}" for k, v in sorted(r["tensor_data"].items()))
        print(f"{r['file'][-40:]:<40} {r['size_bytes']:>11,} {w:<40} "
              f"{r['quantization_scales']:>8,} {r['quantization_zero_points']:>9,} "
              f"{r['per_channel_zero_points']:>9,} {r['quantization_zero_points_listed']:>10,} "
              f"{r['tensor_names']:>7,} {r['other']:>8,}")
    out = args.json or REPO / "benchmarks" / "results" / \
        f"tflite_bytes-{time.strftime('%Y%m%d-%H%M%S')}.json"
    write_json(out, rows, allow_nan=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
