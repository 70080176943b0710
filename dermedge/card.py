"""The model card (``model_card.json``): one builder, one reader. Plain Python, no TensorFlow.

A run directory and an export bundle each carry a card (docs/ARTIFACTS.md). Every writer
goes through :func:`build_card` (``trainer fit``, ``trainer ensemble``), :func:`recalibrated`
(``trainer calibrate``) or :func:`with_export` (``python -m export tflite``); every reader
goes through :func:`read_card` (the export, the demo), which validates what it reads and
names each problem. The JSON layout is unchanged from schema version 1: the typed fields are
views of the dict, and keys the typed card does not know are kept as they are.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dermedge import image as image_contract
from dermedge.errors import DermedgeError
from dermedge.labels import INPUT_NAME

CARD_SCHEMA_VERSION = 1
READABLE_VERSIONS: tuple[int, ...] = (1,)
CARD_FILE = "model_card.json"
# The feature-extractor sub-model's name in cards written before ``backbone_layer`` existed.
V1_BACKBONE_LAYER = "backbone"
RESIZE_MODES: tuple[str, ...] = (image_contract.RESIZE,)
# Top-level keys in the order every writer emits them (optional ones only when present).
KEY_ORDER: tuple[str, ...] = (
    "schema_version", "name", "created", "backbone", "backbone_layer", "weights", "input",
    "preprocessing",
    "heads", "ensemble", "data", "config", "training", "calibration", "distillation",
    "metrics", "versions", "reproducibility", "metadata_prior", "export", "gate")
# "gate": a bundle's input gate (export/gate.py: thresholds, measured refusal rates).
OPTIONAL_KEYS: tuple[str, ...] = ("ensemble", "metadata_prior", "export", "gate")
# What read_card checks (docs/ARTIFACTS.md lists the same; tests hold the two together).
REQUIRED_FIELDS: tuple[str, ...] = (
    "schema_version", "input.shape", "heads.melanoma.threshold", "heads.diagnosis.labels")
EXPORT_FIELDS: tuple[str, ...] = (
    "export.mode", "export.signature", "export.inputs.image", "export.outputs.melanoma",
    "export.outputs.diagnosis")


class CardError(DermedgeError):
    """A model card that is missing, unreadable or lacks what its reader needs."""


@dataclass(frozen=True)
class InputSpec:
    """The model's input (``card.input``): raw RGB pixels, ``(S, S, 3)``."""

    name: str
    size: int
    dtype: str
    resize: str

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.size, self.size, 3)


@dataclass(frozen=True)
class HeadSpec:
    """One output head (``card.heads.<name>``)."""

    activation: str | None
    labels: tuple[str, ...]
    threshold: float | None = None


