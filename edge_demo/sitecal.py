"""A site's own operating point: ``edge-demo calibrate --cases DIR``.

The policy calibrated on the developers' validation split promises rates that need not hold
at a new site (other cameras, other patients). This module refits it on the site's labelled
cases from its case log:

* **Both tiers on kept photos** (``--cloud`` given and photos kept with consent): both tiers
  run again on every labelled case with a photo; per tier and head a temperature is fitted
  and kept where it lowers the cross-validated log-loss; the fallback rules are searched for
  the target fallback rate; then the referral threshold.
* **Device answers only** (no kept photos, or no ``--cloud``): the logged answers are
  replayed under the base policy (the one the cases were logged under) and only the referral
  threshold is refitted: new fallback rules would need cloud answers on cases the cloud
  never saw.

The referral threshold promises melanoma sensitivity >= the target *with 95 % confidence*:
with the threshold at the k-th lowest melanoma score of n, the miss rate at the site is
Beta(k, n + 1 - k) distributed whatever the scores' distribution (order statistics), so the
highest k with P(miss <= 1 - target) >= 0.95 is chosen. When even k = 1 does not reach it, the
sample cannot support the target: the conservative policy is kept and the message says how
many more labelled melanomas are needed (29 in all for 0.9, 59 for 0.95). Every promised rate
carries a 95 % interval for the sample's size; the policy file records the provenance (site,
sample size, melanomas, dates, intervals, how the labelled cases were chosen).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dermedge.metrics import wilson

from . import __version__
from . import temperature as temp
from .calibrate import Sample, _search
from .caselog import DIAGNOSES, CaseLog
from .errors import CalibrationError
from .policy import REFER, TIERS, Policy

CONFIDENCE = 0.95
RETAKE = "retake"


# --- order statistics ------------------------------------------------------------------
def _log_pmf(n: int, p: float, j: int) -> float:
    if p <= 0.0:
        return 0.0 if j == 0 else -math.inf
    if p >= 1.0:
        return 0.0 if j == n else -math.inf
    return (math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1)
            + j * math.log(p) + (n - j) * math.log1p(-p))


def binom_sf(n: int, p: float, k: int) -> float:
    """P(Binomial(n, p) >= k)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    return min(1.0, math.fsum(math.exp(_log_pmf(n, p, j)) for j in range(k, n + 1)))


def beta_cdf(x: float, a: int, b: int) -> float:
    """The regularized incomplete beta I_x(a, b) for whole a, b >= 1."""
    return binom_sf(a + b - 1, x, a)


def beta_ppf(q: float, a: int, b: int) -> float:
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if beta_cdf(mid, a, b) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def melanomas_needed(target: float, confidence: float = CONFIDENCE) -> int:
    """The fewest labelled melanomas that can bound sensitivity >= ``target`` (all referred)."""
    return math.ceil(math.log(1.0 - confidence) / math.log(target) - 1e-12)


def sensitivity_threshold(scores: Sequence[float], target: float,
                          confidence: float = CONFIDENCE) -> dict[str, Any]:
    """The highest referral threshold whose melanoma sensitivity is >= ``target`` with
    ``confidence``, from the melanoma cases' scores (inf: referred by another rule anyway).

    Returns ``{"threshold" (None: not supported), "k", "n", "interval", "point"}``."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    n = int(s.size)
    out: dict[str, Any] = {"n": n, "needed": melanomas_needed(target, confidence),
                           "threshold": None, "k": 0, "interval": None, "point": None}
    # The miss rate at the k-th lowest score is Beta(k, n + 1 - k): P(miss <= 1 - target) =
    # P(Binomial(n, 1 - target) >= k), which falls as k grows; the highest k that keeps it
    # >= confidence is the highest threshold.
    pmf = [math.exp(_log_pmf(n, 1.0 - target, j)) for j in range(n + 1)]
    best, tail = 0, 0.0
    for k in range(n, 0, -1):
        tail += pmf[k]
        if tail >= confidence:
            best = k
            break
    if best == 0:
        return out
    t = s[best - 1]
    thr = 1.0 if not math.isfinite(t) else float(math.floor(t * 1e6) / 1e6)
    lo_m, hi_m = beta_ppf(0.025, best, n + 1 - best), beta_ppf(0.975, best, n + 1 - best)
    out.update(threshold=thr, k=best, interval=[1.0 - hi_m, 1.0 - lo_m],
               point=float(np.mean(s >= thr)))
    return out


# --- the site's labelled cases -----------------------------------------------------------
@dataclass(frozen=True)
class SiteCase:
    case_id: str
    code: str
    dx: str  # one of the 7 classes, or "other"
    device: dict[str, Any]  # the device model's output as logged (before temperature)
    cloud: dict[str, Any] | None
    photo: Path | None
    created_at: str
    label_date: str
    label_source: str
    decision: str
    site_id: str | None


@dataclass
class SiteData:
    """The case log's cases for a site: the labelled ones and how they were chosen."""

    cases: list[SiteCase]
    n_logged: int
    by_decision: dict[str, dict[str, int]]  # decision -> {"cases", "labelled"}
    sites: list[str]
    gate_refused: int
    sources: dict[str, int] = field(default_factory=dict)


