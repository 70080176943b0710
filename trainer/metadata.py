"""Patient metadata (age, sex, body site) as a second, optional source of evidence.

The image model stays image-only (a phone often has no metadata, and the exported TFLite file
takes pixels alone). Where a case comes with metadata, its evidence is added afterwards by
Bayes' rule: a naive-Bayes table of ``log p(field value | diagnosis)`` per field, counted on
the run's **training** split with add-``smoothing`` counts, multiplies the image model's
probabilities by the metadata likelihood ratio

    p(y | image, meta)  ∝  p(y | image) · (p(meta | y) / p(meta)) ** weight

(the diagnosis softmax; the melanoma head's odds by ``p(meta | mel) / p(meta | not mel)``).
This holds whether the image model was trained class-balanced or not: the ratio only carries
what the metadata adds. Fields that are missing, unknown, or a value the table never saw,
contribute nothing, so a case without metadata keeps the image model's answer exactly.
``weight`` < 1 tempers the evidence: the three fields are not independent given the class,
and another clinic's patients differ from HAM10000's.

The section lives in the model card (``metadata_prior``, docs/ARTIFACTS.md) and is pure numbers,
so any consumer (``trainer evaluate``, the demo, a phone app) can apply it with a few lines.
The tables and their use are numpy only; ``fit_run`` (``trainer metadata RUN``) imports Keras
lazily to score the run's validation split with and without them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from dermedge.card import with_section, without_section
from dermedge.errors import RunDirError
from dermedge.files import write_json
from dermedge.labels import DIAGNOSIS_LABELS, MELANOMA_DX
from trainer.data import cache_images, read_splits
from trainer.errors import DermedgeError
from trainer.metrics import card_metrics, choose_threshold, score
from trainer.run import load_run, now_iso, read_card

FIELDS: tuple[str, ...] = ("age", "sex", "site")
AGE_BIN_YEARS = 10
AGE_LAST_BIN = 80  # 80 and over share a bin
DEFAULT_WEIGHT = 0.5
DEFAULT_SMOOTHING = 1.0
_UNKNOWN = {"", "unknown", "nan", "none", "null", "n/a", "na"}


def age_bin(age: Any) -> str | None:
    """``"40-49"`` for 45, ``"80+"`` for 85; None for a missing or impossible age."""
    try:
        a = float(age)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(a) or a < 0 or a > 120:
        return None
    lo = min(int(a // AGE_BIN_YEARS) * AGE_BIN_YEARS, AGE_LAST_BIN)
    return f"{lo}+" if lo == AGE_LAST_BIN else f"{lo}-{lo + AGE_BIN_YEARS - 1}"


def _text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    s = " ".join(str(value).strip().lower().split())
    return None if s in _UNKNOWN else s


def field_value(field: str, value: Any) -> str | None:
    """The table key of one raw field value (None: no evidence)."""
    return age_bin(value) if field == "age" else _text(value)


def _column(records, field: str) -> list:
    if hasattr(records, "columns"):  # a DataFrame of records (trainer.data)
        return records[field].tolist() if field in records.columns else [None] * len(records)
    return [r.get(field) for r in records]


def fit_prior(records, *, smoothing: float = DEFAULT_SMOOTHING,
              weight: float = DEFAULT_WEIGHT) -> dict[str, Any]:
    """Count the naive-Bayes tables on ``records`` (a DataFrame with ``dx`` and any of
    ``age``/``sex``/``site``; the training split) and return the card section."""
    if not smoothing > 0:
        raise DermedgeError(f"The metadata smoothing must be > 0 (pseudo-counts per cell); "
                            f"received {smoothing!r}.")
    check_weight(weight)
    labels = list(DIAGNOSIS_LABELS)
    dx = [str(d) for d in _column(records, "dx")]
    unknown = sorted(set(dx) - set(labels))
    if unknown:
        raise DermedgeError(f"Diagnoses {unknown} are not HAM10000 classes {labels}.")
    y = np.array([labels.index(d) for d in dx], dtype=int)
    if len(y) == 0:
        raise DermedgeError("No training images to count metadata on.")
    counts_y = np.bincount(y, minlength=len(labels)).astype(float)
    fields: dict[str, Any] = {}
    for field in FIELDS:
        values = [field_value(field, v) for v in _column(records, field)]
        known = [(v, c) for v, c in zip(values, y, strict=True) if v is not None]
        if not known:
            continue
        keys = sorted({v for v, _ in known}, key=_order(field))
        index = {k: i for i, k in enumerate(keys)}
        table = np.full((len(keys), len(labels)), float(smoothing))
        for v, c in known:
            table[index[v], c] += 1
        table /= table.sum(axis=0, keepdims=True)
        fields[field] = {"values": keys,
                         "log_likelihood": np.round(np.log(table), 6).tolist(),
                         "images": len(known)}
    if not fields:
        raise DermedgeError("The training records carry no age, sex or site, so there is no "
                            "metadata to learn from. Train on a HAM10000-style CSV with the "
                            "columns age, sex, localization (the ISIC 2018 Task 3 ground truth "
                            "has none).")
    return {"method": "naive-Bayes likelihood ratio on the image model's probabilities",
            "labels": labels, "fields": fields,
            "class_prior": np.round(counts_y / counts_y.sum(), 6).tolist(),
            "weight": float(weight), "smoothing": float(smoothing),
            "age_bins": {"years": AGE_BIN_YEARS, "last": f"{AGE_LAST_BIN}+"},
            "fit_on": {"split": "train", "images": int(len(y))}}


def _order(field: str):
    if field == "age":
        return lambda k: int(k.split("-")[0].rstrip("+"))
    return lambda k: k


def check_weight(weight: Any) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or \
            not 0 <= weight <= 4:
        raise DermedgeError(f"The metadata weight must be a number in [0, 4] (1: plain Bayes "
                            f"rule, {DEFAULT_WEIGHT}: default, tempered); received {weight!r}.")
    return float(weight)


def log_likelihood(prior: Mapping[str, Any], records) -> tuple[np.ndarray, np.ndarray]:
    """``(N, K)`` summed ``log p(value | class)`` over each case's known fields, and ``(N,)``
    how many fields each case contributed."""
    n = len(records)
    k = len(prior["labels"])
    ll = np.zeros((n, k))
    used = np.zeros(n, dtype=int)
    for field, spec in prior["fields"].items():
        index = {v: i for i, v in enumerate(spec["values"])}
        table = np.asarray(spec["log_likelihood"], dtype=float)
        for i, raw in enumerate(_column(records, field)):
            j = index.get(field_value(field, raw))
            if j is not None:
                ll[i] += table[j]
                used[i] += 1
    return ll, used


def apply_prior(prior: Mapping[str, Any], p_mel: np.ndarray, probs: np.ndarray, records, *,
                weight: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The image model's ``(p_mel (N,), probs (N, K))`` updated by each case's metadata;
    also returns how many fields each case had. Cases without usable metadata are unchanged."""
    w = check_weight(prior["weight"] if weight is None else weight)
    probs = np.asarray(probs, dtype=np.float64)
    p_mel = np.asarray(p_mel, dtype=np.float64).reshape(-1)
    if probs.shape != (len(records), len(prior["labels"])) or p_mel.shape != (len(records),):
        raise DermedgeError(f"apply_prior needs one row per case: {len(records)} records, "
                            f"probabilities {probs.shape}, melanoma {p_mel.shape}.")
    ll, used = log_likelihood(prior, records)
    logp = np.log(np.clip(probs, 1e-12, 1.0)) + w * ll
    logp -= logp.max(axis=1, keepdims=True)
    new = np.exp(logp)
    new /= new.sum(axis=1, keepdims=True)
    # Melanoma head: odds x p(meta | mel) / p(meta | not mel), the latter mixed by class prior.
    mel = list(prior["labels"]).index(MELANOMA_DX)
    pi = np.asarray(prior["class_prior"], dtype=float)
    rest = np.arange(len(pi)) != mel
    log_not = np.log(np.exp(ll[:, rest]) @ (pi[rest] / pi[rest].sum()))
    p = np.clip(p_mel, 1e-12, 1 - 1e-12)
    logit = np.log(p) - np.log1p(-p) + w * (ll[:, mel] - log_not)
    new_mel = 1.0 / (1.0 + np.exp(-logit))
    keep = used == 0  # bit-exact for cases without metadata
    new[keep], new_mel[keep] = probs[keep], p_mel[keep]
    return new_mel, new, used


