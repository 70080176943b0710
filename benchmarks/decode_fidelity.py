"""The demo's reduced-scale JPEG decode against the image contract's reference, on real photos.

For each photo: the reference input (``dermedge.image.load_image``: full decode, centred crop,
bilinear resize) and the server's input (the JPEG decoded at the DCT scale that keeps the crop
at least ``--min-crop`` x the model side, the reference crop box mapped onto it). Reports the
pixel differences, and the bundle's answers on both: top-1 agreement, melanoma-decision
agreement at the card's threshold, mean and max |delta p|.

Beside them, on the same photos and model, two yardsticks:

* ``resave``: the reference input of the photo re-saved as JPEG quality ``--resave-quality``
  (what a phone's gallery or a messenger does to a photo before it is uploaded);
* ``int8 vs float`` (with ``--float``): the float bundle's answers against the int8 one's, on
  the reference input (what the export's validation gates bound).

    python benchmarks/decode_fidelity.py --device exports/effl0-int8 --float exports/effl0-float32
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_demo import write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DERMEDGE_SHARED", REPO.parent / "shared"))
PHOTOS = SHARED / "data" / "ham10000_raw_600x450" / "images"


def agreement(tier, a: list[dict], b: list[dict]) -> dict:
    """How far answers ``b`` are from answers ``a`` (same photos, same order)."""
    thr = tier.melanoma_threshold
    top = np.mean([x["top"]["label"] == y["top"]["label"] for x, y in zip(a, b, strict=True)])
    mel = np.mean([(x["melanoma"] >= thr) == (y["melanoma"] >= thr)
                   for x, y in zip(a, b, strict=True)])
    dmel = [abs(x["melanoma"] - y["melanoma"]) for x, y in zip(a, b, strict=True)]
    dp = [max(abs(x["melanoma"] - y["melanoma"]),
              *(abs(x["diagnosis"][k] - y["diagnosis"][k]) for k in x["diagnosis"]))
          for x, y in zip(a, b, strict=True)]
    return {"top1_agreement": round(float(top), 4),
            "melanoma_decision_agreement": round(float(mel), 4),
            "mean_abs_melanoma_diff": round(float(np.mean(dmel)), 4),
            "max_abs_prob_diff": round(float(max(dp)), 4)}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", required=True, help="device (int8) export bundle folder")
    ap.add_argument("--float", dest="float_bundle",
                    help="the same model's float32 bundle: adds the int8-vs-float yardstick")
    ap.add_argument("--photos", type=Path, default=PHOTOS, help="folder of JPEG photos")
    ap.add_argument("--min-crop", default="1,2",
                    help="comma-separated --decode-min-crop settings to measure")
    ap.add_argument("--upscale", type=int, default=1,
                    help="enlarge each photo K x (bicubic, re-encoded as JPEG quality 95) to"
                         " stand in for a phone-size photo")
    ap.add_argument("--variants", type=int, choices=range(1, 9), default=1, metavar="1-8",
                    help="also measure each photo flipped/rotated (the 8 dihedral variants,"
                         " re-encoded as JPEG quality 95): more cases for the agreement rates")
    ap.add_argument("--resave-quality", type=int, default=90,
                    help="JPEG quality of the re-save yardstick")
    ap.add_argument("--out", type=Path, help="JSON output (default: benchmarks/results/)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from dermedge.image import load_image
    from edge_demo.imaging import open_upload
    from edge_demo.tiers import Tier

    tier = Tier.from_bundle(args.device)
    size = tier.image_size
    photos = sorted(args.photos.glob("*.jpg"))
    if not photos:
        ap.error(f"no .jpg photos in {args.photos}; pass --photos")
    settings = [float(x) for x in args.min_crop.split(",")]
    moves = [None, *Image.Transpose][:args.variants]
    datas = []
    for p in photos:
        for move in moves:
            data = p.read_bytes()
            if args.upscale > 1 or move is not None:
                with Image.open(p) as im:
                    im = im.transpose(move) if move is not None else im
                    if args.upscale > 1:
                        im = im.resize((im.width * args.upscale, im.height * args.upscale),
                                       Image.BICUBIC)
                    buf = io.BytesIO()
                    im.save(buf, "JPEG", quality=95)
                data = buf.getvalue()
            datas.append(data)

    refs = [load_image(io.BytesIO(d), size) for d in datas]
    ref_answers = [tier.predict(x) for x in refs]
    rows = []
    for mc in settings:
        pix, answers, scales = [], [], set()
        for data, ref in zip(datas, refs, strict=True):
            upload = open_upload(data, max_pixels=10**9, size=size, min_crop=mc)
            scales.add(upload.scale)
            x = upload.load().model_input(size)
            pix.append(np.abs(x.astype(np.int16) - ref.astype(np.int16)))
            answers.append(tier.predict(x))
        per_image = [float(d.mean()) for d in pix]
        rows.append({"compare": f"decode-min-crop {mc:g} vs reference",
                     "dct_scales": sorted(scales),
                     "pixel_mean_abs_diff": round(float(np.mean(per_image)), 3),
                     "pixel_worst_image_mean_abs_diff": round(max(per_image), 3),
                     "pixel_max_abs_diff": int(max(int(d.max()) for d in pix)),
                     **agreement(tier, ref_answers, answers)})
    resaved, pix = [], []
    for data, ref in zip(datas, refs, strict=True):
        with Image.open(io.BytesIO(data)) as im:
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=args.resave_quality, exif=im.info.get("exif", b""))
        x = load_image(io.BytesIO(buf.getvalue()), size)
        pix.append(np.abs(x.astype(np.int16) - ref.astype(np.int16)))
        resaved.append(tier.predict(x))
    per_image = [float(d.mean()) for d in pix]
    rows.append({"compare": f"re-saved at JPEG quality {args.resave_quality} vs reference",
                 "pixel_mean_abs_diff": round(float(np.mean(per_image)), 3),
                 "pixel_worst_image_mean_abs_diff": round(max(per_image), 3),
                 "pixel_max_abs_diff": int(max(int(d.max()) for d in pix)),
                 **agreement(tier, ref_answers, resaved)})
    if args.float_bundle:
        flt = Tier.from_bundle(args.float_bundle)
        rows.append({"compare": "float32 bundle vs int8 bundle, reference input",
                     **agreement(tier, [flt.predict(x) for x in refs], ref_answers)})

    head = (f"{'compare':<52}{'pixels mean/worst/max':>24}{'top-1':>8}{'mel':>8}"
            f"{'mean dmel':>10}{'max dp':>8}")
    print(f"{tier.name}: {len(photos)} photos x {len(moves)} variants ({len(datas)} cases),"
          f" enlarged x{args.upscale}, {size} px")
    print(head)
    print("-" * len(head))
    for r in rows:
        px = (f"{r['pixel_mean_abs_diff']:.2f}/{r['pixel_worst_image_mean_abs_diff']:.2f}/"
              f"{r['pixel_max_abs_diff']}" if "pixel_mean_abs_diff" in r else "-")
        print(f"{r['compare']:<52}{px:>24}{r['top1_agreement']:>8.1%}"
              f"{r['melanoma_decision_agreement']:>8.1%}{r['mean_abs_melanoma_diff']:>10.4f}"
              f"{r['max_abs_prob_diff']:>8.3f}")
    res = {"created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
           "device": args.device, "float": args.float_bundle, "image_size": size,
           "upscale": args.upscale, "photos": len(photos), "variants": len(moves),
           "cases": len(datas), "rows": rows}
    write_result(res, args.out, "decode_fidelity")
    return 0


if __name__ == "__main__":
    sys.exit(main())
