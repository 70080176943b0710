"""``trainer ensemble``: several finished runs (+ flip test-time augmentation) as one run.

The ensemble is an ordinary run directory (docs/ARTIFACTS.md): one ``model.keras`` taking raw
RGB 0-255 with the named heads ``melanoma``/``diagnosis``, each the mean of its members'
probabilities over the identity and the horizontal, vertical and double flips. It is built
from built-in layers only, so it loads without custom objects and exports to TFLite like any
run: a flip is ``Permute -> Dense(fixed reversal matrix) -> Permute``, exact in float32.

Members must share the input size and the data split (the ensemble's validation scores would
otherwise include images a member trained on). Temperature scaling is fitted on the ensemble's
averaged output and folded into every member's heads (trainer.calibration).
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dermedge.artifacts import partial_dir
from dermedge.card import build_card
from dermedge.errors import RunDirError
from dermedge.files import write_text
from dermedge.labels import DIAGNOSIS_LABELS, INPUT_NAME, MELANOMA_LABELS
from trainer.calibration import calibrate as fit_and_fold
from trainer.calibration import strip_class_bias
from trainer.data import cache_images, read_splits
from trainer.errors import DermedgeError
from trainer.evaluate import write_outputs
from trainer.metadata import for_run as metadata_for_run
from trainer.metrics import card_metrics, choose_threshold, score
from trainer.run import (
    is_complete_run,
    load_run,
    now_iso,
    publish_run,
    save_model,
    start_run,
    versions,
)

FLIPS = ("identity", "hflip", "vflip", "hvflip")


def flip(x, axis: str, size: int, name: str):
    """Reverse ``x`` (N, S, S, C) along ``axis`` ("h": width, "v": height) with built-in layers:
    move that axis last, multiply by the S x S anti-identity, move it back."""
    from keras import layers

    perm = (1, 3, 2) if axis == "h" else (3, 2, 1)  # swap the flipped axis with channels
    reverse = layers.Dense(size, use_bias=False, trainable=False, name=f"{name}_reverse")
    x = layers.Permute(perm, name=f"{name}_to_last")(x)
    x = reverse(x)
    reverse.set_weights([np.eye(size, dtype="float32")[::-1].copy()])
    return layers.Permute(perm, name=f"{name}_back")(x)


def build_ensemble(members: Sequence[Any], size: int, *, tta: bool = True,
                   name: str = "dermedge_ensemble"):
    """One model: the mean of ``members``' heads over ``FLIPS`` (or the identity only)."""
    import keras
    from keras import layers

    if not members:
        raise DermedgeError("An ensemble needs at least one member run.")
    image = keras.Input((size, size, 3), name=INPUT_NAME, dtype="float32")
    views = {"identity": image}
    if tta:
        views["hflip"] = flip(image, "h", size, "hflip")
        views["vflip"] = flip(image, "v", size, "vflip")
        views["hvflip"] = flip(views["hflip"], "v", size, "hvflip")
    mel, diag = [], []
    for i, member in enumerate(members):
        member.name = f"member{i}_{member.name}"  # unique names inside the ensemble
        member.trainable = False
        for view in views.values():
            out = member(view)
            mel.append(out["melanoma"])
            diag.append(out["diagnosis"])

    def mean(tensors, head):
        return tensors[0] if len(tensors) == 1 else layers.Average(name=head)(tensors)

    return keras.Model(image, {"melanoma": mean(mel, "melanoma"),
                               "diagnosis": mean(diag, "diagnosis")}, name=name)


def _same_splits(runs: Sequence[Path]):
    first = read_splits(runs[0] / "splits.csv")
    key = first[["image_id", "split"]].sort_values("image_id").reset_index(drop=True)
    for run in runs[1:]:
        other = read_splits(run / "splits.csv")
        k2 = other[["image_id", "split"]].sort_values("image_id").reset_index(drop=True)
        if not key.equals(k2):
            raise DermedgeError(
                f"{run} was trained on a different split than {runs[0]} (their splits.csv "
                "differ), so the ensemble's validation images would include images a member "
                "trained on. Train every member with the same data, data.val_fraction and "
                "data.split_seed.")
    return first


def _member_passes(members, images: np.ndarray, *, tta: bool, batch_size: int):
    """Per-pass predictions ``(P, N)`` and ``(P, N, K)``, P = members x flips."""
    from trainer.pipeline import predict_arrays

    mel, diag = [], []
    views = ((False, False), (True, False), (False, True), (True, True)) if tta else (
        (False, False),)
    for member in members:
        for hflip, vflip in views:
            x = images[:, :, ::-1] if hflip else images
            x = x[:, ::-1] if vflip else x
            p, d = predict_arrays(member, np.ascontiguousarray(x), batch_size=batch_size)
            mel.append(p)
            diag.append(d)
    return np.stack(mel), np.stack(diag)


