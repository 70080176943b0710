"""One table of policy cases, run through the Python evaluator (edge_demo/policy.py) and the
page's JS evaluator (edge_demo/static/policy.js, in Node and in Chromium): every rule fires in
some case and stays quiet in another, and the texts must match to the character."""

from __future__ import annotations

from typing import Any

LABELS = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")


def answer(top: str, p_top: float, melanoma: float) -> dict[str, Any]:
    rest = (1.0 - p_top) / (len(LABELS) - 1)
    diagnosis = {lab: (p_top if lab == top else rest) for lab in LABELS}
    return {"melanoma": melanoma, "diagnosis": diagnosis,
            "top": {"label": top, "probability": p_top}, "latency_ms": 1.0}


BASE = {"min_confidence": 0.6, "mel_band_low": 0.15, "mel_band_high": 0.65,
        "second_opinion": True, "second_opinion_above": 0.65, "cloud_min_confidence": 0.5,
        "refer_threshold": 0.3, "malignant_classes": ["mel", "bcc", "akiec"],
        "malignant_min_prob": 0.5}

# (name, policy overrides, device answer, cloud answer or None)
CASES: list[tuple[str, dict[str, Any], dict[str, Any], dict[str, Any] | None]] = [
    ("confident benign", {}, answer("nv", 0.92, 0.05), None),
    ("low confidence", {}, answer("bkl", 0.41, 0.05), answer("bkl", 0.7, 0.05)),
    ("in the melanoma band", {}, answer("nv", 0.8, 0.4), answer("nv", 0.8, 0.1)),
    ("band edges are inside", {}, answer("nv", 0.8, 0.15), answer("nv", 0.8, 0.1)),
    ("second opinion", {"mel_band_high": 0.6}, answer("mel", 0.9, 0.7),
     answer("mel", 0.9, 0.8)),
    ("second opinion off", {"second_opinion": False, "mel_band_low": None,
                            "mel_band_high": None}, answer("mel", 0.9, 0.9), None),
    ("threshold equal is not below", {"min_confidence": 0.92}, answer("nv", 0.92, 0.01),
     None),
    ("cloud unsure", {}, answer("bkl", 0.3, 0.05), answer("df", 0.35, 0.05)),
    ("fallback without a cloud answer", {}, answer("bkl", 0.3, 0.05), None),
    ("malignant top", {"mel_band_low": None, "mel_band_high": None, "second_opinion": False},
     answer("bcc", 0.75, 0.1), None),
    ("malignant class below its probability", {"malignant_min_prob": 0.8},
     answer("bcc", 0.75, 0.1), None),
    ("rounding: a tie in binary rounds up", {"min_confidence": 0.125},
     answer("nv", 0.625, 0.375), None),
    ("close to a threshold: more decimals", {"refer_threshold": 0.3, "min_confidence": 0.5},
     answer("nv", 0.5004, 0.2996), None),
    ("zero band is a band", {"mel_band_low": 0.0, "mel_band_high": 0.0},
     answer("nv", 0.99, 0.0), None),
    ("everything at once", {"refer_threshold": 0.01, "malignant_min_prob": 0.0},
     answer("mel", 0.2, 0.5), answer("mel", 0.4, 0.5)),
]


def contexts(policy: dict[str, Any], device: dict[str, Any],
             cloud: dict[str, Any] | None, wants: bool) -> list[tuple[dict, dict]]:
    """(answer, params) pairs for the advice stage, as Policy.decide builds them."""
    use_cloud = wants and cloud is not None
    final = cloud if use_cloud else device
    return [(final, {**policy, "cloud_used": use_cloud,
                     "fallback_unanswered": wants and not use_cloud})]


# --- the complete answer on the phone (static/answer.js + metadata.js vs browser.decide) ----
# A device answer as the page computes it (photo alone): a full distribution over LABELS.
def photo_answer(probs: tuple[float, ...], melanoma: float) -> dict[str, Any]:
    diagnosis = dict(zip(LABELS, probs, strict=True))
    top = max(diagnosis, key=diagnosis.__getitem__)
    return {"melanoma": melanoma, "diagnosis": diagnosis,
            "top": {"label": top, "probability": diagnosis[top]}, "latency_ms": 12.5,
            "computed_on": "browser"}


NO_BAND = {"mel_band_low": None, "mel_band_high": None}
QUIET = {**NO_BAND, "min_confidence": 0.0, "second_opinion": False, "refer_threshold": None}
NV = (0.02, 0.03, 0.05, 0.01, 0.08, 0.80, 0.01)
UNSURE = (0.10, 0.15, 0.30, 0.05, 0.20, 0.18, 0.02)
BCC = (0.05, 0.62, 0.10, 0.03, 0.10, 0.08, 0.02)

