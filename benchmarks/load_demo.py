"""Load benchmark of `edge-demo serve` (waitress) on 127.0.0.1.

For the device-only path and the fallback path (a policy that forces every case to the
cloud tier) and 1, 8 and 32 concurrent keep-alive clients it sends a bounded number of
requests (``--requests`` and ``--seconds`` per level) with one real photo and reports
req/s, p50/p99 latency, errors (must be 0) and the server's RSS at start and end.

    python benchmarks/load_demo.py --device exports/mnv2-int8 --cloud exports/effl0-float32
    python benchmarks/load_demo.py            # tiny 32-px bundles (needs TensorFlow to build)
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
SHARED_PHOTOS = REPO.parent / "shared" / "data" / "ham10000_raw_600x450" / "images"

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

    def __init__(self, device: str, cloud: str, policy: Path, threads: int, log: Path):
        self.port = free_port()
        self._log = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge_demo", "serve", "--device", device, "--cloud", cloud,
             "--policy", str(policy), "--port", str(self.port), "--threads", str(threads)],
            cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
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

    def pct(q):
        return lat[min(len(lat) - 1, int(round(q * (len(lat) - 1))))] if lat else float("nan")

    return {"clients": clients, "requests": len(lat) + len(errors), "ok": len(lat),
            "errors": len(errors), "error_samples": errors[:3], "wall_s": round(wall, 3),
            "req_per_s": round(len(lat) / wall, 2) if wall else 0.0,
            "p50_ms": round(pct(0.50), 2), "p99_ms": round(pct(0.99), 2)}


def tiny_bundles() -> tuple[str, str]:
    sys.path.insert(0, str(REPO / "tests"))
    from demo_fixtures import tiny_bundles as build

    b = build()
    return str(b["int8"]), str(b["float32"])


def pick_image(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    photos = sorted(SHARED_PHOTOS.glob("*.jpg")) if SHARED_PHOTOS.is_dir() else []
    if photos:
        return photos[0]
    sys.path.insert(0, str(REPO / "tests"))
    from demo_fixtures import jpeg_bytes

    p = Path(tempfile.mkdtemp()) / "synthetic_600x450.jpg"
    p.write_bytes(jpeg_bytes((600, 450)))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", help="device bundle (default: tiny 32-px test bundles)")
    ap.add_argument("--cloud", help="cloud bundle (default: tiny 32-px test bundles)")
    ap.add_argument("--image", help="photo to upload (default: a real HAM10000 600x450 JPEG)")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests", type=int, default=300, help="max requests per level")
    ap.add_argument("--seconds", type=float, default=20.0, help="max seconds per level")
    ap.add_argument("--threads", type=int, default=4, help="waitress threads")
    ap.add_argument("--out", type=Path, help="JSON output (default: benchmarks/results/)")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(REPO))
    from edge_demo.policy import Policy

    if bool(args.device) != bool(args.cloud):
        ap.error("pass both --device and --cloud, or neither (tiny test bundles)")
    device, cloud = (args.device, args.cloud) if args.device else tiny_bundles()
    image = pick_image(args.image)
    body, ctype = multipart(image.read_bytes(), image.name)
    levels = [int(c) for c in args.concurrency.split(",")]
    work = Path(tempfile.mkdtemp(prefix="load_demo_"))
    rows = []
    for path_name, pol, expect in (("device-only", DEVICE_ONLY, "device"),
                                   ("fallback", FALLBACK, "device+cloud")):
        policy = Policy(**pol).save(work / f"{path_name}.json")
        server = Server(device, cloud, policy, args.threads, work / f"{path_name}.log")
        try:
            # one request first so lazily-allocated buffers count in the start figure
            run_level(server.port, body, ctype, 1, 5, 10, expect)
            rss0 = rss_mb(server.proc.pid)
            for c in levels:
                r = run_level(server.port, body, ctype, c, args.requests, args.seconds, expect)
                r.update(path=path_name, rss_mb=round(rss_mb(server.proc.pid), 1))
                rows.append(r)
            rss1 = rss_mb(server.proc.pid)
        finally:
            server.stop()
        for r in rows:
            if r["path"] == path_name:
                r["rss_start_mb"], r["rss_end_mb"] = round(rss0, 1), round(rss1, 1)

    head = (f"{'path':<12}{'clients':>8}{'requests':>10}{'errors':>8}{'req/s':>9}"
            f"{'p50 ms':>9}{'p99 ms':>9}{'RSS start':>11}{'RSS end':>9}")
    print(f"image {image.name} ({len(body)} bytes), waitress threads={args.threads},"
          f" device={Path(device).name}, cloud={Path(cloud).name}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['path']:<12}{r['clients']:>8}{r['requests']:>10}{r['errors']:>8}"
              f"{r['req_per_s']:>9.1f}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}"
              f"{r['rss_start_mb']:>11.1f}{r['rss_end_mb']:>9.1f}")
    doc = {"created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
           "host": {"machine": platform.machine(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
           "device": device, "cloud": cloud, "image": str(image), "threads": args.threads,
           "bounds": {"requests_per_level": args.requests, "seconds_per_level": args.seconds},
           "rows": rows}
    out = args.out or RESULTS / f"load_demo_{dt.datetime.now():%Y%m%d_%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")
    total_errors = sum(r["errors"] for r in rows)
    if total_errors:
        print(f"FAILED: {total_errors} errors", file=sys.stderr)
    return 1 if total_errors else 0


if __name__ == "__main__":
    sys.exit(main())
