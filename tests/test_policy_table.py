"""The policy's one source of truth: the Python and JS evaluators agree on a table of cases.

Needs ``node`` (Debian package nodejs); skips without it, and fails under CI=true.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from ci import unavailable
from policy_table import (
    ANSWER_CASES,
    BASE,
    CASES,
    FORMS,
    answer_side,
    assert_same,
    contexts,
    form_side,
)

from edge_demo.errors import PolicyError
from edge_demo.policy import RULES_FILE, Policy, evaluate, rules

POLICY_JS = RULES_FILE.with_name("policy.js")
ANSWER_JS = RULES_FILE.with_name("answer.js")
METADATA_JS = RULES_FILE.with_name("metadata.js")


def _node() -> str:
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        msg = "node not found: install Debian nodejs (apt-get install nodejs) to run policy.js"
        unavailable(msg)
    return node


def _python_side():
    """Every check of every case, as the server computes it."""
    out = []
    for name, over, device, cloud in CASES:
        pol = Policy(**{**BASE, **over})
        params = pol.thresholds()
        d = pol.decide(device, cloud, device_threshold=0.5)
        assert [c.to_dict() for c in d.fallback_checks] == [
            c.to_dict() for c in (evaluate(r, device, params) for r in rules()["fallback"]) if c]
        out.append({"name": name, "params": params, "device": device,
                    "advice": [{"answer": a, "params": p}
                               for a, p in contexts(params, device, cloud, d.wants_fallback)],
                    "fallback": [c.to_dict() for c in d.fallback_checks],
                    "wanted": d.wants_fallback,
                    "advice_checks": [c.to_dict() for c in d.advice_checks]})
    return out


JS_DRIVER = r"""
const P = require(process.argv[1]);
const rules = JSON.parse(require("fs").readFileSync(process.argv[2], "utf8"));
const cases = JSON.parse(require("fs").readFileSync(0, "utf8"));
const out = cases.map((c) => {
  const fb = P.fallbackChecks(rules, c.params, c.device);
  const adv = c.advice.flatMap((a) => rules.advice.map((r) => P.evaluate(r, a.answer, a.params))
    .filter((x) => x));
  return { name: c.name, fallback: fb.checks, wanted: fb.wanted, advice_checks: adv };
});
process.stdout.write(JSON.stringify(out));
"""


def test_every_rule_fires_and_stays_quiet_somewhere():
    seen = {}
    for case in _python_side():
        for c in case["fallback"] + case["advice_checks"]:
            seen.setdefault(c["id"], set()).add(c["fired"])
    ids = [r["id"] for r in rules()["fallback"] + rules()["advice"]]
    assert sorted(seen) == sorted(ids)
    assert all(True in seen[i] for i in ids), seen
    assert all(False in seen[i] for i in ids if i != "fallback_unavailable"), seen


def test_js_evaluator_equals_python_on_the_table():
    py = _python_side()
    proc = subprocess.run([_node(), "-e", JS_DRIVER, str(POLICY_JS), str(RULES_FILE)],
                          input=json.dumps(py), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    js = json.loads(proc.stdout)
    assert len(js) == len(py) == len(CASES)
    for p, j in zip(py, js, strict=True):
        for key in ("fallback", "wanted", "advice_checks"):
            assert j[key] == p[key], (p["name"], key)


ANSWER_DRIVER = r"""
require(process.argv[1]);  // policy.js and metadata.js first, as the page loads them
require(process.argv[2]);
const A = require(process.argv[3]);
const M = globalThis.dermedgeMetadata;
const table = JSON.parse(require("fs").readFileSync(0, "utf8"));
const parsed = table.forms.map((f) => {
  try { return { meta: M.parse(f) }; } catch (e) { return { error: e.message }; }
});
const bodies = table.cases.map((c) => A.localDecide(c.doc, c.answer, M.parse(c.form || {}),
  c.ask));
