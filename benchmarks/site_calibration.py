"""A second site built from the data: does the validation policy keep its promise there, and
do the promises of `edge-demo calibrate --cases` on the site's own sample hold?

The site ("site B"): the validation split of a run, resampled to a pigmented-lesion clinic's
case mix (``SITE_MIX``: 20 % melanoma instead of ~8 %) and photographed with another camera
(``camera_b``: warmer white balance, brighter mid-tones, half the resolution, JPEG quality 60).
Both tiers run once on every image (clean and through camera B) and on those of the 124
600x450 originals that are not in the run's training split; the answers are cached
(``--cache``), and the policies are replayed on them, as edge-demo calibrate does.

1. The validation policy (``calibrate`` on the clean validation split, ``--target-fallback``
   and ``--target-sensitivity``) with its promised rates and 95 % Wilson intervals, against
   its rates at site B (the whole population: every image weighted to the site's mix), with
   the camera and the case mix taken one at a time.
2. For site samples of ``--sizes`` cases (``--resamples`` each, drawn with the site's mix),
   `calibrate_site` (the code of `calibrate --cases`, both tiers on kept photos) fits the
   site's policy; its promised intervals are checked against the rates on the site's other
   cases (``--others`` drawn independently from the site) and against the site's population
   rates; and the share of samples where calibrate refuses for too few melanomas.

    python benchmarks/site_calibration.py --device /work/bundles/edge-int8 \\
        --cloud /work/bundles/edge-float32 --splits /work/runs/edge/splits.csv
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from dermedge.files import write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_demo import write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DERMEDGE_SHARED", REPO.parent / "shared"))
RAW = SHARED / "data" / "ham10000_raw_600x450"
RESULTS = REPO / "benchmarks" / "results"
SITE_MIX = {"mel": 0.20, "nv": 0.50, "bkl": 0.14, "bcc": 0.08, "akiec": 0.04, "df": 0.02,
            "vasc": 0.02}
RATES = ("fallback_rate", "referral_rate", "melanoma_sensitivity", "melanoma_specificity")


def camera_b(im: Image.Image) -> Image.Image:
    """Another camera: warmer white balance, brighter mid-tones, half the resolution, JPEG 60."""
    x = np.asarray(im.convert("RGB"), np.float32) / 255.0
    x = np.clip(x * np.array([1.10, 1.0, 0.88], np.float32), 0, 1) ** 0.85
    out = Image.fromarray((x * 255 + 0.5).astype(np.uint8))
    w, h = out.size
    out = out.resize((w // 2, h // 2), Image.BILINEAR).resize((w, h), Image.BILINEAR)
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=60)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _answers(tier, image: Image.Image) -> dict:
    from edge_demo.imaging import center_crop_resize

    a = tier.predict(center_crop_resize(image, tier.image_size))
    return {"melanoma": a["melanoma"], "diagnosis": a["diagnosis"]}


def build_cache(device, cloud, splits: Path, split: str, raw: Path | None, cache: Path,
                limit: int | None = None) -> dict:
    """Both tiers on every image of ``split`` (clean and through camera B) and on the raw
    originals outside the training split; reused when the bundles and images are the same."""
    with splits.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    train = {r["image_id"] for r in rows if r["split"] == "train"}
    pool = [r for r in rows if r["split"] == split][:limit]
    key = hashlib.sha256(json.dumps([device.sha256, cloud.sha256, split, limit,
                                     [r["image_id"] for r in pool]]).encode()).hexdigest()
    if cache.is_file():
        doc = json.loads(cache.read_text())
        if doc.get("key") == key:
            print(f"using cached tier answers in {cache}")
            return doc
    t0 = time.perf_counter()
    out = {"key": key, "device": device.summary(), "cloud": cloud.summary(), "pool": [],
           "raw": []}
    for i, r in enumerate(pool):
        path = Path(r["path"])
        path = path if path.is_absolute() else splits.parent / path
        im = Image.open(path).convert("RGB")
        site = camera_b(im)
        out["pool"].append({"image_id": r["image_id"], "dx": r["dx"],
                            "clean": {"device": _answers(device, im),
                                      "cloud": _answers(cloud, im)},
                            "site": {"device": _answers(device, site),
                                     "cloud": _answers(cloud, site)}})
        if (i + 1) % 100 == 0:
            print(f"  {i + 1}/{len(pool)} images ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    if raw is not None and (raw / "labels.csv").is_file():
        with (raw / "labels.csv").open(newline="") as f:
            for r in csv.DictReader(f):
                if r["image_id"] in train:
                    continue
                im = Image.open(raw / "images" / f"{r['image_id']}.jpg").convert("RGB")
                out["raw"].append({"image_id": r["image_id"], "dx": r["dx"],
                                   "clean": {"device": _answers(device, im),
                                             "cloud": _answers(cloud, im)}})
    out["seconds"] = round(time.perf_counter() - t0, 1)
    write_text(cache, json.dumps(out))
    return out


def results(items: Sequence[dict], which: str) -> list[dict]:
    from edge_demo.calibrate import Sample
    from edge_demo.sitecal import _answer

    return [{"sample": Sample(it["image_id"], Path(), it["dx"]),
             "device": _answer(it[which]["device"]), "cloud": _answer(it[which]["cloud"])}
            for it in items]


def site_weights(items: Sequence[dict], mix: dict[str, float]) -> np.ndarray:
    dx = np.array([it["dx"] for it in items])
    w = np.zeros(len(dx))
    for c, share in mix.items():
        n = int((dx == c).sum())
        if n:
            w[dx == c] = share / n
    return w / w.sum()


def outcomes(policy, res: Sequence[dict]) -> dict[str, np.ndarray]:
    """Per case: fell back, referred, melanoma (the policy on temperature-scaled answers)."""
    from edge_demo.policy import REFER
    from edge_demo.sitecal import scaled

    res = scaled(res, policy.temperature)
    fell = np.zeros(len(res), bool)
    ref = np.zeros(len(res), bool)
    for i, r in enumerate(res):
        d = policy.decide(r["device"], r["cloud"])
        fell[i], ref[i] = d.wants_fallback, d.decision == REFER
    mel = np.array([r["sample"].dx == "mel" for r in res])
    return {"fell": fell, "ref": ref, "mel": mel}


def rates_of(o: dict[str, np.ndarray], w: np.ndarray | None = None,
             idx: np.ndarray | None = None) -> dict[str, float | None]:
    """The four rates, population-weighted (``w``) or on the cases ``idx``."""
    if idx is not None:
        o = {k: v[idx] for k, v in o.items()}
        w = None
    w = np.ones(len(o["fell"])) if w is None else w

    def share(mask, of):
        t = w[of].sum()
        return float(w[mask & of].sum() / t) if t > 0 else None

    every = np.ones(len(w), bool)
    return {"fallback_rate": share(o["fell"], every), "referral_rate": share(o["ref"], every),
            "melanoma_sensitivity": share(o["ref"], o["mel"]),
            "melanoma_specificity": share(~o["ref"], ~o["mel"])}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", required=True, type=Path)
    p.add_argument("--cloud", required=True, type=Path)
    p.add_argument("--splits", required=True, type=Path, help="a run's splits.csv")
    p.add_argument("--split", default="val")
    p.add_argument("--raw", type=Path, default=RAW, help="the 600x450 originals (optional)")
    p.add_argument("--target-fallback", type=float, default=0.2)
    p.add_argument("--target-sensitivity", type=float, default=0.9)
    p.add_argument("--sizes", default="100,200,400")
    p.add_argument("--resamples", type=int, default=200)
    p.add_argument("--others", type=int, default=2000,
                   help="the site's other cases each promise is checked on")
    p.add_argument("--limit", type=int, help="only the first N images (quick runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=RESULTS / "site_calibration_cache.json")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    from edge_demo.calibrate import calibrate
    from edge_demo.keras_tier import load_cloud_tier
    from edge_demo.policy import Policy
    from edge_demo.sitecal import calibrate_site
    from edge_demo.tiers import Tier

    device, cloud = Tier.from_bundle(args.device), load_cloud_tier(args.cloud)
    cache = build_cache(device, cloud, args.splits, args.split, args.raw, args.cache,
                        args.limit)
    pool = cache["pool"]
    clean, site = results(pool, "clean"), results(pool, "site")
    w_site = site_weights(pool, SITE_MIX)
    val_mix = {c: float(np.mean([it["dx"] == c for it in pool])) for c in SITE_MIX}
    w_val = site_weights(pool, val_mix)

    # 1. the validation policy's promise, and what it does at site B
    val_policy = calibrate(clean, device, cloud, target_fallback=args.target_fallback,
                           target_sensitivity=args.target_sensitivity)
    chosen = next(r for r in val_policy.coverage if r["chosen"])
    promise = {k: {"value": chosen[k], "ci95": chosen[k + "_ci"]} for k in RATES}
    o_clean, o_site = outcomes(val_policy, clean), outcomes(val_policy, site)
    at = {"validation split (promise)": {k: promise[k]["value"] for k in RATES},
          "camera B, validation mix": rates_of(o_site, w_val),
          "clean photos, site mix": rates_of(o_clean, w_site),
          "site B (camera B, site mix)": rates_of(o_site, w_site)}
    if cache["raw"]:
        at[f"{len(cache['raw'])} originals (600x450, not in train)"] = rates_of(
            outcomes(val_policy, results(cache["raw"], "clean")))
    site_truth = at["site B (camera B, site mix)"]
    inside = {k: promise[k]["ci95"][0] <= site_truth[k] <= promise[k]["ci95"][1]
              for k in RATES}
    print(f"\nvalidation policy (n={chosen['n']}, {chosen['n_melanoma']} melanomas): promised"
          " rates with 95 % intervals, and the rates it gives elsewhere")
    head = f"{'':40}" + "".join(f"{k.replace('melanoma_', 'mel '):>22}" for k in RATES)
    print(head + "\n" + "-" * len(head))
    print(f"{'promise [95% CI]':40}" + "".join(
        f"{promise[k]['value']:>8.3f} [{promise[k]['ci95'][0]:.2f}, {promise[k]['ci95'][1]:.2f}]"
        for k in RATES))
    for name, r in at.items():
        if name.startswith("validation"):
            continue
        print(f"{name:40}" + "".join(
            f"{r[k]:>22.3f}" if r[k] is not None else f"{'-':>22}" for k in RATES))
    print("site B inside the promised interval: " + ", ".join(
        f"{k} {'yes' if v else 'NO'}" for k, v in inside.items()))

    # 2. site samples: calibrate --cases on them, promises checked on the site's other cases
    rng = np.random.default_rng(args.seed)
    conservative = Policy.conservative(cloud.melanoma_threshold)
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        t0 = time.perf_counter()
        hits = {k: 0 for k in RATES}
        hits_pop = {k: 0 for k in RATES}
        above = {k: 0 for k in RATES}  # the other cases' rate above the interval
        width = {k: [] for k in RATES}
        refused = bound_held = 0
        n_mel = []
        for _ in range(args.resamples):
            idx = rng.choice(len(site), size=n, p=w_site)
            sample = [site[i] for i in idx]
            n_mel.append(sum(s["sample"].dx == "mel" for s in sample))
            cal = calibrate_site(sample, device_threshold=device.melanoma_threshold,
                                 conservative=conservative,
                                 target_fallback=args.target_fallback,
                                 target_sensitivity=args.target_sensitivity)
            if cal.refused:
                refused += 1
                continue
            o = outcomes(cal.policy, site)
            others = rates_of(o, idx=rng.choice(len(site), size=args.others, p=w_site))
            pop = rates_of(o, w_site)
            bound_held += pop["melanoma_sensitivity"] >= args.target_sensitivity
            for k in RATES:
                lo, hi = cal.promise[k + "_ci"]
                width[k].append(hi - lo)
                hits[k] += lo <= others[k] <= hi
                above[k] += others[k] > hi
                hits_pop[k] += lo <= pop[k] <= hi
        fitted = args.resamples - refused
        row = {"n": n, "resamples": args.resamples, "refused": refused,
               "refused_share": refused / args.resamples,
               "melanomas_median": float(np.median(n_mel)),
               "coverage_others": {k: hits[k] / fitted if fitted else None for k in RATES},
               "coverage_population": {k: hits_pop[k] / fitted if fitted else None
                                       for k in RATES},
               "above_others": {k: above[k] / fitted if fitted else None for k in RATES},
               "median_width": {k: float(np.median(width[k])) if width[k] else None
                                for k in RATES},
               "sensitivity_bound_held": bound_held / fitted if fitted else None,
               "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(f"  n={n}: {fitted} fitted, {refused} refused ({row['seconds']} s)", flush=True)

    print(f"\nsite samples at site B: calibrate --cases (target fallback {args.target_fallback},"
          f" melanoma sensitivity >= {args.target_sensitivity} with 95 % confidence);"
          f" coverage of the promised 95 % intervals on {args.others} other site cases")
    head = (f"{'n':>5} {'mel (median)':>13} {'refused':>8} " + "".join(
        f"{k.replace('melanoma_', 'mel ').replace('_rate', ''):>18}" for k in RATES)
        + f" {'sens >= target':>15}")
    print(head + "\n" + "-" * len(head))
    for r in rows:
        cells = "".join(
            f"{'-':>18}" if r["coverage_others"][k] is None else
            f"{r['coverage_others'][k]:>8.1%} (±{r['median_width'][k] / 2:.2f})"
            for k in RATES)
        held = r["sensitivity_bound_held"]
        print(f"{r['n']:>5} {r['melanomas_median']:>13.0f} {r['refused_share']:>8.1%} "
              + cells + f" {'-' if held is None else f'{held:.1%}':>15}")
    print("outside the interval on the other cases, above it / below it: " + "; ".join(
        f"n={r['n']} " + ", ".join(
            f"{k.replace('melanoma_', 'mel ').replace('_rate', '')} "
            f"{r['above_others'][k]:.1%}/"
            f"{1 - r['coverage_others'][k] - r['above_others'][k]:.1%}"
            for k in RATES) for r in rows if r["coverage_others"]["fallback_rate"] is not None))
    doc = {"command": "python benchmarks/site_calibration.py " + " ".join(
        argv if argv is not None else sys.argv[1:]),
           "device": cache["device"], "cloud": cache["cloud"], "site_mix": SITE_MIX,
           "camera": camera_b.__doc__, "pool": len(pool), "raw": len(cache["raw"]),
           "validation_policy": {"promise": promise, "n": chosen["n"],
                                 "n_melanoma": chosen["n_melanoma"],
                                 "thresholds": val_policy.thresholds()},
           "validation_policy_elsewhere": at, "site_inside_promise": inside,
           "samples": rows, "target_fallback": args.target_fallback,
           "target_sensitivity": args.target_sensitivity, "others": args.others,
           "seed": args.seed}
    write_result(doc, args.out, "site_calibration")
    return 0


if __name__ == "__main__":
    sys.exit(main())
