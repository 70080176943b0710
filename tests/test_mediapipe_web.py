"""USAGE.md's web snippet, as copied, in a real headless Chromium with MediaPipe Tasks for web
(``@mediapipe/tasks-vision`` 0.10.21 from npm, its WebAssembly served locally).

The browser decodes the JPEG and runs MediaPipe's wasm build: it names both heads with their
labels, and its scores match MediaPipe's Python API on the same photo and region of interest
within ``WEB_TOLERANCE``. Needs npm (the package is cached under $DERMEDGE_CACHE) and Debian
``chromium`` + ``chromium-driver``; skips without them, fails under ``CI=true``.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from ci import unavailable
from export_fixtures import make_run_dir
from mediapipe_fixtures import mediapipe_env

from dermedge.labels import HEADS, OOD
from export.api import QuantizationConfig, export_run

pytestmark = [pytest.mark.browser,
              pytest.mark.filterwarnings("ignore::UserWarning:tensorflow.lite.*")]

PACKAGE = "@mediapipe/tasks-vision@0.10.21"
CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CDN = "https://cdn.jsdelivr.net/npm/@mediapipe/tasks-vision@0.10.21/wasm"
# Two uint8 output steps: the browser's JPEG decoder and the wasm kernels may differ slightly.
WEB_TOLERANCE = 2 / 256


_unavailable = unavailable  # skip outside CI; under CI=true a failure with the reason


def _tasks_vision() -> Path:
    from dermedge.files import cache_dir as default_cache_dir

    root = default_cache_dir() / "npm-tasks-vision-0.10.21"
    if (root / ".complete").is_file():
        return root / "package"
    npm = shutil.which("npm")
    if npm is None:
        _unavailable(f"npm is not installed: it fetches {PACKAGE} for the web snippet test")
    tmp = root.with_name(f".{root.name}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        proc = subprocess.run([npm, "pack", PACKAGE, "--silent"], cwd=tmp, capture_output=True,
                              text=True, timeout=300)
        if proc.returncode:
            _unavailable(f"npm pack {PACKAGE} failed: {proc.stderr.strip()[-300:]}")
        with tarfile.open(next(tmp.glob("*.tgz"))) as tf:
            tf.extractall(tmp, filter="data")
        (tmp / ".complete").write_text(PACKAGE + "\n")
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root / "package"


def _page(usage: str) -> str:
    """index.html around USAGE.md's web block: local package and wasm, result on window."""
    block = usage.split("### Web (`@mediapipe/tasks-vision`)\n\n```js\n")[1].split("\n```")[0]
    assert CDN in block and 'from "@mediapipe/tasks-vision"' in block
    block = block.replace(CDN, "/wasm").replace('"@mediapipe/tasks-vision"',
                                                '"/vision_bundle.mjs"')
    head, rest = block.split("\n", 1)  # the import stays first in the module
    return f"""<!doctype html><html><body><img id="photo" src="photo.jpg">
<script type="module">
{head}
try {{
await new Promise(r => document.readyState === "complete" ? r() : addEventListener("load", r));
{rest}
window.__result = {{heads: Object.fromEntries(Object.entries(heads).map(([k, v]) =>
  [k, v.map(c => [c.index, c.categoryName, c.score])])), pMelanoma, isMelanoma}};
}} catch (e) {{ window.__error = String(e && e.stack || e); }}
</script></body></html>"""


class _Handler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".mjs": "text/javascript", ".js": "text/javascript",
                      ".wasm": "application/wasm", ".tflite": "application/octet-stream"}

    def log_message(self, *args):  # keep pytest's output clean
        pass


def test_usage_md_web_snippet_classifies_in_chromium(tmp_path):
    mediapipe_env()
    if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
        _unavailable(f"{CHROMIUM} / {DRIVER} not found: install Debian chromium and "
                     "chromium-driver")
    package = _tasks_vision()
    from export.tflite_metadata import mediapipe_classify

    run = make_run_dir(tmp_path, size=32, train_per_class=3, val_per_class=1, threshold=0.3)
    bundle = export_run(run, QuantizationConfig.int8(14), tmp_path / "int8").path
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(package / "vision_bundle.mjs", site)
    shutil.copytree(package / "wasm", site / "wasm")
    shutil.copy(bundle / "model.tflite", site)
    photo = sorted((tmp_path / "tiny_images").glob("*.jpg"))[0]  # 56x48: the ROI matters
    shutil.copy(photo, site / "photo.jpg")
    (site / "index.html").write_text(_page((bundle / "USAGE.md").read_text()))
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Handler, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service(DRIVER))
    try:
        driver.get(f"http://127.0.0.1:{server.server_address[1]}/index.html")
        deadline, got = time.monotonic() + 90, None
        while time.monotonic() < deadline and got is None:
            got = driver.execute_script("return window.__result || "
                                        "(window.__error && {error: window.__error}) || null")
            time.sleep(0.2)
    finally:
        driver.quit()
        server.shutdown()
        server.server_close()
    assert got is not None, "the page never finished classifying"
    assert "error" not in got, got.get("error")
    ref = mediapipe_classify(bundle / "model.tflite", [photo], roi=True)[0]
    card = json.loads((bundle / "model_card.json").read_text())
    # the two heads, and the input gate's ``ood`` output that exports add by default
    assert set(got["heads"]) == {*HEADS, OOD}
    labels = {**{k: v["labels"] for k, v in card["heads"].items()},
              OOD: card["gate"]["ood"]["labels"]}
    for name, cats in got["heads"].items():
        cats = sorted(cats)
        assert [c[1] for c in cats] == ref[name]["labels"] == labels[name]
        if name == OOD:  # a density score: steep where a toy model's features are sparse, so
            # the browser's JPEG decode moves it more than the heads; the gate's own agreement
            # is checked on real images (test_browser_gate.py, the export's gate_agreement)
            assert 0.0 <= cats[0][2] <= 1.0
            continue
        np.testing.assert_allclose([c[2] for c in cats], ref[name]["scores"],
                                   atol=WEB_TOLERANCE, rtol=0, err_msg=name)
    assert got["isMelanoma"] == (got["pMelanoma"] >= 0.3)
