"""Choose the policy thresholds on a labelled validation set for a target fallback rate.

Both tiers run on every image once; the search then replays the policy on the cached
answers. For each candidate (device-confidence threshold = a quantile of the device's top
probability, a melanoma band of half-width ``w`` around the device card's threshold, a
second opinion above the band or not) the fallback rate must be <= the target; the budget
is used (candidates near the highest feasible rate), and among those the best balanced
accuracy of the combined path wins. The
referral threshold is then the highest one that keeps melanoma sensitivity of the final
path >= ``target_sensitivity``, or, with a ``referral_budget``, the lowest one that refers at
most that share of cases (the highest melanoma sensitivity within the budget). Every rate
in the tables carries a 95 % Wilson interval: these are figures for the calibration split;
a new site should calibrate on a labelled sample of its own.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dermedge.labels import MELANOMA_DX
from dermedge.metrics import wilson
from dermedge.numerics import balanced_accuracy
from dermedge.splits import Sample, read_labelled

from . import __version__
from .errors import CalibrationError, RequestError
from .imaging import load_path
from .policy import REFER, Policy
from .tiers import Tier

COVERAGE_RATES: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
BAND_HALF_WIDTHS: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3)


def read_samples(data: str | Path, split: str = "val") -> list[Sample]:
    """A run's ``splits.csv`` (rows of ``split``) or a folder with one sub-folder per class
    (dermedge.splits.read_labelled)."""
    return read_labelled(data, split, error=CalibrationError)


def run_tiers(samples: Sequence[Sample], device: Tier, cloud: Tier | None,
              progress: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """Every sample through both tiers (unreadable images are skipped with a note)."""
    out = []
    for i, s in enumerate(samples):
        try:
            dev = device.predict(load_path(s.path, device.image_size))
            cl = cloud.predict(load_path(s.path, cloud.image_size)) if cloud else None
        except (OSError, RequestError) as exc:
            out.append({"sample": s, "error": str(exc)})
            continue
        out.append({"sample": s, "device": dev, "cloud": cl})
        if progress:
            progress(i + 1, len(samples))
    return out


REFERRAL_BUDGETS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
def evaluate(policy: Policy, results: Sequence[dict[str, Any]], device: Tier,
             cloud: Tier | None) -> dict[str, Any]:
    """Replay ``policy`` on cached answers: the coverage-table row."""
    ok = [r for r in results if "error" not in r]
    y, dev_pred, final_pred, fell, refer, is_mel = [], [], [], [], [], []
    for r in ok:
        d = policy.decide(r["device"], r["cloud"] if cloud else None,
                          device_threshold=device.melanoma_threshold,
                          cloud_threshold=cloud.melanoma_threshold if cloud else None)
        used = d.wants_fallback and cloud is not None
        final = r["cloud"] if used else r["device"]
        y.append(r["sample"].dx)
        dev_pred.append(r["device"]["top"]["label"])
        final_pred.append(final["top"]["label"])
        fell.append(d.wants_fallback)
        refer.append(d.decision == REFER)
        is_mel.append(r["sample"].dx == MELANOMA_DX)
    n = len(y)
    if n == 0:
        raise CalibrationError("No readable images in the labelled set.")
    y_a, fell_a, ref_a, mel_a = np.asarray(y), np.asarray(fell), np.asarray(refer), \
        np.asarray(is_mel)
    kept = ~fell_a
    dp, fp = np.asarray(dev_pred), np.asarray(final_pred)

    def rate(mask, of):
        return float(np.mean(mask[of])) if of.any() else None

    def ci(mask, of):
        return wilson(int(mask[of].sum()), int(of.sum()))

    everyone = np.ones(n, bool)
    return {
        "n": n,
        "fallback_rate": float(fell_a.mean()),
        "device_accuracy_kept": float(np.mean(dp[kept] == y_a[kept])) if kept.any() else None,
        "device_balanced_accuracy_kept": balanced_accuracy(y_a[kept], dp[kept])
        if kept.any() else None,
        "device_only_accuracy": float(np.mean(dp == y_a)),
        "combined_accuracy": float(np.mean(fp == y_a)),
        "combined_balanced_accuracy": balanced_accuracy(y_a, fp),
        "referral_rate": float(ref_a.mean()),
        "melanoma_sensitivity": rate(ref_a, mel_a),
        "melanoma_specificity": rate(~ref_a, ~mel_a),
        "n_melanoma": int(mel_a.sum()), "n_not_melanoma": int((~mel_a).sum()),
        "fallback_rate_ci": ci(fell_a, everyone), "referral_rate_ci": ci(ref_a, everyone),
        "melanoma_sensitivity_ci": ci(ref_a, mel_a),
        "melanoma_specificity_ci": ci(~ref_a, ~mel_a),
    }


def _within(values: np.ndarray, rate, target: float, k: int) -> list[float]:
    """Up to ``k`` of ``values`` (evenly spread) whose own fallback ``rate`` is <= target."""
    ok = [float(v) for v in values if rate(v) <= target + 1e-9]
    if len(ok) > k:
        ok = [ok[int(i)] for i in np.linspace(0, len(ok) - 1, k).round()]
    return ok


def _search(results, device: Tier, cloud: Tier | None, target: float, base: Policy,
            centre: float | None = None) -> tuple[Policy, dict[str, Any]]:
    """The fallback rules for ``target``; the melanoma band is centred on ``centre`` (default:
    the device card's threshold; a site's temperature moves it)."""
    ok = [r for r in results if "error" not in r]
    top = np.array([r["device"]["top"]["probability"] for r in ok])
    mel = np.array([r["device"]["melanoma"] for r in ok])
    y = np.array([r["sample"].dx for r in ok])
    dev_pred = np.array([r["device"]["top"]["label"] for r in ok])
    cl_pred = np.array([r["cloud"]["top"]["label"] for r in ok]) if cloud else dev_pred
    t = device.melanoma_threshold if centre is None else float(centre)
    # Data-driven candidates (quantized outputs tie a lot, so fixed quantiles would skip
    # reachable rates): every observed top probability / distance to t within the budget.
    conf_cands = [0.0] + _within(np.unique(top), lambda u: np.mean(top < u), target, 60)
    dist = np.abs(mel - t)
    widths = [None] + _within(np.unique(np.concatenate([dist, BAND_HALF_WIDTHS])),
                              lambda w: np.mean(dist <= w), target, 30)
    feasible = []
    for c in conf_cands:
        low_conf = top < c
        for w in widths:
            band = np.zeros_like(low_conf) if w is None else \
                (mel >= max(0.0, t - w)) & (mel <= min(1.0, t + w))
            above = t + (w or 0.0)
            for second in (False, True):
                so = (mel >= above) if second else np.zeros_like(low_conf)
                fb = low_conf | band | so
                r = float(fb.mean())
                if r > target + 1e-9:
                    continue
                pred = np.where(fb, cl_pred, dev_pred)
                feasible.append((r, balanced_accuracy(y, pred), (c, w, second, min(1.0, above))))
    # Use the budget (the cloud tier is the stronger model): among candidates whose fallback
    # rate is within a quarter of the target of the highest feasible rate, the best balanced
    # accuracy wins, then the higher rate.
    top_rate = max(r for r, _, _ in feasible)
    near = [f for f in feasible if f[0] >= top_rate - 0.25 * target - 1e-9]
    rate, _, (c, w, second, above) = max(near, key=lambda f: (round(f[1], 6), f[0]))
    policy = dataclasses.replace(
        base, min_confidence=float(c),
        mel_band_low=None if w is None else float(max(0.0, t - w)),
        mel_band_high=None if w is None else float(min(1.0, t + w)),
        second_opinion=bool(second), second_opinion_above=float(above))
    return policy, {"rule_fallback_rate": rate}


def _refer_threshold(policy: Policy, results, device: Tier, cloud: Tier | None,
                     target_sensitivity: float) -> float | None:
    """The highest threshold whose final-path melanoma sensitivity is >= the target."""
    finals, is_mel = [], []
    for r in results:
        if "error" in r:
            continue
        wants = any(c.fired for c in policy.fallback_checks(r["device"]))
        final = r["cloud"] if (wants and cloud is not None) else r["device"]
        finals.append(final["melanoma"])
        is_mel.append(r["sample"].dx == MELANOMA_DX)
    mel_scores = np.sort(np.asarray(finals)[np.asarray(is_mel, bool)])
    if mel_scores.size == 0:
        return None
    k = int(np.floor((1.0 - target_sensitivity) * mel_scores.size + 1e-9))
    return float(np.floor(mel_scores[min(k, mel_scores.size - 1)] * 1e6) / 1e6)


def _budget_threshold(policy: Policy, results, device: Tier, cloud: Tier | None,
                      budget: float) -> tuple[float, dict[str, Any]]:
    """The lowest referral threshold whose referral rate is <= ``budget`` (so the highest
    melanoma sensitivity within it), by bisection over the final answers' melanoma scores;
    1.0 when the other referral rules alone refer more than the budget."""
    finals = []
    for r in results:
        if "error" in r:
            continue
        wants = any(c.fired for c in policy.fallback_checks(r["device"]))
        finals.append((r["cloud"] if (wants and cloud is not None) else r["device"])
                      ["melanoma"])
    cands = sorted({*(float(np.floor(m * 1e6) / 1e6) for m in finals), 1.0})

    def row(t):
        return evaluate(dataclasses.replace(policy, refer_threshold=t), results, device, cloud)

    lo, hi = 0, len(cands) - 1
    if row(cands[hi])["referral_rate"] > budget + 1e-9:
        return 1.0, {**row(1.0), "within_budget": False}
    while lo < hi:  # the referral rate falls as the threshold rises
        mid = (lo + hi) // 2
        if row(cands[mid])["referral_rate"] <= budget + 1e-9:
            hi = mid
        else:
            lo = mid + 1
    return cands[lo], {**row(cands[lo]), "within_budget": True}


def referral_tradeoff(policy: Policy, results, device: Tier, cloud: Tier | None,
                      budgets: Sequence[float] = REFERRAL_BUDGETS) -> list[dict[str, Any]]:
    """For each referral budget: the threshold, and what it does (with 95 % intervals)."""
    rows = []
    for b in sorted(set(budgets)):
        thr, row = _budget_threshold(policy, results, device, cloud, b)
        rows.append({"referral_budget": b, "refer_threshold": thr, **row})
    return rows


def format_tradeoff(rows: Sequence[dict[str, Any]]) -> str:
    """Referral budget vs melanoma sensitivity, as fixed-width text with 95 % intervals."""
    def cell(r, k):
        v, ci = r.get(k), r.get(k + "_ci")
        if v is None:
            return f"{'-':>21}"
        return f"{v:>7.3f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{v:>21.3f}"

    head = (f"{'budget':>7} {'threshold':>10} {'referral [95% CI]':>21}"
            f" {'mel sens [95% CI]':>21} {'mel spec [95% CI]':>21}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['referral_budget']:>7.2f} {r['refer_threshold']:>10.4f}"
                     f" {cell(r, 'referral_rate')} {cell(r, 'melanoma_sensitivity')}"
                     f" {cell(r, 'melanoma_specificity')}"
                     + ("" if r.get("within_budget", True) else "  (over budget: other"
                        " rules refer more)") + ("  <- chosen" if r.get("chosen") else ""))
    return "\n".join(lines)


def calibrate(results: Sequence[dict[str, Any]], device: Tier, cloud: Tier | None, *,
              target_fallback: float = 0.2, target_sensitivity: float = 0.9,
              referral_budget: float | None = None,
              base: Policy | None = None, provenance: dict[str, Any] | None = None
              ) -> Policy:
    """The calibrated policy (with its coverage table) for cached tier answers.

    ``referral_budget`` (a share of cases) replaces ``target_sensitivity``: the referral
    threshold becomes the one with the highest melanoma sensitivity within the budget."""
    if not 0.0 <= target_fallback <= 1.0:
        raise CalibrationError(f"--target-fallback must be in [0, 1]; received {target_fallback}.")
    if not 0.0 < target_sensitivity <= 1.0:
        raise CalibrationError("--target-sensitivity must be in (0, 1]; received"
                               f" {target_sensitivity}.")
    if referral_budget is not None and not 0.0 < referral_budget <= 1.0:
        raise CalibrationError("--referral-budget must be a share of cases in (0, 1], e.g."
                               f" 0.3 for at most 30 % referred; received {referral_budget}.")
    base = base or Policy(source="calibrated")

    def for_rate(rate: float) -> Policy:
        pol, _ = _search(results, device, cloud, rate, base)
        if referral_budget is not None:
            thr, _ = _budget_threshold(pol, results, device, cloud, referral_budget)
        else:
            thr = _refer_threshold(pol, results, device, cloud, target_sensitivity)
        return dataclasses.replace(pol, refer_threshold=thr)

    chosen = for_rate(target_fallback)
    rows = []
    for rate in sorted({*COVERAGE_RATES, target_fallback}):
        pol = for_rate(rate)
        rows.append({"target_fallback": rate, **evaluate(pol, results, device, cloud),
                     "chosen": rate == target_fallback, "policy": pol.thresholds()})
    errors = [{"image_id": r["sample"].image_id, "error": r["error"]}
              for r in results if "error" in r]
    prov = {"created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "edge_demo": __version__, "target_fallback": target_fallback,
            "target_sensitivity": None if referral_budget is not None else target_sensitivity,
            "referral_budget": referral_budget,
            "referral_tradeoff": [
                {**r, "chosen": referral_budget is not None and r["referral_budget"] ==
                 referral_budget}
                for r in referral_tradeoff(chosen, results, device, cloud,
                                           (*REFERRAL_BUDGETS, *([referral_budget]
                                                                 if referral_budget else [])))],
            "device": device.summary(), "cloud": cloud.summary() if cloud else None,
            "n_images": len(results), "unreadable": errors[:20], **(provenance or {})}
    return dataclasses.replace(chosen, source="calibrated", coverage=tuple(rows),
                               provenance=prov)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The coverage-vs-accuracy table as fixed-width text."""
    cols = [("target_fallback", "target"), ("fallback_rate", "fallback"),
            ("device_accuracy_kept", "dev acc kept"),
            ("device_balanced_accuracy_kept", "dev bacc kept"),
            ("combined_accuracy", "comb acc"), ("combined_balanced_accuracy", "comb bacc"),
            ("melanoma_sensitivity", "mel sens"), ("melanoma_specificity", "mel spec"),
            ("referral_rate", "referral")]
    head = " ".join(f"{h:>13}" for _, h in cols) + "  "
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = []
        for k, _ in cols:
            v = r.get(k)
            cells.append(f"{'-':>13}" if v is None else f"{v:>13.3f}")
        lines.append(" ".join(cells) + ("  <- chosen" if r.get("chosen") else ""))
    return "\n".join(lines)
