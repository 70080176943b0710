"""The input gate on the phone page, in real headless Chromium, against the real chain's
server (toy data -> trainer fit -> export with the ood output -> edge-demo serve).

gate.js in Chromium gives the shared table's measures bit for bit and its decisions to the
character; a black frame, a strongly blurred lesion and a photo that is not dermoscopy each
show "Retake the photo" with what to change, no diagnosis, and nothing uploaded; a lesion
still gets its diagnosis.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from gate_table import DECISIONS, photos
from PIL import Image
from test_browser_device import _start, _upload
from test_browser_e2e import chromium, ensure_runtime
from test_gate_api import BLACK, blurred, lesion
from test_gate_table import js_gate, python_decisions, rgba

from dermedge import quality

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def page(chain_server, tmp_path_factory):
    ensure_runtime()
    with chromium(tmp_path_factory.mktemp("profile")) as driver:
        driver.set_script_timeout(120)
        _start(driver, chain_server)
        yield driver


def test_shared_table_in_chromium(page):
    cases = photos()
    rules = page.execute_async_script(
        "const cb = arguments[0]; fetch('api/v1/policy').then((r) => r.json())"
        ".then((d) => cb(d.gate_rules));")
    got = page.execute_script("""
        const [ims, decisions, rules, params] = arguments;
        const px = (b64) => Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const square = (rgba, w, h) => {  // the centred square, as pixels.js draws it
          const s = Math.min(w, h), x0 = (w - s) >> 1, y0 = (h - s) >> 1;
          const out = new Uint8Array(s * s * 4);
          for (let y = 0; y < s; y++) {
            const i = ((y + y0) * w + x0) * 4;
            out.set(rgba.subarray(i, i + s * 4), y * s * 4);
          }
          return out;
        };
        return {measures: ims.map((p) => window.dermedgeGate.measureRgba(px(p.rgba), p.w, p.h,
                                                                           params)),
                squares: ims.map((p) => window.dermedgeGate.measureSquare(
                    square(px(p.rgba), p.w, p.h), Math.min(p.w, p.h), p.w, p.h, params)),
                decisions: decisions.map((d) => window.dermedgeGate.decide(rules, d.gate,
                                                                            d.values))};""",
        [{"rgba": base64.b64encode(rgba(a).tobytes()).decode(), "w": a.shape[1],
          "h": a.shape[0]} for _, a in cases],
        [{"values": values, "gate": js_gate(over, on, values.get("ood") is not None)}
         for _, values, over, on in DECISIONS],
        rules, quality.params())
    for (name, a), js, sq in zip(cases, got["measures"], got["squares"], strict=True):
        assert js == quality.measure_image(Image.fromarray(a)), name
        assert sq == js, name  # what the page measures: the centred square it decodes
    for (name, *_), py, js in zip(DECISIONS, python_decisions(), got["decisions"], strict=True):
        assert js == py, name


def _photo(tmp_path, name: str, a: np.ndarray):
    p = tmp_path / f"{name}.jpg"
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=92)
    p.write_bytes(buf.getvalue())
    return p


@pytest.mark.parametrize("name, codes, advice", [
    ("black", ["too_dark", "blurry"], "too dark: more light"),
    ("blurred", ["blurry"], "too blurry: hold still and refocus"),
    ("stripes", ["not_dermoscopy"],
     "this does not look like a dermoscopy photo of a skin lesion"),
])
def test_refused_photo_shows_what_to_change_and_is_not_uploaded(page, tmp_path, name, codes,
                                                                advice):
    from selenium.webdriver.common.by import By

    yy, xx = np.mgrid[0:480, 0:640]
    pixels = {"black": BLACK, "blurred": blurred(lesion()),
              "stripes": np.stack([(xx * 3) % 256, (yy * 5) % 256, ((xx + yy) * 2) % 256],
                                  2).astype(np.uint8)}[name]
    last = _upload(page, _photo(tmp_path, name, pixels))
    body = last["body"]
    # the toy model may also find a black or blurred frame atypical: at least these codes
    assert body["advice"]["decision"] == "retake" and set(codes) <= set(body["gate"]["codes"])
    assert body["device"] is None and body["cloud"] is None
    assert last["sentPhoto"] is False and body["photo_received"] is False
    adv = page.find_element(By.ID, "advice")
    assert "retake" in adv.get_attribute("class").split()
    assert adv.text.startswith("Retake the photo") and advice in adv.text
    assert not page.find_element(By.ID, "device").is_displayed()  # no diagnosis shown
    assert "the photo did not leave the phone" in last["where"]
    page_gate = last["answer"]["gate"]  # the page's own verdict, before the server's
    assert page_gate["passed"] is False and page_gate["codes"] == body["gate"]["codes"]


def test_a_lesion_still_gets_its_diagnosis_after_a_retake(page, chain_toy, tmp_path):
    from selenium.webdriver.common.by import By

    _upload(page, _photo(tmp_path, "black", BLACK))
    toy = sorted(chain_toy.rglob("*.jpg"))[0]
    last = _upload(page, toy)
    assert last["body"]["advice"]["decision"] in ("no_action", "refer")
    assert last["answer"]["gate"]["passed"] is True and last["body"]["gate"]["passed"] is True
    assert last["body"]["device"]["ood"] == last["answer"]["ood"]  # read by name in the page
    assert page.find_element(By.ID, "device").is_displayed()
    assert "retake" not in page.find_element(By.ID, "advice").get_attribute("class")
