"""Where the demo server's CPU per request goes, by layer: waitress, Flask, the service.

The real waitress server (``edge_demo.server.make_server``) and app run in this process, with
each layer's thread CPU time counted (``time.thread_time`` around the WSGI app and around
``DemoService.classify``); the load client is a subprocess (``load_demo``'s single-thread
keep-alive client) on the same cores. Rounds alternate the two upload forms, the photo as the
whole body and the photo in a multipart field, so that a machine whose speed drifts compares
like with like. Per request:

* ``service``: ``DemoService.classify`` (decode, crop, resize, inference, policy, body);
* ``flask``: the rest of the WSGI app (routing, hooks, reading the upload, JSON answer);
* ``waitress``: the rest of this process (I/O loop, HTTP parsing, sending the answer);
* ``client``: the load client's process.

    python benchmarks/server_overhead.py --device exports/effl0-int8
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load_demo  # noqa: E402  (the load client and helpers)

REPO = load_demo.REPO
LAYERS = ("waitress", "flask", "service")
WARM_UP = 20  # requests per round before the measured ones (their CPU is counted too)


class TimedService:
    """The app's service with ``classify`` timed in thread CPU; everything else delegates."""

    def __init__(self, service, counter: dict[str, float], lock: threading.Lock):
        self._service, self._counter, self._lock = service, counter, lock

    def __getattr__(self, name):
        return getattr(self._service, name)

    def classify(self, *args, **kwargs):
        t0 = time.thread_time()
        try:
            return self._service.classify(*args, **kwargs)
        finally:
            dt_s = time.thread_time() - t0
            with self._lock:
                self._counter["service"] += dt_s


