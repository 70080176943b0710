"""Bytes a phone downloads to open the demo page: a first visit and a repeat visit, before and
after issue 35's delivery changes, in one run.

For each server, a fresh headless Chromium profile (phone viewport) opens the page, waits until
the device model is loaded in the page, then opens it again (a repeat visit: same profile, its
HTTP cache). Bytes are Chromium's own count of what came over the network for each request
(DevTools ``Network.loadingFinished.encodedDataLength``: headers and body as sent, compressed
or not; 0 for a file served from the browser's cache).

* ``before``: the code at ``--before`` (default 3d438fb, what issue 35 started from), extracted
  with ``git archive`` and served on plain HTTP;
* ``after, HTTPS``: this working tree, ``--tls on``, at ``https://dermedge.test`` with the test
  CA trusted in Chromium's NSS database (what a tester's phone does once it trusts the CA);
* ``after, HTTP``: the same server over plain ``http://dermedge.test`` (a phone that has not
  trusted the CA yet).

The "after" server's compressed copies are made before the measurement (``--state-dir`` keeps
them for the next run; the first run waits for brotli 11 on the runtime, a few minutes).

    python benchmarks/browser_bytes.py --device /work/bundles/edge-int8
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))
from load_demo import free_port, write_result  # noqa: E402

NAME = "dermedge.test"


@contextlib.contextmanager
def server(code: Path, args: list[str], log: Path, wait_for: str | None = None,
           timeout: float = 1800):
    """``python -m edge_demo serve`` from the source tree ``code``; yields the port once
    /readyz answers (and, with ``wait_for``, once that text is in its log)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(code), "EDGE_DEMO_LOG_JSON": "0",
           "EDGE_DEMO_WEB_RUNTIME_DIR": str(REPO / "edge_demo" / "web" / "node_modules")}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "edge_demo", "serve", *args,
                                 "--port", str(port)], cwd=code, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2):
                    pass
                if wait_for is None or wait_for in log.read_text():
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"browser_bytes: the server did not get ready; see {log}")
            time.sleep(0.5)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def kind(url: str) -> str:
    path = url.split("://", 1)[-1].split("/", 1)[-1]
    if path.startswith("runtime/"):
        return "runtime .wasm" if ".wasm" in path else "runtime .js"
    if "model.tflite" in path:
        return "model"
    if path.startswith("static/"):
        return "page scripts, css"
    if path.startswith("api/"):
        return "API (policy, version)"
    return "page HTML, other"


def visit(driver, url: str) -> dict:
    """Open ``url``, wait for the device model, and count what came over the network."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get_log("performance")  # drop what came before
    driver.get(url)
    WebDriverWait(driver, 300).until(lambda d: d.execute_script(
        "const s = document.getElementById('device-status');"
        " return s && s.dataset.state;"))
    state = driver.execute_script("return document.getElementById('device-status')"
                                  ".dataset.state;")
    time.sleep(1.0)  # the page's last small requests (policy)
    urls, done, cached = {}, {}, set()
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        p = msg.get("params", {})
        if msg["method"] == "Network.requestWillBeSent":
            urls[p["requestId"]] = p["request"]["url"]
        elif msg["method"] == "Network.loadingFinished":
            done[p["requestId"]] = p["encodedDataLength"]
        elif msg["method"] == "Network.requestServedFromCache":
            cached.add(p["requestId"])
    by_kind: dict[str, dict] = {}
    for rid, n in done.items():
        url = urls.get(rid, "")
        if not url.startswith("http"):
            continue
        k = by_kind.setdefault(kind(url), {"bytes": 0, "requests": 0, "from_cache": 0})
        k["bytes"] += int(n)
        k["requests"] += 1
        k["from_cache"] += rid in cached or n == 0
    total = sum(k["bytes"] for k in by_kind.values())
    return {"state": state, "bytes": total, "by_kind": by_kind,
            "requests": sum(k["requests"] for k in by_kind.values()),
            "from_cache": sum(k["from_cache"] for k in by_kind.values())}


def measure(url: str, profile: Path, home: Path | None) -> dict:
    from selenium import webdriver
    from test_browser_e2e import chromium

    opts = webdriver.ChromeOptions()
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    env = {**os.environ, "HOME": str(home)} if home else None
    with chromium(profile, args=(f"--host-resolver-rules=MAP {NAME} 127.0.0.1",), env=env,
                  options=opts) as driver:
        driver.execute_cdp_cmd("Network.enable", {})
        first = visit(driver, url)
        repeat = visit(driver, url)
        features = driver.execute_script(
            "return {secure: isSecureContext, isolated: crossOriginIsolated};")
    return {"url": url, "first": first, "repeat": repeat, **features}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", required=True, type=Path, help="device bundle (int8, batch 1)")
    p.add_argument("--before", default="3d438fb", help="git revision to compare with")
    p.add_argument("--state-dir", type=Path, help="the after-server's state folder (kept:"
                   " its compressed copies are reused by the next run)")
    p.add_argument("--compress", default="best", choices=("best", "fast"))
    p.add_argument("--out", type=Path, help="JSON result (default benchmarks/results/...)")
    args = p.parse_args(argv)

    from test_browser_e2e import ensure_runtime
    from test_https import _nss_home

    ensure_runtime()
    work = Path(tempfile.mkdtemp(prefix="browser_bytes_"))
    before = work / "before"
    before.mkdir()
    archive = subprocess.run(["git", "archive", args.before], cwd=REPO, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(before)], input=archive, check=True)
    state = args.state_dir or work / "state"
    serve = ["--device", str(args.device.resolve()), "--threads", "2"]
    rows = {}
    with server(before, serve, work / "before.log") as port:
        rows["before (HTTP)"] = measure(f"http://{NAME}:{port}/", work / "p-before", None)
    after = [*serve, "--tls", "on", "--tls-name", NAME, "--state-dir", str(state),
             "--compress", args.compress]
    with server(REPO, after, work / "after.log", wait_for=" compressed ") as port:
        home = _nss_home(work / "nss", state / "tls" / "ca.crt")
        rows["after, HTTPS"] = measure(f"https://{NAME}:{port}/", work / "p-https", home)
        rows["after, HTTP"] = measure(f"http://{NAME}:{port}/", work / "p-http", None)
    base = rows["before (HTTP)"]["first"]["bytes"]
    print("\n| server | first visit kB | vs before | repeat visit kB | repeat: requests"
          " (from cache) | runtime + model kB on repeat |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        rep = r["repeat"]
        heavy = sum(v["bytes"] for k, v in rep["by_kind"].items()
                    if k.startswith("runtime") or k == "model")
        print(f"| {name} | {r['first']['bytes'] / 1e3:,.1f} |"
              f" {r['first']['bytes'] / base:.1%} | {rep['bytes'] / 1e3:,.1f} |"
              f" {rep['requests']} ({rep['from_cache']}) | {heavy / 1e3:,.1f} |")
    print("\nfirst visit by kind, kB:")
    kinds = sorted({k for r in rows.values() for k in r["first"]["by_kind"]})
    print("| kind | " + " | ".join(rows) + " |")
    print("|---|" + "---|" * len(rows))
    for k in kinds:
        print(f"| {k} | " + " | ".join(
            f"{r['first']['by_kind'].get(k, {}).get('bytes', 0) / 1e3:,.1f}"
            for r in rows.values()) + " |")
    write_result({"args": {k: str(v) for k, v in vars(args).items()},
                  "machine": platform.platform(), "rows": rows}, args.out, "browser_bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
