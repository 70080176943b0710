"""The device tier in real headless Chromium: LiteRT.js runs the bundle in the page.

Outputs equal Python LiteRT's on the same uint8 pixels; the page's preprocessing stays
within the stated tolerance of the Pillow contract on the 600x450 JPEGs; the page's
fallback decision equals the server's on the policy table; a confident case sends no photo
(asserted on what the server received); and the page falls back to the server tier when the
browser cannot run the model or the server turns it off.

``DERMEDGE_BROWSER_BUNDLES`` (paths separated by ``:``) adds bundles to the equality test,
e.g. the quickstart's ``bundle-int8`` and the edge recipe's 224 px int8 bundle.
"""

from __future__ import annotations

import base64
import json
import os
import random
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from policy_table import BASE, CASES, FORMS, answer_side, assert_same, form_side
from test_browser_e2e import _photo, browser_bundles, chromium, demo_server, ensure_runtime

from edge_demo.policy import Policy
from edge_demo.tiers import Tier

pytestmark = pytest.mark.browser

# Stated tolerance of the page's preprocessing against dermedge.image.load_image (Pillow) on
# the 124 HAM10000 600x450 JPEGs. Measured with Chromium 156 / Pillow 13 (both decode JPEG
# with libjpeg-turbo): 0 levels everywhere at 32, 64, 224 and 260 px, so 0 on both heads;
# the bounds leave room for another build's JPEG decoder, not for a different resize.
PIXEL_MAX_DIFF, PIXEL_MEAN_DIFF = 2, 0.05
HEAD_MAX_DIFF = {"melanoma": 0.02, "diagnosis": 0.02}


def _extra_bundles() -> list[Path]:
    raw = os.environ.get("DERMEDGE_BROWSER_BUNDLES", "")
    return [Path(p) for p in raw.split(":") if p]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    ensure_runtime()
    with chromium(tmp_path_factory.mktemp("profile")) as driver:
        driver.set_script_timeout(180)
        yield driver


def _start(browser, url: str, state: str = "browser", timeout: float = 90,
           query: str = "") -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url + "/" + query)
    WebDriverWait(browser, timeout).until(
        lambda d: d.find_element(By.ID, "device-status").get_attribute("data-state"))
    status = browser.find_element(By.ID, "device-status")
    assert status.get_attribute("data-state") == state, status.text


def _run_pixels(browser, pixels: np.ndarray) -> dict:
    b64 = base64.b64encode(np.ascontiguousarray(pixels, np.uint8).tobytes()).decode()
    out = browser.execute_async_script(
        "const cb = arguments[1]; window.dermedgeDevice.runPixelsB64(arguments[0])"
        ".then(cb, (e) => cb({error: String(e)}));", b64)
    assert "error" not in out, out
    return out


def _same(js: dict, py: dict, tol: float = 0.0) -> None:
    """Equal (int8: 0 quanta apart) or, for float models, within ``tol``: XNNPACK's float
    kernels in WebAssembly and on x86 differ by a float32 ulp or two (measured 1.5e-8)."""
    assert abs(js["melanoma"] - py["melanoma"]) <= tol
    assert js["diagnosis"].keys() == py["diagnosis"].keys()
    assert max(abs(js["diagnosis"][k] - py["diagnosis"][k]) for k in py["diagnosis"]) <= tol
    assert js["top"]["label"] == py["top"]["label"]


def _equality_bundles() -> list[Path]:
    b = browser_bundles()
    return [b["int8"], b["float32"], *_extra_bundles()]


# (bundle, LiteRT.js build): the int8 model on the threaded build (the page on localhost is
# cross-origin isolated: min(4, cores) threads) and on the single-threaded one (?threads=1)
EQUALITY = [(0, "threaded"), (0, "single"), (1, None),
            *((2 + i, None) for i in range(len(_extra_bundles())))]


