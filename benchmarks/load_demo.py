"""Load benchmark of `edge-demo serve` (waitress) on 127.0.0.1, beside the same pipeline
without HTTP.

Side by side in one run, on the same cores (ratios are what to compare between machines):

* ``inference``: the device tier's interpreter alone on a prepared (S, S, 3) input, 1 thread;
* ``jpeg->answer``: ``DemoService.classify`` on the photo's bytes (decode, crop, resize,
  inference, policy), 1 thread, with the demo's reduced-scale JPEG decode and with the
  reference full decode;
* ``no-HTTP pipeline``: ``--pipeline-threads`` threads (default: as many as the server's)
  calling ``classify`` (one-thread interpreters), images/s, measured just before and just after
  each server level (the ratio uses their mean, so a drifting machine compares like with like);
* the server (a subprocess) at 1, 8 and 32 keep-alive clients, with the photo as the whole
  body (what the page sends) and in a multipart field (``curl -F``): req/s, p50/p99, errors
  (must be 0), RSS, and ``/healthz`` p50/p99 probed during each level.

Bounded: ``--requests`` and ``--seconds`` per level.

    python benchmarks/load_demo.py --device exports/effl0-int8
    python benchmarks/load_demo.py --device exports/mnv2-int8 --cloud exports/effl0-float32
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import platform
import selectors
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from dermedge.files import write_json

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SHARED = Path(os.environ.get("DERMEDGE_SHARED", REPO.parent / "shared"))
SHARED_PHOTOS = SHARED / "data" / "ham10000_raw_600x450" / "images"

# Policies that pin the path: nothing falls back / everything falls back.
DEVICE_ONLY = {"min_confidence": 0.0, "mel_band_low": None, "mel_band_high": None,
               "second_opinion": False}
FALLBACK = {**DEVICE_ONLY, "min_confidence": 1.0}


def write_result(doc: dict, out: Path | None, stem: str) -> Path:
    """Write ``doc`` as JSON to ``out`` (default ``results/<stem>_<time>.json``) atomically
    (temp file, then rename) and say where."""
    out = out or RESULTS / f"{stem}_{dt.datetime.now():%Y%m%d_%H%M%S}.json"
    write_json(out, doc, allow_nan=True)
    print(f"wrote {out}")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system) used so far by ``pid`` (default: this process)."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


class Conn:
    """One keep-alive HTTP/1.1 connection of the load client (non-blocking): sends prepared
    request bytes and frames Content-Length responses. The client shares the cores with the
    server, so one thread drives every connection (no per-request thread wake-ups or GIL
    hand-offs) and does as little as it can."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.buf = b""
        self.out = memoryview(b"")
        self.t0 = 0.0

    def start(self, request: bytes) -> None:
        self.out, self.t0 = memoryview(request), time.perf_counter()

    def send_some(self) -> bool:
        """Send what the socket takes; True once the whole request is out."""
        if self.out:
            self.out = self.out[self.sock.send(self.out):]
        return not self.out

    def receive(self) -> tuple[int, bytes, bool] | None:
        """Read what arrived; ``(status, body, server_closes)`` once a response is complete."""
        chunk = self.sock.recv(262144)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buf += chunk
        return self.parse()

    def parse(self) -> tuple[int, bytes, bool] | None:
        head, sep, rest = self.buf.partition(b"\r\n\r\n")
        if not sep:
            return None
        lines = head.split(b"\r\n")
        length, close = 0, False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        if len(rest) < length:
            return None
        self.buf = rest[length:]
        return int(lines[0].split()[1]), rest[:length], close

    def close(self) -> None:
        self.sock.close()