def has_metadata(records) -> bool:
    """Whether any record carries a usable age, sex or site."""
    return any(field_value(f, v) is not None for f in FIELDS for v in _column(records, f))


def strongest(prior: Mapping[str, Any], top: int = 5) -> list[dict[str, Any]]:
    """The field values that raise one class's odds most: ``p(value | class) / p(value)``."""
    labels = list(prior["labels"])
    pi = np.asarray(prior["class_prior"], dtype=float)
    rows = []
    for field, spec in prior["fields"].items():
        table = np.exp(np.asarray(spec["log_likelihood"], dtype=float))
        for value, lik in zip(spec["values"], table, strict=True):
            ratio = lik / float(lik @ pi)  # p(value | y) / p(value)
            j = int(np.argmax(ratio))
            rows.append({"field": field, "value": value, "class": labels[j],
                         "ratio": float(ratio[j])})
    rows.sort(key=lambda r: -r["ratio"])
    return rows[:top]


def fit_run(run_dir, *, weight: float = DEFAULT_WEIGHT, smoothing: float = DEFAULT_SMOOTHING,
            batch_size: int = 64, progress: bool = True) -> dict[str, Any]:
    """Count the tables on a finished run's train split, score its val split with and without
    them, and store the section (with its own melanoma threshold) in the run's card.

    Only ``model_card.json`` changes (atomically); the model and its metrics stay image-only.
    """
    from pathlib import Path

    from trainer.pipeline import predict_arrays

    run = Path(run_dir).expanduser().resolve()
    card = read_card(run)
    records = read_splits(run / "splits.csv")
    train = records[records["split"] == "train"].reset_index(drop=True)
    val = records[records["split"] == "val"].reset_index(drop=True)
    if val.empty:
        raise RunDirError(f"{run / 'splits.csv'} has no val rows to score the metadata on.")
    section = fit_prior(train, smoothing=smoothing, weight=weight)
    if not has_metadata(val):
        raise RunDirError(f"The validation images of {run} carry no age, sex or site; the "
                          "metadata tables would change nothing there.")
    model, card = load_run(run)  # only once the splits are known to be usable
    images = cache_images(val["path"].tolist(), card.input_size, None, progress=progress)
    train_cfg = (card.get("config") or {}).get("train", {})
    # The predictions the run's threshold was chosen on (with flips if it was trained with tta).
    p_mel, probs = predict_arrays(model, images, batch_size=batch_size,
                                  tta=bool(train_cfg.get("tta", False)))
    spec = train_cfg.get("melanoma_threshold", "youden")
    scored = score_on_val(section, val, p_mel, probs, card.melanoma_threshold, spec)
    section.update(scored)
    write_json(run / "model_card.json", with_section(card, "metadata_prior", section).to_dict())
    return section


