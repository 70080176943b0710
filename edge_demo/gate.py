"""The input gate: refuse what the model cannot judge, before any diagnosis is shown.

The checks live in ``static/gate_rules.json`` (one table, also evaluated by the page's
``static/gate.js``): the photo's size, exposure and blur (:mod:`dermedge.quality`) and the
device model's ``ood`` output ("this does not look like a dermoscopy photo"). Thresholds come
from the device bundle's card (``gate.thresholds``, measured by the export on the validation
split), else the table's defaults; a policy file's ``gate`` section overrides them by name.
A refused photo is answered with HTTP 200, ``advice.decision == "retake"`` and a ``gate``
section (docs/DEMO.md); it gets no diagnosis and no cloud fallback.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from dermedge import quality
from dermedge.labels import OOD  # the device model's optional output: atypicality in [0, 1]

from .errors import PolicyError, RequestError
from .policy import GATE_RULES_FILE, _digits, _f
from .policy import gate_rules as rules

__all__ = ["GATE_RULES_FILE", "Gate", "GateCheck", "GateOutcome", "evaluate", "rules"]

RETAKE = "retake"
MIN_SIDE = "min_side"  # its default is the model's input side
VALUES: tuple[str, ...] = (*quality.MEASURES, OOD)
OFF_MESSAGE = ("The input gate is off (--no-gate, for research): photos the model cannot judge"
               " get a diagnosis too.")


def threshold_names() -> tuple[str, ...]:
    return tuple(c["threshold"] for c in rules()["checks"])


def defaults() -> dict[str, float | None]:
    """The table's default thresholds (None: the check needs a measured threshold)."""
    return {c["threshold"]: c["default"] for c in rules()["checks"]}


@dataclass(frozen=True)
class GateCheck:
    """One check on one photo: the measure, the threshold and whether it refused the photo."""

    id: str
    code: str
    fired: bool
    value: float | None
    threshold: float | None
    text: str

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "code": self.code, "fired": self.fired, "value": self.value,
                "threshold": self.threshold, "text": self.text}


def evaluate(check: dict[str, Any], values: dict[str, Any],
             thresholds: dict[str, Any]) -> GateCheck:
    """One check of ``gate_rules.json`` on one photo's values; gate.js mirrors it line by line.

    A check whose value or threshold is missing (None) is not applied: it does not fire and
    its text says why (``skipped``)."""
    value = values.get(check["value"])
    threshold = thresholds.get(check["threshold"])
    if value is None or threshold is None:
        why = check.get("skipped") or (f"not checked: no {check['value']} value"
                                       if value is None else "not checked: no threshold")
        return GateCheck(check["id"], check["code"], False, None if value is None
                         else float(value), None if threshold is None else float(threshold), why)
    value, threshold = float(value), float(threshold)
    fired = value < threshold if check["op"] == "<" else value > threshold
    d = check["digits"] if "digits" in check else _digits(value, [threshold])
    fields = {"value": _f(value, d), "threshold": _f(threshold, d)}
    text = check["fired" if fired else "not_fired"].format(**fields)
    if fired:
        text = f"{check['advice']} ({text})"
    return GateCheck(check["id"], check["code"], fired, value, threshold, text)


@dataclass(frozen=True)
class GateOutcome:
    """The gate's verdict on one photo (``to_dict`` is the response's ``gate`` section)."""

    enabled: bool
    passed: bool
    checks: tuple[GateCheck, ...]
    message: str
    values: dict[str, float | None] = field(default_factory=dict)
    note: str | None = None

    @property
    def codes(self) -> list[str]:
        return list(dict.fromkeys(c.code for c in self.checks if c.fired))

    def to_dict(self) -> dict[str, Any]:
        out = {"enabled": self.enabled, "passed": self.passed,
               "checks": [c.to_dict() for c in self.checks], "message": self.message,
               "codes": self.codes, "values": dict(self.values)}
        if self.note:
            out["note"] = self.note
        return out


