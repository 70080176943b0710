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