# (name, policy overrides, device answer, patient fields as typed (or None), the device card
#  has metadata tables, a cloud tier is configured, the tester asked for the cloud)
ANSWER_CASES: list[tuple[str, dict[str, Any], dict[str, Any], dict[str, str] | None, bool,
                         bool, bool]] = [
    ("photo alone, confident", QUIET, photo_answer(NV, 0.04), None, True, True, False),
    ("details move melanoma up: tables' threshold", QUIET, photo_answer(NV, 0.2),
     {"age": "75", "sex": "female", "site": "face"}, True, True, False),
    ("details into the second-opinion rule, cloud configured", {**QUIET, "second_opinion": True,
     "second_opinion_above": 0.5}, photo_answer(NV, 0.3),
     {"age": "74", "sex": "Female ", "site": " FACE"}, True, True, False),
    ("details into a fallback, no cloud tier", {**QUIET, "second_opinion": True,
     "second_opinion_above": 0.5}, photo_answer(NV, 0.3),
     {"age": "79.5", "sex": "female", "site": "face"}, True, False, False),
    ("details that push towards nevus", {"min_confidence": 0.6, "refer_threshold": None},
     photo_answer(UNSURE, 0.12), {"age": "35", "sex": "male", "site": "back"}, True, True,
     False),
    ("only unknown values: photo alone", QUIET, photo_answer(NV, 0.2),
     {"age": "95", "site": "ear", "sex": "unknown"}, True, True, False),
    ("details but no tables on the card", QUIET, photo_answer(NV, 0.2),
     {"age": "75", "site": "face"}, False, True, False),
    ("low confidence, no details", {}, photo_answer(UNSURE, 0.1), None, True, True, False),
    ("malignant top, asked for the cloud", {**QUIET, "malignant_min_prob": 0.6},
     photo_answer(BCC, 0.1), {"sex": "male"}, True, True, True),
    ("in the band with a set refer threshold", {"refer_threshold": 0.25},
     photo_answer(NV, 0.5), {"age": "0", "site": "scalp"}, True, True, False),
    ("near the threshold: more decimals", {**QUIET, "refer_threshold": 0.3},
     photo_answer(NV, 0.2996), None, True, True, False),
    # the policy's temperature first (static/temperature.js), then the tables; the card's
    # threshold and the tables' are mapped through the melanoma temperature
    ("temperature sharpens a low confidence away", {**QUIET, "min_confidence": 0.85,
     "temperature": {"device": {"melanoma": 0.7, "diagnosis": 0.5}}}, photo_answer(NV, 0.2),
     None, True, True, False),
    ("temperature, then the details", {**QUIET, "temperature": {"device": {"melanoma": 1.6}}},
     photo_answer(NV, 0.2), {"age": "75", "sex": "female", "site": "face"}, True, True, False),
]

# Patient fields as a form sends them: what parse() keeps, or the 400 message it gives.
FORMS: list[dict[str, str]] = [
    {}, {"age": "", "sex": "", "site": ""}, {"age": " 63 "}, {"age": "0"}, {"age": "120"},
    {"age": "12.5", "sex": "MALE", "site": "Lower   Extremity"}, {"sex": "n/a", "site": "None"},
    {"site": "back/upper"}, {"age": "121"}, {"age": "-1"}, {"age": "sixty"},
    {"age": "1" * 30}, {"sex": "other"}, {"site": "face1"}, {"site": "a" * 61},
]

# Probabilities after the metadata update: Python's libm and V8's exp/log may differ in the
# last bit, so the two sides agree to this absolute tolerance (texts to the character).
PROB_TOL = 1e-12


class CardTier:
    """What DemoService.respond and browser.policy_body read of a tier (card, threshold,
    summary): deciding never touches the model itself."""

    def __init__(self, name: str, prior: dict[str, Any] | None, threshold: float = 0.31):
        self.name, self.melanoma_threshold = name, threshold
        self.card = {"name": name, **({"metadata_prior": prior} if prior else {})}

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": "0" * 64, "mode": "int8", "bundle": self.name,
                "image_size": 32, "melanoma_threshold": self.melanoma_threshold,
                "validation_passed": True, "synthetic": True}


def answer_side() -> list[dict[str, Any]]:
    """Every case of ANSWER_CASES through the server's own code: the policy document the page
    reads, and the body POST /api/v1/decide returns when no photo arrives."""
    import json

    from demo_fixtures import demo_prior

    from edge_demo import browser, metadata
    from edge_demo.policy import Policy
    from edge_demo.service import DemoService

    prior = demo_prior()
    out = []
    for name, over, answer, form, has_tables, has_cloud, ask in ANSWER_CASES:
        svc = DemoService(CardTier("tiny-int8", prior if has_tables else None),
                          CardTier("tiny-float32", None, 0.4) if has_cloud else None,
                          Policy(**{**BASE, **over}))
        meta = metadata.parse(form or {})
        body = browser.decide(svc, answer, None, meta, ask_cloud=ask)
        body.pop("timings_ms")
        out.append({"name": name, "doc": json.loads(json.dumps(browser.policy_body(svc))),
                    "answer": answer, "form": form, "ask": ask,
                    "body": json.loads(json.dumps(body))})
    return out


def form_side() -> list[dict[str, Any]]:
    """FORMS through metadata.parse: the fields kept, or the error message."""
    from edge_demo import metadata
    from edge_demo.errors import RequestError

    out = []
    for form in FORMS:
        try:
            out.append({"meta": metadata.parse(form)})
        except RequestError as exc:
            out.append({"error": str(exc)})
    return out


def assert_same(js: Any, py: Any, where: str = "") -> None:
    """Equal JSON trees: strings and flags exactly, numbers within PROB_TOL."""
    if isinstance(py, dict):
        assert isinstance(js, dict) and sorted(js) == sorted(py), (where, js, py)
        for k in py:
            assert_same(js[k], py[k], f"{where}.{k}")
    elif isinstance(py, list):
        assert isinstance(js, list) and len(js) == len(py), (where, js, py)
        for i, (a, b) in enumerate(zip(js, py, strict=True)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(py, float | int) and not isinstance(py, bool):
        assert isinstance(js, float | int) and not isinstance(js, bool), (where, js, py)
        assert abs(js - py) <= PROB_TOL, (where, js, py)
    else:
        assert js == py, (where, js, py)