@pytest.mark.parametrize("which, build", EQUALITY)
def test_outputs_equal_python_litert_on_the_same_pixels(browser, tmp_path, which, build):
    """40 inputs (real photos through the contract when ../shared is there, then random
    pixels): both heads equal, on the build and thread count the page says it used."""
    from conftest import SHARED
    from selenium.webdriver.common.by import By

    from dermedge.image import load_image

    bundle = _equality_bundles()[which]
    tier = Tier.from_bundle(bundle)
    S = tier.image_size
    folder = SHARED / "data" / "ham10000_raw_600x450" / "images"
    photos = sorted(folder.glob("*.jpg"))[:20] if folder.is_dir() else []
    rng = np.random.default_rng(0)
    inputs = [load_image(p, S) for p in photos] + [
        rng.integers(0, 256, (S, S, 3), dtype=np.uint8) for _ in range(40 - len(photos))]
    with demo_server(["--device", str(bundle), "--threads", "1"], tmp_path / "s.log") as url:
        _start(browser, url, query="?threads=1" if build == "single" else "")
        status = browser.find_element(By.ID, "device-status")
        if build == "threaded":
            assert browser.execute_script("return crossOriginIsolated;"), (
                "the page is not cross-origin isolated: the server must send COOP/COEP and"
                " serve the threaded runtime (the server side of issue 35)")
        if build is not None:
            cores = browser.execute_script("return navigator.hardwareConcurrency;")
            assert status.get_attribute("data-build") == build, status.text
            assert status.get_attribute("data-threads") == str(
                min(4, cores) if build == "threaded" else 1), status.text
            assert f"{build} build" in status.text
        for x in inputs:
            _same(_run_pixels(browser, x), tier.predict(x),
                  0.0 if tier.mode == "int8" else 1e-6)


def _upload(browser, photo: Path, timeout: float = 60, consent: bool = True,
            keep: bool = False) -> dict:
    """Take the photo, record (or not) the patient's consent to send it (and to keep it in
    the case log), press Classify."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.execute_script("window.dermedgeLast = null;"  # a new photo, even the same file
                           " document.getElementById('result').hidden = true;"
                           " document.getElementById('image-input').value = '';"
                           " document.getElementById('case-code-value').textContent = '';")
    browser.find_element(By.ID, "image-input").send_keys(str(photo))
    # the page's change handler (a new case, consent boxes cleared) runs first
    WebDriverWait(browser, timeout).until(
        lambda d: d.find_element(By.ID, "case-code-value").text)
    if consent:
        browser.find_element(By.ID, "consent-upload").click()
    if keep:
        browser.find_element(By.ID, "consent-keep").click()
    browser.find_element(By.ID, "submit").click()
    WebDriverWait(browser, timeout).until(
        lambda d: d.find_element(By.ID, "result").is_displayed()
        or d.find_element(By.ID, "error").is_displayed())
    assert not browser.find_element(By.ID, "error").is_displayed(), \
        browser.find_element(By.ID, "error").text
    last = browser.execute_script(
        "return {last: window.dermedgeLast, px: window.dermedgeDevice &&"
        " window.dermedgeDevice.lastPixelsB64()};")
    last["last"]["where"] = browser.find_element(By.ID, "where").text
    last["last"]["pixels"] = last["px"]
    return last["last"]


def test_page_classifies_real_photos_in_the_browser(browser, tmp_path, shared_dir):
    """The phone-width page: the device answer is computed in Chromium from the photo, and it
    equals Python LiteRT's on the pixels the page fed the model."""
    b = browser_bundles()
    tier = Tier.from_bundle(b["int8"])
    S = tier.image_size
    photos = sorted((shared_dir / "data" / "ham10000_raw_600x450" / "images").glob("*.jpg"))
    with demo_server(["--device", str(b["int8"]), "--cloud", str(b["float32"]),
                      "--threads", "2"], tmp_path / "s.log") as url:
        _start(browser, url)
        for photo in photos[:3]:
            last = _upload(browser, photo)
            assert last["answer"]["computed_on"] == "browser"
            assert last["body"]["device"]["computed_on"] == "browser"
            assert "Device answer: on this phone" in last["where"]
            px = np.frombuffer(base64.b64decode(last["pixels"]), np.uint8).reshape(S, S, 3)
            _same(last["answer"], tier.predict(px))


def _browser_pixels(browser, photo: Path, size: int) -> np.ndarray:
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, "image-input").send_keys(str(photo))
    b64 = browser.execute_async_script(
        "const cb = arguments[1]; window.dermedgeDevice.preprocessB64("
        "document.getElementById('image-input').files[0], arguments[0])"
        ".then(cb, (e) => cb('ERROR ' + e));", size)
    assert not b64.startswith("ERROR"), b64
    return np.frombuffer(base64.b64decode(b64), np.uint8).reshape(size, size, 3)


