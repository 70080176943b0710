"""The server side of the offline page: the service worker's script, the manifest and the
cache version (Flask test client, tiny bundles; the page itself runs in
tests/test_browser_offline.py)."""

from __future__ import annotations

import io
import json
import re

import pytest
from PIL import Image
from test_edge_demo_browser_api import make_app

from edge_demo import offline
from edge_demo.browser import RUNTIME_FILES
from edge_demo.policy import Policy


@pytest.fixture
def runtime_dir(tmp_path):
    """An installed-runtime layout (the files' names and the package version)."""
    root = tmp_path / "node_modules"
    for name in RUNTIME_FILES:
        path = root / "@litertjs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"//")
    (root / "@litertjs" / "core" / "package.json").write_text('{"version": "9.8.7"}')
    return root


def _worker(client) -> dict:
    resp = client.get("/sw.js")
    assert resp.status_code == 200 and resp.mimetype == "text/javascript"
    assert resp.headers["Cache-Control"] == "no-cache"  # a new bundle reaches the next visit
    found = re.search(r"^const OFFLINE = (.*);$", resp.get_data(as_text=True), re.M)
    return json.loads(found.group(1))


def test_the_worker_keeps_the_page_policy_model_and_each_builds_files(tmp_path, runtime_dir):
    app = make_app(tmp_path, WEB_RUNTIME_DIR=str(runtime_dir))
    client = app.test_client()
    svc = app.extensions["edge_demo"]["service"]
    cfg = _worker(client)
    assert cfg["version"] == (f"dermedge-m{svc.device.sha256[:12]}-p{svc.policy.sha256[:12]}"
                              f"-litert9.8.7-page{offline.page_digest()[:10]}")
    page = client.get("/")
    config = json.loads(re.search(r'id="browser-config" type="application/json">(.*?)</script>',
                                  page.get_data(as_text=True)).group(1))
    assert page.headers[offline.VERSION_HEADER] == cfg["version"] == config["offline"]["version"]
    assert client.get("/api/v1/policy").headers[offline.VERSION_HEADER] == cfg["version"]
    shell = cfg["shell"]
    assert shell[:3] == ["/", "/manifest.webmanifest", "/api/v1/policy"]
    assert config["model"] in shell  # the very URL the page loads the model from
    assert {u.split("?")[0] for u in shell} >= {"/static/app.js", "/static/device.js",
                                                "/static/answer.js", "/static/icons/icon-192.png"}
    for url in shell:
        with client.get(url) as resp:  # static files are streamed: close them
            assert resp.status_code == 200, url
    assert sorted(cfg["builds"]) == ["compat", "single", "threaded"]
    for build, files in cfg["builds"].items():
        assert [f.rsplit("/", 1)[1] for f in files] == [
            "index.js", "index.js", f"{offline.BUILDS[build]}.js", f"{offline.BUILDS[build]}.wasm"]
        assert all(config["runtime"] in f or f.startswith("/runtime/") for f in files)


def test_a_new_policy_or_model_is_a_new_cache(tmp_path, runtime_dir):
    b = make_app(tmp_path, WEB_RUNTIME_DIR=str(runtime_dir))
    base = _worker(b.test_client())["version"]
    other = Policy(min_confidence=0.5).save(tmp_path / "p.json")
    assert _worker(make_app(tmp_path, WEB_RUNTIME_DIR=str(runtime_dir),
                            POLICY_FILE=str(other)).test_client())["version"] != base
    from demo_fixtures import tiny_bundles

    swapped = make_app(tmp_path, WEB_RUNTIME_DIR=str(runtime_dir),
                       DEVICE_BUNDLE=str(tiny_bundles()["float32"]))
    assert _worker(swapped.test_client())["version"].split("-p")[0] != base.split("-p")[0]


def test_without_the_runtime_the_worker_keeps_no_model_or_runtime(tmp_path):
    cfg = _worker(make_app(tmp_path).test_client())  # make_app points at a missing runtime
    assert cfg["builds"] == {} and "-litertserver-" in cfg["version"]
    assert not any("model.tflite" in u for u in cfg["shell"])


def test_the_manifest_makes_the_page_installable(tmp_path):
    client = make_app(tmp_path).test_client()
    resp = client.get("/manifest.webmanifest")
    assert resp.status_code == 200 and resp.mimetype == "application/manifest+json"
    doc = resp.get_json()
    assert doc["start_url"] == doc["scope"] == "/" and doc["display"] == "standalone"
    assert doc["short_name"] and "not a diagnosis" in doc["description"]
    purposes = set()
    for icon in doc["icons"]:
        with client.get(icon["src"]) as png:
            assert png.status_code == 200 and png.mimetype == "image/png"
            side = Image.open(io.BytesIO(png.data)).size
        assert f"{side[0]}x{side[1]}" == icon["sizes"]
        purposes.add(icon["purpose"])
    assert purposes == {"any", "maskable"}
    assert {"192x192", "512x512"} <= {i["sizes"] for i in doc["icons"]}
    page = client.get("/").get_data(as_text=True)
    assert 'rel="manifest" href="/manifest.webmanifest"' in page
