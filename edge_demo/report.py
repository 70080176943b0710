"""The field report: ``edge-demo report --cases DIR --out report/`` (HTML with SVG plots, and
JSON), and its short version on the ``/cases`` page.

Rates are compared with the policy's promise through a **prediction interval for the number
of cases seen**: the promise is a rate measured on n0 calibration cases (k0 events), so the
count among the m cases seen here is beta-binomial (Jeffreys posterior Beta(k0 + 1/2,
n0 - k0 + 1/2)); the drift flag fires only when the observed count leaves its central 95 %.
No TensorFlow, no plotting library: the SVG is written here.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dermedge.files import write_text
from dermedge.metrics import wilson

from .caselog import CaseLog
from .errors import CalibrationError
from .policy import REFER, Policy
from .sitecal import RETAKE, site_data, verification

LEVEL = 0.95
RELIABILITY_BINS = (0.0, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0)


# --- the numbers -------------------------------------------------------------------------
def _betabinom_logpmf(x: int, m: int, a: float, b: float) -> float:
    lb = math.lgamma
    return (lb(m + 1) - lb(x + 1) - lb(m - x + 1) + lb(x + a) + lb(m - x + b) - lb(m + a + b)
            - (lb(a) + lb(b) - lb(a + b)))


def prediction_interval(k0: float, n0: float, m: int, level: float = LEVEL) -> list[int]:
    """The central ``level`` interval of the count of events among ``m`` new cases, for a
    rate measured as ``k0`` of ``n0`` (beta-binomial, Jeffreys prior)."""
    a, b = k0 + 0.5, n0 - k0 + 0.5
    pmf = np.exp([_betabinom_logpmf(x, m, a, b) for x in range(m + 1)])
    cdf = np.cumsum(pmf / pmf.sum())
    tail = (1.0 - level) / 2
    lo = int(np.searchsorted(cdf, tail, side="left"))
    hi = int(np.searchsorted(cdf, 1.0 - tail, side="left"))
    return [lo, min(hi, m)]


def _promise(policy: Policy) -> dict[str, tuple[float, int] | None]:
    """{rate: (promised rate, its sample size)} from the policy's calibration."""
    row = next((r for r in policy.coverage if r.get("chosen")), None) or {}
    prov = policy.provenance or {}
    out: dict[str, tuple[float, int] | None] = {"fallback": None, "referral": None,
                                                "gate": None}
    n = row.get("n")
    for key, name in (("fallback_rate", "fallback"), ("referral_rate", "referral")):
        if row.get(key) is not None and n:
            out[name] = (float(row[key]), int(n))
    if prov.get("gate_rate") is not None and prov.get("n_cases_logged"):
        out["gate"] = (float(prov["gate_rate"]), int(prov["n_cases_logged"]))
    return out


def _rate(k: int, n: int, promise: tuple[float, int] | None) -> dict[str, Any]:
    out: dict[str, Any] = {"k": k, "n": n, "observed": k / n if n else None,
                           "ci95": wilson(k, n), "promise": None, "promise_n": None,
                           "prediction_interval": None, "drift": None}
    if promise is not None and n:
        p0, n0 = promise
        lo, hi = prediction_interval(round(p0 * n0), n0, n)
        out.update(promise=p0, promise_n=n0, prediction_interval=[lo / n, hi / n],
                   prediction_counts=[lo, hi], drift=not lo <= k <= hi)
    return out


def _final_melanoma(row: dict[str, Any]) -> float | None:
    resp = row.get("response") or {}
    by = (resp.get("advice") or {}).get("decided_by")
    ans = resp.get("cloud") if by == "cloud" and resp.get("cloud") else resp.get("device")
    return None if not ans else float(ans["melanoma"])