def test_preprocessing_within_tolerance_of_pillow(browser, tmp_path, shared_dir):
    """All 124 600x450 JPEGs at the model's size (both heads compared) and at 224 px."""
    from dermedge.image import load_image

    b = browser_bundles()
    tier = Tier.from_bundle(b["int8"])
    photos = sorted((shared_dir / "data" / "ham10000_raw_600x450" / "images").glob("*.jpg"))
    assert len(photos) == 124
    worst = {"pixel_max": 0, "pixel_mean": 0.0, "melanoma": 0.0, "diagnosis": 0.0}
    with demo_server(["--device", str(b["int8"]), "--threads", "1"], tmp_path / "s.log") as url:
        _start(browser, url)
        for i, photo in enumerate(photos):
            for size in (tier.image_size,) + ((224,) if i % 4 == 0 else ()):
                got, ref = _browser_pixels(browser, photo, size), load_image(photo, size)
                diff = np.abs(got.astype(int) - ref.astype(int))
                worst["pixel_max"] = max(worst["pixel_max"], int(diff.max()))
                worst["pixel_mean"] = max(worst["pixel_mean"], float(diff.mean()))
                if size == tier.image_size:
                    a, r = tier.predict(got), tier.predict(ref)
                    worst["melanoma"] = max(worst["melanoma"], abs(a["melanoma"] -
                                                                   r["melanoma"]))
                    worst["diagnosis"] = max(worst["diagnosis"], max(
                        abs(a["diagnosis"][k] - r["diagnosis"][k]) for k in a["diagnosis"]))
    print("browser vs Pillow preprocessing, worst case:", worst)
    assert worst["pixel_max"] <= PIXEL_MAX_DIFF and worst["pixel_mean"] <= PIXEL_MEAN_DIFF, worst
    assert worst["melanoma"] <= HEAD_MAX_DIFF["melanoma"], worst
    assert worst["diagnosis"] <= HEAD_MAX_DIFF["diagnosis"], worst


def test_browser_fallback_decision_equals_the_servers(browser, tmp_path):
    """policy.js in Chromium vs Policy.decide on the table where every rule fires, and the
    complete answer (answer.js + metadata.js) vs POST /api/v1/decide on the answer table;
    the thresholds the page reads are the server's; the page states the operating point."""
    from selenium.webdriver.common.by import By

    b = browser_bundles()
    row = {"chosen": True, "n": 200, "n_melanoma": 40, "n_not_melanoma": 160,
           "fallback_rate": 0.2, "referral_rate": 0.37, "melanoma_sensitivity": 0.95,
           "melanoma_specificity": 0.7}
    policy = Policy(**{**BASE, "min_confidence": 0.4242}, coverage=(row,),
                    provenance={"split": "val"})
    path = policy.save(tmp_path / "policy.json")
    with demo_server(["--device", str(b["int8"]), "--policy", str(path), "--threads", "1"],
                     tmp_path / "s.log") as url:
        _start(browser, url)
        published = browser.execute_async_script(
            "const cb = arguments[0]; fetch('api/v1/policy').then((r) => r.json()).then(cb);")
        assert published["policy"]["policy"] == policy.thresholds()
        summary = browser.find_element(By.ID, "operating-point-summary")
        assert "sent 20.0% to the cloud and referred 37.0%" in summary.text
        summary.click()
        text = browser.find_element(By.ID, "operating-point").text
        assert "Melanoma sensitivity 95.0% 83.5% to 98.6% n = 40" in text, text
        assert "calibrate on a labelled sample of its own" in text
        cases = [{"params": Policy(**{**BASE, **over}).thresholds(), "device": dev}
                 for _, over, dev, _ in CASES]
        js = browser.execute_script(
            "const rules = arguments[1];"
            "return arguments[0].map((c) => window.dermedgePolicy.fallbackChecks(rules,"
            " c.params, c.device));", cases, published["rules"])
        # the complete answer (both stages, the card's tables) on the shared table
        answers, forms = answer_side(), form_side()
        got = browser.execute_script(
            "const M = window.dermedgeMetadata;"
            "return {bodies: arguments[0].map((c) => window.dermedgeAnswer.localDecide(c.doc,"
            " c.answer, M.parse(c.form || {}), c.ask)), forms: arguments[1].map((f) => {"
            " try { return {meta: M.parse(f)}; } catch (e) { return {error: e.message}; } })};",
            answers, FORMS)
    for case, body in zip(answers, got["bodies"], strict=True):
        assert_same(body, case["body"], case["name"])
    assert got["forms"] == forms
    fired = set()
    for (name, over, dev, cloud), got in zip(CASES, js, strict=True):
        d = Policy(**{**BASE, **over}).decide(dev, cloud)
        assert got["wanted"] == d.wants_fallback, name
        assert got["rules_fired"] == d.fallback_rules, name
        assert got["checks"] == [c.to_dict() for c in d.fallback_checks], name
        fired |= set(d.fallback_rules)
    assert fired == {"low_confidence", "melanoma_uncertain", "second_opinion"}


