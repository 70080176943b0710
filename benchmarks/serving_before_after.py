"""/healthz and classify under load, the server before and after a change, alternated.

Runs `python -m edge_demo serve` from two source trees (``--before``: e.g. main's `edge_demo`
and `dermedge` exported with ``git archive main edge_demo dermedge | tar -x -C DIR``; after:
this checkout), alternating them ``--rounds`` times so that load from other processes hits
both alike, and reports req/s, p50/p99 and /healthz p50/p99 at 8 and 32 clients.

    python benchmarks/serving_before_after.py --before /tmp/main-src \\
        --device /work/bundles/effl0-short-int8
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
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
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--after-args", default="--allow-unvalidated",
                    help="extra `serve` options for this checkout's server")
    ap.add_argument("--out", type=Path, help="JSON output (default: benchmarks/results/)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(L.REPO))
    from edge_demo.policy import Policy

    image = L.pick_image(args.image)
    body, ctype = L.multipart(image.read_bytes(), image.name)
    policy = Policy(**L.DEVICE_ONLY).save(Path(tempfile.mkdtemp()) / "device-only.json")
    rows = []
    for rnd in range(args.rounds):
        for which, root, extra in (("before", args.before, []),
                                   ("after", L.REPO, args.after_args.split())):
            proc, port = serve(root, args.device, policy, args.threads, extra)
            try:
                L.run_level(port, body, ctype, 1, 5, 10, "device")
                for c in (8, 32):
                    with L.HealthProbe(port) as probe:
                        r = L.run_level(port, body, ctype, c, args.requests, args.seconds,
                                        "device")
                    rows.append({"round": rnd + 1, "server": which, "clients": c,
                                 "req_per_s": r["req_per_s"], "p50_ms": r["p50_ms"],
                                 "p99_ms": r["p99_ms"], "errors": r["errors"],
                                 "healthz_p50_ms": round(L.pct(probe.ms, 0.5), 1),
                                 "healthz_p99_ms": round(L.pct(probe.ms, 0.99), 1),
                                 "healthz_probes": len(probe.ms),
                                 "load_average": round(os.getloadavg()[0], 1)})
            finally:
                proc.terminate()
                proc.wait(20)
    head = (f"{'round':>5} {'server':<7}{'clients':>8}{'req/s':>8}{'p50 ms':>8}{'p99 ms':>8}"
            f"{'hz p50':>8}{'hz p99':>8}{'probes':>7}{'load':>6}")
    print(f"image {image.name}, device={Path(args.device).name}, threads={args.threads}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['round']:>5} {r['server']:<7}{r['clients']:>8}{r['req_per_s']:>8.1f}"
              f"{r['p50_ms']:>8.1f}{r['p99_ms']:>8.1f}{r['healthz_p50_ms']:>8.1f}"
              f"{r['healthz_p99_ms']:>8.1f}{r['healthz_probes']:>7}{r['load_average']:>6.1f}")
    out = args.out or L.RESULTS / f"serving_before_after_{dt.datetime.now():%Y%m%d_%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                               "before": str(args.before), "device": args.device,
                               "image": str(image), "rows": rows}, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
