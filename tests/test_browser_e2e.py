"""The page in a real headless Chromium against the real waitress server.

Needs Debian ``chromium`` + ``chromium-driver`` and the LiteRT.js runtime (``npm ci`` in
edge_demo/web, which needs Debian ``npm``); when they are absent the tests install them (root
with apt-get only, bounded by timeouts) or skip with the reason; under CI=true a failed
install fails the test instead.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from ci import unavailable
from conftest import demo_server
from demo_fixtures import jpeg_bytes, tiny_bundles, write_bundle

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


WEB = REPO / "edge_demo" / "web"
RUNTIME_JS = WEB / "node_modules" / "@litertjs" / "core" / "dist" / "index.js"


_unavailable = unavailable  # skip outside CI; under CI=true a failure with the reason


def _apt_install(*packages: str) -> None:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        _unavailable(f"Debian packages {' '.join(packages)} are missing and apt-get cannot run"
                     " here (not root): install them.")
    try:
        subprocess.run(["apt-get", "update"], check=True, capture_output=True, timeout=300)
        subprocess.run(["apt-get", "install", "-y", *packages], check=True,
                       capture_output=True, timeout=600)
    except (subprocess.SubprocessError, OSError) as exc:
        _unavailable(f"installing {' '.join(packages)} with apt-get failed: {exc}")


def _ensure_chromium() -> None:
    if os.path.exists(CHROMIUM) and os.path.exists(DRIVER):
        return
    _apt_install("chromium", "chromium-driver")
    if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
        _unavailable("apt-get ran but /usr/bin/chromium or /usr/bin/chromedriver is missing.")


def ensure_runtime() -> None:
    """The pinned LiteRT.js runtime in edge_demo/web/node_modules (`npm ci`, bounded)."""
    if RUNTIME_JS.is_file():
        return
    if shutil.which("npm") is None:
        _apt_install("npm")
    try:
        proc = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=WEB,
                              capture_output=True, text=True, timeout=600)
    except (subprocess.SubprocessError, OSError) as exc:
        _unavailable(f"`npm ci` in {WEB} failed: {exc}")
    if proc.returncode != 0 or not RUNTIME_JS.is_file():
        _unavailable(f"`npm ci` in {WEB} failed (exit {proc.returncode}): {proc.stderr[-800:]}")


@functools.cache
def browser_bundles() -> dict[str, Path]:
    """The tiny bundles with batch 1, as `python -m export tflite` writes them (LiteRT.js
    refuses a dynamic batch); ``dynamic_int8`` keeps the converter's batch -1."""
    from export.batch import fix_batch

    b = tiny_bundles()
    root = Path(tempfile.mkdtemp(prefix="edge_demo_browser_bundles_"))
    out = {"dynamic_int8": b["int8"], "keras_run": b["keras_run"]}
    rng = np.random.default_rng(0)
    for key in ("int8", "float32"):
        dest = root / key
        shutil.copytree(b[key], dest)
        model = (dest / "model.tflite").read_bytes()
        size = json.loads((dest / "model_card.json").read_text())["input"]["shape"][0]
        fixed, _ = fix_batch(model, rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8))
        card = json.loads((dest / "model_card.json").read_text())
        out[key] = write_bundle(dest, fixed, card["export"]["mode"], card["name"])  # new sha256
    return out


@contextlib.contextmanager
def chromium(profile: Path, args: tuple[str, ...] = (), env: dict[str, str] | None = None,
             options=None):
    """Headless Chromium with a phone-sized viewport (390 x 844, mobile emulation); ``args``
    are more command-line flags, ``env`` the browser's environment (e.g. its HOME)."""
    _ensure_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = options or webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                "--window-size=390,844", *args):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service(DRIVER, env=env))
    # headless windows have a minimum width of ~500 px: emulate the phone's viewport instead
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True})
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ensure_runtime()
    b = browser_bundles()
    log = tmp_path_factory.mktemp("server") / "server.log"
    with demo_server(["--device", str(b["int8"]), "--cloud", str(b["float32"]),
                      "--threads", "2"], log) as url:
        yield url


@pytest.fixture
def browser(tmp_path):
    with chromium(tmp_path / "profile") as driver:
        yield driver


def _photo(tmp_path: Path) -> Path:
    """A real HAM10000 photo when ../shared is present, else a synthetic JPEG."""
    from conftest import SHARED

    folder = SHARED / "data" / "ham10000_raw_600x450" / "images"
    photos = sorted(folder.glob("*.jpg")) if folder.is_dir() else []
    if photos:
        return photos[0]
    p = tmp_path / "synthetic.jpg"
    p.write_bytes(jpeg_bytes((600, 450)))
    return p


