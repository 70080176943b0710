"""The in-browser device tier: what the page needs to run the device model itself.

The page runs the device bundle's ``model.tflite`` with LiteRT.js (pinned in ``web/``,
served by this server: no CDN), applies stage 1 of the policy with ``static/policy.js``,
and uploads the photo only when a fallback rule fires (or the tester asks). Either way it
posts its device answer to ``POST /api/v1/decide`` so the server decides referral and the
result can be logged for the study without the photo.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from pathlib import Path
from typing import Any

from dermedge import quality
from dermedge.metrics import wilson

from .errors import RequestError
from .metadata import tables
from .policy import gate_rules, rules

WEB_DIR = Path(__file__).with_name("web")
# The runtime files the page may load (LiteRT.js picks one .js/.wasm pair at run time: the
# threaded build needs a cross-origin isolated page, relaxed SIMD and SharedArrayBuffer).
RUNTIME_FILES = frozenset({
    "core/dist/index.js", "wasm-utils/dist/index.js",
    "core/wasm/litert_wasm_internal.js", "core/wasm/litert_wasm_internal.wasm",
    "core/wasm/litert_wasm_compat_internal.js", "core/wasm/litert_wasm_compat_internal.wasm",
    "core/wasm/litert_wasm_threaded_internal.js",
    "core/wasm/litert_wasm_threaded_internal.wasm",
})
# /runtime/<id>/<file>: the id (a hash over every runtime file) versions the whole folder,
# because LiteRT.js builds its .js/.wasm URLs from the folder's URL
_RUNTIME_ID = re.compile(r"^[0-9a-f]{16}$")
INSTALL_HINT = ("the LiteRT.js runtime is not installed: run `npm ci --prefix edge_demo/web`"
                " (Debian: apt-get install npm) and restart the server")
NEW_SITE_NOTE = ("These figures are for the split the policy was calibrated on. A new site"
                 " (other cameras, other patients) should calibrate on a labelled sample of"
                 " its own: a policy calibrated on the edge recipe's validation split fell"
                 " back on 29 % and referred 51 % of a held-out test set from another source"
                 " (20 % and 37 % on its own split).")


def runtime_root(config: dict[str, Any]) -> Path:
    """The ``node_modules/@litertjs`` folder the runtime files are served from."""
    base = config.get("WEB_RUNTIME_DIR") or WEB_DIR / "node_modules"
    return Path(base) / "@litertjs"


def runtime_status(config: dict[str, Any]) -> dict[str, Any]:
    """Whether the page can run the device model: enabled, installed, version, or why not."""
    if not config.get("BROWSER_INFERENCE", True):
        return {"enabled": False, "reason": "in-browser inference is turned off on this"
                " server (--no-browser-inference)", "version": None}
    root = runtime_root(config)
    missing = [f for f in sorted(RUNTIME_FILES) if not (root / f).is_file()]
    if missing:
        return {"enabled": False, "reason": INSTALL_HINT, "version": None}
    try:
        version = json.loads((root / "core" / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        version = None
    return {"enabled": True, "reason": None, "version": version}


def runtime_id(config: dict[str, Any], store) -> str | None:
    """The runtime folder's version: a hash over its files' sha256 (None: not installed)."""
    root = runtime_root(config)
    try:
        hashes = [store.file(root / name, "").sha256 for name in sorted(RUNTIME_FILES)]
    except OSError:
        return None
    return hashlib.sha256("".join(hashes).encode()).hexdigest()[:16]


def runtime_file(config: dict[str, Any], name: str, store, request):
    """The response for one allow-listed runtime file (``<id>/`` in front: versioned, cached
    for a year); a 404 JSON error for anything else."""
    status = runtime_status(config)
    version, _, rest = name.partition("/")
    versioned = bool(_RUNTIME_ID.match(version)) and rest in RUNTIME_FILES
    if versioned:
        name = rest
    if name not in RUNTIME_FILES or not status["enabled"]:
        why = status["reason"] or "not one of the LiteRT.js files the page loads"
        raise RequestError(f"No runtime file {name!r} here ({why}).", status=404,
                           code="not_found")
    mime = "application/wasm" if name.endswith(".wasm") else "text/javascript"
    asset = store.file(runtime_root(config) / name, mime)
    current = runtime_id(config, store) if versioned else None
    return store.respond(request, asset, asset.sha256 if version == current else None)


def model_url(base: str, sha256: str) -> str:
    """The device model's URL, versioned by its sha256 (a new model is a new URL)."""
    return f"{base}api/v1/device/model.tflite?v={sha256[:16]}"


