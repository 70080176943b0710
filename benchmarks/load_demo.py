"""Load benchmark of `edge-demo serve` (waitress) on 127.0.0.1, beside the same pipeline
without HTTP.

Side by side in one run, on the same cores (ratios are what to compare between machines):

* ``inference``: the device tier's interpreter alone on a prepared (S, S, 3) input, 1 thread;
* ``jpeg->answer``: ``DemoService.classify`` on the photo's bytes (decode, crop, resize,
  inference, policy), 1 thread, with the demo's reduced-scale JPEG decode and with the
  reference full decode;
* ``no-HTTP pipeline``: ``--threads`` threads calling ``classify`` (one-thread interpreters),
  images/s;
* the server (a subprocess) at 1, 8 and 32 keep-alive clients: req/s, p50/p99, errors (must
  be 0), RSS, and ``/healthz`` p50/p99 probed during each level.

Bounded: ``--requests`` and ``--seconds`` per level.

    python benchmarks/load_demo.py --device /work/bundles/effl0-short-int8 --allow-unvalidated
    python benchmarks/load_demo.py --device exports/mnv2-int8 --cloud exports/effl0-float32
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SHARED = Path(os.environ.get("DERMEDGE_SHARED", REPO.parent / "shared"))
SHARED_PHOTOS = SHARED / "data" / "ham10000_raw_600x450" / "images"

# Policies that pin the path: nothing falls back / everything falls back.
DEVICE_ONLY = {"min_confidence": 0.0, "mel_band_low": None, "mel_band_high": None,
               "second_opinion": False}
FALLBACK = {**DEVICE_ONLY, "min_confidence": 1.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def multipart(data: bytes, filename: str) -> tuple[bytes, str]:
    boundary = "edgedemobench7d1f"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\";"
            f" filename=\"{filename}\"\r\nContent-Type: image/jpeg\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), \
        f"multipart/form-data; boundary={boundary}"


class Server:
    """`python -m edge_demo serve` in a subprocess, ready when /readyz answers 200."""

    def __init__(self, device: str, cloud: str | None, policy: Path, threads: int, log: Path,
                 extra: Sequence[str] = ()):
        self.port = free_port()
        self._log = log.open("w")
        cmd = [sys.executable, "-m", "edge_demo", "serve", "--device", device,
               "--policy", str(policy), "--port", str(self.port), "--threads", str(threads),
               *extra]
        if cloud:
            cmd += ["--cloud", cloud]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "EDGE_DEMO_LOG_JSON": "0"})
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise SystemExit(f"server failed to start; see {log}") from None
                time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))] if v else float("nan")


class HealthProbe:
    """GET /healthz on its own connection every ``every`` s while a level runs."""

    def __init__(self, port: int, every: float = 0.02):
        self.port, self.every = port, every
        self.ms: list[float] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self._stop.is_set():
            t0 = time.perf_counter()
            try:
                conn.request("GET", "/healthz")
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    raise RuntimeError(resp.status)
                self.ms.append((time.perf_counter() - t0) * 1000)
            except Exception:  # noqa: BLE001 - counted
                self.errors += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            time.sleep(self.every)
        conn.close()


def run_level(port: int, body: bytes, ctype: str, clients: int, max_requests: int,
              max_seconds: float, expect_path: str) -> dict:
    lock = threading.Lock()
    state = {"sent": 0}
    latencies: list[float] = []
    errors: list[str] = []
    t_end = time.monotonic() + max_seconds

    def take() -> bool:
        with lock:
            if state["sent"] >= max_requests or time.monotonic() >= t_end:
                return False
            state["sent"] += 1
            return True

    def worker():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            while take():
                t0 = time.perf_counter()
                try:
                    conn.request("POST", "/api/v1/classify", body, {"Content-Type": ctype})
                    resp = conn.getresponse()
                    payload = resp.read()
                    ms = (time.perf_counter() - t0) * 1000
                    if resp.status != 200:
                        raise RuntimeError(f"HTTP {resp.status}: {payload[:200]!r}")
                    if json.loads(payload)["tier_path"] != expect_path:
                        raise RuntimeError(f"unexpected tier path (wanted {expect_path})")
                    with lock:
                        latencies.append(ms)
                except Exception as exc:  # noqa: BLE001 - every failure is counted
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        finally:
            conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies)

    return {"clients": clients, "requests": len(lat) + len(errors), "ok": len(lat),
            "errors": len(errors), "error_samples": errors[:3], "wall_s": round(wall, 3),
            "req_per_s": round(len(lat) / wall, 2) if wall else 0.0,
            "p50_ms": round(pct(lat, 0.50), 2), "p99_ms": round(pct(lat, 0.99), 2)}


def pick_image(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    photos = sorted(SHARED_PHOTOS.glob("*.jpg")) if SHARED_PHOTOS.is_dir() else []
    if photos:
        return photos[0]
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)  # a smooth blob on skin tone plus noise, 600 x 450
    yy, xx = np.mgrid[0:450, 0:600]
    blob = np.exp(-(((xx - 300) / 150) ** 2 + ((yy - 225) / 112) ** 2))
    arr = np.array([200, 160, 140]) - blob[..., None] * np.array([120, 100, 90])
    arr = np.clip(arr + rng.normal(0, 8, arr.shape), 0, 255).astype(np.uint8)
    p = Path(tempfile.mkdtemp()) / "synthetic_600x450.jpg"
    Image.fromarray(arr).save(p, quality=90)
    return p


def interleaved_ms(fns: dict, n: int) -> dict[str, float]:
    """Median ms of each function over ``n`` rounds, calling them in turn each round (after 3
    warm-up rounds), so that load from other processes hits them alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(n + 3):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if i >= 3:
                times[k].append((time.perf_counter() - t0) * 1000)
    return {k: pct(v, 0.5) for k, v in times.items()}


