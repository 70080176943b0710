"""The page without a network, in real headless Chromium against the real server.

After one online visit the service worker holds the page, the policy, the model and the
runtime build in use: with the server stopped, a reload classifies with the complete advice
(computed on the phone, the server's answer), cases wait in the phone's queue (surviving a
reload, deletable) and each is sent exactly once when the server is back; a new bundle on
the server replaces the stored one at the next online visit. ``http://127.0.0.1`` is a
secure context in Chromium, so service workers run here without a certificate.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from conftest import free_port
from test_browser_device import _case_rows, _log_records, _upload
from test_browser_e2e import _photo, browser_bundles, chromium, demo_server, ensure_runtime

from edge_demo.tiers import Tier

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    ensure_runtime()
    with chromium(tmp_path_factory.mktemp("profile")) as driver:
        driver.set_script_timeout(120)
        yield driver


def _js(browser, body: str, *args):
    """Run an async snippet (``return`` a value) in the page; raise its error here."""
    out = browser.execute_async_script(
        "const cb = arguments[arguments.length - 1];"
        f"(async () => {{ {body} }})().then((v) => cb({{v}}), (e) => cb({{e: String(e)}}));",
        *args)
    assert "e" not in out, out["e"]
    return out["v"]


def _wait(browser, what, cond, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, timeout, poll_frequency=0.2).until(
        lambda d: cond(d), message=f"waiting for {what}")


def _ready(browser) -> dict:
    """The page has loaded the model and says whether it works offline."""
    from selenium.webdriver.common.by import By

    _wait(browser, "the device model", lambda d: d.find_element(
        By.ID, "device-status").get_attribute("data-state"))
    status = browser.find_element(By.ID, "device-status")
    assert status.get_attribute("data-state") == "browser", status.text
    offline = _js(browser, "return await window.dermedgeOffline.ready;")
    assert offline, browser.find_element(By.ID, "offline-status").text
    return offline


def _caches(browser) -> dict[str, list[str]]:
    return _js(browser, """const out = {};
        for (const name of await caches.keys()) {
          out[name] = (await (await caches.open(name)).keys()).map((r) => r.url);
        }
        return out;""")


def _queue(browser) -> list[dict]:
    return _js(browser, "return (await window.dermedgeCases.queue()).map((i) => ({case_id:"
                        " i.case_id, photo: Boolean(i.photo), fields: i.fields}));")


def _history(browser) -> dict[str, dict]:
    return {h["case_id"]: h for h in _js(browser,
                                          "return await window.dermedgeCases.history();")}


def test_offline_reload_classifies_and_the_queue_sends_each_case_once(browser, tmp_path):
    from selenium.webdriver.common.by import By

    b = browser_bundles()
    port, photo = free_port(), _photo(tmp_path)
    args = ["--device", str(b["int8"]), "--cloud", str(b["float32"]), "--threads", "1"]
    with demo_server(args, tmp_path / "online.log", port=port) as url:
        browser.get(url + "/")
        offline = _ready(browser)  # one online visit
    cached = _caches(browser)
    assert list(cached) == [offline["cache"]]
    files = [u.rsplit("/", 1)[1] for u in cached[offline["cache"]]]
    wasm = sorted(f for f in files if f.endswith(".wasm"))
    assert len(wasm) == 1 and wasm[0].startswith({"threaded": "litert_wasm_threaded_internal",
                                                  "single": "litert_wasm_internal.",
                                                  "compat": "litert_wasm_compat"}
                                                 [offline["build"]])  # only the build in use
    assert any(f.startswith("model.tflite") for f in files) and "policy" in files

    # the server is gone: the page still loads, classifies and gives the complete advice
    browser.refresh()
    _ready(browser)
    cases = []
    for consent in (True, False, False):
        last = _upload(browser, photo, consent=consent)
        assert last["queued"] is True and last["needCloud"] is True  # default policy falls back
        assert last["body"] == last["local"] and last["body"]["advice"]["checks"]
        note = browser.find_element(By.ID, "case-note").text
        assert "No network" in note and "queued on the phone" in note
        assert ("with its photo (consented)" in note) is consent
        assert browser.find_element(By.ID, "advice").text.startswith(
            ("Refer to a dermatologist", "No action suggested"))
        assert "the photo did not leave the phone" in last["where"]
        cases.append(last)
    ids = [c["caseId"] for c in cases]
    assert len(set(ids)) == 3
    queued = {q["case_id"]: q for q in _queue(browser)}
    assert sorted(queued) == sorted(ids)
    assert [queued[i]["photo"] for i in ids] == [True, False, False]
    fields = queued[ids[0]]["fields"]
    assert fields["consent_upload"] == "1" and queued[ids[1]]["fields"]["consent_upload"] == "0"
    assert fields["model_sha256"] == Tier.from_bundle(b["int8"]).sha256
    assert json.loads(fields["device_answer"]) == cases[0]["answer"]
    # the tester deletes the third case; the queue survives a reload
    browser.find_element(By.CSS_SELECTOR, f'#queue-list li[data-case-id="{ids[2]}"] button'
                         ).click()
    _wait(browser, "the deleted case", lambda d: d.find_element(
        By.ID, "queue-status").get_attribute("data-count") == "2")
    browser.refresh()
    _ready(browser)
    _wait(browser, "the stored queue", lambda d: d.find_element(
        By.ID, "queue-status").get_attribute("data-count") == "2")
    assert "2 cases are waiting to be sent" in browser.find_element(By.ID, "queue-status").text

    logged, log = tmp_path / "cases", tmp_path / "back.log"
    with demo_server([*args, "--cases", str(logged)], log, port=port):
        # the network is back: several triggers at once still send each case once
        browser.execute_script("for (let i = 0; i < 3; i++) window.dispatchEvent("
                               "new Event('online')); window.dermedgeCases.sync('test');")
        _wait(browser, "the queue to empty", lambda d: d.find_element(
            By.ID, "queue-status").get_attribute("data-count") == "0", timeout=60)
        history = _history(browser)
        browser.refresh()  # and a reload sends nothing again
        _ready(browser)
        _js(browser, "return await window.dermedgeCases.ready;")
        text = browser.find_element(By.ID, "history-list").get_attribute("textContent")
    records = _log_records(log)
    posts = [r for r in records if r.get("method") == "POST"]
    results = [r for r in records if r.get("event") == "result"]
    assert [p["path"] for p in posts] == ["/api/v1/decide"] * 2
    assert all(p["status"] == 200 for p in posts)
    assert sorted(r["photo_received"] for r in results) == [False, True]
    rows = {r["id"]: r for r in _case_rows(logged)}  # each case in the case log once
    assert sorted(rows) == sorted(ids[:2]) and rows[ids[0]]["photo_received"] == 1
    assert (rows[ids[0]]["consent_upload"], rows[ids[1]]["consent_upload"]) == (1, 0)
    assert json.loads(rows[ids[0]]["client"])["queued"] is True
    assert history[ids[0]]["status"] == history[ids[1]]["status"] == "answered"
    assert history[ids[2]]["status"] == "deleted"
    # without the photo the server gives the answer the phone gave offline
    assert history[ids[1]]["answer"]["message"] == cases[1]["local"]["advice"]["message"]
    assert history[ids[0]]["answer"]["cloud_used"] is True
    assert text.count("answered by the server after the network came back") == 2


def _pixels_answer(browser, x: np.ndarray) -> dict:
    b64 = base64.b64encode(np.ascontiguousarray(x, np.uint8).tobytes()).decode()
    return _js(browser, "return await window.dermedgeDevice.runPixelsB64(arguments[0]);", b64)


def test_a_new_bundle_replaces_the_stored_one(browser, tmp_path):
    """The same origin, a new device model: the next online visit stores the new bundle and
    drops the old cache; offline, the page then runs the new model."""
    from selenium.webdriver.common.by import By

    b = browser_bundles()
    port = free_port()
    old, new = Tier.from_bundle(b["int8"]), Tier.from_bundle(b["float32"])
    with demo_server(["--device", str(b["int8"]), "--threads", "1"], tmp_path / "a.log",
                     port=port) as url:
        browser.get(url + "/")
        first = _ready(browser)
    with demo_server(["--device", str(b["float32"]), "--threads", "1"], tmp_path / "b.log",
                     port=port) as url:
        browser.get(url + "/")
        second = _ready(browser)
        _wait(browser, "the old cache to go", lambda d: list(_caches(d)) == [second["cache"]])
    assert first["cache"] != second["cache"] and new.sha256[:12] in second["cache"]
    browser.refresh()  # offline again
    _ready(browser)
    assert f"sha256 {new.sha256[:12]}" in browser.find_element(By.ID, "runs-what").text
    assert browser.execute_script("return window.dermedgeDevice.config.sha256;") == new.sha256
    x = np.random.default_rng(1).integers(0, 256, (new.image_size,) * 2 + (3,), np.uint8)
    got, want = _pixels_answer(browser, x), new.predict(x)
    assert abs(got["melanoma"] - want["melanoma"]) <= 1e-6
    assert old.sha256 != new.sha256
