"""/healthz and classify under load, the server before and after a change, alternated.

Runs `python -m edge_demo serve` from two source trees (``--before``: e.g. main's `edge_demo`
and `dermedge` exported with ``git archive main edge_demo dermedge | tar -x -C DIR``; after:
this checkout), alternating them ``--rounds`` times so that load from other processes hits
both alike, and reports req/s, p50/p99, the server's CPU per request and /healthz p50/p99 at
each ``--clients`` level, then the medians per server and upload form.

    git archive HEAD~1 edge_demo dermedge | tar -x -C /tmp/before
    python benchmarks/serving_before_after.py --before /tmp/before --device exports/effl0-int8
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load_demo as L  # noqa: E402


def serve(root: Path, device: str, policy: Path, threads: int, extra: list[str]):
    port = L.free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_demo", "serve", "--device", device, "--policy",
         str(policy), "--port", str(port), "--threads", str(threads), *extra],
        cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "EDGE_DEMO_LOG_JSON": "0", "PYTHONPATH": str(root)})
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2)
            return proc, port
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise SystemExit(f"the server from {root} did not start") from None
            time.sleep(0.2)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, required=True, help="source tree of the old server")
    ap.add_argument("--device", required=True, help="device export bundle folder")
    ap.add_argument("--image", help="photo to upload (default: a real HAM10000 600x450 JPEG)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--requests", type=int, default=300, help="max requests per level")
    ap.add_argument("--seconds", type=float, default=8.0, help="max seconds per level")
    ap.add_argument("--threads", type=int,
                    help="both servers' --threads (default: this checkout's default)")
    ap.add_argument("--clients", default="8,32", help="load levels (keep-alive clients)")
    ap.add_argument("--upload", choices=("body", "multipart", "both"), default="multipart",
                    help="the photo as the whole body, in a multipart field, or both (a server"
                         " from before the body form answers it 415)")
    ap.add_argument("--after-args", default="",
                    help="extra `serve` options for this checkout's server")
    ap.add_argument("--out", type=Path, help="JSON output (default: benchmarks/results/)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(L.REPO))
    from edge_demo.cli import default_threads
    from edge_demo.policy import Policy

    threads = args.threads or default_threads()
    levels = [int(c) for c in args.clients.split(",")]
    image = L.pick_image(args.image)
    data = image.read_bytes()
    uploads = {"body": (data, "image/jpeg"), "multipart": L.multipart(data, image.name)}
    forms = list(uploads) if args.upload == "both" else [args.upload]
    policy = Policy(**L.DEVICE_ONLY).save(Path(tempfile.mkdtemp()) / "device-only.json")
    rows = []
    for rnd in range(args.rounds):
        servers = [("before", args.before, []), ("after", L.REPO, args.after_args.split())]
        for which, root, extra in servers if rnd % 2 == 0 else servers[::-1]:
            proc, port = serve(root, args.device, policy, threads, extra)
            try:
                L.run_level(port, *uploads[forms[0]], 1, 5, 10, "device")
                for form, c in ((f, c) for f in forms for c in levels):
                    with L.HealthProbe(port) as probe:
                        r = L.run_level(port, *uploads[form], c, args.requests, args.seconds,
                                        "device", proc.pid)
                    rows.append({"round": rnd + 1, "server": which, "upload": form,
                                 "clients": c, "req_per_s": r["req_per_s"],
                                 "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"],
                                 "server_cpu_ms": r["server_cpu_ms"], "errors": r["errors"],
                                 "healthz_p50_ms": round(L.pct(probe.ms, 0.5), 1),
                                 "healthz_p99_ms": round(L.pct(probe.ms, 0.99), 1),
                                 "healthz_probes": len(probe.ms),
                                 "load_average": round(os.getloadavg()[0], 1)})
            finally:
                proc.terminate()
                proc.wait(20)
    head = (f"{'round':>5} {'server':<7}{'upload':<10}{'clients':>8}{'req/s':>8}{'p50 ms':>8}"
            f"{'p99 ms':>8}{'srv cpu':>8}{'hz p50':>8}{'hz p99':>8}{'probes':>7}{'load':>6}")
    print(f"image {image.name}, device={Path(args.device).name}, threads={threads};"
          " srv cpu: the server's CPU ms per request")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['round']:>5} {r['server']:<7}{r['upload']:<10}{r['clients']:>8}"
              f"{r['req_per_s']:>8.1f}{r['p50_ms']:>8.1f}{r['p99_ms']:>8.1f}"
              f"{r['server_cpu_ms']:>8.2f}{r['healthz_p50_ms']:>8.1f}"
              f"{r['healthz_p99_ms']:>8.1f}{r['healthz_probes']:>7}{r['load_average']:>6.1f}")
    medians = []
    for form, c in ((f, c) for f in forms for c in levels):
        pair = {}
        for which in ("before", "after"):
            mine = [r for r in rows if (r["server"], r["upload"], r["clients"]) == (which, form, c)]
            pair[which] = {k: round(statistics.median(r[k] for r in mine), 3)
                           for k in ("req_per_s", "server_cpu_ms", "p99_ms", "healthz_p99_ms")}
        ratio = pair["after"]["req_per_s"] / pair["before"]["req_per_s"]
        medians.append({"upload": form, "clients": c, **pair, "req_per_s_after_over_before":
                        round(ratio, 3)})
        print(f"median, {form}, {c} clients: req/s {pair['before']['req_per_s']:.1f} ->"
              f" {pair['after']['req_per_s']:.1f} ({ratio:.3f}x), server CPU ms per request"
              f" {pair['before']['server_cpu_ms']:.2f} -> {pair['after']['server_cpu_ms']:.2f}")
    L.write_result({"created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                    "before": str(args.before), "device": args.device, "image": str(image),
                    "threads": threads, "rows": rows, "medians": medians},
                   args.out, "serving_before_after")
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
