"""What embedding TFLite Model Metadata costs and what MediaPipe Tasks returns from the file.

    python benchmarks/tflite_metadata.py BUNDLE [BUNDLE ...] [--photos N] [--json OUT]

For each bundle (exported before metadata, or re-embedded: the file's own metadata is replaced)
the metadata is embedded as the export does (export/tflite_metadata.py) and compared side by
side with the file MediaPipe's populator writes (it re-serialises the model, undoing
compaction): sizes, seconds, whether two writes are byte-identical, and MediaPipe
``ImageClassifier``'s scores against LiteRT on pre-cropped pixels and, on N raw 600x450 photos
from ../shared, with the centred square as region of interest and with the photo stretched.
Prints a table and writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DERMEDGE_SHARED", REPO.parent / "shared"))


def measure(bundle: Path, photos: list[Path]) -> dict:
    from tensorflow.lite.tools import flatbuffer_utils  # noqa: F401 - an export has it loaded

    from dermedge.artifacts import read_bundle
    from dermedge.image import load_image
    from dermedge.litert import run_tflite
    from export.tflite_metadata import embed, mediapipe_classify, split_file

    card = read_bundle(bundle).card
    src = split_file((bundle / "model.tflite").read_bytes())[0]
    s = card.input_size
    compacted = bool((card["export"].get("compaction") or {}).get("applied"))
    rng = np.random.default_rng(0)
    check = rng.integers(0, 256, (2, s, s, 3), dtype=np.uint8)
    t0 = time.perf_counter()
    out, rep = embed(src, card, card["export"]["mode"], check, compacted=compacted)
    seconds = time.perf_counter() - t0
    again, _ = embed(src, card, card["export"]["mode"], check, compacted=compacted)
    row = {"bundle": bundle.name, "mode": card["export"]["mode"], "size_without": len(src),
           "size_mediapipe_populator": rep["mediapipe_repacked_size"], "size_shipped": len(out),
           "metadata_bytes": rep["metadata_bytes"], "embed_seconds": round(seconds, 2),
           "byte_identical_rewrite": out == again}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.tflite"
        path.write_bytes(out)
        pixels = np.stack([load_image(p, s) for p in photos])
        ref = run_tflite(path, pixels)
        pre = mediapipe_classify(path, list(pixels))
        dx = np.stack([g["diagnosis"]["scores"] for g in pre])
        row["precropped_max_abs_diff"] = float(np.abs(dx - ref["diagnosis"]).max())
        for name, roi in (("roi", True), ("stretch", False)):
            got = mediapipe_classify(path, photos, roi=roi)
            d = np.abs(np.stack([g["diagnosis"]["scores"] for g in got]) - ref["diagnosis"])
            m = np.abs(np.array([g["melanoma"]["scores"][0] for g in got])
                       - ref["melanoma"][:, 0])
            top1 = np.mean(np.stack([g["diagnosis"]["scores"] for g in got]).argmax(1)
                           == ref["diagnosis"].argmax(1))
            row[f"{name}_max_abs_diff"] = float(max(d.max(), m.max()))
            row[f"{name}_mean_abs_diff"] = float(d.mean())
            row[f"{name}_top1_agreement"] = float(top1)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundles", nargs="+", type=Path)
    p.add_argument("--photos", type=int, default=32, help="raw 600x450 photos from ../shared")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    raw = SHARED / "data" / "ham10000_raw_600x450" / "images"
    photos = sorted(raw.glob("*.jpg"))[:args.photos]
    if not photos:
        print(f"needs the raw photos in {raw} (set DERMEDGE_SHARED)", file=sys.stderr)
        return 2
    rows = [measure(b, photos) for b in args.bundles]
    from export.bench import table

    print(f"{len(photos)} raw photos; diffs are |MediaPipe - LiteRT on the image contract|")
    print(table(rows, [("bundle", "bundle", ""), ("mode", "mode", ""),
                       ("no metadata B", "size_without", ","),
                       ("MediaPipe populator B", "size_mediapipe_populator", ","),
                       ("shipped B", "size_shipped", ","), ("embed s", "embed_seconds", ".2f"),
                       ("reproducible", "byte_identical_rewrite", ""),
                       ("pre-cropped max", "precropped_max_abs_diff", ".2g"),
                       ("ROI max", "roi_max_abs_diff", ".4f"),
                       ("ROI mean", "roi_mean_abs_diff", ".5f"),
                       ("ROI top-1", "roi_top1_agreement", ".3f"),
                       ("stretch max", "stretch_max_abs_diff", ".4f"),
                       ("stretch mean", "stretch_mean_abs_diff", ".5f"),
                       ("stretch top-1", "stretch_top1_agreement", ".3f")]))
    out = args.json or REPO / "benchmarks" / "results" / (
        f"tflite_metadata-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"photos": len(photos), "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