def _reliability(probs: Sequence[float], truth: Sequence[bool]) -> dict[str, Any]:
    p, y = np.asarray(probs, float), np.asarray(truth, bool)
    bins, ece = [], 0.0
    edges = RELIABILITY_BINS
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        m = (p >= lo) & ((p < hi) if i < len(edges) - 2 else (p <= hi))
        k = int(m.sum())
        if k:
            obs = float(y[m].mean())
            ece += k / len(p) * abs(obs - float(p[m].mean()))
            bins.append({"lo": lo, "hi": hi, "n": k, "mean_p": float(p[m].mean()),
                         "observed": obs, "ci95": wilson(int(y[m].sum()), k)})
        else:
            bins.append({"lo": lo, "hi": hi, "n": 0, "mean_p": None, "observed": None,
                         "ci95": None})
    return {"bins": bins, "ece": ece if len(p) else None, "n": int(len(p))}


def field_report(log: CaseLog, policy: Policy, site_id: str | None = None) -> dict[str, Any]:
    """Everything the report shows, as plain numbers."""
    rows = [r for r in log.cases(with_response=True)
            if site_id is None or r.get("site_id") == site_id]
    under = [r for r in rows if r.get("policy_sha256") == policy.sha256]
    notes = []
    if rows and not under:
        notes.append("No case was logged under this policy (its sha256 differs): the rates"
                     " below cover every case, under whatever policy each was logged.")
        under = rows
    elif len(under) < len(rows):
        notes.append(f"{len(rows) - len(under)} of {len(rows)} cases were logged under another"
                     " policy and are left out of the rates.")
    days: dict[str, int] = {}
    for r in rows:
        day = r["created_at"][:10]
        days[day] = days.get(day, 0) + 1
    decided = [r for r in under if r["decision"] != RETAKE]
    promise = _promise(policy)
    rates = {
        "fallback": _rate(sum(bool(r["fallback_wanted"]) for r in decided), len(decided),
                          promise["fallback"]),
        "referral": _rate(sum(r["decision"] == REFER for r in decided), len(decided),
                          promise["referral"]),
        "gate": _rate(sum(r["decision"] == RETAKE for r in under), len(under),
                      promise["gate"]),
    }
    both = [r for r in rows if r.get("device_top") and r.get("cloud_top")]
    agree = sum(r["device_top"] == r["cloud_top"] for r in both)
    thr = policy.refer_threshold
    mel_agree = (sum((r["device_melanoma"] >= thr) == (r["cloud_melanoma"] >= thr)
                     for r in both) if thr is not None else None)
    labelled = [r for r in rows if r.get("label_diagnosis") and r["decision"] != RETAKE]
    is_mel = [r["label_diagnosis"] == "mel" for r in labelled]
    referred = [r["decision"] == REFER for r in labelled]
    n_mel = sum(is_mel)
    tp = sum(m and f for m, f in zip(is_mel, referred, strict=True))
    tn = sum((not m) and (not f) for m, f in zip(is_mel, referred, strict=True))
    try:
        ver = verification(site_data(log, site_id))
    except CalibrationError:  # no cases: nothing to say about how labels were chosen
        ver = None
    probs = [_final_melanoma(r) for r in labelled]
    keep = [i for i, p in enumerate(probs) if p is not None]
    latency: dict[str, list[float]] = {}
    for r in rows:
        if r.get("device_ms") is None:
            continue
        build = r.get("build") or ("server" if r.get("device_computed_on") == "server"
                                   else "unknown")
        latency.setdefault(build, []).append(float(r["device_ms"]))
    return {
        "generated": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "case_log": str(log.path), "site": site_id,
        "policy": {"source": policy.source, "sha256": policy.sha256,
                   "calibrated_on": (policy.provenance or {}).get("split"),
                   "calibration_n": next((r.get("n") for r in policy.coverage
                                          if r.get("chosen")), None)},
        "cases": {"total": len(rows), "under_policy": len(under),
                  "first": min(days) if days else None, "last": max(days) if days else None,
                  "per_day": [{"day": d, "n": days[d]} for d in sorted(days)]},
        "rates": rates,
        "agreement": {"n": len(both), "top": agree / len(both) if both else None,
                      "top_ci95": wilson(agree, len(both)),
                      "melanoma_call": (mel_agree / len(both)) if both and thr is not None
                      else None, "melanoma_threshold": thr},
        "labelled": {"n": len(labelled), "n_melanoma": n_mel,
                     "sensitivity": tp / n_mel if n_mel else None,
                     "sensitivity_ci95": wilson(tp, n_mel),
                     "specificity": tn / (len(labelled) - n_mel) if len(labelled) > n_mel
                     else None, "specificity_ci95": wilson(tn, len(labelled) - n_mel),
                     "verification": ver},
        "reliability": _reliability([probs[i] for i in keep], [is_mel[i] for i in keep]),
        "latency": [{"build": b, "n": len(v), "median_ms": float(np.median(v)),
                     "p90_ms": float(np.percentile(v, 90))} for b, v in sorted(latency.items())],
        "notes": notes,
    }


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _ci(c: Sequence[float] | None) -> str:
    return "" if not c else f" [{_pct(c[0])}, {_pct(c[1])}]"


