"""The classify pipeline shared by the HTTP API and ``edge-demo predict``."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dermedge import quality
from dermedge.image import DRAFT_MIN_CROP

from .errors import EdgeDemoError
from .gate import RETAKE, Gate, GateOutcome
from .imaging import (
    DEFAULT_MAX_DECODED_PIXELS,
    DEFAULT_MAX_PIXELS,
    DecodeBudget,
    open_upload,
    reuse_image_memory,
)
from .keras_tier import load_cloud_tier
from .metadata import adjust, tables
from .policy import DEFAULTS_NOTE, DISCLAIMER, Policy
from .temperature import apply as apply_temperature
from .temperature import scale_probability
from .tiers import Tier, validation_refusal

log = logging.getLogger("edge_demo")

# Pixels decoded at once across the server's threads: one 16 MP image, or ~200 phone photos
# decoded at reduced scale; bounds the memory of decoding to 4 bytes x this x a few copies.
DEFAULT_DECODE_BUDGET = 16_000_000
# Reduced-scale JPEG decoding keeps the crop >= 2x the model side where a reduced scale allows
# it (a 12 MP photo at 1/4 for 224 px), else >= 1x (a 600 x 450 photo at 1/2, not in full):
# the inputs stay within the tolerances in tests/test_server_hardening.py, and the edge model's
# answers move about as much as with a JPEG re-save at quality 90 (benchmarks/serving.md).
DEFAULT_DECODE_MIN_CROP = DRAFT_MIN_CROP


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000.0, 3)


@dataclass(frozen=True)
class DemoService:
    """The loaded tiers and policy; built once at start-up."""

    device: Tier
    cloud: Tier | None
    policy: Policy
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_decoded_pixels: int = DEFAULT_MAX_DECODED_PIXELS
    budget: DecodeBudget | None = None
    fast_decode: bool = True
    decode_min_crop: float = DEFAULT_DECODE_MIN_CROP
    gate: Gate = Gate(enabled=False)  # from_paths builds the device bundle's gate

    @classmethod
    def from_paths(cls, device: str | Path, cloud: str | Path | None = None,
                   policy: str | Path | None = None, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                   max_decoded_pixels: int = DEFAULT_MAX_DECODED_PIXELS,
                   decode_budget: int = DEFAULT_DECODE_BUDGET, pool_size: int = 1,
                   num_threads: int = 1, allow_unvalidated: bool = False,
                   fast_decode: bool = True,
                   decode_min_crop: float = DEFAULT_DECODE_MIN_CROP,
                   gate: bool = True) -> DemoService:
        """Load the bundles (and the policy file, else conservative defaults); ``gate=False``
        turns the input gate off (research: every photo gets a diagnosis, and says so)."""
        if not device:
            raise EdgeDemoError("No device bundle given. Pass --device BUNDLE_DIR (or set"
                                " DEVICE_BUNDLE / EDGE_DEMO_DEVICE_BUNDLE).")
        dev = Tier.from_bundle(device, pool_size=pool_size, num_threads=num_threads,
                               allow_unvalidated=allow_unvalidated, flag="--device")
        cl = (load_cloud_tier(cloud, pool_size=pool_size, num_threads=num_threads)
              if cloud else None)
        for flag, tier in (("--device", dev), ("--cloud", cl)):
            if tier is None:
                continue
            failed = ((tier.card.get("export") or {}).get("validation") or {}
                      ).get("passed") is False
            if failed and not allow_unvalidated:
                raise EdgeDemoError(validation_refusal(flag, tier.bundle, tier.card))
            if failed:
                log.warning("Serving %s although it failed its export validation"
                            " (--allow-unvalidated): for comparison only.", tier.bundle)
        reuse_image_memory()
        if policy:
            pol = Policy.load(policy)
        else:
            pol = Policy.conservative((cl or dev).melanoma_threshold)
        gate_ = Gate.for_tier(dev.card, pol.gate, has_ood=dev.has_ood, enabled=gate,
                              image_size=dev.image_size)
        return cls(dev, cl, pol, int(max_pixels), int(max_decoded_pixels),
                   DecodeBudget(decode_budget), bool(fast_decode), float(decode_min_crop),
                   gate_)

    def warm_up(self) -> None:
        self.device.warm_up()
        if self.cloud is not None:
            self.cloud.warm_up()

    def models(self) -> dict[str, Any]:
        pol = self.policy.to_dict()
        if self.policy.source == "defaults":
            pol["note"] = DEFAULTS_NOTE
        out = {"device": self.device.describe(),
               "cloud": self.cloud.describe() if self.cloud else None,
               "policy": pol, "gate": self.gate.describe()}
        for name in ("device", "cloud"):
            tier = getattr(self, name)
            if tier is None:
                continue
            synthetic = bool((tier.card.get("data") or {}).get("synthetic", False))
            out[name]["synthetic"] = synthetic
            if synthetic:
                out[name]["note"] = ("A toy model trained on synthetic images: its answers"
                                     " say nothing about real skin lesions.")
        return out

    def _tiers(self) -> list:
        return [t for t in (self.device, self.cloud) if t is not None]

    def decode(self, data: bytes, timings: dict[str, float], what: str = "uploaded file",
               *, gate: bool | None = None) -> dict[Any, Any]:
        """Upload bytes -> ``{side: (side, side, 3) uint8}`` for every loaded tier's size,
        and with the gate on (``gate``: default the service's) ``"gate"``: the photo's
        measures (dermedge.quality; ``timings["gate"]`` is their cost).

        JPEGs are decoded at reduced scale (crop >= the largest model side, and >= the gate
        image's side); the decoded pixels are held against the decode budget until every input
        is cut from them, so concurrent large images cannot pile up in memory.
        """
        t0 = time.perf_counter()
        gate = self.gate.enabled if gate is None else gate
        sizes = sorted({t.image_size for t in self._tiers()})
        upload = open_upload(data, max_pixels=self.max_pixels,
                             size=max(sizes) if self.fast_decode else None,
                             min_crop=self.decode_min_crop,
                             max_decoded_pixels=self.max_decoded_pixels, what=what,
                             gate=gate)
        budget = self.budget or DecodeBudget(self.max_decoded_pixels)
        inputs: dict[Any, Any] = {}
        with budget.hold(upload.decoded_pixels):
            photo = upload.load()
            inputs.update({s: photo.model_input(s) for s in sizes})
            if gate:
                t1 = time.perf_counter()
                pixels, side = photo.gate_input()
            del photo, upload
        if gate:
            inputs["gate"] = quality.measure(pixels, side)
            timings["gate"] = _ms(t1)
        timings["decode"] = round(_ms(t0) - timings.get("gate", 0.0), 3)
        return inputs

    def decode_image(self, data: bytes, size: int | None = None):
        """Upload bytes -> the upright RGB image (for Grad-CAM), within the same limits."""
        upload = open_upload(data, max_pixels=self.max_pixels,
                             size=size if self.fast_decode else None,
                             min_crop=self.decode_min_crop,
                             max_decoded_pixels=self.max_decoded_pixels)
        budget = self.budget or DecodeBudget(self.max_decoded_pixels)
        with budget.hold(upload.decoded_pixels):
            return upload.load().image

    def run_tier(self, tier: Tier, inputs: dict[int, Any],
                 meta: dict[str, Any] | None = None,
                 raw: dict[str, Any] | None = None) -> dict[str, Any]:
        """The tier's answer: the model's output (kept in ``raw[role]`` when given), at the
        policy's temperature, updated by the case's metadata when its card has the tables."""
        return self.adjust(tier, tier.predict(inputs[tier.image_size]), meta, raw)

    def role(self, tier: Tier) -> str:
        return "device" if tier is self.device else "cloud"

    def adjust(self, tier: Tier, answer: dict[str, Any], meta: dict[str, Any] | None,
               raw: dict[str, Any] | None = None) -> dict[str, Any]:
        """A model output -> the answer the policy decides on (temperature, then metadata)."""
        role = self.role(tier)
        if raw is not None:
            raw[role] = {"melanoma": answer["melanoma"], "diagnosis": dict(answer["diagnosis"])}
        answer = apply_temperature(answer, self.policy.temperature.get(role))
        prior = tables(tier.card) if meta else None
        if prior is not None:
            answer, _ = adjust(answer, prior, meta)
        return answer

    def _threshold(self, tier, answer: dict[str, Any] | None) -> float | None:
        """The melanoma threshold that fits the answer: the tables' own after metadata, at
        the policy's temperature for the tier's melanoma head."""
        if tier is None:
            return None
        if answer is not None and answer.get("metadata_used"):
            t = float(tier.card["metadata_prior"]["melanoma_threshold"])
        else:
            t = tier.melanoma_threshold
        return scale_probability(t, self.policy.temperature_of(self.role(tier), "melanoma"))

    @staticmethod
    def _metadata_section(meta, device, cloud, tiers) -> dict[str, Any]:
        return {"received": meta or {},
                "used": {name: (answer or {}).get("metadata_used", [])
                         for name, answer in (("device", device), ("cloud", cloud))},
                "tables": {name: tables(t.card) is not None for name, t in tiers.items()
                           if t is not None}}

    def classify(self, data: bytes, metadata: dict[str, Any] | None = None, *,
                 what: str = "uploaded file",
                 raw: dict[str, Any] | None = None) -> dict[str, Any]:
        """Image bytes (+ optional age/sex/site) -> the ``/api/v1/classify`` response body;
        ``what`` names the image in error messages (a local file for ``edge-demo predict``);
        ``raw`` (optional) receives the tiers' model outputs for the case log."""
        t_all = time.perf_counter()
        timings: dict[str, float] = {"decode": 0.0, "device": 0.0, "cloud": 0.0}
        inputs = self.decode(data, timings, what)
        t0 = time.perf_counter()
        device = self.run_tier(self.device, inputs, metadata, raw)
        timings["device"] = _ms(t0)
        outcome = self.gate.decide({**inputs.get("gate", {}), "ood": device.get("ood")})
        if not outcome.passed:
            body = self.refuse(outcome, metadata)
            timings["total"] = _ms(t_all)
            return {**body, "timings_ms": timings, "tier_path": "device"}
        checks = self.policy.fallback_checks(device)
        wants = any(c.fired for c in checks)
        cloud = None
        cloud_error = None
        if wants and self.cloud is not None:
            t0 = time.perf_counter()
            try:
                cloud = self.run_tier(self.cloud, inputs, metadata, raw)
            except Exception as exc:  # noqa: BLE001 - a cloud failure must not fail the request
                log.exception("cloud tier failed")
                cloud_error = f"{type(exc).__name__}: {exc}"
            timings["cloud"] = _ms(t0)
        note = (f" The cloud tier failed ({cloud_error}); the device answer stands."
                if cloud_error else "")
        body = self.respond(device, cloud, metadata, wanted=wants, note=note, gate=outcome)
        timings["total"] = _ms(t_all)
        return {**body, "timings_ms": timings,
                "tier_path": "device+cloud" if cloud is not None else "device"}

    def respond(self, device: dict[str, Any], cloud: dict[str, Any] | None,
                metadata: dict[str, Any] | None, *, wanted: bool,
                note: str = "", gate: GateOutcome | None = None) -> dict[str, Any]:
        """The policy's decision on the tiers' answers, as the classify response body (less
        timings and path): shared by the server tier and the browser tier's /decide.
        ``gate``: the input gate's outcome on the photo (it passed)."""
        d = self.policy.decide(
            device, cloud, device_threshold=self._threshold(self.device, device),
            cloud_threshold=self._threshold(self.cloud, cloud))
        reason = d.fallback_reason
        if wanted and self.cloud is None:
            reason += " No cloud tier is configured, so the device answer stands."
        else:
            reason += note
        return {
            "device": device,
            "fallback": {"used": wanted and cloud is not None, "wanted": wanted,
                         "rules_fired": d.fallback_rules, "reason": reason,
                         "checks": [c.to_dict() for c in d.fallback_checks]},
            "cloud": cloud,
            "advice": {"decision": d.decision, "message": d.message,
                       "rules_fired": d.advice_rules, "decided_by": d.decided_by,
                       "checks": [c.to_dict() for c in d.advice_checks]},
            "gate": (gate or self.gate.decide({})).to_dict(),
            "disclaimer": DISCLAIMER,
            "metadata": self._metadata_section(metadata, device, cloud,
                                               {"device": self.device, "cloud": self.cloud}),
            "models": self._models_section(),
        }

    def _models_section(self) -> dict[str, Any]:
        return {"device": self.device.summary(),
                "cloud": self.cloud.summary() if self.cloud else None,
                "policy": self.policy.source, "policy_sha256": self.policy.sha256}

    def refuse(self, outcome: GateOutcome, metadata: dict[str, Any] | None) -> dict[str, Any]:
        """The body for a photo the input gate refused: ``retake``, what to change, and no
        diagnosis (``device``/``cloud`` are null) and no cloud fallback."""
        fired = [c.id for c in outcome.checks if c.fired]
        return {
            "device": None,
            "fallback": {"used": False, "wanted": False, "rules_fired": [],
                         "reason": "Not considered: the input gate refused the photo.",
                         "checks": []},
            "cloud": None,
            "advice": {"decision": RETAKE, "message": outcome.message, "rules_fired": fired,
                       "decided_by": "gate", "checks": []},
            "gate": outcome.to_dict(),
            "disclaimer": DISCLAIMER,
            "metadata": self._metadata_section(metadata, None, None,
                                               {"device": self.device, "cloud": self.cloud}),
            "models": self._models_section(),
        }

    def classify_cloud(self, data: bytes,
                       metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """The cloud tier alone (what a phone app calls on fallback)."""
        if self.cloud is None:
            raise EdgeDemoError("No cloud tier is loaded; start the server with --cloud.")
        t_all = time.perf_counter()
        timings: dict[str, float] = {"decode": 0.0, "cloud": 0.0}
        inputs = self.decode(data, timings)
        t0 = time.perf_counter()
        cloud = self.run_tier(self.cloud, inputs, metadata)
        timings["cloud"] = _ms(t0)
        timings["total"] = _ms(t_all)
        return {"cloud": cloud, "disclaimer": DISCLAIMER,
                "metadata": self._metadata_section(metadata, None, cloud,
                                                   {"cloud": self.cloud}),
                "timings_ms": timings,
                "tier_path": "cloud", "models": {"cloud": self.cloud.summary()}}
