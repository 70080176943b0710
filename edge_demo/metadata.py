"""Optional patient metadata on a request (age, sex, body site) and the bundle's tables.

A bundle whose card has ``metadata_prior`` (``trainer metadata``, docs/ARTIFACTS.md) carries
naive-Bayes tables of ``log p(value | diagnosis)``; a case with metadata gets the tier's
probabilities multiplied by its likelihood ratio (raised to the card's ``weight``), the
melanoma odds by ``p(meta | mel) / p(meta | not mel)``, and the melanoma threshold chosen for
those updated probabilities. This is the consumer side of the card contract, as a phone app
would implement it: numbers from the card, no training code (the demo never imports trainer).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from dermedge.labels import MELANOMA_DX

from .errors import RequestError

FIELDS = ("age", "sex", "site")
SEXES = ("male", "female")
MAX_SITE_CHARS = 60
_UNKNOWN = {"", "unknown", "nan", "none", "null", "n/a", "na"}


def parse(form: Mapping[str, Any]) -> dict[str, Any] | None:
    """``{"age", "sex", "site"}`` from request fields (blank = not given); None when none is
    given. Raises a 400 ``bad_metadata`` error that names the field and what it accepts."""
    out: dict[str, Any] = {}
    age = str(form.get("age") or "").strip()
    if age:
        try:
            value = float(age)
        except ValueError:
            value = float("nan")
        if not (math.isfinite(value) and 0 <= value <= 120):
            raise RequestError(f"The field 'age' must be a number of years from 0 to 120 (or "
                               f"left out); received {age[:20]!r}.", code="bad_metadata")
        out["age"] = value
    sex = " ".join(str(form.get("sex") or "").lower().split())
    if sex and sex not in _UNKNOWN:
        if sex not in SEXES:
            raise RequestError(f"The field 'sex' must be one of {', '.join(SEXES)} (or left "
                               f"out); received {sex[:20]!r}.", code="bad_metadata")
        out["sex"] = sex
    site = " ".join(str(form.get("site") or "").lower().split())
    if site and site not in _UNKNOWN:
        if len(site) > MAX_SITE_CHARS or not site.replace(" ", "").replace("/", "").isalpha():
            raise RequestError(f"The field 'site' must be a body site in words, e.g. 'back' or "
                               f"'lower extremity' (at most {MAX_SITE_CHARS} letters); "
                               f"received {site[:20]!r}.", code="bad_metadata")
        out["site"] = site
    return out or None


def _key(prior: Mapping[str, Any], field: str, value: Any) -> str | None:
    if field != "age":
        return value
    years = int(prior.get("age_bins", {}).get("years", 10))
    last = int(str(prior.get("age_bins", {}).get("last", "80+")).rstrip("+"))
    lo = min(int(value // years) * years, last)
    return f"{lo}+" if lo == last else f"{lo}-{lo + years - 1}"


def adjust(answer: dict[str, Any], prior: Mapping[str, Any],
           meta: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The tier ``answer`` updated by ``meta``, and the fields the tables knew (none: the
    answer is returned unchanged)."""
    labels = list(prior["labels"])
    ll = [0.0] * len(labels)
    used = []
    for field, spec in prior["fields"].items():
        if meta.get(field) is None:
            continue
        key = _key(prior, field, meta[field])
        if key in spec["values"]:
            row = spec["log_likelihood"][spec["values"].index(key)]
            ll = [a + float(b) for a, b in zip(ll, row, strict=True)]
            used.append(field)
    if not used:
        return answer, []
    w = float(prior["weight"])
    logp = [math.log(max(float(answer["diagnosis"][lab]), 1e-12)) + w * v
            for lab, v in zip(labels, ll, strict=True)]
    top = max(logp)
    z = sum(math.exp(v - top) for v in logp)
    diagnosis = {lab: math.exp(v - top) / z for lab, v in zip(labels, logp, strict=True)}
    mel = labels.index(MELANOMA_DX)
    pi = [float(p) for p in prior["class_prior"]]
    rest = sum(p for i, p in enumerate(pi) if i != mel)
    not_mel = sum(math.exp(v) * p / rest for i, (v, p) in enumerate(zip(ll, pi, strict=True))
                  if i != mel)
    p = min(max(float(answer["melanoma"]), 1e-12), 1 - 1e-12)
    logit = math.log(p / (1 - p)) + w * (ll[mel] - math.log(not_mel))
    best = max(diagnosis, key=diagnosis.__getitem__)
    return {**answer, "melanoma": 1.0 / (1.0 + math.exp(-logit)), "diagnosis": diagnosis,
            "top": {"label": best, "probability": diagnosis[best]},
            "image_only": {"melanoma": answer["melanoma"], "top": answer["top"]},
            "metadata_used": used}, used


def tables(card: Mapping[str, Any]) -> dict[str, Any] | None:
    """The card's tables when they are usable here (HAM10000 labels with melanoma)."""
    prior = card.get("metadata_prior")
    if not isinstance(prior, Mapping) or MELANOMA_DX not in prior.get("labels", ()):
        return None
    return dict(prior)


def choices(card: Mapping[str, Any]) -> list[str]:
    """The body sites a card's tables know, for the page's list."""
    prior = tables(card) or {}
    return list(prior.get("fields", {}).get("site", {}).get("values", []))