def run_level(port: int, body: bytes, ctype: str, clients: int, max_requests: int,
              max_seconds: float, expect_path: str, server_pid: int | None = None,
              timeout: float = 60.0) -> dict:
    """``clients`` keep-alive connections, each sending its next request when the last is
    answered, until ``max_requests`` or ``max_seconds``; one selector thread drives them."""
    request = (f"POST /api/v1/classify HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
               f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    sel = selectors.DefaultSelector()
    latencies: list[float] = []
    errors: list[str] = []
    sent = 0
    t_end = time.monotonic() + max_seconds

    def begin(conn: Conn) -> None:
        nonlocal sent
        if sent >= max_requests or time.monotonic() >= t_end:
            conn.close()
            return
        sent += 1
        conn.start(request)
        sel.register(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)

    def drop(conn: Conn, exc: Exception) -> None:
        errors.append(f"{type(exc).__name__}: {exc}")
        try:
            sel.unregister(conn.sock)
        except (KeyError, ValueError):  # not registered, or already closed
            pass
        conn.close()

    def fail(conn: Conn, exc: Exception) -> None:
        drop(conn, exc)
        try:
            begin(Conn(port))
        except OSError as again:  # the server is gone: this connection's slot ends
            errors.append(f"reconnect: {again}")

    cpu0 = (cpu_s(), cpu_s(server_pid) if server_pid else 0.0)
    t0 = time.perf_counter()
    for _ in range(clients):
        begin(Conn(port))
    while sel.get_map():
        ready = sel.select(timeout)
        if not ready:
            for key in list(sel.get_map().values()):
                drop(key.data, TimeoutError(f"no answer within {timeout:g} s"))
            break
        for key, events in ready:
            conn: Conn = key.data
            try:
                if events & selectors.EVENT_WRITE and conn.send_some():
                    sel.modify(conn.sock, selectors.EVENT_READ, conn)
                if not events & selectors.EVENT_READ:
                    continue
                done = conn.receive()
                if done is None:
                    continue
                status, payload, closes = done
                ms = (time.perf_counter() - conn.t0) * 1000
                if status != 200:
                    raise RuntimeError(f"HTTP {status}: {payload[:200]!r}")
                if json.loads(payload)["tier_path"] != expect_path:
                    raise RuntimeError(f"unexpected tier path (wanted {expect_path})")
                latencies.append(ms)
                sel.unregister(conn.sock)
                if closes:
                    conn.close()
                    conn = Conn(port)
                begin(conn)
            except Exception as exc:  # noqa: BLE001 - every failure is counted
                fail(conn, exc)
    wall = time.perf_counter() - t0
    cpu1 = (cpu_s(), cpu_s(server_pid) if server_pid else 0.0)
    sel.close()
    lat = sorted(latencies)
    n = max(1, len(lat) + len(errors))

    return {"clients": clients, "requests": len(lat) + len(errors), "ok": len(lat),
            "errors": len(errors), "error_samples": errors[:3], "wall_s": round(wall, 3),
            "req_per_s": round(len(lat) / wall, 2) if wall else 0.0,
            "p50_ms": round(pct(lat, 0.50), 2), "p99_ms": round(pct(lat, 0.99), 2),
            # CPU per request: the client's (this process, with the /healthz probe) and the
            # server's; the two share the machine's cores
            "client_cpu_ms": round((cpu1[0] - cpu0[0]) * 1000 / n, 3),
            "server_cpu_ms": round((cpu1[1] - cpu0[1]) * 1000 / n, 3)}


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


class Pipeline:
    """The pipeline without HTTP, in this process: ``DemoService.classify`` on the photo's
    bytes from ``threads`` threads (one-thread interpreters, one per thread)."""

    def __init__(self, device: str, data: bytes, threads: int, allow: bool, min_crop: float):
        from edge_demo.service import DemoService

        self.data, self.threads = data, threads
        self.fast = DemoService.from_paths(device, allow_unvalidated=allow, pool_size=threads,
                                           decode_min_crop=min_crop)
        self.ref = DemoService.from_paths(device, allow_unvalidated=allow, fast_decode=False)
        self.fast.warm_up()
        self.ref.warm_up()

    def single(self, n: int) -> dict:
        """One thread, interleaved: inference alone vs JPEG -> answer (server's and reference
        decode)."""
        x = self.fast.decode(self.data, {})[self.fast.device.image_size]
        out = interleaved_ms({
            "inference_ms": lambda: self.fast.device.predict(x),
            "jpeg_to_answer_ms": lambda: self.fast.classify(self.data),
            "jpeg_to_answer_reference_decode_ms": lambda: self.ref.classify(self.data)}, n)
        out["jpeg_to_answer_ratio"] = out["jpeg_to_answer_ms"] / out["inference_ms"]
        out["reference_decode_ratio"] = (out["jpeg_to_answer_reference_decode_ms"]
                                         / out["inference_ms"])
        return {k: round(v, 2) for k, v in out.items()}

    def rate(self, total: int) -> tuple[float, float]:
        """(images/s, CPU ms per image) over ``total`` images."""
        lock, count = threading.Lock(), [0]

        def work():
            while True:
                with lock:
                    if count[0] >= total:
                        return
                    count[0] += 1
                self.fast.classify(self.data)

        cpu0, t0 = cpu_s(), time.perf_counter()
        workers = [threading.Thread(target=work) for _ in range(self.threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return total / (time.perf_counter() - t0), (cpu_s() - cpu0) * 1000 / total


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
    ap.add_argument("--threads", type=int,
                    help="the server's --threads (default: its own default, the usable CPUs)")
    ap.add_argument("--pipeline-threads", type=int,
                    help="threads of the no-HTTP pipeline figure (default: the server's)")
    ap.add_argument("--upload", choices=("body", "multipart", "both"), default="both",
                    help="how the photo is sent: as the whole body (what the page sends) or in"
                         " a multipart field 'image' (curl -F)")
    ap.add_argument("--calls", type=int, default=100, help="calls per single-thread timing")
    ap.add_argument("--decode-min-crop", type=float,
                    help="the server's --decode-min-crop (default: its own default)")
    ap.add_argument("--allow-unvalidated", action="store_true",
                    help="serve a bundle whose export validation failed (timing only)")
    ap.add_argument("--out", type=Path, help="JSON output (default: benchmarks/results/)")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(REPO))
    from edge_demo.cli import default_threads
    from edge_demo.policy import Policy

    if args.threads is None:
        args.threads = default_threads()
    if args.pipeline_threads is None:
        args.pipeline_threads = args.threads
    if args.decode_min_crop is None:
        from edge_demo.service import DEFAULT_DECODE_MIN_CROP

        args.decode_min_crop = DEFAULT_DECODE_MIN_CROP

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
    uploads = {"body": (data, "image/jpeg"), "multipart": multipart(data, image.name)}
    forms = list(uploads) if args.upload == "both" else [args.upload]
    levels = [int(c) for c in args.concurrency.split(",")]
    work = Path(tempfile.mkdtemp(prefix="load_demo_"))
    pipeline = Pipeline(device, data, args.pipeline_threads, args.allow_unvalidated,
                        args.decode_min_crop)
    pipe = pipeline.single(args.calls)
    rate, cpu = pipeline.rate(args.calls * 4)
    pipe.update(pipeline_images_per_s=round(rate, 1), pipeline_cpu_ms=round(cpu, 3),
                pipeline_threads=args.pipeline_threads)
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
            for form in forms:
                run_level(server.port, *uploads[form], 1, 5, 10, expect)
            rss0 = rss_mb(server.proc.pid)
            for form, c in ((f, c) for f in forms for c in levels):
                # the pipeline figure just before and after the level (the server idles
                # meanwhile), so that a machine whose speed drifts compares like with like
                before = pipeline.rate(args.calls * 2)
                with HealthProbe(server.port) as probe:
                    r = run_level(server.port, *uploads[form], c, args.requests, args.seconds,
                                  expect, server.proc.pid)
                after = pipeline.rate(args.calls * 2)
                pipe_rate = (before[0] + after[0]) / 2
                r.update(path=path_name, upload=form, rss_mb=round(rss_mb(server.proc.pid), 1),
                         pipeline_images_per_s=round(pipe_rate, 1),
                         pipeline_before_after=[round(before[0], 1), round(after[0], 1)],
                         pipeline_cpu_ms=round((before[1] + after[1]) / 2, 3),
                         healthz_p50_ms=round(pct(probe.ms, 0.5), 2),
                         healthz_p99_ms=round(pct(probe.ms, 0.99), 2),
                         healthz_probes=len(probe.ms), healthz_errors=probe.errors,
                         vs_pipeline=round(r["req_per_s"] / pipe_rate, 2),
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
    print("pipe: the no-HTTP pipeline's images/s just before and after each level; x pipe:"
          " req/s over it; CPU ms per image (pipe) and per request (server, client)")
    head = (f"{'path':<12}{'upload':<10}{'clients':>8}{'reqs':>6}{'err':>5}{'req/s':>8}{'pipe':>8}"
            f"{'x pipe':>8}{'p50 ms':>8}{'p99 ms':>8}{'p99/p50':>8}{'hz p99':>8}{'RSS MB':>8}"
            f"{'pipe cpu':>9}{'srv cpu':>8}{'cli cpu':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['path']:<12}{r['upload']:<10}{r['clients']:>8}{r['requests']:>6}{r['errors']:>5}"
              f"{r['req_per_s']:>8.1f}{r['pipeline_images_per_s']:>8.1f}"
              f"{r['vs_pipeline']:>8.2f}{r['p50_ms']:>8.1f}"
              f"{r['p99_ms']:>8.1f}{r['p99_over_p50']:>8.2f}{r['healthz_p99_ms']:>8.1f}"
              f"{r['rss_mb']:>8.1f}{r['pipeline_cpu_ms']:>9.2f}{r['server_cpu_ms']:>8.2f}"
              f"{r['client_cpu_ms']:>8.2f}")
    doc = {"created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
           "host": {"machine": platform.machine(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
           "device": device, "cloud": cloud, "image": str(image), "enlarge": args.enlarge,
           "upload_bytes": len(data), "threads": args.threads,
           "decode_min_crop": args.decode_min_crop,
           "load_average_at_end": list(os.getloadavg()),
           "bounds": {"requests_per_level": args.requests, "seconds_per_level": args.seconds},
           "no_http": pipe, "rows": rows}
    write_result(doc, args.out, "load_demo")
    total_errors = sum(r["errors"] + r["healthz_errors"] for r in rows)
    if total_errors:
        print(f"FAILED: {total_errors} errors", file=sys.stderr)
    return 1 if total_errors else 0


if __name__ == "__main__":
    sys.exit(main())