def score_on_val(section: Mapping[str, Any], val, p_mel: np.ndarray, probs: np.ndarray,
                 image_threshold: float, spec) -> dict[str, Any]:
    """What the tables do on the validation split: the melanoma threshold chosen on the updated
    probabilities (``spec`` as in ``train.melanoma_threshold``) and the metrics with and without."""

    image_only = score(val, p_mel, probs, threshold=image_threshold)
    p_mel2, probs2, used = apply_prior(section, p_mel, probs, val)
    threshold = choose_threshold(val, p_mel2, spec)
    fused = score(val, p_mel2, probs2, threshold=threshold)
    return {
        "created": now_iso(), "melanoma_threshold": float(threshold),
        "val": {"images": int(len(val)), "with_metadata": int((used > 0).sum()),
                "fields_per_image": round(float(used.mean()), 3)},
        "metrics": {"val": card_metrics(fused), "val_image_only": card_metrics(image_only)},
        "per_class_recall": {
            "val": {k: v["recall"] for k, v in fused["per_class"].items()},
            "val_image_only": {k: v["recall"] for k, v in image_only["per_class"].items()}},
    }


def for_run(records, p_mel: np.ndarray, probs: np.ndarray, image_threshold: float,
            spec) -> dict[str, Any] | None:
    """The card section for a run being written (``trainer fit`` / ``ensemble``): tables from
    the train split, scored on the val split; None when either split has no metadata."""
    train = records[records["split"] == "train"].reset_index(drop=True)
    val = records[records["split"] == "val"].reset_index(drop=True)
    if train.empty or val.empty or not has_metadata(train) or not has_metadata(val):
        return None
    section = fit_prior(train)
    section.update(score_on_val(section, val, p_mel, probs, image_threshold, spec))
    return section


def remove_from_run(run_dir) -> bool:
    """Drop the card's ``metadata_prior``; returns whether there was one."""
    from pathlib import Path


    run = Path(run_dir).expanduser().resolve()
    card = read_card(run)
    if "metadata_prior" not in card:
        return False
    write_json(run / "model_card.json", without_section(card, "metadata_prior").to_dict())
    return True