def _answer(raw: dict[str, Any] | None) -> dict[str, Any] | None:
    if not raw:
        return None
    diag = {k: float(v) for k, v in raw["diagnosis"].items()}
    top = max(diag, key=diag.__getitem__)
    return {"melanoma": float(raw["melanoma"]), "diagnosis": diag,
            "top": {"label": top, "probability": diag[top]}, "latency_ms": 0.0}


def site_data(log: CaseLog, site_id: str | None = None) -> SiteData:
    rows = [r for r in log.cases() if site_id is None or r.get("site_id") == site_id]
    if not rows:
        where = f" for site {site_id!r}" if site_id else ""
        raise CalibrationError(f"The case log {log.path} holds no cases{where}.")
    by: dict[str, dict[str, int]] = {}
    cases, sources = [], {}
    for r in rows:
        d = by.setdefault(r["decision"], {"cases": 0, "labelled": 0})
        d["cases"] += 1
        if r.get("label_diagnosis") is None:
            continue
        d["labelled"] += 1
        sources[r["label_source"]] = sources.get(r["label_source"], 0) + 1
        if r["decision"] == RETAKE or not r.get("device_raw"):
            continue  # the gate refused the photo: no decision to calibrate
        cases.append(SiteCase(
            r["id"], r["code"], r["label_diagnosis"], _answer(r["device_raw"]),
            _answer(r.get("cloud_raw")), log.photos / r["photo"] if r.get("photo") else None,
            r["created_at"], r["label_date"], r["label_source"], r["decision"],
            r.get("site_id")))
    return SiteData(cases, len(rows), by, sorted({r["site_id"] for r in rows if r.get("site_id")}),
                    by.get(RETAKE, {}).get("cases", 0), sources)


def verification(data: SiteData) -> dict[str, Any]:
    """How the labelled cases were chosen, and the verification-bias warning."""
    ref, rest = data.by_decision.get(REFER, {}), data.by_decision.get("no_action", {})
    f_ref = ref.get("labelled", 0) / ref["cases"] if ref.get("cases") else None
    f_rest = rest.get("labelled", 0) / rest["cases"] if rest.get("cases") else None
    biased = (f_ref is not None and (f_rest is None or f_rest == 0
                                     or f_ref > 1.5 * f_rest or f_rest > 1.5 * f_ref))
    text = ("Labelled: " + (f"{f_ref:.0%} of the {ref['cases']} referred cases"
                            if f_ref is not None else "no referred cases") + " and "
            + (f"{f_rest:.0%} of the {rest['cases']} not referred" if f_rest is not None
               else "no cases that were not referred") + ".")
    if biased:
        text += (" Labels follow the referral (verification bias): melanomas among the"
                 " not-referred cases are under-counted, so sensitivity is overestimated and"
                 " specificity misestimated. Label a random sample of the not-referred cases"
                 " too (e.g. by follow-up).")
    else:
        text += (" Referred and not-referred cases were labelled at similar rates; the"
                 " estimates still assume the labelled cases are like the unlabelled ones.")
    return {"labelled_share_referred": f_ref, "labelled_share_not_referred": f_rest,
            "warning": bool(biased), "text": text, "sources": data.sources}


# --- answers and replay ------------------------------------------------------------------
def results_from_cases(cases: Sequence[SiteCase], device=None, cloud=None
                       ) -> tuple[list[dict[str, Any]], str]:
    """The calibration results and their mode: ``both tiers`` (both tiers re-run on the kept
    photos) when ``cloud`` is given and some labelled case has one, else ``device only``
    (the logged answers)."""
    from .imaging import load_path

    with_photo = [c for c in cases if c.photo is not None and c.photo.is_file()]
    if cloud is not None and device is not None and with_photo:
        out = []
        for c in with_photo:
            out.append({"sample": Sample(c.code, c.photo, c.dx),
                        "device": device.predict(load_path(c.photo, device.image_size)),
                        "cloud": cloud.predict(load_path(c.photo, cloud.image_size))})
        return out, "both tiers"
    return [{"sample": Sample(c.code, c.photo or Path(), c.dx), "device": c.device,
             "cloud": c.cloud} for c in cases], "device only"


