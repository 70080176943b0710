"""The explicit fallback / referral policy.

Stage 1 (on the device answer): fall back to the cloud tier when
``low_confidence``      top diagnosis probability < ``min_confidence``;
``melanoma_uncertain``  ``mel_band_low`` <= P(melanoma) <= ``mel_band_high``;
``second_opinion``      ``second_opinion`` is on and P(melanoma) >= ``second_opinion_above``.

Stage 2 (on the final answer: the cloud's when it was asked, else the device's): refer when
``cloud_unsure``        the cloud's top probability < ``cloud_min_confidence``;
``fallback_unavailable`` a fallback rule fired but no cloud answer exists;
``melanoma_risk``       P(melanoma) >= ``refer_threshold`` (unset: the tier card's threshold);
``malignant_top``       the top diagnosis is in ``malignant_classes`` at >= ``malignant_min_prob``.
Otherwise the advice is ``no_action`` (rule ``no_referral_rule``).

A policy file (version 2) holds the thresholds above and two optional sections a site fits on
its own cases: ``gate`` (overrides of the input gate's thresholds, which otherwise come from
the device bundle's card) and ``temperature`` (per tier and head, applied to the tier's
probabilities before the rules). Version 1 files read as version 2 with neither section.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import math
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

from dermedge.files import write_text
from dermedge.labels import HEADS

from .errors import PolicyError

POLICY_VERSION = 2
READABLE_POLICY_VERSIONS: tuple[int, ...] = (1, 2)
TIERS: tuple[str, ...] = ("device", "cloud")
TEMPERATURE_HEADS: tuple[str, ...] = HEADS
NO_ACTION, REFER = "no_action", "refer"
DISCLAIMER = ("Research tool, not a diagnosis. The model can be wrong; anyone worried about a"
              " skin lesion should see a doctor.")
DEFAULTS_NOTE = ("No calibrated policy file is loaded: the server uses conservative default"
                 " thresholds (more cloud fallbacks and referrals than a calibrated policy)."
                 " Run `edge-demo calibrate` on a labelled validation split and pass --policy.")


@dataclass(frozen=True)
class RuleCheck:
    """One rule evaluated on one answer: the value, the threshold and whether it fired."""

    id: str
    fired: bool
    value: float | None
    threshold: Any
    op: str
    text: str

    def to_dict(self) -> dict[str, Any]:
        threshold = list(self.threshold) if isinstance(self.threshold, tuple | list) \
            else self.threshold
        return {"id": self.id, "fired": self.fired, "value": self.value,
                "threshold": threshold, "op": self.op, "text": self.text}


@dataclass(frozen=True)
class Decision:
    """The outcome of the policy for one image."""

    fallback_checks: tuple[RuleCheck, ...]
    advice_checks: tuple[RuleCheck, ...]
    decision: str
    message: str
    fallback_reason: str
    decided_by: str

    @property
    def fallback_rules(self) -> list[str]:
        return [c.id for c in self.fallback_checks if c.fired]

    @property
    def advice_rules(self) -> list[str]:
        fired = [c.id for c in self.advice_checks if c.fired]
        return fired or ["no_referral_rule"]

    @property
    def wants_fallback(self) -> bool:
        return bool(self.fallback_rules)


RULES_FILE = Path(__file__).with_name("static") / "policy_rules.json"
# The optional sections of a version-2 policy file (see the module docstring).
SECTIONS: tuple[str, ...] = ("gate", "temperature")


@functools.cache
def rules() -> dict[str, Any]:
    """The rule definitions (``static/policy_rules.json``), shared with the page's policy.js."""
    return json.loads(RULES_FILE.read_text(encoding="utf-8"))


GATE_RULES_FILE = RULES_FILE.with_name("gate_rules.json")


@functools.cache
def gate_rules() -> dict[str, Any]:
    """The input gate's checks (``static/gate_rules.json``: edge_demo/gate.py and gate.js)."""
    return json.loads(GATE_RULES_FILE.read_text(encoding="utf-8"))


def rule_tables() -> dict[str, Any]:
    """Every rule table the policy's identity covers, by name."""
    return {"policy_rules": rules(), "gate_rules": gate_rules()}


def _gate_overrides(value: Any) -> dict[str, float]:
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
            and math.isfinite(v) for k, v in value.items()):
        raise PolicyError("Policy.gate must map gate threshold names to numbers, e.g."
                          f' {{"blur_min": 40}}; received {value!r}.')
    return {k: float(v) for k, v in value.items()}