def browser_config(service, config: dict[str, Any], base_url: str,
                   version: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the page's device.js needs: runtime URLs, the model URL and its tensor contract
    (both URLs versioned when ``version``, ``delivery.version_body``, is given)."""
    dev = service.device
    status = runtime_status(config)
    rid = (version or {}).get("runtime", {}).get("id")
    return {**status,
            "runtime": base_url + (f"runtime/{rid}/" if rid else "runtime/"),
            "model": (model_url(base_url, dev.sha256) if version
                      else base_url + "api/v1/device/model.tflite"),
            "policy_sha256": service.policy.sha256,
            "runtime_id": rid, "cache_key": (version or {}).get("cache_key"),
            "keep_photos": bool(config.get("KEEP_PHOTOS")),
            "sha256": dev.sha256, "image_size": dev.image_size,
            "labels": list(dev.labels),
            "input": dev.input.to_dict(),
            "outputs": {h: c.to_dict() for h, c in dev.outputs.items()},
            "metadata_tables": tables(dev.card) is not None,
            "cloud": service.cloud is not None,
            "gate": {"enabled": service.gate.enabled, "params": quality.params()}}


OPERATING_KEYS = (("fallback_rate", "n"), ("referral_rate", "n"),
                  ("melanoma_sensitivity", "n_melanoma"),
                  ("melanoma_specificity", "n_not_melanoma"))


def operating_point(policy) -> dict[str, Any] | None:
    """What the active policy did on its calibration split, each rate with a 95 % interval
    (Wilson); None for the default thresholds, which were not calibrated on anything."""
    chosen = next((r for r in policy.coverage if r.get("chosen")), None)
    if chosen is None:
        return None
    out: dict[str, Any] = {"n": chosen.get("n"), "split": policy.provenance.get("split"),
                           "data": Path(str(policy.provenance.get("data", ""))).name or None,
                           "note": NEW_SITE_NOTE}
    for key, count in OPERATING_KEYS:
        value, n = chosen.get(key), chosen.get(count)
        ci = chosen.get(key + "_ci")
        if ci is None and value is not None and n:
            ci = wilson(round(value * n), n)
        out[key] = {"value": value, "ci95": ci, "n": n}
    return out


def policy_body(service) -> dict[str, Any]:
    """``GET /api/v1/policy``: thresholds, the rules both evaluators read, operating point."""
    from .policy import DEFAULTS_NOTE, DISCLAIMER

    pol = service.policy
    tiers = {"device": service.device, "cloud": service.cloud}
    return {"policy": pol.to_dict(), "sha256": pol.sha256, "rules": rules(),
            "gate": service.gate.describe(), "gate_rules": gate_rules(),
            "device_threshold": service._threshold(service.device, None),
            # what static/answer.js needs to give the server's answer offline
            "device_metadata": tables(service.device.card),
            "metadata_tables": {k: tables(t.card) is not None for k, t in tiers.items()
                                if t is not None},
            "models": {"device": service.device.summary(),
                       "cloud": service.cloud.summary() if service.cloud else None,
                       "policy": pol.source, "policy_sha256": pol.sha256},
            "disclaimer": DISCLAIMER,
            "note": DEFAULTS_NOTE if pol.source == "defaults" else None,
            "operating_point": operating_point(pol), "calibrate_note": NEW_SITE_NOTE}


def parse_device_answer(raw: str | None, labels: tuple[str, ...]) -> dict[str, Any]:
    """The page's device answer (JSON), checked: probabilities in [0, 1] for every label."""
    if not raw:
        raise RequestError("The field 'device_answer' is missing: POST the answer the page"
                           " computed (JSON with melanoma, diagnosis, latency_ms).",
                           code="bad_device_answer")
    try:
        doc = json.loads(raw)
        mel = float(doc["melanoma"])
        diag = {lab: float(doc["diagnosis"][lab]) for lab in labels}
        latency = float(doc.get("latency_ms", 0.0))
        ood = None if doc.get("ood") is None else float(doc["ood"])
    except (ValueError, TypeError, KeyError) as exc:
        raise RequestError(
            f"The field 'device_answer' must be JSON with 'melanoma' (0-1), 'diagnosis' (a"
            f" probability for each of {list(labels)}) and 'latency_ms'; {type(exc).__name__}:"
            f" {exc}.", code="bad_device_answer") from exc
    values = [mel, *diag.values(), *([] if ood is None else [ood])]
    if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values) or not (
            math.isfinite(latency) and latency >= 0):
        raise RequestError("The device answer's probabilities must be numbers in [0, 1] and"
                           " latency_ms >= 0.", code="bad_device_answer")
    top = max(diag, key=diag.__getitem__)
    out = {"melanoma": mel, "diagnosis": diag, "top": {"label": top, "probability": diag[top]},
           "latency_ms": round(latency, 3), "computed_on": "browser"}
    if ood is not None:
        out["ood"] = ood
    return out