def message(checks: list[GateCheck] | tuple[GateCheck, ...]) -> str:
    """The sentence shown to the tester: what to change, once per code (gate.js: the same)."""
    advice = {c["id"]: c["advice"] for c in rules()["checks"]}
    fired = list(dict.fromkeys(advice[c.id] for c in checks if c.fired))
    if fired:
        return "Retake the photo: " + "; ".join(fired) + "."
    return f"The photo passed the input gate ({len(checks)} checks)."


@dataclass(frozen=True)
class Gate:
    """The gate a server or ``edge-demo predict`` applies: thresholds and where they came from."""

    enabled: bool = True
    thresholds: dict[str, float | None] = field(default_factory=dict)
    source: dict[str, str] = field(default_factory=dict)  # threshold -> card|policy|default
    has_ood: bool = False

    @classmethod
    def for_tier(cls, card: dict[str, Any], overrides: dict[str, float] | None = None, *,
                 has_ood: bool, image_size: int, enabled: bool = True) -> Gate:
        """The gate for a device bundle: its card's thresholds (else the table's defaults;
        ``min_side``: the model's ``image_size``), overridden by a policy's ``gate`` section;
        unknown threshold names are refused."""
        overrides = dict(overrides or {})
        names = threshold_names()
        unknown = [k for k in overrides if k not in names]
        if unknown:
            near = difflib.get_close_matches(unknown[0], names, n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise PolicyError(f"The policy's gate section names the unknown threshold"
                              f" {unknown[0]!r}.{hint} Gate thresholds: {list(names)}.")
        card_thr = ((card.get("gate") or {}).get("thresholds") or {})
        thresholds, source = {}, {}
        for name, default in defaults().items():
            if name in overrides:
                thresholds[name], source[name] = float(overrides[name]), "policy"
            elif card_thr.get(name) is not None:
                thresholds[name], source[name] = float(card_thr[name]), "card"
            else:
                if name == MIN_SIDE:
                    default = image_size
                thresholds[name] = None if default is None else float(default)
                source[name] = "default"
        return cls(bool(enabled), thresholds, source, bool(has_ood))

    @property
    def note(self) -> str | None:
        if not self.enabled:
            return None
        if not self.has_ood:
            return ("Quality checks only: the device model has no 'ood' output, so photos that"
                    " are not dermoscopy are not recognised. Re-export the bundle to add it.")
        if self.thresholds.get("ood_max") is None:
            return ("Quality checks only: no 'ood_max' threshold (the bundle's card has no"
                    " measured gate); set one in the policy's gate section or re-export.")
        return None

    def decide(self, values: dict[str, Any]) -> GateOutcome:
        """Every check on one photo's values (the quality measures and ``ood``)."""
        values = {k: (None if values.get(k) is None else float(values[k])) for k in VALUES}
        if not self.enabled:
            return GateOutcome(False, True, (), OFF_MESSAGE, values)
        checks = tuple(evaluate(c, values, self.thresholds) for c in rules()["checks"])
        passed = not any(c.fired for c in checks)
        return GateOutcome(True, passed, checks, message(checks), values, self.note)

    def describe(self) -> dict[str, Any]:
        """For ``GET /api/v1/policy`` and the page: what the gate applies, and from where."""
        return {"enabled": self.enabled, "thresholds": dict(self.thresholds),
                "source": dict(self.source), "ood_output": self.has_ood, "note": self.note,
                "params": quality.params(), "off_message": OFF_MESSAGE}


def parse_page_gate(raw: str | None) -> dict[str, float | None] | None:
    """The page's gate outcome (the ``gate`` form field, JSON with ``values``): the measures
    the page took on the photo, checked as numbers; None when the field is absent."""
    if raw is None or raw == "":
        return None
    try:
        doc = json.loads(raw)
        values = doc["values"]
        if not isinstance(values, dict):
            raise TypeError("'values' is not an object")
        out = {}
        for k in VALUES:
            v = values.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)
                                  or not math.isfinite(v)):
                raise ValueError(f"{k}={v!r} is not a finite number")
            out[k] = None if v is None else float(v)
    except (ValueError, TypeError, KeyError) as exc:
        raise RequestError(
            "The field 'gate' must be JSON with 'values': the page's gate measures"
            f" ({', '.join(VALUES)}; numbers or null); {type(exc).__name__}: {exc}.",
            code="bad_gate") from exc
    return out