def rate_lines(rep: dict[str, Any]) -> list[dict[str, Any]]:
    lines = []
    for name, what in (("fallback", "sent to the cloud"), ("referral", "referred"),
                       ("gate", "refused by the photo check")):
        r = rep["rates"][name]
        if not r["n"]:
            continue
        text = f"{_pct(r['observed'])} {what} ({r['k']} of {r['n']})"
        if r["promise"] is not None:
            pi = r["prediction_interval"]
            text += (f"; promised {_pct(r['promise'])}, so {r['prediction_counts'][0]} to"
                     f" {r['prediction_counts'][1]} of {r['n']} expected ({_pct(pi[0])} to"
                     f" {_pct(pi[1])})")
            text += ": DRIFT, outside what the promise allows" if r["drift"] else ": as promised"
        else:
            text += "; the policy makes no promise for it"
        lines.append({"rate": name, "text": text, "flag": bool(r["drift"])})
    return lines


def short_version(rep: dict[str, Any]) -> dict[str, Any]:
    """The few lines the /cases page shows."""
    c, lab = rep["cases"], rep["labelled"]
    head = (f"{c['total']} cases" + (f" from {c['first']} to {c['last']}" if c["first"] else "")
            + f"; {lab['n']} with a reference diagnosis ({lab['n_melanoma']} melanomas).")
    lines = rate_lines(rep)
    if lab["sensitivity"] is not None:
        lines.append({"rate": "sensitivity", "flag": False, "text":
                      f"Melanoma sensitivity on labelled cases {_pct(lab['sensitivity'])}"
                      f"{_ci(lab['sensitivity_ci95'])}, specificity"
                      f" {_pct(lab['specificity'])}{_ci(lab['specificity_ci95'])}"})
    ag = rep["agreement"]
    if ag["n"]:
        lines.append({"rate": "agreement", "flag": False, "text":
                      f"Device and cloud agree on the top diagnosis in {_pct(ag['top'])} of"
                      f" {ag['n']} cases seen by both"})
    notes = list(rep["notes"])
    if lab["verification"]:
        notes.append(lab["verification"]["text"])
    return {"headline": head, "lines": lines, "notes": notes, "policy": rep["policy"]}


# --- the files ---------------------------------------------------------------------------
def _svg(width: int, height: int, body: list[str], title: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}"'
            f' viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}"'
            ' font-family="sans-serif" font-size="11">'
            f"<title>{html.escape(title)}</title>{''.join(body)}</svg>")


