"""The device tier in the browser (LiteRT.js in headless Chromium) beside native LiteRT.

For each bundle it starts `edge-demo serve` and measures, in one run:

* **model**: on the same uint8 pixels of real 600x450 photos (through the input contract),
  the model run in the page (``performance.now`` around ``model.run`` and reading the
  outputs) and ``Tier.predict`` in Python LiteRT, interleaved run by run, at each thread
  count: 1 = the page's single-threaded build (``?threads=1``), N > 1 = its threaded build on
  N threads (``?threads=N``: needs the server's cross-origin isolation headers) against
  ``Tier`` with ``num_threads=N``. Medians after warm-up; outputs equal (0 quanta) or not.
* **prep**: the page's preprocessing of one 600x450 JPEG (decode, centred crop, Pillow-exact
  bilinear resize) as it is now (static/pixels.js) and as it was
  (benchmarks/browser_prep_before.js), alternating, and whether both give the same pixels.
* **page to answer**: from opening the page to the first answer shown, the photo chosen as
  soon as the page can take it: a first visit (empty browser cache), a repeat visit, and
  offline (the server stopped; the service worker's copy).
* ``--profile``: where the single-thread run's time goes (the page's own phases, and a
  Chrome CPU profile split into the WebAssembly module, JavaScript and the rest).

Prints tables; writes JSON to benchmarks/results/.

    python benchmarks/browser_latency.py /work/bundles/edge-int8 --threads 1 2 --profile
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PREP_BEFORE = Path(__file__).with_name("browser_prep_before.js")
sys.path.insert(0, str(REPO / "tests"))


def _compressed(log: Path, timeout: float = 1800) -> None:
    """Wait until the server has its compressed copies (made once per file content, in the
    background): the page is then served as a phone gets it, and no compression runs beside
    the measurements."""
    deadline = time.monotonic() + timeout
    while " compressed " not in log.read_text():
        if time.monotonic() > deadline:
            raise SystemExit(f"browser_latency: error: no compressed copies after {timeout} s"
                             f" (see {log}).")
        time.sleep(1)


def _photos(shared: Path, n: int) -> list[Path]:
    folder = shared.resolve() / "data" / "ham10000_raw_600x450" / "images"
    photos = sorted(folder.glob("*.jpg"))[:n]  # absolute: Chromium's file input needs them
    if not photos:
        raise SystemExit(f"browser_latency: error: no photos in {folder}; pass --shared.")
    return photos


def _async(driver, body: str, *args):
    """An async snippet (``return`` a value) run in the page; its error raised here."""
    out = driver.execute_async_script(
        "const cb = arguments[arguments.length - 1];"
        f"(async () => {{ {body} }})().then((v) => cb({{v}}), (e) => cb({{e: String(e)}}));",
        *args)
    if "e" in out:
        raise SystemExit(f"browser_latency: error in the page: {out['e']}")
    return out["v"]


def _open(driver, url: str, timeout: float = 180) -> dict:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, timeout).until(
        lambda d: d.find_element("id", "device-status").get_attribute("data-state"))
    return _async(driver, "return await window.dermedgeDevice.ready;")


def model_row(driver, url: str, bundle: Path, pixels, threads: int, runs: int,
              warmup: int) -> dict:
    from edge_demo.tiers import Tier

    info = _open(driver, f"{url}/?threads={threads}")
    want = "single" if threads == 1 else "threaded"
    if info["build"] != want or info["threads"] != threads:
        raise SystemExit(f"browser_latency: error: asked for {threads} thread(s), the page"
                         f" runs the {info['build']} build on {info['threads']} ({info['why']});"
                         " the threaded build needs the server's COOP/COEP headers.")
    tier = Tier.from_bundle(bundle, num_threads=threads)
    b64 = [base64.b64encode(x.tobytes()).decode() for x in pixels]
    _async(driver, "window.__px = arguments[0].map((b) => Uint8Array.from(atob(b),"
                   " (c) => c.charCodeAt(0))); return 0;", b64)
    js_ms, py_ms, equal = [], [], True
    for i in range(warmup + runs):
        out = _async(driver, "return await window.dermedgeDevice.runPixels(window.__px["
                             "arguments[0]]);", i % len(pixels))
        py = tier.predict(pixels[i % len(pixels)])  # interleaved: both see the same load
        if i >= warmup:
            js_ms.append(out["latency_ms"])
            py_ms.append(py["latency_ms"])
        equal &= out["melanoma"] == py["melanoma"] and out["diagnosis"] == py["diagnosis"]
    js, py = statistics.median(js_ms), statistics.median(py_ms)
    return {"bundle": bundle.name, "name": tier.name, "mode": tier.mode,
            "image_size": tier.image_size, "size_mb": round(tier.size_bytes / 1e6, 2),
            "threads": threads, "build": info["build"], "runs": runs, "warmup": warmup,
            "browser_median_ms": round(js, 2), "native_median_ms": round(py, 2),
            "ratio_browser_over_native": round(js / py, 2), "outputs_equal": bool(equal),
            "model_load_ms": round(info["loadMs"], 1), "litertjs": info.get("version")}


def prep_row(driver, photo: Path, size: int, runs: int, warmup: int) -> dict:
    driver.execute_script(PREP_BEFORE.read_text())
    driver.execute_script("document.getElementById('image-input').value = '';")
    driver.find_element("id", "image-input").send_keys(str(photo))
    out = _async(driver, """
        const f = document.getElementById('image-input').files[0], S = arguments[1];
        const P = await import(new URL("pixels.js", document.querySelector(
          'script[src*="device.js"]').src).href);
        const B = window.__prepBeforeParts;
        const t = {now: [], before: [], now_decode: [], before_decode: [], now_resize: [],
                   before_resize: []};
        let same = true;
        const now = async () => {
          const t0 = performance.now(), sq = await P.decodeSquare(f), t1 = performance.now();
          const px = P.squareResize(sq.rgba, sq.side, 0, 0, sq.side, S);
          return [t1 - t0, performance.now() - t1, px];
        };
        const before = async () => {
          const t0 = performance.now(), img = await B.decode(f), t1 = performance.now();
          const px = B.cropResize(img.rgba, img.width, img.height, S);
          return [t1 - t0, performance.now() - t1, px];
        };
        for (let i = 0; i < arguments[0]; i++) {  // alternating which goes first
          const [a, b] = i % 2 ? [await before(), await now()].reverse()
            : [await now(), await before()];
          t.now_decode.push(a[0]); t.now_resize.push(a[1]); t.now.push(a[0] + a[1]);
          t.before_decode.push(b[0]); t.before_resize.push(b[1]); t.before.push(b[0] + b[1]);
          same = same && a[2].length === b[2].length && a[2].every((v, j) => v === b[2][j]);
        }
        return {t, same};""", warmup + runs, size)
    med = {k: round(statistics.median(v[warmup:]), 2) for k, v in out["t"].items()}
    return {"photo": photo.name, "size": size, "runs": runs,
            **{f"prep_{k}_median_ms": v for k, v in med.items()},
            "speedup": round(med["before"] / med["now"], 2),
            "resize_speedup": round(med["before_resize"] / med["now_resize"], 2),
            "same_pixels": bool(out["same"])}


def _visit(driver, url: str, photo: Path) -> dict:
    """Open the page, choose the photo once the model is loaded, press Classify: the page's
    own marks (ms from the start of navigation)."""
    from selenium.webdriver.support.ui import WebDriverWait

    info = _open(driver, url + "/")
    driver.find_element("id", "image-input").send_keys(str(photo))
    driver.find_element("id", "submit").click()
    WebDriverWait(driver, 120).until(lambda d: d.execute_script(
        "return performance.getEntriesByName('dermedge-answer').length > 0;"))
    marks = driver.execute_script(
        "const m = (n) => performance.getEntriesByName(n)[0].startTime;"
        "return {ready: m('dermedge-model-ready'), answer: m('dermedge-answer'),"
        " queued: Boolean(window.dermedgeLast && window.dermedgeLast.queued)};")
    offline = _async(driver, "return await window.dermedgeOffline.ready;")
    return {"model_ready_ms": round(marks["ready"], 1), "answer_ms": round(marks["answer"], 1),
            "queued": marks["queued"], "build": info["build"], "threads": info["threads"],
            "offline_ready": bool(offline)}


def page_to_answer(bundle: Path, photo: Path, tmp: Path, serve: list[str]) -> dict:
    """First visit, repeat visit, and offline, in one fresh browser profile."""
    from conftest import free_port
    from test_browser_e2e import chromium, demo_server

    port = free_port()
    out = {}
    with chromium(tmp / "visits") as driver:
        driver.set_script_timeout(300)
        with demo_server(["--device", str(bundle), *serve], tmp / "visits.log",
                         port=port, timeout=180) as url:
            _compressed(tmp / "visits.log")
            out["first_visit"] = _visit(driver, url, photo)
            out["repeat_visit"] = _visit(driver, url, photo)
        out["offline"] = _visit(driver, url, photo)
    if not out["offline"]["queued"]:
        raise SystemExit("browser_latency: error: the offline visit reached a server.")
    return out


def profile_row(driver, url: str, pixels, runs: int, tmp: Path) -> dict:
    """The single-thread run, split: the page's phases (input tensor, model.run, reading the
    outputs) and a CPU profile's samples by where they fall."""
    _open(driver, f"{url}/?threads=1")
    b64 = base64.b64encode(pixels[0].tobytes()).decode()
    phases = _async(driver, """
        const D = window.dermedgeDevice, px = Uint8Array.from(atob(arguments[0]),
          (c) => c.charCodeAt(0));
        const {runtime: rt, model} = D.internals();
        const S = D.config.image_size, t = {input: [], run: [], read: []};
        for (let i = 0; i < arguments[1]; i++) {
          const t0 = performance.now();
          const input = rt.Tensor.fromTypedArray(px, [1, S, S, 3]);
          const t1 = performance.now();
          const out = await model.run({image: input});
          const t2 = performance.now();
          out.melanoma.toTypedArray(); out.diagnosis.toTypedArray();
          const t3 = performance.now();
          input.delete(); Object.values(out).forEach((x) => x.delete());
          t.input.push(t1 - t0); t.run.push(t2 - t1); t.read.push(t3 - t2);
        }
        const med = (a) => a.slice().sort((x, y) => x - y)[a.length >> 1];
        return {input: med(t.input), run: med(t.run), read: med(t.read)};""", b64, runs)
    driver.execute_cdp_cmd("Profiler.enable", {})
    driver.execute_cdp_cmd("Profiler.setSamplingInterval", {"interval": 200})
    driver.execute_cdp_cmd("Profiler.start", {})
    _async(driver, """const D = window.dermedgeDevice, px = Uint8Array.from(atob(arguments[0]),
        (c) => c.charCodeAt(0));
        for (let i = 0; i < arguments[1]; i++) await D.runPixels(px);
        return 0;""", b64, runs)
    prof = driver.execute_cdp_cmd("Profiler.stop", {})["profile"]
    (tmp / "single-thread.cpuprofile").write_text(json.dumps(prof))
    nodes = {n["id"]: n for n in prof["nodes"]}
    by_node = Counter(prof["samples"])
    where, wasm_fns = Counter(), Counter()
    for node_id, count in by_node.items():
        frame = nodes[node_id]["callFrame"]
        name, url_ = frame["functionName"], frame.get("url", "")
        if url_.startswith("wasm://") or name.startswith(("$", "wasm-function")):
            where["WebAssembly (LiteRT + XNNPACK kernels)"] += count
            wasm_fns[name] += count
        elif name in ("(idle)", "(program)", "(garbage collector)"):
            where[name] += count
        else:
            where["JavaScript (LiteRT.js glue, page)"] += count
    total = sum(by_node.values())
    busy = total - where["(idle)"]
    top = wasm_fns.most_common(5)
    return {"runs": runs, "phases_median_ms": {k: round(v, 3) for k, v in phases.items()},
            "samples": total,
            "share_of_busy": {k: round(v / busy, 3) for k, v in where.items() if k != "(idle)"},
            "top_wasm_functions_share_of_wasm": [
                (n, round(c / max(1, sum(wasm_fns.values())), 3)) for n, c in top]}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundles", nargs="+", type=Path, help="export bundle folders (batch 1)")
    p.add_argument("--runs", type=int, default=100, help="timed runs per runtime")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs first")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                   help="thread counts (1: the single-threaded build; >1: the threaded one)")
    p.add_argument("--photos", type=int, default=10, help="real photos cycled as inputs")
    p.add_argument("--profile", action="store_true",
                   help="also split the single-thread run (page phases, CPU profile)")
    p.add_argument("--shared", type=Path, default=REPO.parent / "shared",
                   help="the shared data folder (600x450 HAM10000 photos)")
    p.add_argument("--state-dir", type=Path, help="the server's state folder (kept: its"
                   " compressed copies are reused by the next run; default: a new one)")
    args = p.parse_args(argv)
    from test_browser_e2e import chromium, demo_server, ensure_runtime

    from dermedge.image import load_image
    from edge_demo.tiers import Tier

    ensure_runtime()
    photos = _photos(args.shared, args.photos)
    tmp = Path(tempfile.mkdtemp(prefix="browser_latency_"))
    serve = ["--threads", "2", "--state-dir", str(args.state_dir or tmp / "state")]
    models, preps, visits, profiles = [], [], {}, {}
    for bundle in args.bundles:
        S = Tier.from_bundle(bundle).image_size
        pixels = [load_image(ph, S) for ph in photos]
        with demo_server(["--device", str(bundle), *serve], tmp / "server.log",
                         timeout=180) as url, chromium(tmp / f"p-{bundle.name}") as driver:
            _compressed(tmp / "server.log")
            driver.set_script_timeout(900)
            for t in args.threads:
                models.append(model_row(driver, url, bundle, pixels, t, args.runs,
                                        args.warmup))
            preps.append({"bundle": bundle.name, **prep_row(driver, photos[0], S, args.runs,
                                                            args.warmup)})
            if args.profile:
                profiles[bundle.name] = profile_row(driver, url, pixels, args.runs, tmp)
        visits[bundle.name] = page_to_answer(bundle, photos[0], tmp, serve)

    head = (f"{'bundle':<22} {'thr':>3} {'build':<9} {'browser ms':>10} {'native ms':>9}"
            f" {'ratio':>6} {'equal':>6}")
    print(head + "\n" + "-" * len(head))
    for r in models:
        print(f"{r['bundle']:<22} {r['threads']:>3} {r['build']:<9}"
              f" {r['browser_median_ms']:>10.2f} {r['native_median_ms']:>9.2f}"
              f" {r['ratio_browser_over_native']:>6.2f} {str(r['outputs_equal']):>6}")
    print(f"\n{'bundle':<22} {'prep ms now / before':>20} {'decode+read':>13}"
          f" {'crop+resize':>13} {'speedup':>7} {'same':>5}")
    for r in preps:
        print(f"{r['bundle']:<22} {r['prep_now_median_ms']:>9.2f} /"
              f" {r['prep_before_median_ms']:<8.2f}"
              f" {r['prep_now_decode_median_ms']:>5.2f} / {r['prep_before_decode_median_ms']:<5.2f}"
              f" {r['prep_now_resize_median_ms']:>5.2f} / {r['prep_before_resize_median_ms']:<5.2f}"
              f" {r['speedup']:>7.2f} {str(r['same_pixels']):>5}")
    print(f"\n{'bundle':<22} {'visit':<13} {'build':<9} {'model ready ms':>14}"
          f" {'answer ms':>9}")
    for name, v in visits.items():
        for kind, r in v.items():
            print(f"{name:<22} {kind:<13} {r['build'] + '/' + str(r['threads']):<9}"
                  f" {r['model_ready_ms']:>14.1f} {r['answer_ms']:>9.1f}")
    for name, r in profiles.items():
        print(f"\n{name}, one thread: page phases (median ms) {r['phases_median_ms']};"
              f" CPU profile, share of busy samples {r['share_of_busy']};"
              f" top wasm functions {r['top_wasm_functions_share_of_wasm']}")
    from load_demo import write_result

    write_result({"created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                  "machine": platform.platform(), "cpus": os.cpu_count(),
                  "command": sys.argv, "models": models, "prep": preps,
                  "page_to_answer": visits, "profile": profiles}, None, "browser_latency")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