def ensemble_runs(run_dirs: Sequence[str | Path], out: str | Path, *, tta: bool = True,
                  calibrate: bool = True, class_bias: bool = False, name: str | None = None,
                  overwrite: bool = False, batch_size: int = 64,
                  progress: bool = True) -> dict[str, Any]:
    """Combine finished runs into the run directory ``out``; returns its model card.
    ``class_bias``: calibration also fits per-class diagnosis offsets (trainer.calibration) on
    the averaged output, after removing any offsets the members carry (those were fitted for
    each member alone, on the same images; the ensemble's cross-fitted figure then covers every
    offset in the model)."""
    import keras

    from trainer.pipeline import MEL_INDEX, labels_from_dx, predict_arrays

    if class_bias and not calibrate:
        raise DermedgeError("--class-bias is fitted with the calibration; drop --no-calibrate "
                            "or --class-bias.")
    t0 = time.time()
    runs = [Path(r).expanduser().resolve() for r in run_dirs]
    if len(set(runs)) != len(runs):
        raise DermedgeError("The same run is given twice; pass each member run once.")
    out = Path(out).expanduser().resolve()
    if out.exists() and not overwrite:
        what = "a complete run" if is_complete_run(out) else "something"
        raise RunDirError(f"--out {out} already holds {what}; pass --overwrite to replace it, "
                          "or choose another --out.")
    loaded = [load_run(r) for r in runs]
    sizes = {card.input_size for _, card in loaded}
    if len(sizes) != 1:
        raise DermedgeError(f"Member runs take different input sizes ({sorted(sizes)}); an "
                            "ensemble needs one input size. Train the members at the same "
                            "model.input_size.")
    for run, (_, card) in zip(runs, loaded, strict=True):
        if list(card.diagnosis_labels) != list(DIAGNOSIS_LABELS):
            raise DermedgeError(f"{run} has diagnosis labels {card['heads']['diagnosis']['labels']}"
                                f"; an ensemble needs the HAM10000 order {list(DIAGNOSIS_LABELS)}.")
    size = sizes.pop()
    records = _same_splits(runs)
    val = records[records["split"] == "val"].reset_index(drop=True)
    members = [model for model, _ in loaded]
    val_y = labels_from_dx(val["dx"])
    images = cache_images(val["path"].tolist(), size, None, progress=progress)

    stripped = []
    if class_bias:  # members' own offsets were fitted for each alone: the average gets its own

        stripped = [str(run) for run, (model, card) in zip(runs, loaded, strict=True)
                    if strip_class_bias(model, card)]
    calibration = None
    if calibrate:
        p_passes, d_passes = _member_passes(members, images, tta=tta, batch_size=batch_size)
        calibration = fit_and_fold(members, p_passes, d_passes, val_y, val_y == MEL_INDEX,
                                   class_bias=class_bias)
    model = build_ensemble(members, size, tta=tta)
    p_mel, probs = predict_arrays(model, images, batch_size=batch_size)
    threshold = choose_threshold(val, p_mel, "youden")
    metrics = score(val, p_mel, probs, threshold=threshold)
    metrics.update({"split": "val", "source": loaded[0][1].get("data", {}).get("source"),
                    "tta": bool(tta)})

    work = partial_dir(out)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    try:
        import yaml

        spec = {"ensemble": {"members": [str(r) for r in runs], "tta": bool(tta),
                             "calibrate": bool(calibrate),
                             "class_bias": bool(calibrate and class_bias)}}
        # the members' splits (identical, checked above): the held-out images they never saw
        start_run(work, records, yaml.safe_dump(spec, sort_keys=False))
        save_model(model, work)
        write_text(work / "history.csv", "epoch,phase\n")
        write_outputs(work, val, p_mel, probs, metrics, predictions=False, report=False)
        first = loaded[0][1]
        data = dict(first.get("data") or {})
        data.pop("synthetic", None)  # a toy member makes a toy ensemble
        synthetic = any((c.get("data") or {}).get("synthetic") for _, c in loaded)
        card = build_card(
            name=name or out.name, created=now_iso(), backbone="ensemble", weights=None,
            input_size=size,
            preprocessing={"in_model": True, "mode": "per member",
                           "formula": "each member normalises inside its own sub-model"},
            melanoma_threshold=threshold, diagnosis_labels=DIAGNOSIS_LABELS,
            melanoma_labels=MELANOMA_LABELS,
            ensemble={
                "tta": list(FLIPS) if tta else ["identity"],
                "passes": len(members) * (len(FLIPS) if tta else 1),
                "members": [{"run": str(r), "name": c.name, "backbone": c.backbone,
                             "sha256": hashlib.sha256((r / "model.keras").read_bytes())
                             .hexdigest(),
                             "val_balanced_accuracy": c.get("metrics", {}).get("val", {})
                             .get("balanced_accuracy")}
                            for r, (_, c) in zip(runs, loaded, strict=True)],
                "member_offsets_removed": stripped,
            },
            data=data, synthetic=synthetic, config=spec,
            training={"epochs_run": 0, "wall_time_s": round(time.time() - t0, 1),
                      "backend": keras.backend.backend(),
                      "members_wall_time_s": round(sum(
                          c.get("training", {}).get("wall_time_s") or 0.0
                          for _, c in loaded), 1)},
            calibration=calibration, metrics_val=card_metrics(metrics), versions=versions(),
            # age/sex/site evidence (trainer.metadata), or None
            metadata_prior=metadata_for_run(records, p_mel, probs, threshold, "youden"),
        )
        publish_run(work, out, card, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return card