def _log_records(log: Path) -> list[dict]:
    out = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def _case_rows(folder: Path) -> list[dict]:
    """The server's case log, read as any SQLite client would."""
    import sqlite3

    db = sqlite3.connect(folder / "cases.sqlite3")
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute("SELECT * FROM cases ORDER BY created_at")]
    finally:
        db.close()


def _kept(folder: Path) -> list[bytes]:
    photos = folder / "photos"
    return [p.read_bytes() for p in sorted(photos.iterdir())] if photos.is_dir() else []


@pytest.mark.parametrize("policy, consent, photo_sent", [
    ({"min_confidence": 0.0, "mel_band_low": None, "mel_band_high": None,
      "second_opinion": False}, True, False),
    ({"min_confidence": 1.0}, True, True),
    ({"min_confidence": 1.0}, False, False),
])
def test_photo_leaves_the_phone_only_on_fallback(browser, tmp_path, policy, consent,
                                                 photo_sent):
    """What the server received (its case log and its request log): the photo only when a
    fallback rule fires and the tester recorded consent for the case; a fallback without
    consent keeps the device answer, says so, and is logged at once (no consent to keep the
    photo was given, so nothing is kept either way)."""
    from selenium.webdriver.common.by import By

    b = browser_bundles()
    cases = tmp_path / "cases"
    pol = Policy(**policy).save(tmp_path / "policy.json")
    photo = _photo(tmp_path)
    log = tmp_path / "s.log"
    with demo_server(["--device", str(b["int8"]), "--cloud", str(b["float32"]),
                      "--policy", str(pol), "--cases", str(cases), "--keep-photos",
                      "--threads", "1"], log) as url:
        _start(browser, url)
        last = _upload(browser, photo, consent=consent)
        case_note = browser.find_element(By.ID, "case-note").text
    rows = _case_rows(cases)
    assert len(rows) == 1 and rows[0]["photo_received"] == int(photo_sent)
    assert rows[0]["consent_upload"] == int(consent)
    assert not rows[0]["consent_keep"] and _kept(cases) == []  # no consent to keep
    assert last["body"]["case"]["logged"] is True
    records = _log_records(log)
    posts = [r["path"] for r in records if r.get("method") == "POST"]
    results = [r for r in records if r.get("event") == "result"]
    assert "/api/v1/classify" not in posts  # the server never ran the device tier
    assert posts == ["/api/v1/decide"] and len(results) == 1
    assert results[0]["photo_received"] is photo_sent
    assert last["sentPhoto"] is photo_sent and last["body"]["photo_received"] is photo_sent
    if photo_sent:
        assert last["body"]["cloud"] is not None
        assert "the photo left the phone" in last["where"] and "cloud answer: cloud" in \
            last["where"]
    else:
        assert last["body"]["cloud"] is None
        assert "the photo did not leave the phone" in last["where"]
    if last["needCloud"] and not consent:
        assert "no consent to send the photo" in case_note
        assert "The photo was not sent, so the device answer stands." in \
            last["body"]["fallback"]["reason"]
        assert last["body"]["advice"]["rules_fired"][0] == "fallback_unavailable"
    else:
        assert case_note == ""


def test_server_tier_when_the_browser_cannot_run_the_model(browser, tmp_path):
    """A model LiteRT.js refuses (dynamic batch), a browser without WebAssembly, and
    --no-browser-inference: the page says so and the server runs the device tier."""
    from selenium.webdriver.common.by import By

    b = browser_bundles()
    photo = _photo(tmp_path)
    for args, says, no_wasm in (
            (["--device", str(b["dynamic_int8"])], "failed to load in this browser", False),
            (["--device", str(b["int8"])], "this browser has no WebAssembly", True),
            (["--device", str(b["int8"]), "--no-browser-inference"],
             "turned off on this server", False)):
        log = tmp_path / f"s{random.random()}.log"
        script = browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {
            "source": "delete globalThis.WebAssembly;"}) if no_wasm else None
        try:
            with demo_server([*args, "--threads", "1"], log) as url:
                _start(browser, url, state="server")
                assert says in browser.find_element(By.ID, "device-status").text
                last = _upload(browser, photo)
        finally:
            if script is not None:
                browser.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", script)
        assert last["body"]["tier_path"] == "device"
        assert "Device answer: on the server" in last["where"]
        assert "the photo left the phone" in last["where"]
        assert [r["path"] for r in _log_records(log) if r.get("method") == "POST"] == [
            "/api/v1/classify"]


