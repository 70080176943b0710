"""Knowledge distillation: a run learns from a finished teacher run's probabilities.

``train.distill_from: RUN`` (a finished run, typically the cloud ensemble) and
``train.distill_weight: a``: each training image's targets become ``(1 - a) * label +
a * teacher``, for both heads (Hinton et al. 2015, with the soft term at temperature 1, which
is the same loss up to a constant). The teacher answers once per training image, on the
unaugmented image at its own input size; the answers are cached beside the image cache,
keyed by the teacher's ``model.keras`` bytes and the images, so a second student (or a
resumed run) does not pay for them again.

What the targets mean. The student's diagnosis head is trained to reproduce the teacher's
diagnosis probabilities: with ``class_balance: logit_adjust`` the loss compares
``softmax(z + tau * log prior)`` to the target, so the teacher's probabilities are multiplied
by ``prior ** tau`` (and renormalised) first, the same shift the hard labels get implicitly.
The melanoma head's target is the teacher's calibrated P(melanoma), which is already on the
data's own prior, like the 0/1 label it is mixed with.

The teacher must not have trained on this run's validation or test images: its answers would
carry those labels into training and inflate every validation figure. ``check_no_leak``
refuses such a teacher.
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dermedge.files import atomic_path
from trainer.errors import ConfigError

TARGETS_VERSION = 1


def check_teacher(teacher: str | Path) -> dict[str, Any]:
    """The teacher's model card; a clear error if it is not a finished run with both heads."""
    from dermedge.errors import RunDirError
    from dermedge.labels import DIAGNOSIS_LABELS
    from trainer.run import read_card

    try:
        card = read_card(teacher)
    except RunDirError as e:
        raise ConfigError(f"train.distill_from: {e}") from None
    labels = list(card.diagnosis_labels)
    if labels != list(DIAGNOSIS_LABELS):
        raise ConfigError(f"train.distill_from: {teacher}'s diagnosis head has labels {labels}; "
                          f"a teacher needs the HAM10000 order {list(DIAGNOSIS_LABELS)}.")
    return card


def check_no_leak(teacher: str | Path, records: pd.DataFrame) -> None:
    """Refuse a teacher whose train split holds any of ``records``' val/test lesions (or
    images, where a dataset has no lesion ids)."""
    from trainer.data import read_splits

    theirs = read_splits(Path(teacher) / "splits.csv")
    taught = theirs[theirs["split"] == "train"]
    held = records[records["split"] != "train"]
    by_lesion = held["lesion_id"].notna().all() and taught["lesion_id"].notna().all()
    key = "lesion_id" if by_lesion else "image_id"
    leaked = sorted(set(held[key].astype(str)) & set(taught[key].astype(str)))
    if leaked:
        what = "lesions" if by_lesion else "images"
        raise ConfigError(
            f"train.distill_from: the teacher {teacher} trained on {len(leaked)} of this run's "
            f"{len(held)} validation/test {what} (e.g. {leaked[0]}), so its answers would carry "
            "their labels into training and inflate the validation scores. Use a teacher "
            "trained on the same split (same data.path, data.val_fraction, data.test_fraction "
            "and data.split_seed), or leave train.distill_from unset.")


def teacher_answers(teacher: str | Path, paths: list[str], *, cache_dir: str | Path | None,
                    batch_size: int = 64, workers: int | None = None,
                    progress: bool = True) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``(p_mel (N,), probs (N, 7), info)``: the teacher's answers on ``paths`` (one pass over
    the unaugmented images; an ensemble's flips are inside its model), cached on disk."""
    from dermedge.files import cache_dir as default_cache_dir
    from trainer.data import cache_images, cache_key
    from trainer.pipeline import N_CLASSES, predict_arrays
    from trainer.run import load_run

    teacher = Path(teacher)
    card = check_teacher(teacher)
    size = card.input_size
    sha = hashlib.sha256((teacher / "model.keras").read_bytes()).hexdigest()  # as trainer ensemble
    key, _ = cache_key(paths, size)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"teacher_v{TARGETS_VERSION}_{sha[:16]}_{size}px_n{len(paths)}_{key}.npz"
    info = {"teacher": str(teacher), "teacher_name": card.name,
            "teacher_backbone": card.backbone, "teacher_sha256": sha,
            "teacher_input_size": size,
            "teacher_val": {k: card.get("metrics", {}).get("val", {}).get(k)
                            for k in ("balanced_accuracy", "melanoma_auc")},
            "cache": str(final)}
    if final.is_file():
        try:
            with np.load(final) as z:
                p_mel, probs = z["p_mel"], z["probs"]
            if p_mel.shape == (len(paths),) and probs.shape == (len(paths), N_CLASSES):
                return p_mel, probs, {**info, "cached": True}
        except (OSError, ValueError, KeyError):
            pass  # a corrupt cache file is recomputed
    images = cache_images(paths, size, cache_dir, workers=workers, progress=progress)
    model, _ = load_run(teacher)
    n, t0 = len(paths), time.time()
    p_mel, probs = np.empty(n), np.empty((n, N_CLASSES))
    chunk = max(batch_size, 256)
    for start in range(0, n, chunk):
        p_mel[start:start + chunk], probs[start:start + chunk] = predict_arrays(
            model, images[start:start + chunk], batch_size=batch_size)
        if progress:
            done = min(start + chunk, n)
            print(f"distill: teacher {teacher.name} answered {done}/{n} training images "
                  f"({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
    with atomic_path(final, suffix=".npz") as tmp:
        np.savez(tmp, p_mel=p_mel, probs=probs)
    return p_mel, probs, {**info, "cached": False, "seconds": round(time.time() - t0, 1)}


def soft_targets(p_mel: np.ndarray, probs: np.ndarray, *, log_prior: np.ndarray | None,
                 tau: float = 1.0) -> dict[str, np.ndarray]:
    """The heads' soft targets from the teacher's answers (module docstring): ``log_prior``
    (the student's train-split log class prior) when the student's loss is logit-adjusted."""
    probs = np.clip(np.asarray(probs, np.float64), 1e-12, None)
    if log_prior is not None:
        probs = probs * np.exp(tau * np.asarray(log_prior, np.float64))
    probs = probs / probs.sum(axis=1, keepdims=True)
    return {"melanoma": np.clip(np.asarray(p_mel, np.float64), 0.0, 1.0).astype(np.float32),
            "diagnosis": probs.astype(np.float32)}


def agreement(probs: np.ndarray, labels: np.ndarray) -> float:
    """How often the teacher's top diagnosis is the label on the training images."""
    return float(np.mean(np.asarray(probs).argmax(axis=1) == np.asarray(labels)))
