"""What HTTPS costs on `edge-demo serve`: plain HTTP and HTTPS on the same server, same port,
side by side in one run (rounds alternate the order).

* ``classify``: the photo as the body of ``POST /api/v1/classify`` over keep-alive
  connections at 1 and 8 clients: req/s, p50, p99, the server's CPU ms per request;
* ``new connection``: ``GET /api/v1/version`` on a fresh connection each time (a phone's first
  request; over HTTPS with a full TLS handshake): ms per request, server CPU ms per request;
* ``download``: the 9 MB threaded runtime WebAssembly, uncompressed, over one keep-alive
  connection: MB/s and the server's CPU ms per MB.

The client runs on the same cores (its TLS work included in the wall-clock figures; the CPU
columns are the server process alone). Bounded by ``--requests``/``--seconds`` per level.

    python benchmarks/tls_overhead.py --device exports/effl0-int8 --rounds 3
"""

from __future__ import annotations

import argparse
import http.client
import json
import platform
import ssl
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_demo import DEVICE_ONLY, Server, cpu_s, pct, pick_image, write_result  # noqa: E402

WASM = "core/wasm/litert_wasm_threaded_internal.wasm"


def _connect(scheme: str, port: int, ctx: ssl.SSLContext):
    if scheme == "https":
        return http.client.HTTPSConnection("localhost", port, context=ctx, timeout=60)
    return http.client.HTTPConnection("127.0.0.1", port, timeout=60)


def _drive(scheme, port, ctx, clients, requests, seconds, one) -> dict:
    """``one(conn)`` from ``clients`` threads on their own keep-alive connections; with
    ``one`` returning False the connection is replaced after each request."""
    lat: list[float] = []
    lock = threading.Lock()
    left = [requests]
    stop = time.monotonic() + seconds

    def worker():
        conn = None
        while time.monotonic() < stop:
            with lock:
                if left[0] <= 0:
                    break
                left[0] -= 1
            if conn is None:
                conn = _connect(scheme, port, ctx)
            t0 = time.perf_counter()
            keep = one(conn)
            ms = (time.perf_counter() - t0) * 1000.0
            with lock:
                lat.append(ms)
            if not keep:
                conn.close()
                conn = None
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"n": len(lat), "per_s": len(lat) / wall, "p50_ms": pct(lat, 0.5),
            "p99_ms": pct(lat, 0.99), "wall_s": wall}


