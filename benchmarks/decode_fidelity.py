"""The demo's reduced-scale JPEG decode against the image contract's reference, on real photos.

For each photo: the reference input (``dermedge.image.load_image``: full decode, centred crop,
bilinear resize) and the demo's (JPEG decoded at the DCT scale that keeps the crop >= the model
size, then the same crop and resize). Reports the mean/max absolute pixel difference, and the
device tier's answers on both: top-1 agreement, melanoma-threshold agreement, max |delta p|.

    python benchmarks/decode_fidelity.py --device /work/bundles/effl0-short-int8
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SHARED = Path(os.environ.get("DERMEDGE_SHARED", REPO.parent / "shared"))
PHOTOS = SHARED / "data" / "ham10000_raw_600x450" / "images"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", required=True, help="device export bundle folder")
    ap.add_argument("--photos", type=Path, default=PHOTOS, help="folder of JPEG photos")
    ap.add_argument("--min-crop", type=float, default=1.0,
                    help="the decoded crop side must be >= this x the model size")
    ap.add_argument("--upscale", type=int, default=1,
                    help="enlarge each photo K x (bicubic, re-encoded as JPEG quality 95) to"
                         " stand in for a phone-size photo")
    ap.add_argument("--out", type=Path, help="JSON output (default: benchmarks/results/)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from dermedge.image import center_crop_resize, load_image
    from edge_demo.imaging import decode_upload
    from edge_demo.tiers import Tier

    tier = Tier.from_bundle(args.device)
    size = tier.image_size
    photos = sorted(args.photos.glob("*.jpg"))
    if not photos:
        ap.error(f"no .jpg photos in {args.photos}; pass --photos")
    pix, top, mel, dp = [], 0, 0, 0.0
    for p in photos:
        data = p.read_bytes()
        if args.upscale > 1:
            with Image.open(p) as im:
                big = im.resize((im.width * args.upscale, im.height * args.upscale),
                                Image.BICUBIC)
            buf = io.BytesIO()
            big.save(buf, "JPEG", quality=95)
            data = buf.getvalue()
        ref = load_image(io.BytesIO(data), size)
        fast = center_crop_resize(decode_upload(data, max_pixels=10**9, size=size,
                                                min_crop=args.min_crop), size)
        pix.append(np.abs(fast.astype(np.int16) - ref.astype(np.int16)))
        a, b = tier.predict(ref), tier.predict(fast)
        top += a["top"]["label"] == b["top"]["label"]
        thr = tier.melanoma_threshold
        mel += (a["melanoma"] >= thr) == (b["melanoma"] >= thr)
        dp = max(dp, abs(a["melanoma"] - b["melanoma"]),
                 *(abs(a["diagnosis"][k] - b["diagnosis"][k]) for k in a["diagnosis"]))
    per_image = [float(d.mean()) for d in pix]
    res = {"created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
           "device": args.device, "image_size": size, "min_crop": args.min_crop,
           "upscale": args.upscale,
           "photos": len(photos), "pixel_mean_abs_diff": round(float(np.mean(per_image)), 3),
           "pixel_worst_image_mean_abs_diff": round(max(per_image), 3),
           "pixel_max_abs_diff": int(max(int(d.max()) for d in pix)),
           "top1_agreement": round(top / len(photos), 4),
           "melanoma_threshold_agreement": round(mel / len(photos), 4),
           "max_abs_prob_diff": round(dp, 4)}
    for k, v in res.items():
        print(f"{k:32s} {v}")
    out = args.out or RESULTS / f"decode_fidelity_{dt.datetime.now():%Y%m%d_%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