def decide(service, device: dict[str, Any] | None, data: bytes | None,
           meta: dict[str, Any] | None, *, ask_cloud: bool = False,
           page_gate: dict[str, float | None] | None = None,
           raw: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``/api/v1/classify`` body for a device answer computed in the browser (the model's
    output: the policy's temperature and the patient fields are applied here, as for the
    server tier); the cloud tier runs only when the photo was sent and a fallback rule fired
    (or the tester asked: then the cloud answer is shown, and the policy still decides on the
    device answer). ``raw`` (optional) receives the tiers' model outputs for the case log.

    The input gate is re-checked with the server's thresholds on what the server has: the
    page's measures (``page_gate``, the ``gate`` field), the measures of the photo itself
    when it was sent, and the device answer's ``ood``. A refused photo needs no device answer.
    """
    t_all = time.perf_counter()
    timings = {"decode": 0.0, "device": float(device["latency_ms"]) if device else 0.0,
               "cloud": 0.0}
    image = None
    values = dict(page_gate or {})
    if data and service.gate.enabled:  # the photo's own measures, not the page's word
        image = service.decode(data, timings)
        values.update(image["gate"])
    if device is not None and device.get("ood") is not None:
        values["ood"] = device["ood"]
    outcome = service.gate.decide(values)
    if not outcome.passed or device is None:
        if outcome.passed:
            raise RequestError("The field 'device_answer' is missing: POST the answer the page"
                               " computed (JSON with melanoma, diagnosis, latency_ms), or a"
                               " 'gate' whose measures refuse the photo.",
                               code="bad_device_answer")
        if raw is not None and device is not None:
            raw["device"] = {"melanoma": device["melanoma"],
                             "diagnosis": dict(device["diagnosis"])}
        body = service.refuse(outcome, meta)
        timings["total"] = round((time.perf_counter() - t_all) * 1000.0, 3)
        return {**body, "photo_received": bool(data), "timings_ms": timings,
                "tier_path": "browser", "device_computed_on": "browser"}
    device = service.adjust(service.device, device, meta, raw)
    checks = service.policy.fallback_checks(device)
    wants = any(c.fired for c in checks)
    cloud = None
    if (wants or ask_cloud) and data and service.cloud is not None:
        image = image or service.decode(data, timings, gate=False)
        t0 = time.perf_counter()
        cloud = service.run_tier(service.cloud, image, meta, raw)
        timings["cloud"] = round((time.perf_counter() - t0) * 1000.0, 3)
    note = " The photo was not sent, so the device answer stands." if wants and not data else ""
    body = service.respond(device, cloud, meta, wanted=wants, note=note, gate=outcome)
    body["fallback"]["asked"] = bool(ask_cloud)
    timings["total"] = round((time.perf_counter() - t_all) * 1000.0, 3)
    return {**body, "photo_received": bool(data), "timings_ms": timings,
            "tier_path": "browser+cloud" if cloud is not None else "browser",
            "device_computed_on": "browser"}