def test_upload_renders_result_without_reload(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server + "/")
    assert "Research tool, not a diagnosis" in browser.find_element(By.ID, "disclaimer").text
    WebDriverWait(browser, 60).until(
        lambda d: d.find_element(By.ID, "device-status").get_attribute("data-state"))
    assert "runs in this browser" in browser.find_element(By.ID, "device-status").text
    browser.execute_script("window.__marker = 'same-page';")
    browser.find_element(By.ID, "image-input").send_keys(str(_photo(tmp_path)))
    WebDriverWait(browser, 10).until(
        lambda d: d.find_element(By.ID, "preview").get_attribute("hidden") is None)
    code = browser.find_element(By.ID, "case-code-value").text  # made when the photo is taken
    assert re.fullmatch(r"[0-9A-HJKMNP-TV-Z]{4}-[0-9A-HJKMNP-TV-Z]{4}", code), code
    browser.find_element(By.ID, "consent-upload").click()  # the photo may leave the phone
    browser.find_element(By.ID, "submit").click()
    WebDriverWait(browser, 30).until(ec.visibility_of_element_located((By.ID, "advice")))
    advice = browser.find_element(By.ID, "advice").text
    assert ("Refer to a dermatologist" in advice) or ("No action suggested" in advice)
    assert "not a diagnosis" in advice
    assert "Melanoma risk:" in browser.find_element(By.ID, "device-risk").text
    assert len(browser.find_elements(By.CSS_SELECTOR, "#device-top li")) == 3
    fallback = browser.find_element(By.ID, "fallback").text
    assert "cloud" in fallback.lower()
    assert browser.find_element(By.ID, "cloud").is_displayed()  # default policy falls back
    where = browser.find_element(By.ID, "where").text
    assert "Device answer: on this phone" in where and "the photo left the phone" in where
    assert "on this phone (in the browser)" in browser.find_element(By.ID, "device-latency").text
    op = browser.find_element(By.ID, "operating-point")
    op.find_element(By.TAG_NAME, "summary").click()
    assert "default thresholds, not calibrated" in op.text  # no operating point to state
    assert "calibrate on a labelled sample of its own" in op.text
    assert browser.execute_script("return window.__marker;") == "same-page"  # no reload
    assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None
    shot = Path(os.environ.get("EDGE_DEMO_SCREENSHOT", tmp_path / "phone.png"))
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 0


def test_bad_upload_shows_error(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    bad = tmp_path / "notes.jpg"
    bad.write_bytes(b"definitely not a photo" * 20)
    browser.get(server + "/")
    WebDriverWait(browser, 60).until(  # the page decodes it itself: the browser's message
        lambda d: d.find_element(By.ID, "device-status").get_attribute("data-state"))
    browser.find_element(By.ID, "image-input").send_keys(str(bad))
    browser.find_element(By.ID, "submit").click()
    WebDriverWait(browser, 20).until(
        lambda d: d.find_element(By.ID, "error").get_attribute("hidden") is None)
    assert "not an image" in browser.find_element(By.ID, "error").text


def test_patient_details_update_the_answer(browser, tmp_path_factory, tmp_path):
    """Age and site typed on the page reach the server and the tier shows what they changed."""
    from demo_fixtures import with_metadata_tables
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    root = tmp_path_factory.mktemp("meta")
    ensure_runtime()
    device = with_metadata_tables(browser_bundles()["int8"], root / "int8")
    with demo_server(["--device", str(device), "--threads", "1"], root / "server.log") as url:
        browser.get(url + "/")
        WebDriverWait(browser, 60).until(
            lambda d: d.find_element(By.ID, "device-status").get_attribute("data-state"))
        browser.find_element(By.CSS_SELECTOR, "#patient summary").click()
        browser.find_element(By.ID, "age-input").send_keys("74")
        Select(browser.find_element(By.ID, "site-input")).select_by_value("face")
        browser.find_element(By.ID, "image-input").send_keys(str(_photo(tmp_path)))
        browser.find_element(By.ID, "submit").click()
        WebDriverWait(browser, 30).until(
            ec.visibility_of_element_located((By.ID, "device-metadata")))
        note = browser.find_element(By.ID, "device-metadata").text
        where = browser.find_element(By.ID, "where").text
    assert "Updated with the patient's age, site" in note and "photo alone" in note
    # the browser computed the photo's answer; the server applied the card's tables to it
    assert "Device answer: on this phone" in where
