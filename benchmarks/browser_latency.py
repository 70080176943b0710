"""In-browser device-tier latency (LiteRT.js in headless Chromium) beside Python LiteRT.

For each bundle it starts `edge-demo serve`, opens the page in headless Chromium (phone
viewport), waits for LiteRT.js to load the model, and times, on the same uint8 pixels of real
600x450 photos (through the input contract): the model run in the page (``performance.now``
around ``model.run`` and reading the outputs; WebAssembly + XNNPACK, single-threaded build)
and ``Tier.predict`` in Python LiteRT (1 thread), interleaved run by run. Medians after
warm-up; also the page's preprocessing of a 600x450 JPEG (decode, crop, Pillow-exact resize) and
whether the two runtimes' outputs are equal. Prints a table, writes JSON to
benchmarks/results/.

    python benchmarks/browser_latency.py /work/bundles/effl0-short-int8 [/tmp/qs/bundle-int8]
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import platform
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO / "tests"))


def _photos(shared: Path, n: int) -> list[Path]:
    folder = shared / "data" / "ham10000_raw_600x450" / "images"
    photos = sorted(folder.glob("*.jpg"))[:n]
    if not photos:
        raise SystemExit(f"browser_latency: error: no photos in {folder}; pass --shared.")
    return photos


def measure(bundle: Path, photos: list[Path], runs: int, warmup: int) -> dict:
    from test_browser_e2e import chromium, demo_server, ensure_runtime

    from dermedge.image import load_image
    from edge_demo.tiers import Tier

    ensure_runtime()
    tier = Tier.from_bundle(bundle, num_threads=1)
    S = tier.image_size
    pixels = [load_image(p, S) for p in photos]
    tmp = Path(tempfile.mkdtemp(prefix="browser_latency_"))
    with demo_server(["--device", str(bundle), "--threads", "1"], tmp / "server.log",
                     timeout=180) as url, chromium(tmp / "profile") as driver:
        driver.set_script_timeout(600)
        driver.get(url + "/")
        load = driver.execute_async_script(
            "const cb = arguments[0]; window.dermedgeDevice.ready.then((i) => cb(i),"
            " (e) => cb({error: String(e)}));")
        if "error" in load:
            raise SystemExit(f"browser_latency: error: the page could not load {bundle}:"
                             f" {load['error']}")
        js_ms, py_ms, equal = [], [], True
        for i in range(warmup + runs):
            x = pixels[i % len(pixels)]
            b64 = base64.b64encode(x.tobytes()).decode()
            out = driver.execute_async_script(
                "const cb = arguments[1]; window.dermedgeDevice.runPixelsB64(arguments[0])"
                ".then(cb);", b64)
            py = tier.predict(x)  # interleaved with the browser's run: same load on both
            if i >= warmup:
                js_ms.append(out["latency_ms"])
                py_ms.append(py["latency_ms"])
            equal &= (out["melanoma"] == py["melanoma"] and out["diagnosis"] == py["diagnosis"])
        driver.find_element("id", "image-input").send_keys(str(photos[0]))
        pre = driver.execute_async_script(
            "const cb = arguments[1]; const f = document.getElementById('image-input').files[0];"
            "(async () => { const t = [];"
            " for (let i = 0; i < arguments[0]; i++) { const t0 = performance.now();"
            "  await window.dermedgeDevice.preprocessB64(f, " + str(S) + ");"
            "  t.push(performance.now() - t0); } return t; })().then(cb);", warmup + runs)[warmup:]
        ua = driver.execute_script("return navigator.userAgent;")
    js, py = statistics.median(js_ms), statistics.median(py_ms)
    return {"bundle": bundle.name, "name": tier.name, "mode": tier.mode, "image_size": S,
            "size_mb": round(tier.size_bytes / 1e6, 2), "runs": runs, "warmup": warmup,
            "browser_median_ms": round(js, 2), "python_median_ms": round(py, 2),
            "ratio_browser_over_python": round(js / py, 2),
            "browser_preprocess_median_ms": round(statistics.median(pre), 2),
            "model_load_ms": round(load["loadMs"], 1), "litertjs": load.get("version"),
            "outputs_equal": bool(equal), "user_agent": ua}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundles", nargs="+", type=Path, help="export bundle folders (batch 1)")
    p.add_argument("--runs", type=int, default=50, help="timed runs per runtime")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs first")
    p.add_argument("--photos", type=int, default=10, help="real photos cycled as inputs")
    p.add_argument("--shared", type=Path, default=REPO.parent / "shared",
                   help="the shared data folder (600x450 HAM10000 photos)")
    args = p.parse_args(argv)
    photos = _photos(args.shared, args.photos)
    rows = [measure(b, photos, args.runs, args.warmup) for b in args.bundles]
    head = (f"{'bundle':<24} {'mode':<7} {'S':>4} {'MB':>6} {'browser ms':>11} {'python ms':>10}"
            f" {'ratio':>6} {'prep ms':>8} {'load ms':>8} {'equal':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['bundle']:<24} {r['mode']:<7} {r['image_size']:>4} {r['size_mb']:>6.2f}"
              f" {r['browser_median_ms']:>11.2f} {r['python_median_ms']:>10.2f}"
              f" {r['ratio_browser_over_python']:>6.2f} {r['browser_preprocess_median_ms']:>8.2f}"
              f" {r['model_load_ms']:>8.1f} {str(r['outputs_equal']):>6}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"browser_latency-{stamp}.json"
    out.write_text(json.dumps({"created": stamp, "machine": platform.platform(),
                               "cpus": __import__("os").cpu_count(), "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