def svg_cases_over_time(per_day: Sequence[dict[str, Any]]) -> str:
    w, h, pad = 560, 180, 30
    if not per_day:
        return _svg(w, 40, ['<text x="5" y="20">no cases</text>'], "cases over time")
    top = max(d["n"] for d in per_day)
    bw = (w - 2 * pad) / len(per_day)
    body = [f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#888"/>']
    for i, d in enumerate(per_day):
        bh = (h - 2 * pad) * d["n"] / top
        x = pad + i * bw
        body.append(f'<rect x="{x + 1:.1f}" y="{h - pad - bh:.1f}" width="{max(bw - 2, 1):.1f}"'
                    f' height="{bh:.1f}" fill="#0b6bcb"><title>{d["day"]}: {d["n"]}</title>'
                    "</rect>")
    body.append(f'<text x="{pad}" y="{h - 8}">{per_day[0]["day"]}</text>')
    body.append(f'<text x="{w - pad}" y="{h - 8}" text-anchor="end">{per_day[-1]["day"]}'
                "</text>")
    body.append(f'<text x="{pad}" y="{pad - 10}">max {top} a day</text>')
    return _svg(w, h, body, "cases over time")


def svg_rates(rates: dict[str, Any]) -> str:
    """Each rate: the observed value with its 95 % interval (dot and whisker) over the band
    the promise allows for this many cases (grey)."""
    w, row, pad = 560, 40, 110
    names = [k for k in ("fallback", "referral", "gate") if rates[k]["n"]]
    h = 30 + row * max(1, len(names))
    body = []

    def x(v):
        return pad + (w - pad - 20) * v

    for g in (0, 0.25, 0.5, 0.75, 1.0):
        body.append(f'<line x1="{x(g):.1f}" y1="10" x2="{x(g):.1f}" y2="{h - 15}"'
                    ' stroke="#eee"/>')
        body.append(f'<text x="{x(g):.1f}" y="{h - 3}" text-anchor="middle">{g:.0%}</text>')
    for i, k in enumerate(names):
        r = rates[k]
        y = 25 + i * row
        body.append(f'<text x="5" y="{y + 4}">{k}</text>')
        if r["prediction_interval"]:
            lo, hi = r["prediction_interval"]
            body.append(f'<rect x="{x(lo):.1f}" y="{y - 9}" width="{max(x(hi) - x(lo), 1):.1f}"'
                        ' height="18" fill="#ddd"><title>what the promise allows</title></rect>')
            body.append(f'<line x1="{x(r["promise"]):.1f}" y1="{y - 11}"'
                        f' x2="{x(r["promise"]):.1f}" y2="{y + 11}" stroke="#555"/>')
        if r["ci95"]:
            body.append(f'<line x1="{x(r["ci95"][0]):.1f}" y1="{y}" x2="{x(r["ci95"][1]):.1f}"'
                        f' y2="{y}" stroke="#1d232a"/>')
        color = "#b3261e" if r["drift"] else "#0b6bcb"
        body.append(f'<circle cx="{x(r["observed"]):.1f}" cy="{y}" r="5" fill="{color}">'
                    f'<title>{k}: {_pct(r["observed"])}</title></circle>')
    return _svg(w, h, body, "rates against the promise")


def svg_reliability(rel: dict[str, Any]) -> str:
    s, pad = 240, 30
    body = [f'<rect x="{pad}" y="10" width="{s}" height="{s}" fill="none" stroke="#888"/>',
            f'<line x1="{pad}" y1="{10 + s}" x2="{pad + s}" y2="10" stroke="#bbb"'
            ' stroke-dasharray="4 3"/>',
            f'<text x="{pad + s / 2}" y="{s + 35}" text-anchor="middle">melanoma probability'
            " shown</text>",
            f'<text x="12" y="{10 + s / 2}" transform="rotate(-90 12 {10 + s / 2})"'
            ' text-anchor="middle">observed melanoma share</text>']
    for b in rel["bins"]:
        if not b["n"]:
            continue
        cx, cy = pad + s * b["mean_p"], 10 + s * (1 - b["observed"])
        if b["ci95"]:
            body.append(f'<line x1="{cx:.1f}" y1="{10 + s * (1 - b["ci95"][0]):.1f}"'
                        f' x2="{cx:.1f}" y2="{10 + s * (1 - b["ci95"][1]):.1f}"'
                        ' stroke="#1d232a"/>')
        r = 2 + min(6, math.sqrt(b["n"]))
        body.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{r:.1f}" fill="#0b6bcb">'
                    f'<title>{b["n"]} cases, mean {b["mean_p"]:.2f}, observed'
                    f' {b["observed"]:.2f}</title></circle>')
    return _svg(s + 2 * pad, s + 45, body, "reliability diagram")