process.stdout.write(JSON.stringify({ forms: parsed, bodies: bodies }));
"""


def node_answers(cases: list[dict], forms: list[dict]) -> dict:
    proc = subprocess.run([_node(), "-e", ANSWER_DRIVER, str(POLICY_JS), str(METADATA_JS),
                           str(ANSWER_JS)], input=json.dumps({"cases": cases, "forms": forms}),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_the_answer_table_covers_every_path():
    """Tables used and not, a fallback with and without a cloud tier, both advices, the
    tables' threshold and the card's, a parse error for each field."""
    bodies = [c["body"] for c in answer_side()]
    assert len(bodies) == len(ANSWER_CASES)
    assert {b["advice"]["decision"] for b in bodies} == {"refer", "no_action"}
    used = [b["device"].get("metadata_used") for b in bodies]
    assert ["age", "sex", "site"] in used and None in used
    reasons = " ".join(b["fallback"]["reason"] for b in bodies)
    assert "The photo was not sent" in reasons and "No cloud tier is configured" in reasons
    assert any(b["fallback"]["wanted"] for b in bodies if b["device"].get("metadata_used")) and \
        not any(c[2]["melanoma"] >= 0.5 for c in ANSWER_CASES[2:4])  # details moved it there
    assert any("0.42" in b["advice"]["message"] for b in bodies)  # the tables' threshold
    errors = [f["error"] for f in form_side() if "error" in f]
    assert {e.split("'")[1] for e in errors} == {"age", "sex", "site"}


def test_answer_js_equals_the_servers_decide_on_the_table():
    """answer.js + metadata.js in Node give the body of POST /api/v1/decide (no photo):
    texts to the character, probabilities within PROB_TOL; parse() keeps the same fields and
    gives the same 400 messages."""
    py = answer_side()
    js = node_answers(py, FORMS)
    for case, body in zip(py, js["bodies"], strict=True):
        assert_same(body, case["body"], case["name"])
    assert js["forms"] == form_side()


def test_check_texts_say_what_happened():
    pol = Policy(**BASE)
    d = pol.decide({"melanoma": 0.0, "top": {"label": "nv", "probability": 0.97},
                    "diagnosis": {}}, None)
    mel = next(c for c in d.advice_checks if c.id == "melanoma_risk")
    assert not mel.fired
    assert mel.text == "melanoma risk 0.00 is below the referral threshold 0.30"
    low = d.fallback_checks[0]
    assert low.text == ("top diagnosis 'nv' at 0.97 is at or above the confidence threshold"
                        " 0.60")
    no_band = Policy(**{**BASE, "mel_band_low": None, "mel_band_high": None})
    close = no_band.decide({"melanoma": 0.2996, "top": {"label": "nv", "probability": 0.9},
                            "diagnosis": {}}, None)
    mel = next(c for c in close.advice_checks if c.id == "melanoma_risk")
    assert mel.text == "melanoma risk 0.2996 is below the referral threshold 0.3000"
    assert "melanoma risk 0.2996 < 0.3000" in close.message
    assert "0.125" not in Policy(**{**BASE, "min_confidence": 0.125}).decide(
        {"melanoma": 0.0, "top": {"label": "nv", "probability": 0.5}, "diagnosis": {}},
        None).fallback_checks[0].text


@pytest.mark.parametrize("field, value, match", [
    ("malignant_classes", 5, r"malignant_classes must be a list of diagnosis labels.*"
                             r"received 5"),
    ("malignant_classes", "mel", "received 'mel'"),
    ("second_opinion", "yes", "second_opinion must be true or false"),
])
def test_bad_policy_fields_are_policy_errors(tmp_path, field, value, match):
    doc = Policy().to_dict()
    doc["policy"][field] = value
    (tmp_path / "p.json").write_text(json.dumps(doc))
    with pytest.raises(PolicyError, match=match):
        Policy.load(tmp_path / "p.json")