def client_main(port: int, form: str, clients: int, requests: int, seconds: float,
                image: str) -> int:
    """The subprocess side: one level of keep-alive load; prints its result as JSON."""
    data = Path(image).read_bytes()
    body, ctype = ((data, "image/jpeg") if form == "body"
                   else load_demo.multipart(data, Path(image).name))
    load_demo.run_level(port, body, ctype, clients, WARM_UP, 10, "device")
    r = load_demo.run_level(port, body, ctype, clients, requests, seconds, "device")
    print(json.dumps(r))
    return 0 if r["errors"] == 0 else 1


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", required=True, help="device (int8) export bundle folder")
    ap.add_argument("--image", help="photo to upload (default: a real HAM10000 600x450 JPEG)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; each runs both forms")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=1500, help="max requests per form and round")
    ap.add_argument("--seconds", type=float, default=10.0, help="max seconds per form and round")
    ap.add_argument("--threads", type=int,
                    help="the server's worker threads (default: the server's, the usable CPUs)")
    ap.add_argument("--log-json", action="store_true",
                    help="with the per-request JSON log line (the server's default; off here,"
                         " as in load_demo, to measure the HTTP path alone)")
    ap.add_argument("--allow-unvalidated", action="store_true",
                    help="serve a bundle whose export validation failed (timing only)")
    ap.add_argument("--out", type=Path, help="JSON output (default: benchmarks/results/)")
    ap.add_argument("--client", nargs=6, metavar=("PORT", "FORM", "CLIENTS", "REQUESTS",
                                                 "SECONDS", "IMAGE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.client:
        port, form, clients, requests, seconds, image = args.client
        return client_main(int(port), form, int(clients), int(requests), float(seconds), image)

    sys.path.insert(0, str(REPO))
    from edge_demo.app import create_app
    from edge_demo.cli import default_threads
    from edge_demo.policy import Policy
    from edge_demo.server import make_server

    threads = args.threads or default_threads()
    image = load_demo.pick_image(args.image)
    work = Path(tempfile.mkdtemp(prefix="server_overhead_"))
    policy = Policy(**load_demo.DEVICE_ONLY).save(work / "device-only.json")
    app = create_app({"DEVICE_BUNDLE": args.device, "POLICY_FILE": str(policy),
                      "INTERPRETERS": threads, "LOG_JSON": args.log_json,
                      "ALLOW_UNVALIDATED": args.allow_unvalidated})
    log, stderr = None, sys.stderr
    if args.log_json:  # the log's cost counts (written to a file), its lines are not shown
        log = (work / "requests.log").open("w")
        sys.stderr = log  # the request log writes to the current sys.stderr
    counter = {"app": 0.0, "service": 0.0}
    lock = threading.Lock()
    state = app.extensions["edge_demo"]
    state["service"] = TimedService(state["service"], counter, lock)

    def wsgi(environ, start_response):
        t0 = time.thread_time()
        try:
            return app(environ, start_response)
        finally:
            dt_s = time.thread_time() - t0
            with lock:
                counter["app"] += dt_s

    port = load_demo.free_port()
    server = make_server(wsgi, port=port, threads=threads, max_body=10 * 1024 * 1024)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    rows = []
    try:
        for rnd in range(1, args.rounds + 1):
            for form in ("body", "multipart"):
                counter.update(app=0.0, service=0.0)
                cpu0 = load_demo.cpu_s()
                proc = subprocess.run(
                    [sys.executable, __file__, "--device", args.device, "--client", str(port),
                     form, str(args.clients), str(args.requests), str(args.seconds),
                     str(image)], capture_output=True, text=True, check=False)
                cpu = load_demo.cpu_s() - cpu0
                if proc.returncode != 0:
                    raise SystemExit(f"load client failed: {proc.stderr.strip()[-500:]}")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                n = r["ok"] + WARM_UP
                with lock:
                    app_s, svc_s = counter["app"], counter["service"]
                ms = {"waitress": (cpu - app_s) * 1000 / n, "flask": (app_s - svc_s) * 1000 / n,
                      "service": svc_s * 1000 / n}
                rows.append({"round": rnd, "upload": form, "clients": args.clients,
                             "requests": r["ok"], "errors": r["errors"],
                             "req_per_s": r["req_per_s"], "p50_ms": r["p50_ms"],
                             "p99_ms": r["p99_ms"], "client_cpu_ms": r["client_cpu_ms"],
                             "cpu_ms": {k: round(v, 3) for k, v in ms.items()},
                             "http_cpu_ms": round(ms["waitress"] + ms["flask"], 3)})
    finally:
        server.stop()
        serving.join(timeout=30)
        if log is not None:
            sys.stderr = stderr
            log.close()

    print(f"image {image.name}, device={Path(args.device).name}, {threads} worker threads,"
          f" {args.clients} clients, request log {'on' if args.log_json else 'off'},"
          f" {os.cpu_count()} CPUs (client and server share them)")
    head = (f"{'round':>5}  {'upload':<10}{'req/s':>8}{'p50 ms':>8}{'p99 ms':>8}"
            f"{'waitress':>10}{'flask':>8}{'service':>9}{'client':>8}{'HTTP':>8}")
    print("CPU ms per request by layer; HTTP = waitress + flask")
    print(head)
    print("-" * len(head))
    for r in rows:
        c = r["cpu_ms"]
        print(f"{r['round']:>5}  {r['upload']:<10}{r['req_per_s']:>8.1f}{r['p50_ms']:>8.1f}"
              f"{r['p99_ms']:>8.1f}{c['waitress']:>10.3f}{c['flask']:>8.3f}{c['service']:>9.3f}"
              f"{r['client_cpu_ms']:>8.3f}{r['http_cpu_ms']:>8.3f}")
    summary = {}
    for form in ("body", "multipart"):
        mine = [r for r in rows if r["upload"] == form]
        summary[form] = {k: round(statistics.median(r["cpu_ms"][k] for r in mine), 3)
                         for k in LAYERS}
        summary[form]["http"] = round(statistics.median(r["http_cpu_ms"] for r in mine), 3)
    print("medians: " + "; ".join(
        f"{form}: waitress {s['waitress']:.3f}, flask {s['flask']:.3f}, HTTP {s['http']:.3f}"
        for form, s in summary.items()))
    doc = {"created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
           "host": {"machine": platform.machine(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
           "device": args.device, "image": str(image), "threads": threads,
           "clients": args.clients, "log_json": args.log_json, "rows": rows,
           "median_cpu_ms": summary}
    load_demo.write_result(doc, args.out, "server_overhead")
    return 0


if __name__ == "__main__":
    sys.exit(main())