@dataclass(frozen=True)
class ModelCard(Mapping):
    """A validated card. Build with :func:`build_card`, read with :func:`read_card`.

    The typed fields are what every stage reads; the card is also a read-only mapping of its
    top-level sections (``card["export"]``, ``card.get("calibration")``: copies, so the card
    cannot be changed through them). :meth:`to_dict` / :meth:`to_json` serialise it."""

    schema_version: int
    name: str | None
    backbone: str | None
    input: InputSpec
    melanoma: HeadSpec
    diagnosis: HeadSpec
    synthetic: bool
    raw: Mapping[str, Any]

    @property
    def input_size(self) -> int:
        return self.input.size

    @property
    def melanoma_threshold(self) -> float:
        return float(self.melanoma.threshold)

    @property
    def diagnosis_labels(self) -> tuple[str, ...]:
        return self.diagnosis.labels

    @property
    def backbone_layer(self) -> str | None:
        """The name of the model's feature-extractor sub-model (None for an ensemble)."""
        if "backbone_layer" in self.raw:
            return self.raw["backbone_layer"]
        return None if self.backbone == "ensemble" else V1_BACKBONE_LAYER

    @property
    def export(self) -> dict[str, Any] | None:
        section = self.raw.get("export")
        return copy.deepcopy(section) if isinstance(section, dict) else None

    def __getitem__(self, key: str) -> Any:
        """A top-level section as JSON (a copy), e.g. ``card["heads"]``."""
        return copy.deepcopy(self.raw[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self.raw)

    def __len__(self) -> int:
        return len(self.raw)

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(dict(self.raw))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"


# ---------------------------------------------------------------------------- builders
def build_card(*, name: str | None, created: str, backbone: str, weights: str | None,
               input_size: int, preprocessing: dict, melanoma_threshold: float,
               diagnosis_labels: tuple[str, ...] | list[str], data: dict, config: dict,
               training: dict, metrics_val: dict, versions: dict,
               melanoma_labels: tuple[str, ...] | list[str] = ("melanoma",),
               calibration: dict | None = None, distillation: dict | None = None,
               ensemble: dict | None = None, metadata_prior: dict | None = None,
               backbone_layer: str | None = None, synthetic: bool = False,
               reproducibility: dict | None = None) -> ModelCard:
    """The card of a run directory (``trainer fit``, ``trainer ensemble``).

    ``data.synthetic`` is set from ``synthetic``: True when the run trained on
    ``trainer toy-data`` output, so every bundle made from it says it is a toy model.
    ``backbone_layer``: the feature-extractor sub-model's name (export's bias correction works
    on it); None when the model has none (an ensemble). ``reproducibility``: what the
    figures depend on besides the config and ``versions`` (trainer/provenance.py), or None.
    """
    d: dict[str, Any] = {
        "schema_version": CARD_SCHEMA_VERSION,
        "name": name,
        "created": created,
        "backbone": backbone,
        "backbone_layer": backbone_layer,
        "weights": weights,
        # Keras and float TFLite take float32 pixels 0-255; the contract's uint8 is the image.
        "input": {**image_contract.describe(int(input_size)), "dtype": "float32"},
        "preprocessing": dict(preprocessing),
        "heads": {
            "melanoma": {"activation": "sigmoid", "labels": list(melanoma_labels),
                         "threshold": float(melanoma_threshold)},
            "diagnosis": {"activation": "softmax", "labels": list(diagnosis_labels)},
        },
        "ensemble": ensemble,
        "data": {**(data or {}), "synthetic": bool(synthetic)},
        "config": config,
        "training": training,
        "calibration": calibration,
        "distillation": distillation,
        "metrics": {"val": metrics_val},
        "versions": versions,
        "reproducibility": reproducibility,
        "metadata_prior": metadata_prior,
    }
    d = {k: v for k, v in d.items() if not (k in OPTIONAL_KEYS and v is None)}
    return card_from_dict(_ordered(d), where="the card being written")


def recalibrated(card: ModelCard, *, calibration: dict, melanoma_threshold: float,
                 metrics_val: dict, metadata_scores: dict | None = None) -> ModelCard:
    """``card`` after ``trainer calibrate`` folded new calibration into the model."""
    d = card.to_dict()
    d["calibration"] = calibration
    d["heads"]["melanoma"]["threshold"] = float(melanoma_threshold)
    d.setdefault("metrics", {})["val"] = metrics_val
    if metadata_scores and d.get("metadata_prior"):
        d["metadata_prior"].update(metadata_scores)
    return card_from_dict(d, where="the recalibrated card")


def with_export(card: ModelCard | Mapping[str, Any], section: dict) -> ModelCard:
    """A bundle's card: the run's card plus its ``export`` section."""
    d = card.to_dict() if isinstance(card, ModelCard) else copy.deepcopy(dict(card))
    d["export"] = section
    return card_from_dict(_ordered(d), where="the bundle card being written", need_export=True)


def with_section(card: ModelCard, key: str, value: Any) -> ModelCard:
    """``card`` with one top-level section set (e.g. ``metadata_prior``)."""
    d = card.to_dict()
    d[key] = value
    return card_from_dict(_ordered(d), where="the card being written")


def without_section(card: ModelCard, key: str) -> ModelCard:
    """``card`` without the optional top-level section ``key``."""
    if key not in OPTIONAL_KEYS:
        raise ValueError(f"{key!r} is not an optional card section ({', '.join(OPTIONAL_KEYS)}).")
    d = card.to_dict()
    d.pop(key, None)
    return card_from_dict(d, where="the card being written")


def _ordered(d: dict) -> dict:
    known = {k: d[k] for k in KEY_ORDER if k in d}
    return {**known, **{k: v for k, v in d.items() if k not in known}}


# ---------------------------------------------------------------------------- reader
def read_card(source: str | Path, *, error: type[DermedgeError] = CardError,
              need_export: bool = False) -> ModelCard:
    """The validated card at ``source`` (a ``model_card.json`` or the folder holding one).

    ``error`` is the class raised (the export raises RunDirError, the demo BundleError);
    ``need_export`` also checks the bundle's ``export`` section.
    """
    path = Path(source)
    if path.is_dir():
        path = path / CARD_FILE
    if not path.is_file():
        raise error(f"{path} does not exist. A run directory (`trainer fit`) and an export "
                    f"bundle (`python -m export tflite`) each hold a {CARD_FILE}; point at one.")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path} is not valid JSON ({exc}). Restore it, or re-create it with the "
                    "stage that wrote it (`trainer fit` or `python -m export tflite`).") from None
    return card_from_dict(d, where=str(path), error=error, need_export=need_export)