def svg_latency(latency: Sequence[dict[str, Any]]) -> str:
    w, row, pad = 560, 28, 90
    h = 20 + row * max(1, len(latency))
    top = max([r["p90_ms"] for r in latency] + [1e-9])
    body = []
    for i, r in enumerate(latency):
        y = 10 + i * row
        body.append(f'<text x="5" y="{y + 13}">{html.escape(r["build"])}</text>')
        wm = (w - pad - 250) * r["median_ms"] / top
        w9 = (w - pad - 250) * r["p90_ms"] / top
        body.append(f'<rect x="{pad}" y="{y + 2}" width="{w9:.1f}" height="16" fill="#cfe0f5"/>')
        body.append(f'<rect x="{pad}" y="{y + 2}" width="{wm:.1f}" height="16" fill="#0b6bcb"/>')
        body.append(f'<text x="{pad + w9 + 5:.1f}" y="{y + 14}">median {r["median_ms"]:.0f} ms,'
                    f' p90 {r["p90_ms"]:.0f} ms (n={r["n"]})</text>')
    return _svg(w, h, body, "device latency per phone build")


def render_html(rep: dict[str, Any]) -> str:
    short = short_version(rep)
    e = html.escape
    items = "".join(f'<li class="{"flag" if ln["flag"] else ""}">{e(ln["text"])}</li>'
                    for ln in short["lines"])
    notes = "".join(f"<p class=note>{e(n)}</p>" for n in short["notes"])
    lab = rep["labelled"]
    rel = rep["reliability"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dermedge field report</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font:15px/1.45 system-ui,sans-serif;max-width:48rem;margin:1rem auto;padding:0 1rem;
color:#1d232a}} .flag{{color:#b3261e;font-weight:600}} .note{{color:#5b6670}}
h2{{margin-top:1.6rem}} code{{font-size:0.85em}}</style></head><body>
<h1>Field report</h1>
<p>{e(short["headline"])}<br>Policy <code>{e(rep["policy"]["source"])}</code>
(sha256 <code>{e(rep["policy"]["sha256"][:12])}</code>); generated {e(rep["generated"])}.
Research tool, not a diagnosis.</p>
<ul>{items}</ul>{notes}
<h2>Cases over time</h2>{svg_cases_over_time(rep["cases"]["per_day"])}
<h2>Rates against the promise</h2>
<p class=note>Dot and line: the observed rate and its 95 % interval. Grey band: where the
promised rate puts the observed one for this many cases (95 % prediction interval); a red dot
is outside it (drift).</p>{svg_rates(rep["rates"])}
<h2>Device and cloud</h2><p>Top diagnosis agreement {_pct(rep["agreement"]["top"])}
{_ci(rep["agreement"]["top_ci95"])} over {rep["agreement"]["n"]} cases both tiers answered.</p>
<h2>Labelled cases</h2><p>{lab["n"]} labelled, {lab["n_melanoma"]} melanomas. Sensitivity
{_pct(lab["sensitivity"])}{_ci(lab["sensitivity_ci95"])}, specificity
{_pct(lab["specificity"])}{_ci(lab["specificity_ci95"])}.</p>
<p class=note>{e((lab["verification"] or {}).get("text", ""))}</p>
<h2>Reliability</h2><p class=note>The melanoma probability the tester was shown against the
share of labelled melanomas, in bins (95 % intervals); expected calibration error
{"n/a" if rel["ece"] is None else f"{rel['ece']:.3f}"} over {rel["n"]} cases.</p>
{svg_reliability(rel)}
<h2>Latency per phone build</h2>{svg_latency(rep["latency"])}
</body></html>
"""


def write_report(rep: dict[str, Any], out: str | Path) -> list[Path]:
    """``report.json`` and ``report.html`` in ``out`` (created private: 0700)."""
    folder = Path(out).expanduser()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    paths = [folder / "report.json", folder / "report.html"]
    write_text(paths[0], json.dumps(rep, indent=2) + "\n", mode=0o600)  # health data
    write_text(paths[1], render_html(rep), mode=0o600)
    return paths