def scaled(results: Sequence[dict[str, Any]], temps: dict[str, dict[str, float]]
           ) -> list[dict[str, Any]]:
    return [{**r, "device": temp.apply(r["device"], temps.get("device")),
             "cloud": None if r.get("cloud") is None else temp.apply(r["cloud"],
                                                                     temps.get("cloud"))}
            for r in results]


def fit_temperatures(results: Sequence[dict[str, Any]], tiers: Sequence[str]
                     ) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """Per tier and head, the temperature where it lowers the cross-validated log-loss."""
    temps: dict[str, dict[str, float]] = {}
    details: dict[str, Any] = {}
    for tier in tiers:
        rows = [r for r in results if r.get(tier) is not None]
        mel = fit_one = None
        if rows:
            mel = temp.fit([r[tier]["melanoma"] for r in rows],
                           [r["sample"].dx == "mel" for r in rows], binary=True)
            known = [r for r in rows if r["sample"].dx in DIAGNOSES]
            labels = list(rows[0][tier]["diagnosis"])
            if known and set(labels) >= set(DIAGNOSES):
                fit_one = temp.fit([[r[tier]["diagnosis"][lab] for lab in labels]
                                    for r in known],
                                   [labels.index(r["sample"].dx) for r in known], binary=False)
        details[tier] = {"melanoma": mel, "diagnosis": fit_one}
        chosen = {h: d["t"] for h, d in (("melanoma", mel), ("diagnosis", fit_one))
                  if d is not None and d["adopted"]}
        if chosen:
            temps[tier] = chosen
    return temps, details


def replay(policy: Policy, results: Sequence[dict[str, Any]],
           weights: Sequence[float] | None = None) -> dict[str, Any]:
    """The policy on (already temperature-scaled) answers: rates, weighted when given."""
    n = len(results)
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    fell, refer, mel = np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, bool)
    for i, r in enumerate(results):
        d = policy.decide(r["device"], r.get("cloud"))
        fell[i] = d.wants_fallback
        refer[i] = d.decision == REFER
        mel[i] = r["sample"].dx == "mel"

    def share(mask, of):
        tot = w[of].sum()
        return float(w[mask & of].sum() / tot) if tot > 0 else None

    every = np.ones(n, bool)
    return {"n": n, "n_melanoma": int(mel.sum()), "n_not_melanoma": int((~mel).sum()),
            "fallback_rate": share(fell, every), "referral_rate": share(refer, every),
            "melanoma_sensitivity": share(refer, mel),
            "melanoma_specificity": share(~refer, ~mel),
            "_counts": {"fallback": int(fell.sum()), "referral": int(refer.sum()),
                        "mel_referred": int((refer & mel).sum()),
                        "not_mel_kept": int((~refer & ~mel).sum())}}


# --- the calibration ---------------------------------------------------------------------
@dataclass
class SiteCalibration:
    policy: Policy
    refused: bool
    message: str
    promise: dict[str, Any]
    details: dict[str, Any]


def _other_rules(policy: Policy, r: dict[str, Any]) -> bool:
    """Whether a referral rule other than the melanoma threshold refers this case."""
    d = policy.decide(r["device"], r.get("cloud"))
    return any(c.fired and c.id != "melanoma_risk" for c in d.advice_checks)