def _temperatures(value: Any) -> dict[str, dict[str, float]]:
    ok = isinstance(value, dict) and all(
        t in TIERS and isinstance(h, dict) and all(
            k in TEMPERATURE_HEADS and isinstance(v, int | float) and not isinstance(v, bool)
            and math.isfinite(v) and v > 0 for k, v in h.items())
        for t, h in value.items())
    if not ok:
        raise PolicyError("Policy.temperature must map a tier (device, cloud) to a temperature"
                          ' > 0 per head (melanoma, diagnosis), e.g. {"device": {"melanoma":'
                          f' 1.3, "diagnosis": 1.1}}}}; received {value!r}.')
    return {t: {k: float(v) for k, v in h.items()} for t, h in value.items()}


@functools.lru_cache(maxsize=4096)  # thresholds repeat on every request
def _f(x: float, digits: int = 2) -> str:
    """``digits`` decimals, halves rounded up, as JavaScript's ``toFixed`` does."""
    return str(Decimal(float(x)).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))


def _digits(value: float | None, thresholds: list[float]) -> int:
    """2 decimals, or more when a value that differs from a threshold would print the same
    (0.2996 vs 0.3: "0.2996 is below 0.3000", not "0.30 is below 0.30")."""
    d = 2
    while value is not None and d < 6 and any(
            value != t and _f(value, d) == _f(t, d) for t in thresholds):
        d += 1
    return d


_OPS = {"<": lambda v, t: v < t, ">=": lambda v, t: v >= t,
        "in": lambda v, t: t[0] <= v <= t[1]}


def evaluate(rule: dict[str, Any], answer: dict[str, Any],
             params: dict[str, Any]) -> RuleCheck | None:
    """One rule of ``policy_rules.json`` on one answer; None when its ``when`` switch is off.

    ``params`` holds the policy thresholds plus the context switches (``cloud_used``,
    ``fallback_unanswered``); policy.js mirrors this function line by line.
    """
    if rule.get("when") and (params.get(rule["when"]) is None
                             or params.get(rule["when"]) is False):
        return None
    top = answer["top"]["label"]
    values = {"top_probability": float(answer["top"]["probability"]),
              "melanoma": float(answer["melanoma"])}
    value = values[rule["value"]] if rule["value"] else None
    key = rule["threshold"]
    threshold = ([float(params[k]) for k in key] if isinstance(key, list)
                 else None if key is None else float(params[key]))
    op = rule["op"]
    if op == "always":
        fired = True
    elif op == "top_in_and_>=":
        fired = top in params[rule["classes"]] and value >= threshold
    else:
        fired = _OPS[op](value, threshold)
    bounds = threshold if isinstance(threshold, list) else [] if threshold is None \
        else [threshold]
    d = _digits(value, bounds)
    fields = {"top": top, "value": "" if value is None else _f(value, d)}
    if isinstance(threshold, list):
        fields.update(low=_f(threshold[0], d), high=_f(threshold[1], d))
    elif threshold is not None:
        fields["threshold"] = _f(threshold, d)
    if rule.get("classes"):
        fields["classes"] = "[" + ", ".join(f"'{c}'" for c in params[rule["classes"]]) + "]"
    text = rule["fired" if fired else "not_fired"].format(**fields)
    return RuleCheck(rule["id"], fired, value, threshold, op, text)