def card_from_dict(d: Any, *, where: str = "the model card",
                   error: type[DermedgeError] = CardError,
                   need_export: bool = False) -> ModelCard:
    """Validate a card already parsed from JSON; every problem is named in one message."""
    if not isinstance(d, dict):
        raise error(f"{where} must hold a JSON object; received {type(d).__name__}.")
    problems = card_problems(d, need_export=need_export)
    if problems:
        raise error(f"{where} is not a usable model card (schema version "
                    f"{CARD_SCHEMA_VERSION}, docs/ARTIFACTS.md): " + "; ".join(problems)
                    + ". Re-create it with the stage that wrote it (`trainer fit`, `python -m "
                    "export tflite`) or fix the field.")
    shape = _get(d, "input.shape")
    mel, diag = d["heads"]["melanoma"], d["heads"]["diagnosis"]
    return ModelCard(
        schema_version=int(d["schema_version"]),
        name=None if d.get("name") is None else str(d["name"]),
        backbone=None if d.get("backbone") is None else str(d["backbone"]),
        input=InputSpec(name=str(_get(d, "input.name") or INPUT_NAME), size=int(shape[0]),
                        dtype=str(_get(d, "input.dtype") or "float32"),
                        resize=str(_get(d, "input.resize") or image_contract.RESIZE)),
        melanoma=HeadSpec(mel.get("activation"), tuple(mel.get("labels") or ["melanoma"]),
                          float(mel["threshold"])),
        diagnosis=HeadSpec(diag.get("activation"), tuple(diag["labels"])),
        synthetic=bool(_get(d, "data.synthetic") or False),
        raw=copy.deepcopy(d),
    )


def card_problems(d: dict, *, need_export: bool = False) -> list[str]:
    """Every way ``d`` breaks the card contract, as short phrases (empty when it is fine)."""
    problems = []
    version = d.get("schema_version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        problems.append(f"schema_version is {version!r}; this dermedge reads "
                        f"{' or '.join(map(str, READABLE_VERSIONS))}")
    shape = _get(d, "input.shape")
    if not (isinstance(shape, list) and len(shape) == 3 and shape[2] == 3
            and shape[0] == shape[1] and isinstance(shape[0], int)
            and not isinstance(shape[0], bool) and shape[0] > 0):
        problems.append(f"input.shape must be [S, S, 3]; received {shape!r}")
    if _get(d, "input.name") not in (None, INPUT_NAME):
        problems.append(f"input.name must be {INPUT_NAME!r}; received {_get(d, 'input.name')!r}")
    resize = _get(d, "input.resize")
    if resize is not None and resize not in RESIZE_MODES:
        problems.append(f"input.resize={resize!r} is not supported (known: "
                        f"{', '.join(RESIZE_MODES)})")
    labels = _get(d, "heads.diagnosis.labels")
    if not (isinstance(labels, list) and labels and all(isinstance(x, str) for x in labels)
            and len(set(labels)) == len(labels)):
        problems.append(f"heads.diagnosis.labels must be a list of distinct label names; "
                        f"received {labels!r}")
    thr = _get(d, "heads.melanoma.threshold")
    if not (isinstance(thr, (int, float)) and not isinstance(thr, bool) and 0 < thr < 1):
        problems.append(f"heads.melanoma.threshold must be a number in (0, 1); received {thr!r}")
    synthetic = _get(d, "data.synthetic")
    if synthetic is not None and not isinstance(synthetic, bool):
        problems.append(f"data.synthetic must be true or false; received {synthetic!r}")
    if need_export:
        for field in EXPORT_FIELDS:
            if _get(d, field) is None:
                problems.append(f"{field} is missing")
    return problems


def _get(d: Any, dotted: str) -> Any:
    cur = d
    for key in dotted.split("."):
        if not isinstance(cur, dict) or key not in cur:
            return None
        cur = cur[key]
    return cur
