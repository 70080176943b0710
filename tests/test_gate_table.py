"""The input gate's one source of truth: Python (dermedge/quality.py, edge_demo/gate.py) and
the page's gate.js give bit-identical measures and identical decisions on one table of cases.

Needs ``node`` (Debian package nodejs); those tests skip without it and fail under CI=true.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess

import numpy as np
import pytest
from ci import unavailable
from gate_table import DECISIONS, GOOD, THRESHOLDS, photos
from PIL import Image

from dermedge import quality
from edge_demo.errors import PolicyError
from edge_demo.gate import GATE_RULES_FILE as RULES_FILE
from edge_demo.gate import OFF_MESSAGE, Gate, rules
from edge_demo.policy import Policy, rule_tables

GATE_JS = RULES_FILE.with_name("gate.js")


def _node() -> str:
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        unavailable("node not found: install Debian nodejs (apt-get install nodejs) to run"
                    " gate.js")
    return node


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, np.uint8).tobytes()).decode()


def rgba(rgb: np.ndarray) -> np.ndarray:
    return np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2)


def gate_for(over: dict, enabled: bool, has_ood: bool = True) -> Gate:
    return Gate(enabled, {**THRESHOLDS, **over}, {}, has_ood)


def python_decisions() -> list[dict]:
    return [gate_for(over, on, values.get("ood") is not None).decide(values).to_dict()
            for _, values, over, on in DECISIONS]


def js_gate(over: dict, enabled: bool, has_ood: bool = True) -> dict:
    """What GET /api/v1/policy publishes as ``gate`` (the fields gate.js reads)."""
    return gate_for(over, enabled, has_ood).describe()


JS_DRIVER = r"""
const G = require(process.argv[1]);
const rules = JSON.parse(require("fs").readFileSync(process.argv[2], "utf8"));
const doc = JSON.parse(require("fs").readFileSync(0, "utf8"));
const px = (b64) => Uint8Array.from(Buffer.from(b64, "base64"));
// the centred square alone, as pixels.js decodeSquare draws it for the page
const square = (rgba, w, h) => {
  const s = Math.min(w, h), x0 = (w - s) >> 1, y0 = (h - s) >> 1;
  const out = new Uint8Array(s * s * 4);
  for (let y = 0; y < s; y++) {
    const i = ((y + y0) * w + x0) * 4;
    out.set(rgba.subarray(i, i + s * 4), y * s * 4);
  }
  return out;
};
const photos = doc.photos.map((p) => {
  const rgba = px(p.rgba), img = G.gateImage(rgba, p.w, p.h, doc.params);
  return { plane: Buffer.from(img.plane).toString("base64"),
    measures: G.measure(img.plane, img.g, img.side, doc.params),
    square: G.measureSquare(square(rgba, p.w, p.h), Math.min(p.w, p.h), p.w, p.h, doc.params) };
});
const geometry = doc.sizes.map(([w, h]) => G.geometry(w, h, doc.params));
const decisions = doc.decisions.map((d) => G.decide(rules, d.gate, d.values));
process.stdout.write(JSON.stringify({ photos, geometry, decisions }));
"""


SIZES = [(224, 224), (600, 450), (450, 600), (448, 449), (896, 897), (897, 1200),
         (4000, 3000), (3024, 4032), (8160, 6120), (3, 5)]


@pytest.fixture(scope="module")
def node_side():
    cases = photos()
    doc = {"params": quality.params(),
           "photos": [{"rgba": _b64(rgba(a)), "w": a.shape[1], "h": a.shape[0]}
                      for _, a in cases],
           "sizes": SIZES,
           "decisions": [{"values": values,
                          "gate": js_gate(over, on, values.get("ood") is not None)}
                         for _, values, over, on in DECISIONS]}
    proc = subprocess.run([_node(), "-e", JS_DRIVER, str(GATE_JS), str(RULES_FILE)],
                          input=json.dumps(doc), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_measures_are_bit_identical_in_node(node_side):
    for (name, a), js in zip(photos(), node_side["photos"], strict=True):
        im = Image.fromarray(a)
        plane = quality.gate_image(im)
        assert base64.b64decode(js["plane"]) == plane.tobytes(), name
        assert js["measures"] == quality.measure(plane, min(im.size)), name
        assert js["measures"] == quality.measure_image(im), name
        assert js["square"] == js["measures"], name  # the page measures the centred square


def test_gate_geometry_is_the_same_and_never_enlarges(node_side):
    for (w, h), js in zip(SIZES, node_side["geometry"], strict=True):
        g, k, (left, top, right, bottom) = quality.gate_geometry(w, h)
        assert (js["g"], js["k"], js["left"], js["top"]) == (g, k, left, top), (w, h)
        s = min(w, h)
        assert g <= quality.SIDE_CAP and g * k <= s < (g + 1) * k and (k == 1) == (s <= 448)
        assert right - left == bottom - top == g * k
    assert quality.gate_geometry(4000, 3000)[:2] == (428, 7)
    assert quality.gate_geometry(600, 450)[:2] == (225, 2)


def test_decisions_and_texts_equal_in_node(node_side):
    py = python_decisions()
    assert len(node_side["decisions"]) == len(py) == len(DECISIONS)
    for (name, *_), p, j in zip(DECISIONS, py, node_side["decisions"], strict=True):
        assert j == p, name


def test_every_check_fires_and_stays_quiet_somewhere():
    seen: dict[str, set] = {}
    for d in python_decisions():
        for c in d["checks"]:
            seen.setdefault(c["id"], set()).add(c["fired"])
    assert sorted(seen) == sorted(c["id"] for c in rules()["checks"])
    assert all(v == {True, False} for v in seen.values()), seen


def test_measures_separate_what_they_should():
    m = {name: quality.measure_image(Image.fromarray(a)) for name, a in photos()}
    assert m["black frame"]["mean_luma"] == 0 and m["black frame"]["dark_share"] == 1.0
    assert m["white frame"]["clipped_share"] == 1.0
    assert m["black frame"]["sharpness"] == 0 == m["white frame"]["sharpness"]
    assert m["smooth lesion, no texture"]["sharpness"] < 1.5 < 3.0 < m[
        "smooth lesion with grain"]["sharpness"]
    assert m["noise above the cap"]["side"] == 450  # the square's side, not the reduced one
    assert quality.gate_image(Image.fromarray(photos()[2][1])).shape == (225, 225)
    assert quality.gate_image(Image.fromarray(photos()[3][1])).shape == (61, 61)  # no upscale
    # a k x k block mean of Pillow's luma, rounded half up
    a = photos()[2][1]
    y = np.asarray(Image.fromarray(a).convert("L"), np.int64)[:450, 75:525]
    want = (y.reshape(225, 2, 225, 2).sum(axis=(1, 3)) + 2) // 4
    np.testing.assert_array_equal(quality.gate_image(Image.fromarray(a)), want)


def test_refusal_message_says_what_to_change_once():
    black = dict(DECISIONS[5][1])
    out = gate_for({}, True).decide(black)
    assert not out.passed and out.codes == ["too_dark", "blurry"]
    assert out.message == ("Retake the photo: too dark: more light; too blurry: hold still"
                           " and refocus.")
    text = {c.id: c.text for c in out.checks}
    assert text["too_dark"] == "too dark: more light (mean brightness 0.00 of 255 is below 40.00)"
    assert gate_for({}, True).decide({**GOOD, "ood": 0.91}).message == (
        "Retake the photo: this does not look like a dermoscopy photo of a skin lesion:"
        " photograph the lesion through the dermatoscope.")
    off = gate_for({}, False).decide(black)
    assert off.passed and not off.enabled and off.message == OFF_MESSAGE and off.checks == ()


def test_thresholds_come_from_card_then_policy():
    card = {"gate": {"thresholds": {"sharpness_min": 2.5, "ood_max": 0.7}}}
    g = Gate.for_tier(card, {"ood_max": 0.8}, has_ood=True, image_size=224)
    assert g.thresholds["sharpness_min"] == 2.5 and g.source["sharpness_min"] == "card"
    assert g.thresholds["ood_max"] == 0.8 and g.source["ood_max"] == "policy"
    assert g.thresholds["min_side"] == 224 and g.source["min_side"] == "default"
    old = Gate.for_tier({}, {}, has_ood=False, image_size=64)
    assert old.thresholds["ood_max"] is None and "Quality checks only" in old.note
    with pytest.raises(PolicyError, match=r"unknown threshold 'sharpnes_min'.*Did you mean"
                                          r" 'sharpness_min'"):
        Gate.for_tier(card, {"sharpnes_min": 3}, has_ood=True, image_size=224)


def test_policy_identity_covers_the_gate_table_and_overrides():
    assert rule_tables()["gate_rules"] == rules()
    assert Policy(gate={"ood_max": 0.5}).sha256 != Policy().sha256