@dataclass(frozen=True)
class Policy:
    """Thresholds of the two-stage policy (see the module docstring for the rules)."""

    min_confidence: float = 0.6
    mel_band_low: float | None = 0.15
    mel_band_high: float | None = 0.65
    second_opinion: bool = True
    second_opinion_above: float = 0.65
    cloud_min_confidence: float = 0.5
    refer_threshold: float | None = None
    malignant_classes: tuple[str, ...] = ("mel", "bcc", "akiec")
    malignant_min_prob: float = 0.5
    # Input-gate threshold overrides ({threshold name: value}); empty: the card's thresholds.
    gate: dict[str, float] = field(default_factory=dict, hash=False)
    # {"device"|"cloud": {"melanoma"|"diagnosis": T}}; empty or 1.0: probabilities as is.
    temperature: dict[str, dict[str, float]] = field(default_factory=dict, hash=False)
    source: str = "defaults"
    coverage: tuple[dict[str, Any], ...] = ()
    provenance: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self):
        for name in ("min_confidence", "second_opinion_above", "cloud_min_confidence",
                     "malignant_min_prob", "mel_band_low", "mel_band_high", "refer_threshold"):
            v = getattr(self, name)
            if v is None and name in ("mel_band_low", "mel_band_high", "refer_threshold"):
                continue
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 <= v <= 1.0:
                raise PolicyError(f"Policy.{name} must be a probability in [0, 1]; received"
                                  f" {v!r}.")
        if (self.mel_band_low is None) != (self.mel_band_high is None):
            raise PolicyError("Set both mel_band_low and mel_band_high, or neither (no band);"
                              f" received {self.mel_band_low!r}, {self.mel_band_high!r}.")
        if self.mel_band_low is not None and self.mel_band_low > self.mel_band_high:
            raise PolicyError(f"mel_band_low ({self.mel_band_low}) must be <= mel_band_high"
                              f" ({self.mel_band_high}).")
        mc = self.malignant_classes
        if isinstance(mc, str) or not isinstance(mc, list | tuple) or not all(
                isinstance(c, str) for c in mc):
            raise PolicyError(
                "Policy.malignant_classes must be a list of diagnosis labels, e.g."
                f' ["mel", "bcc", "akiec"]; received {mc!r}. Fix the field in the policy file'
                " (or re-run `edge-demo calibrate`).")
        if not isinstance(self.second_opinion, bool):
            raise PolicyError("Policy.second_opinion must be true or false; received"
                              f" {self.second_opinion!r}.")
        object.__setattr__(self, "malignant_classes", tuple(mc))
        object.__setattr__(self, "coverage", tuple(self.coverage))
        object.__setattr__(self, "gate", _gate_overrides(self.gate))
        object.__setattr__(self, "temperature", _temperatures(self.temperature))

    # --- named constructors -----------------------------------------------------------
    @classmethod
    def conservative(cls, melanoma_threshold: float) -> Policy:
        """Documented defaults around a card's melanoma threshold ``t``: band [t/2, (1+t)/2],
        a second opinion above the band, referral at ``t``; more fallbacks than calibrated."""
        t = float(melanoma_threshold)
        high = round((1.0 + t) / 2.0, 4)
        return cls(min_confidence=0.6, mel_band_low=round(t / 2.0, 4), mel_band_high=high,
                   second_opinion=True, second_opinion_above=high, cloud_min_confidence=0.5,
                   refer_threshold=None, malignant_min_prob=0.5, source="defaults",
                   provenance={"note": DEFAULTS_NOTE})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Policy:
        known = {f.name for f in dataclasses.fields(cls)} - {
            "source", "coverage", "provenance", *SECTIONS}
        unknown = [k for k in d if k not in known]
        if unknown:
            k = unknown[0]
            near = difflib.get_close_matches(k, sorted(known), n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise PolicyError(f"Unknown policy key {k!r}.{hint} Known keys: {sorted(known)}.")
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        """Read a policy file written by ``edge-demo calibrate`` (or by hand)."""
        p = Path(path).expanduser()
        if not p.is_file():
            raise PolicyError(f"Policy file not found: {p}. Write one with `edge-demo calibrate"
                              " ... --out policy.json`, or leave --policy out for defaults.")
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise PolicyError(f"Cannot parse the policy file {p} as JSON ({exc}).") from exc
        if not isinstance(doc, dict) or "policy" not in doc:
            raise PolicyError(f"{p} is not a policy file: expected a JSON object with keys"
                              " 'version' and 'policy'.")
        version = doc.get("version")
        if version not in READABLE_POLICY_VERSIONS or isinstance(version, bool):
            raise PolicyError(f"{p} has policy version {version!r}; this demo reads versions"
                              f" {', '.join(map(str, READABLE_POLICY_VERSIONS))}. Re-run"
                              " `edge-demo calibrate`.")
        if not isinstance(doc["policy"], dict):
            raise PolicyError(f"{p}: 'policy' must be an object of thresholds.")
        sections = {k: doc.get(k) or {} for k in SECTIONS}  # version 1: neither section
        for k, v in sections.items():
            if not isinstance(v, dict):
                raise PolicyError(f"{p}: {k!r} must be an object; received {v!r}.")
        base = cls.from_dict(doc["policy"])
        try:
            return dataclasses.replace(base, **sections, source=f"file:{p.name}",
                                       coverage=tuple(doc.get("coverage") or ()),
                                       provenance=dict(doc.get("provenance") or {}))
        except PolicyError as exc:
            raise PolicyError(f"{p}: {exc}") from None

    def thresholds(self) -> dict[str, Any]:
        return dict(self._thresholds)

    @functools.cached_property
    def _thresholds(self) -> dict[str, Any]:  # the policy is frozen: built once, copied per call
        d = dataclasses.asdict(self)
        for k in ("source", "coverage", "provenance", *SECTIONS):
            d.pop(k)
        d["malignant_classes"] = list(self.malignant_classes)
        return d

    def to_dict(self) -> dict[str, Any]:
        return {"version": POLICY_VERSION, "source": self.source, "policy": self.thresholds(),
                "gate": dict(self.gate),
                "temperature": {t: dict(h) for t, h in self.temperature.items()},
                "coverage": list(self.coverage), "provenance": self.provenance}

    @functools.cached_property
    def sha256(self) -> str:
        """The policy's identity: what decides an answer (thresholds, gate overrides,
        temperatures and the rule tables), not where the file lives or how it was fitted.
        The page, the case log and the offline queue record it beside the model's sha256."""
        doc = {"version": POLICY_VERSION, "policy": self.thresholds(), "gate": dict(self.gate),
               "temperature": {t: dict(h) for t, h in self.temperature.items()},
               "rules": rule_tables()}
        text = json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def temperature_of(self, tier: str, head: str) -> float:
        """The temperature for one tier's head (1.0: the probabilities as the model gives)."""
        return float(self.temperature.get(tier, {}).get(head, 1.0))

    def save(self, path: str | Path) -> Path:
        """Write the policy atomically (temp file then rename)."""
        p = Path(path).expanduser()
        write_text(p, json.dumps(self.to_dict(), indent=2) + "\n")
        return p

    # --- the rules --------------------------------------------------------------------
    def fallback_checks(self, device: dict[str, Any]) -> tuple[RuleCheck, ...]:
        """Stage 1 on the device answer (every enabled rule, fired or not)."""
        params = self.thresholds()
        checks = (evaluate(r, device, params) for r in rules()["fallback"])
        return tuple(c for c in checks if c is not None)

    def decide(self, device: dict[str, Any], cloud: dict[str, Any] | None = None, *,
               device_threshold: float = 0.5, cloud_threshold: float | None = None) -> Decision:
        """Both stages: the advice, a sentence, and every rule checked (fired or not).

        ``*_threshold`` are the tiers' card thresholds, used when ``refer_threshold`` is unset.
        """
        fb = self.fallback_checks(device)
        wants = any(c.fired for c in fb)
        if wants:
            fired = [c.text for c in fb if c.fired]
            reason = "Sent to the cloud model: " + "; ".join(fired) + "."
        else:
            top = device["top"]
            reason = (f"The device model is confident enough (top {top['label']!r} at"
                      f" {_f(top['probability'])}); no fallback rule fired.")
        use_cloud = wants and cloud is not None
        final = cloud if use_cloud else device
        by = "cloud" if use_cloud else "device"
        thr = self.refer_threshold
        if thr is None:
            thr = cloud_threshold if (use_cloud and cloud_threshold is not None) \
                else device_threshold
        top, p_top = final["top"]["label"], float(final["top"]["probability"])
        mel = float(final["melanoma"])
        params = {**self.thresholds(), "refer_threshold": float(thr), "cloud_used": use_cloud,
                  "fallback_unanswered": wants and not use_cloud}
        checks = [c for c in (evaluate(r, final, params) for r in rules()["advice"])
                  if c is not None]
        fired = [c for c in checks if c.fired]
        if fired:
            decision = REFER
            message = (f"Refer to a dermatologist ({by} model): "
                       + "; ".join(c.text for c in fired) + ".")
        else:
            decision = NO_ACTION
            d = _digits(mel, [float(thr)])
            message = (f"No action suggested by the model ({by} model: melanoma risk"
                       f" {_f(mel, d)} < {_f(thr, d)}, top diagnosis {top!r} at {_f(p_top)}).")
        return Decision(fb, tuple(checks), decision, message, reason, by)