def _classify(photo: bytes):
    def one(conn) -> bool:
        conn.request("POST", "/api/v1/classify", body=photo,
                     headers={"Content-Type": "image/jpeg"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200, resp.status
        return True
    return one


def _fresh(conn) -> bool:
    conn.request("GET", "/api/v1/version")
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 200
    return False


def _download(path: str, sizes: list[int]):
    def one(conn) -> bool:
        conn.request("GET", path, headers={"Accept-Encoding": "identity"})
        resp = conn.getresponse()
        sizes.append(len(resp.read()))
        assert resp.status == 200
        return True
    return one


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", required=True, help="device bundle (int8)")
    p.add_argument("--image", help="photo to classify (default: the first HAM10000 photo in"
                   " ../shared, else a synthetic 600x450 JPEG)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=600, help="requests per level at most")
    p.add_argument("--seconds", type=float, default=6.0, help="seconds per level at most")
    p.add_argument("--downloads", type=int, default=8, help="runtime downloads per level")
    p.add_argument("--threads", type=int, default=2, help="server worker threads")
    p.add_argument("--out", type=Path, help="JSON result (default benchmarks/results/...)")
    args = p.parse_args(argv)

    from edge_demo.policy import Policy

    work = Path(tempfile.mkdtemp(prefix="tls_overhead_"))
    policy = Policy(**DEVICE_ONLY).save(work / "policy.json")
    photo = pick_image(args.image).read_bytes()
    server = Server(args.device, None, policy, args.threads, work / "server.log",
                    extra=["--tls", "on", "--state-dir", str(work / "state"),
                           "--compress", "off"])
    try:
        ctx = ssl.create_default_context(cafile=str(work / "state" / "tls" / "ca.crt"))
        conn = _connect("http", server.port, ctx)
        conn.request("GET", "/api/v1/version")
        rid = json.loads(conn.getresponse().read())["runtime"]["id"]
        conn.close()
        wasm = f"/runtime/{rid}/{WASM}"
        levels = [("classify", 1), ("classify", 8), ("new connection", 1), ("download", 1)]
        runs: list[dict] = []
        for r in range(args.rounds):
            for level, clients in levels:
                order = ("http", "https") if r % 2 == 0 else ("https", "http")
                for scheme in order:
                    sizes: list[int] = []
                    one = {"classify": _classify(photo), "new connection": _fresh,
                           "download": _download(wasm, sizes)}[level]
                    n = args.downloads if level == "download" else args.requests
                    for _ in range(3):  # warm-up: connections, caches
                        c = _connect(scheme, server.port, ctx)
                        one(c)
                        c.close()
                    cpu0 = cpu_s(server.proc.pid)
                    res = _drive(scheme, server.port, ctx, clients, n, args.seconds, one)
                    cpu = cpu_s(server.proc.pid) - cpu0
                    res.update(level=level, clients=clients, scheme=scheme, round=r,
                               server_cpu_ms=cpu * 1000.0 / max(res["n"], 1))
                    if level == "download":
                        mb = sum(sizes[3:]) / 1e6 if len(sizes) > 3 else 0.0
                        res["mb_per_s"] = mb / res["wall_s"] if res["wall_s"] else 0.0
                        res["server_cpu_ms_per_mb"] = cpu * 1000.0 / mb if mb else 0.0
                    runs.append(res)
                    print(f"round {r} {level:>14} x{clients} {scheme:>5}: {res['per_s']:8.1f}/s"
                          f" p50 {res['p50_ms']:7.2f} ms p99 {res['p99_ms']:7.2f} ms"
                          f" server CPU {res['server_cpu_ms']:6.2f} ms/req", flush=True)
    finally:
        server.stop()

    rows = []
    for level, clients in levels:
        row = {"level": level, "clients": clients}
        for scheme in ("http", "https"):
            rs = [x for x in runs if x["level"] == level and x["clients"] == clients
                  and x["scheme"] == scheme]
            keys = ("per_s", "p50_ms", "p99_ms", "server_cpu_ms", "mb_per_s",
                    "server_cpu_ms_per_mb")
            row[scheme] = {k: statistics.median(x[k] for x in rs) for k in keys if k in rs[0]}
        rows.append(row)
    print("\n| what | clients | HTTP | HTTPS | HTTPS / HTTP |")
    print("|---|---|---|---|---|")
    for row in rows:
        h, s = row["http"], row["https"]
        if row["level"] == "download":
            print(f"| download {WASM.rsplit('/', 1)[1]} (MB/s; server CPU ms/MB) | 1 |"
                  f" {h['mb_per_s']:.0f}; {h['server_cpu_ms_per_mb']:.2f} |"
                  f" {s['mb_per_s']:.0f}; {s['server_cpu_ms_per_mb']:.2f} |"
                  f" {s['mb_per_s'] / h['mb_per_s']:.2f}× speed;"
                  f" {s['server_cpu_ms_per_mb'] / h['server_cpu_ms_per_mb']:.1f}× CPU |")
            continue
        print(f"| {row['level']} (req/s; p50 / p99 ms; server CPU ms/req) | {row['clients']} |"
              f" {h['per_s']:.0f}; {h['p50_ms']:.2f} / {h['p99_ms']:.2f}; "
              f"{h['server_cpu_ms']:.2f} | {s['per_s']:.0f}; {s['p50_ms']:.2f} /"
              f" {s['p99_ms']:.2f}; {s['server_cpu_ms']:.2f} |"
              f" {s['per_s'] / h['per_s']:.2f}× req/s;"
              f" +{s['server_cpu_ms'] - h['server_cpu_ms']:.2f} ms CPU |")
    write_result({"args": {k: str(v) for k, v in vars(args).items()},
                  "machine": platform.platform(), "rows": rows, "runs": runs},
                 args.out, "tls_overhead")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