def no_http(device: str, data: bytes, threads: int, n: int, allow: bool,
            min_crop: float) -> dict:
    """The pipeline without HTTP, measured in this process before the server starts."""
    from edge_demo.service import DemoService

    fast = DemoService.from_paths(device, allow_unvalidated=allow, pool_size=threads,
                                  decode_min_crop=min_crop)
    ref = DemoService.from_paths(device, allow_unvalidated=allow, fast_decode=False)
    fast.warm_up()
    ref.warm_up()
    x = fast.decode(data, {})[fast.device.image_size]
    out = interleaved_ms({"inference_ms": lambda: fast.device.predict(x),
                          "jpeg_to_answer_ms": lambda: fast.classify(data),
                          "jpeg_to_answer_reference_decode_ms": lambda: ref.classify(data)}, n)
    out["jpeg_to_answer_ratio"] = round(out["jpeg_to_answer_ms"] / out["inference_ms"], 2)
    out["reference_decode_ratio"] = round(
        out["jpeg_to_answer_reference_decode_ms"] / out["inference_ms"], 2)
    lock, count = threading.Lock(), [0]
    total = n * 4

    def work():
        while True:
            with lock:
                if count[0] >= total:
                    return
                count[0] += 1
            fast.classify(data)

    t0 = time.perf_counter()
    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    out["pipeline_images_per_s"] = round(total / (time.perf_counter() - t0), 1)
    out["pipeline_threads"] = threads
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", required=True, help="device (int8) export bundle folder")
    ap.add_argument("--cloud", help="cloud bundle: adds the fallback path (every case to the"
                    " cloud tier)")
    ap.add_argument("--image", help="photo to upload (default: a real HAM10000 600x450 JPEG)")
    ap.add_argument("--enlarge", type=float, default=1.0,
                    help="enlarge the photo this many times (bicubic, JPEG quality 90) to stand"
                         " in for a phone photo, e.g. 6.72 -> 4032 x 3024 from 600 x 450")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests", type=int, default=300, help="max requests per level")
    ap.add_argument("--seconds", type=float, default=20.0, help="max seconds per level")
    ap.add_argument("--threads", type=int, default=4, help="waitress threads")
    ap.add_argument("--pipeline-threads", type=int, default=2,
                    help="threads of the no-HTTP pipeline figure")
    ap.add_argument("--calls", type=int, default=100, help="calls per single-thread timing")
    ap.add_argument("--decode-min-crop", type=float, default=2.0,
                    help="the server's --decode-min-crop (reduced-scale JPEG decoding)")
    ap.add_argument("--allow-unvalidated", action="store_true",
                    help="serve a bundle whose export validation failed (timing only)")
    ap.add_argument("--out", type=Path, help="JSON output (default: benchmarks/results/)")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(REPO))
    from edge_demo.policy import Policy

    device, cloud = args.device, args.cloud
    image = pick_image(args.image)
    data = image.read_bytes()
    if args.enlarge != 1.0:
        import io

        from PIL import Image

        with Image.open(image) as im:
            big = im.resize((round(im.width * args.enlarge), round(im.height * args.enlarge)),
                            Image.BICUBIC)
        buf = io.BytesIO()
        big.save(buf, "JPEG", quality=90)
        data = buf.getvalue()
        print(f"enlarged {image.name} to {big.width} x {big.height} ({len(data)} bytes)")
    body, ctype = multipart(data, image.name)
    levels = [int(c) for c in args.concurrency.split(",")]
    work = Path(tempfile.mkdtemp(prefix="load_demo_"))
    pipe = no_http(device, data, args.pipeline_threads, args.calls, args.allow_unvalidated,
                   args.decode_min_crop)
    extra = ["--decode-min-crop", str(args.decode_min_crop)]
    if args.allow_unvalidated:
        extra.append("--allow-unvalidated")
    rows = []
    paths = [("device-only", DEVICE_ONLY, "device")]
    if cloud:
        paths.append(("fallback", FALLBACK, "device+cloud"))
    for path_name, pol, expect in paths:
        policy = Policy(**pol).save(work / f"{path_name}.json")
        server = Server(device, cloud, policy, args.threads, work / f"{path_name}.log", extra)
        try:
            # one request first so lazily-allocated buffers count in the start figure
            run_level(server.port, body, ctype, 1, 5, 10, expect)
            rss0 = rss_mb(server.proc.pid)
            for c in levels:
                with HealthProbe(server.port) as probe:
                    r = run_level(server.port, body, ctype, c, args.requests, args.seconds,
                                  expect)
                r.update(path=path_name, rss_mb=round(rss_mb(server.proc.pid), 1),
                         healthz_p50_ms=round(pct(probe.ms, 0.5), 2),
                         healthz_p99_ms=round(pct(probe.ms, 0.99), 2),
                         healthz_probes=len(probe.ms), healthz_errors=probe.errors,
                         vs_pipeline=round(r["req_per_s"] / pipe["pipeline_images_per_s"], 2),
                         p99_over_p50=round(r["p99_ms"] / r["p50_ms"], 2))
                rows.append(r)
            rss1 = rss_mb(server.proc.pid)
        finally:
            server.stop()
        for r in rows:
            if r["path"] == path_name:
                r["rss_start_mb"], r["rss_end_mb"] = round(rss0, 1), round(rss1, 1)

    print(f"image {image.name} x{args.enlarge:g} ({len(data)} bytes), device={Path(device).name},"
          f" cloud={Path(cloud).name if cloud else 'none'}, waitress threads={args.threads},"
          f" decode-min-crop={args.decode_min_crop}, {os.cpu_count()} CPUs (client and server"
          f" share them), load average {os.getloadavg()[0]:.1f}")
    print(f"inference alone {pipe['inference_ms']:.2f} ms | JPEG->answer"
          f" {pipe['jpeg_to_answer_ms']:.2f} ms ({pipe['jpeg_to_answer_ratio']:.2f}x),"
          f" with the reference decode {pipe['jpeg_to_answer_reference_decode_ms']:.2f} ms"
          f" ({pipe['reference_decode_ratio']:.2f}x) | no-HTTP pipeline"
          f" ({pipe['pipeline_threads']} threads) {pipe['pipeline_images_per_s']:.1f} images/s")
    head = (f"{'path':<12}{'clients':>8}{'reqs':>6}{'err':>5}{'req/s':>8}{'x pipe':>8}"
            f"{'p50 ms':>8}{'p99 ms':>8}{'p99/p50':>8}{'hz p99':>8}{'RSS MB':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['path']:<12}{r['clients']:>8}{r['requests']:>6}{r['errors']:>5}"
              f"{r['req_per_s']:>8.1f}{r['vs_pipeline']:>8.2f}{r['p50_ms']:>8.1f}"
              f"{r['p99_ms']:>8.1f}{r['p99_over_p50']:>8.2f}{r['healthz_p99_ms']:>8.1f}"
              f"{r['rss_mb']:>8.1f}")
    doc = {"created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
           "host": {"machine": platform.machine(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
           "device": device, "cloud": cloud, "image": str(image), "enlarge": args.enlarge,
           "upload_bytes": len(data), "threads": args.threads,
           "decode_min_crop": args.decode_min_crop,
           "load_average_at_end": list(os.getloadavg()),
           "bounds": {"requests_per_level": args.requests, "seconds_per_level": args.seconds},
           "no_http": pipe, "rows": rows}
    out = args.out or RESULTS / f"load_demo_{dt.datetime.now():%Y%m%d_%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")
    total_errors = sum(r["errors"] + r["healthz_errors"] for r in rows)
    if total_errors:
        print(f"FAILED: {total_errors} errors", file=sys.stderr)
    return 1 if total_errors else 0


if __name__ == "__main__":
    sys.exit(main())