def test_server_tier_sends_the_photo_as_the_body_and_the_details_in_the_url(browser,
                                                                           tmp_path):
    """The page posts the file itself (no multipart) with age/site in the query string; the
    server gets the very bytes and applies the card's tables to them."""
    from demo_fixtures import with_metadata_tables
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    device = with_metadata_tables(browser_bundles()["int8"], tmp_path / "int8")
    photo = _photo(tmp_path)
    cases = tmp_path / "cases"
    watch = browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": """
        window.__posts = [];
        const fetch0 = window.fetch;
        window.fetch = (url, init) => {
          if (init && init.method === "POST") window.__posts.push({url: String(url),
            type: init.headers && init.headers["Content-Type"],
            file: init.body instanceof Blob, form: init.body instanceof FormData});
          return fetch0(url, init);
        };"""})
    try:
        with demo_server(["--device", str(device), "--no-browser-inference", "--threads", "1",
                          "--cases", str(cases), "--keep-photos"], tmp_path / "s.log") as url:
            _start(browser, url, state="server")
            browser.find_element(By.CSS_SELECTOR, "#patient summary").click()
            browser.find_element(By.ID, "age-input").send_keys("74")
            Select(browser.find_element(By.ID, "site-input")).select_by_value("face")
            last = _upload(browser, photo, keep=True)
            posts = browser.execute_script("return window.__posts;")
    finally:
        browser.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", watch)
    assert len(posts) == 1 and posts[0]["url"].startswith("api/v1/classify?age=74&site=face&")
    assert posts[0] | {"url": None} == {"url": None, "type": "image/jpeg", "file": True,
                                        "form": False}
    query = urllib.parse.parse_qs(posts[0]["url"].split("?", 1)[1])  # the case fields
    assert query["consent_upload"] == ["1"] and query["case_id"] == [last["caseId"]]
    assert query["consent_keep"] == ["1"] and last["body"]["case"]["id"] == last["caseId"]
    assert json.loads(query["client"][0])["build"] == "server"
    assert last["body"]["metadata"]["received"] == {"age": 74.0, "site": "face"}
    assert last["body"]["device"]["metadata_used"] == ["age", "site"]
    assert _kept(cases) == [photo.read_bytes()]  # the very bytes, kept with consent


def test_patient_details_that_trigger_fallback_send_the_photo(browser, tmp_path):
    """The browser's photo-only answer is confident; the card's tables (applied on the phone
    as on the server) move it into the second-opinion rule, so the page sends the photo."""
    from demo_fixtures import with_metadata_tables
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from dermedge.image import load_image
    from edge_demo.metadata import adjust, tables

    b = browser_bundles()
    device = with_metadata_tables(b["int8"], tmp_path / "int8")
    tier = Tier.from_bundle(device)
    photo = _photo(tmp_path)
    alone = tier.predict(load_image(photo, tier.image_size))
    meta = {"age": 75.0, "sex": "female", "site": "face"}
    updated, used = adjust(alone, tables(tier.card), meta)
    assert used and updated["melanoma"] > alone["melanoma"] + 0.01
    above = (alone["melanoma"] + updated["melanoma"]) / 2
    pol = Policy(min_confidence=0.0, mel_band_low=None, mel_band_high=None,
                 second_opinion=True, second_opinion_above=above).save(tmp_path / "p.json")
    cases, log = tmp_path / "cases", tmp_path / "s.log"
    with demo_server(["--device", str(device), "--cloud", str(b["float32"]), "--policy",
                      str(pol), "--cases", str(cases), "--threads", "1"], log) as url:
        _start(browser, url)
        browser.find_element(By.CSS_SELECTOR, "#patient summary").click()
        browser.find_element(By.ID, "age-input").send_keys("75")
        Select(browser.find_element(By.ID, "sex-input")).select_by_value("female")
        Select(browser.find_element(By.ID, "site-input")).select_by_value("face")
        last = _upload(browser, photo)
    assert last["fallback"]["wanted"] is False  # the photo alone: no rule fired
    # the page applied the card's tables itself (metadata.js), so one request sends the photo
    assert last["local"]["fallback"]["rules_fired"] == ["second_opinion"]
    assert last["sentPhoto"] is True and last["body"]["fallback"]["used"] is True
    assert last["body"]["fallback"]["rules_fired"] == ["second_opinion"]
    results = [r for r in _log_records(log) if r.get("event") == "result"]
    assert [r["photo_received"] for r in results] == [True]
    rows = _case_rows(cases)  # one case, logged with its photo (not kept: no --keep-photos)
    assert len(rows) == 1 and rows[0]["id"] == results[0]["case_id"] == last["caseId"]
    assert rows[0]["photo_received"] == 1 and rows[0]["fallback_used"] == 1