def calibrate_site(results: Sequence[dict[str, Any]], *, device_threshold: float,
                   conservative: Policy, base: Policy | None = None,
                   target_fallback: float = 0.2, target_sensitivity: float = 0.9,
                   refit_fallback: bool = True, fit_temperature: bool = True,
                   confidence: float = CONFIDENCE) -> SiteCalibration:
    """Fit the site's policy on its labelled ``results`` (tier answers before temperature).

    ``refit_fallback`` (both tiers on every case): temperatures and the fallback rules are
    refitted; otherwise ``base`` keeps its fallback rules and temperatures and only the
    referral threshold moves. ``conservative`` is what stays when the sample cannot support
    ``target_sensitivity``."""
    if not 0.0 < target_sensitivity < 1.0:
        raise CalibrationError(f"--target-sensitivity must be in (0, 1); received"
                               f" {target_sensitivity}.")
    if not 0.0 <= target_fallback <= 1.0:
        raise CalibrationError(f"--target-fallback must be in [0, 1]; received"
                               f" {target_fallback}.")
    base = base or conservative
    if not results:
        raise CalibrationError("No labelled cases to calibrate on: enter reference diagnoses"
                               " on /cases or with `edge-demo cases import labels.csv`.")
    details: dict[str, Any] = {}
    if refit_fallback:
        if any(r.get("cloud") is None for r in results):
            raise CalibrationError("Refitting the fallback rules needs both tiers' answers on"
                                   " every case.")
        temps, details["temperature_fit"] = (fit_temperatures(results, TIERS)
                                             if fit_temperature else ({}, {}))
        pol0 = dataclasses.replace(base, temperature=temps, source="calibrated")
        scaled_results = scaled(results, temps)
        centre = temp.scale_probability(device_threshold,
                                        temps.get("device", {}).get("melanoma", 1.0))
        pol1, _ = _search(scaled_results, None, True, target_fallback, pol0, centre=centre)
    else:
        pol1 = dataclasses.replace(base, source="calibrated")
        scaled_results = scaled(results, dict(base.temperature))
    mel_scores = []
    for r in scaled_results:
        if r["sample"].dx != "mel":
            continue
        if _other_rules(dataclasses.replace(pol1, refer_threshold=1.0), r):
            mel_scores.append(math.inf)
        else:
            d = pol1.decide(r["device"], r.get("cloud"), device_threshold=0.5)
            final = r["cloud"] if d.decided_by == "cloud" else r["device"]
            mel_scores.append(float(final["melanoma"]))
    sens = sensitivity_threshold(mel_scores, target_sensitivity, confidence)
    details["sensitivity"] = sens
    n_mel = sens["n"]
    if sens["threshold"] is None:
        more = sens["needed"] - n_mel
        message = (f"The sample cannot support the target: it holds {n_mel} labelled"
                   f" melanoma{'s' if n_mel != 1 else ''}, and bounding a melanoma sensitivity"
                   f" of {target_sensitivity:.2f} with {confidence:.0%} confidence needs at"
                   f" least {sens['needed']}, even if every one is referred. Label"
                   f" {more} more melanoma{'s' if more != 1 else ''} (or lower"
                   " --target-sensitivity). The conservative policy is kept.")
        return SiteCalibration(conservative, True, message, {}, details)
    policy = dataclasses.replace(pol1, refer_threshold=sens["threshold"])
    got = replay(policy, scaled_results)
    c = got["_counts"]
    n, n_not = got["n"], got["n_not_melanoma"]
    promise = {
        "n": n, "n_melanoma": n_mel, "n_not_melanoma": n_not,
        "fallback_rate": got["fallback_rate"], "fallback_rate_ci": wilson(c["fallback"], n),
        "referral_rate": got["referral_rate"], "referral_rate_ci": wilson(c["referral"], n),
        "melanoma_sensitivity": got["melanoma_sensitivity"],
        "melanoma_sensitivity_ci": sens["interval"],
        "melanoma_sensitivity_bound": target_sensitivity,
        "melanoma_specificity": got["melanoma_specificity"],
        "melanoma_specificity_ci": wilson(c["not_mel_kept"], n_not) if n_not else None,
    }
    message = (f"Referral threshold {policy.refer_threshold:.4f}: melanoma sensitivity >="
               f" {target_sensitivity:.2f} with {confidence:.0%} confidence ({n_mel}"
               " labelled melanomas).")
    return SiteCalibration(policy, False, message, promise, details)


def site_policy(cal: SiteCalibration, data: SiteData, *, mode: str, n_used: int,
                target_fallback: float, target_sensitivity: float, site_id: str | None,
                base: Policy, verification_info: dict[str, Any],
                excluded: dict[str, int]) -> Policy:
    """The policy file to write: the calibration with its promise (as the page's coverage
    row) and its provenance."""
    dates = sorted(c.created_at for c in data.cases)
    label_dates = sorted(c.label_date for c in data.cases)
    prov = {
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "edge_demo": __version__, "calibrated_on": "site cases",
        "site": site_id or ", ".join(data.sites) or None, "split": "site cases",
        "mode": mode, "refused": cal.refused, "message": cal.message,
        "target_fallback": target_fallback, "target_sensitivity": target_sensitivity,
        "confidence": CONFIDENCE, "n_cases_logged": data.n_logged,
        "n_labelled": len(data.cases), "n_used": n_used,
        "n_melanoma": cal.details.get("sensitivity", {}).get("n"),
        "melanomas_needed": cal.details.get("sensitivity", {}).get("needed"),
        "excluded": excluded,
        "case_dates": [dates[0], dates[-1]] if dates else None,
        "label_dates": [label_dates[0], label_dates[-1]] if label_dates else None,
        "gate_refused": data.gate_refused,
        "gate_rate": data.gate_refused / data.n_logged if data.n_logged else None,
        "gate_rate_ci": wilson(data.gate_refused, data.n_logged),
        "verification": verification_info, "base_policy_sha256": base.sha256,
        "promise": cal.promise, "temperature_fit": cal.details.get("temperature_fit"),
    }
    coverage = () if cal.refused else (
        {"chosen": True, "target_fallback": target_fallback, **cal.promise},)
    return dataclasses.replace(cal.policy, source="calibrated" if not cal.refused
                               else "defaults", coverage=coverage, provenance=prov)
