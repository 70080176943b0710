"""What the input gate refuses, and what it costs, through the demo's own pipeline.

Every photo goes through ``DemoService`` exactly as an upload does (decode, the gate's
measures, the device model with its ``ood`` output, the gate's decision with the bundle's
card thresholds):

* false refusals on real dermoscopy: the run's validation split and the 124 HAM10000
  originals as photographed (600x450), each with a Wilson 95 % interval and per check;
* detection per kind of bad input, with an interval and the AUROC of the check's own score
  against the clean photos: everyday photos that are not dermoscopy (the held-out half of
  ``everyday_photos_dev``: sorted by file name, the second 150; the first 150 chose the ood
  method), and graded Gaussian blur and darkening synthesized from validation images and from
  the originals; at each strength also how often the model's top diagnosis changed (why the
  photo should be retaken);
* the gate's cost as a ratio to the model run, per photo, on the server (Python, 1 thread)
  and with ``--browser`` in the page (headless Chromium, LiteRT.js), on 600x450 originals and
  on 4000x3000 JPEGs made from them.

Prints a table and writes JSON to benchmarks/results/.

    python benchmarks/input_gate.py /work/tmp/i36/edge-int8-gate --run /work/runs/edge \\
        --browser
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))

BLUR_224 = (0.5, 1.0, 1.5, 2.0, 3.0)  # Gaussian sigma, px of the 224-px validation image
BLUR_600 = (1.0, 2.0, 3.0, 4.0, 6.0)  # ... of the 600x450 original (gate image ~448 px)
DARK = (0.5, 0.35, 0.25, 0.15, 0.08)  # pixel values multiplied by this
SCORE = {"blur": "sharpness", "dark": "mean_luma", "everyday": "ood"}
LOW_IS_BAD = {"sharpness", "mean_luma"}


def _ci(k: int, n: int) -> list[float] | None:
    from dermedge.metrics import wilson

    ci = wilson(k, n)
    return None if ci is None else [round(v, 4) for v in ci]


def auroc(bad: Sequence[float], good: Sequence[float]) -> float | None:
    """P(score of a bad photo > score of a good one), ties counted half (Mann-Whitney)."""
    bad, good = np.asarray(bad, np.float64), np.asarray(good, np.float64)
    if not len(bad) or not len(good):
        return None
    allv = np.concatenate([bad, good])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    i = 0
    while i < len(allv):  # average ranks over ties
        j = i
        while j + 1 < len(allv) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[:len(bad)].sum() - len(bad) * (len(bad) + 1) / 2
    return round(float(u / (len(bad) * len(good))), 4)


def jpeg(im: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def run_photo(svc, data: bytes) -> dict:
    """One upload through the service: the gate's verdict, its values and the model's top."""
    from edge_demo.gate import OOD

    timings: dict = {}
    inputs = svc.decode(data, timings)
    t0 = time.perf_counter()
    answer = svc.device.predict(inputs[svc.device.image_size])
    device_ms = (time.perf_counter() - t0) * 1000
    outcome = svc.gate.decide({**inputs["gate"], OOD: answer.get(OOD)})
    return {"refused": not outcome.passed, "codes": outcome.codes,
            "values": outcome.values, "top": answer["top"]["label"],
            "gate_ms": timings["gate"], "device_ms": device_ms}


def refusal_row(name: str, rows: list[dict]) -> dict:
    k = sum(r["refused"] for r in rows)
    per: dict[str, int] = {}
    for r in rows:
        for c in r["codes"]:
            per[c] = per.get(c, 0) + 1
    return {"set": name, "n": len(rows), "refused": k, "rate": round(k / len(rows), 4),
            "ci95": _ci(k, len(rows)), "by_code": per}


def detection_row(kind: str, strength, rows: list[dict], clean: list[dict]) -> dict:
    score = SCORE[kind]
    sign = -1.0 if score in LOW_IS_BAD else 1.0
    bad = [sign * r["values"][score] for r in rows if r["values"][score] is not None]
    good = [sign * r["values"][score] for r in clean if r["values"][score] is not None]
    k = sum(r["refused"] for r in rows)
    per: dict[str, int] = {}
    for r in rows:
        for c in r["codes"]:
            per[c] = per.get(c, 0) + 1
    out = {"kind": kind, "strength": strength, "n": len(rows), "refused": k,
           "rate": round(k / len(rows), 4), "ci95": _ci(k, len(rows)),
           "auroc": auroc(bad, good), "score": score, "by_code": per}
    if clean and len(clean) == len(rows) and kind != "everyday":
        changed = sum(a["top"] != b["top"] for a, b in zip(rows, clean, strict=True))
        out["top_changed"] = round(changed / len(rows), 4)
    return out


def blurred(im: Image.Image, sigma: float) -> Image.Image:
    return im.filter(ImageFilter.GaussianBlur(sigma))


def darkened(im: Image.Image, f: float) -> Image.Image:
    a = np.asarray(im, np.float32) * f
    return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8))


def server_cost(svc, photos: list[Path], runs: int) -> dict:
    """Median gate and model times per photo at two photo sizes, and their ratio; and the
    decode with the gate's reduced-scale rule against the model's alone."""
    out = {}
    for label, scale in (("600x450", 1), ("4000x3000", None)):
        datas = []
        for p in photos:
            im = Image.open(p).convert("RGB")
            datas.append(jpeg(im if scale else im.resize((4000, 3000), Image.LANCZOS)))
        gate, dev, dec_on, dec_off = [], [], [], []
        for _ in range(runs):
            for d in datas:
                r = run_photo(svc, d)
                gate.append(r["gate_ms"])
                dev.append(r["device_ms"])
                for flag, acc in ((True, dec_on), (False, dec_off)):
                    t: dict = {}
                    svc.decode(d, t, gate=flag)
                    acc.append(t["decode"])
        g, m = statistics.median(gate), statistics.median(dev)
        out[label] = {"gate_ms": round(g, 3), "model_ms": round(m, 3),
                      "ratio": round(g / m, 4), "n": len(gate),
                      "decode_ms_with_gate": round(statistics.median(dec_on), 3),
                      "decode_ms_without": round(statistics.median(dec_off), 3)}
    return out


def browser_cost(bundle: Path, photos: list[Path], runs: int) -> dict:
    """The page's gate (measures on the decoded photo) and model run, medians per photo."""
    from test_browser_e2e import chromium, demo_server, ensure_runtime

    ensure_runtime()
    tmp = Path(tempfile.mkdtemp(prefix="input_gate_"))
    files = {}
    for p in photos:
        im = Image.open(p).convert("RGB")
        files.setdefault("600x450", []).append(p)
        big = tmp / f"{p.stem}_4000.jpg"
        big.write_bytes(jpeg(im.resize((4000, 3000), Image.LANCZOS)))
        files.setdefault("4000x3000", []).append(big)
    out = {}
    with demo_server(["--device", str(bundle), "--threads", "1"], tmp / "server.log",
                     timeout=180) as url, chromium(tmp / "profile") as driver:
        driver.set_script_timeout(600)
        driver.get(url + "/")
        driver.execute_async_script("const cb = arguments[0];"
                                    " window.dermedgeDevice.ready.then(cb, cb);")
        for label, paths in files.items():
            gate, dev = [], []
            for _ in range(runs):
                for p in paths:
                    b64 = __import__("base64").b64encode(p.read_bytes()).decode()
                    r = driver.execute_async_script(
                        "const [b64, cb] = arguments;"
                        "const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));"
                        "const f = new File([bytes], 'p.jpg', {type: 'image/jpeg'});"
                        "window.dermedgeDevice.classifyFile(f).then((a) => cb({g: a.gate_ms,"
                        " m: a.latency_ms}), (e) => cb({error: String(e)}));", b64)
                    if "error" in r:
                        raise SystemExit(f"input_gate: error: the page failed: {r['error']}")
                    gate.append(r["g"])
                    dev.append(r["m"])
            g, m = statistics.median(gate), statistics.median(dev)
            out[label] = {"gate_ms": round(g, 3), "model_ms": round(m, 3),
                          "ratio": round(g / m, 4), "n": len(gate)}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    import pandas as pd
    from load_demo import write_result

    from edge_demo.service import DemoService

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path, help="device bundle exported with the input gate")
    ap.add_argument("--run", type=Path, required=True,
                    help="the run directory it came from (its splits.csv names the val split)")
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--synthetic", type=int, default=300,
                    help="validation images to blur and darken (the first N of the split)")
    ap.add_argument("--browser", action="store_true", help="also time the page in Chromium")
    ap.add_argument("--cost-photos", type=int, default=10)
    ap.add_argument("--cost-runs", type=int, default=3)
    ap.add_argument("--limit", type=int, help="at most N photos per set (a quick check)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    svc = DemoService.from_paths(args.bundle)
    data = args.shared / "data"
    splits = pd.read_csv(args.run / "splits.csv")
    val = [Path(p) for p in splits[splits["split"] == "val"]["path"]]
    raw = sorted((data / "ham10000_raw_600x450" / "images").glob("*.jpg"))
    every = sorted((data / "everyday_photos_dev").glob("*.jpg"))
    choose, report = every[:150], every[150:]
    if args.limit:
        val, raw, choose, report = (x[:args.limit] for x in (val, raw, choose, report))
    t0 = time.perf_counter()

    def files(paths):
        return [run_photo(svc, p.read_bytes()) for p in paths]

    real = {"validation split": files(val), "600x450 originals": files(raw)}
    refusals = [refusal_row(k, v) for k, v in real.items()]
    detections = [detection_row("everyday", "held out (150)", files(report), real[
        "validation split"]),
                  detection_row("everyday", "choose part (150, chose the method)",
                                files(choose), real["validation split"])]
    sub = val[:args.synthetic]
    clean_val = real["validation split"][:len(sub)]
    ims = [Image.open(p).convert("RGB") for p in sub]
    for s in BLUR_224:
        rows = [run_photo(svc, jpeg(blurred(im, s), 95)) for im in ims]
        detections.append(detection_row("blur", f"sigma {s} px of 224 (val)", rows, clean_val))
    raw_ims = [Image.open(p).convert("RGB") for p in raw]
    for s in BLUR_600:
        rows = [run_photo(svc, jpeg(blurred(im, s), 95)) for im in raw_ims]
        detections.append(detection_row("blur", f"sigma {s} px of 600x450 (originals)", rows,
                                        real["600x450 originals"]))
    for f in DARK:
        rows = [run_photo(svc, jpeg(darkened(im, f), 95)) for im in ims]
        detections.append(detection_row("dark", f"x{f} (val)", rows, clean_val))
    black = [run_photo(svc, jpeg(Image.new("RGB", (640, 480))))]
    cost = {"server": server_cost(svc, raw[:args.cost_photos], args.cost_runs)}
    if args.browser:
        cost["page"] = browser_cost(args.bundle, raw[:args.cost_photos], args.cost_runs)

    print(f"\nbundle {args.bundle.name}: thresholds {svc.gate.thresholds}")
    print(f"\n{'real dermoscopy':<32}{'n':>5}{'refused':>9}{'rate':>8}  95 % CI        by check")
    for r in refusals:
        print(f"{r['set']:<32}{r['n']:>5}{r['refused']:>9}{r['rate']:>8.3f}  "
              f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]  {r['by_code']}")
    print(f"\n{'bad input':<46}{'n':>5}{'detected':>10}  95 % CI        AUROC   top chg  "
          "by check")
    for d in detections:
        print(f"{d['kind'] + ': ' + str(d['strength']):<46}{d['n']:>5}{d['rate']:>10.3f}  "
              f"[{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}]  {d['auroc'] or float('nan'):.3f}"
              f"   {str(d.get('top_changed', '')):<8}{d['by_code']}")
    print(f"black frame: {'refused' if black[0]['refused'] else 'passed'} {black[0]['codes']}")
    print(f"\n{'cost per photo':<26}{'gate ms':>10}{'model ms':>10}{'ratio':>8}"
          "   decode ms (with the gate / without)")
    for where, sizes in cost.items():
        for size, c in sizes.items():
            dec = (f"   {c['decode_ms_with_gate']:.2f} / {c['decode_ms_without']:.2f}"
                   if "decode_ms_with_gate" in c else "")
            print(f"{where + ' ' + size:<26}{c['gate_ms']:>10.2f}{c['model_ms']:>10.2f}"
                  f"{c['ratio']:>8.3f}{dec}")
    doc = {"bundle": str(args.bundle), "run": str(args.run),
           "card_gate": svc.device.card.get("gate"), "thresholds": svc.gate.thresholds,
           "real": refusals, "detection": detections, "black_frame": black[0], "cost": cost,
           "everyday_split": "sorted by file name: the first 150 chose the method, the last"
                             " 150 are held out",
           "seconds": round(time.perf_counter() - t0, 1)}
    write_result(doc, args.out, "input_gate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
