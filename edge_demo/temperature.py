"""Temperature scaling of a tier's answer: the policy file's ``temperature`` section.

A site whose model is over- or under-confident gets a temperature per tier and head
(``edge-demo calibrate --cases``). The melanoma probability becomes ``sigmoid(logit(p) / T)``
and the diagnosis ``softmax(log(p) / T)``; T = 1 leaves an answer as the model gave it.
``static/temperature.js`` mirrors :func:`apply` line by line (tests/test_temperature.py runs
both on one table), so the page and the server decide on the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

EPS = 1e-7
T_MIN, T_MAX = 0.25, 8.0


def _clip(p: float) -> float:
    return min(max(float(p), EPS), 1.0 - EPS)


def scale_probability(p: float, t: float) -> float:
    """P(melanoma) at temperature ``t``."""
    if t == 1.0:
        return float(p)
    q = _clip(p)
    z = (math.log(q) - math.log1p(-q)) / t
    return 1.0 / (1.0 + math.exp(-z))


def scale_distribution(probs: Mapping[str, float], t: float) -> dict[str, float]:
    """A probability per label at temperature ``t`` (the labels' order is kept)."""
    if t == 1.0:
        return {k: float(v) for k, v in probs.items()}
    logs = [math.log(max(float(v), EPS)) / t for v in probs.values()]
    top = max(logs)
    ex = [math.exp(v - top) for v in logs]
    z = 0.0
    for e in ex:
        z += e
    return {k: e / z for k, e in zip(probs, ex, strict=True)}


def apply(answer: dict[str, Any], temps: Mapping[str, float] | None) -> dict[str, Any]:
    """``answer`` with the tier's temperatures applied; unchanged when none is set or all are
    1.0. The result names them in ``temperature``."""
    t_mel = float((temps or {}).get("melanoma", 1.0))
    t_diag = float((temps or {}).get("diagnosis", 1.0))
    if t_mel == 1.0 and t_diag == 1.0:
        return answer
    diagnosis = scale_distribution(answer["diagnosis"], t_diag)
    best = max(diagnosis, key=diagnosis.__getitem__)
    return {**answer, "melanoma": scale_probability(answer["melanoma"], t_mel),
            "diagnosis": diagnosis, "top": {"label": best, "probability": diagnosis[best]},
            "temperature": {"melanoma": t_mel, "diagnosis": t_diag}}


# --- fitting (edge-demo calibrate --cases) ------------------------------------------------
def _nll_binary(p: np.ndarray, y: np.ndarray, t: float) -> float:
    q = np.clip(p, EPS, 1 - EPS)
    z = (np.log(q) - np.log1p(-q)) / t
    # -log sigmoid(z) for positives, -log sigmoid(-z) for negatives, stable
    return float(np.mean(np.logaddexp(0.0, np.where(y, -z, z))))


def _nll_multi(p: np.ndarray, y: np.ndarray, t: float) -> float:
    logs = np.log(np.clip(p, EPS, 1.0)) / t
    logs -= logs.max(axis=1, keepdims=True)
    lse = np.log(np.exp(logs).sum(axis=1))
    return float(np.mean(lse - logs[np.arange(len(y)), y]))


def _best_t(nll, p, y) -> float:
    """The temperature minimising ``nll`` on a log grid, refined by golden section."""
    grid = np.exp(np.linspace(math.log(T_MIN), math.log(T_MAX), 41))
    values = [nll(p, y, t) for t in grid]
    i = int(np.argmin(values))
    lo, hi = math.log(grid[max(0, i - 1)]), math.log(grid[min(len(grid) - 1, i + 1)])
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(p, y, math.exp(a)), nll(p, y, math.exp(b))
    for _ in range(30):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(p, y, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(p, y, math.exp(b))
    return float(math.exp((lo + hi) / 2))


def fit(probs: Sequence, labels: Sequence, *, binary: bool, folds: int = 5,
        seed: int = 0) -> dict[str, Any]:
    """Fit one head's temperature; adopt it only where it helps: its cross-validated
    negative log-likelihood (fit on 4/5, scored on the rest) beats T = 1's.

    ``probs``: P(positive) per case (binary) or a probability row per case; ``labels``: 0/1
    or the class index. Returns ``{"t", "adopted", "n", "nll_before", "nll_after", ...}``.
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=bool if binary else np.int64)
    n = len(y)
    nll = _nll_binary if binary else _nll_multi
    out: dict[str, Any] = {"n": int(n), "t": 1.0, "adopted": False}
    if n < 2 * folds or (binary and (y.all() or not y.any())):
        out["why"] = (f"too few cases to fit ({n}; at least {2 * folds}, with both outcomes)")
        return out
    t_all = _best_t(nll, p, y)
    order = np.random.default_rng(seed).permutation(n)
    cv_fit = cv_one = 0.0
    for k in range(folds):
        test = order[k::folds]
        train = np.setdiff1d(order, test)
        t_k = _best_t(nll, p[train], y[train])
        cv_fit += nll(p[test], y[test], t_k) * len(test)
        cv_one += nll(p[test], y[test], 1.0) * len(test)
    cv_fit, cv_one = cv_fit / n, cv_one / n
    adopted = cv_fit < cv_one
    out.update(t=round(t_all, 4) if adopted else 1.0, adopted=bool(adopted),
               fitted_t=round(t_all, 4), nll_before=round(nll(p, y, 1.0), 5),
               nll_after=round(nll(p, y, t_all), 5), cv_nll_t1=round(cv_one, 5),
               cv_nll_fitted=round(cv_fit, 5))
    if not adopted:
        out["why"] = "the fitted temperature did not lower the cross-validated log-loss"
    return out
