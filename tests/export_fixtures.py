"""Run directories for export tests: a tiny model + card + splits over synthetic JPEGs.

Reusable by other test modules through :func:`make_run_dir`. The card comes from the one
builder (``dermedge.card.build_card``), as ``trainer fit`` writes it; the whole chain through
the real ``trainer fit`` and ``python -m export`` is in conftest.py's ``chain_*`` fixtures.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from dermedge.card import build_card
from dermedge.labels import DIAGNOSIS_LABELS, MELANOMA_DX

# One distinct colour per class, so a tiny CNN learns the task in a few epochs.
CLASS_COLOURS = {"akiec": (200, 60, 60), "bcc": (60, 200, 60), "bkl": (60, 60, 200),
                 "df": (200, 200, 60), "mel": (40, 20, 20), "nv": (200, 60, 200),
                 "vasc": (60, 200, 200)}


def write_images(folder: Path, per_class: dict[str, int], *, seed: int = 0,
                 size: tuple[int, int] = (56, 48)) -> list[dict]:
    """Noisy solid-colour JPEGs (non-square, so the centre crop matters); one row each."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for dx, n in per_class.items():
        for i in range(n):
            base = np.array(CLASS_COLOURS[dx], np.float32)
            img = base + rng.normal(0, 12, (size[1], size[0], 3))
            img = np.clip(img, 0, 255).astype(np.uint8)
            image_id = f"ISIC_{dx}_{seed}_{i:03d}"
            path = folder / f"{image_id}.jpg"
            Image.fromarray(img).save(path, quality=95)
            rows.append({"image_id": image_id, "lesion_id": f"L_{image_id}", "dx": dx,
                         "melanoma": int(dx == MELANOMA_DX), "path": str(path.resolve())})
    return rows


def smooth_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """Image-like uint8 inputs, ``(n, size, size, 3)``: a per-image colour plus noise."""
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 200, (n, 1, 1, 3))
    return np.clip(base + rng.normal(0, 25, (n, size, size, 3)), 0, 255).astype(np.uint8)


def card_for(name: str, backbone: str, size: int, threshold: float = 0.5) -> dict:
    """A run card from the real builder, for a ``build_model`` model trained outside
    ``trainer fit``."""
    from trainer.model import BACKBONE_NAME

    return build_card(
        name=name, created="2026-01-01T00:00:00+00:00", backbone=backbone,
        backbone_layer=BACKBONE_NAME, weights=None,
        input_size=size, preprocessing={"in_model": True}, melanoma_threshold=threshold,
        diagnosis_labels=DIAGNOSIS_LABELS, data={"source": "synthetic", "layout": "test"},
        synthetic=True, config={}, training={}, metrics_val={}, versions={}).to_dict()


def train_quickly(model, images: np.ndarray, dx: list[str], epochs: int = 30) -> None:
    """A few epochs so the outputs are confident (quantization then agrees with float)."""
    import keras

    idx = {lab: i for i, lab in enumerate(DIAGNOSIS_LABELS)}
    y = np.array([idx[d] for d in dx])
    mel = (np.array(dx) == MELANOMA_DX).astype(np.float32)[:, None]
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss={"diagnosis": "sparse_categorical_crossentropy",
                        "melanoma": "binary_crossentropy"})
    keras.utils.set_random_seed(0)
    model.fit(images.astype(np.float32), {"diagnosis": y, "melanoma": mel}, epochs=epochs,
              batch_size=16, verbose=0, shuffle=True)


def make_run_dir(root: Path, *, name: str = "tiny", backbone: str = "tiny_cnn", size: int = 32,
                 train_per_class: int = 6, val_per_class: int = 4, train: bool = True,
                 model=None, threshold: float = 0.5) -> Path:
    """A complete run directory (docs/ARTIFACTS.md) with a tiny model, in ``root/name``."""
    import keras

    from trainer.data import load_image
    from trainer.model import build_model

    root = Path(root)
    run = root / name
    run.mkdir(parents=True)
    rows = (
        [dict(r, split="train") for r in write_images(
            root / f"{name}_images", {d: train_per_class for d in DIAGNOSIS_LABELS}, seed=1)]
        + [dict(r, split="val") for r in write_images(
            root / f"{name}_images", {d: val_per_class for d in DIAGNOSIS_LABELS}, seed=2)])
    if model is None:
        keras.utils.set_random_seed(0)
        model = build_model(backbone, input_size=size, weights=None, dropout=0.0)
        if train:
            tr = [r for r in rows if r["split"] == "train"]
            images = np.stack([load_image(r["path"], size) for r in tr])
            train_quickly(model, images, [r["dx"] for r in tr])
    model.save(run / "model.keras")
    (run / "model_card.json").write_text(json.dumps(card_for(name, backbone, size, threshold)))
    (run / "labels.txt").write_text("\n".join(DIAGNOSIS_LABELS) + "\n")
    import pandas as pd

    pd.DataFrame(rows)[["image_id", "lesion_id", "dx", "melanoma", "path", "split"]].to_csv(
        run / "splits.csv", index=False)
    return run


def set_constant_heads(model, p_melanoma: float = 0.9, diagnosis_argmax: int = 3):
    """Zero the head kernels and set biases: melanoma ≈ p, diagnosis argmax known, any input."""
    mel = model.get_layer("melanoma")
    k, b = mel.get_weights()
    mel.set_weights([np.zeros_like(k), np.full_like(b, np.log(p_melanoma / (1 - p_melanoma)))])
    dia = model.get_layer("diagnosis")
    k, b = dia.get_weights()
    bias = np.zeros_like(b)
    bias[diagnosis_argmax] = 3.0
    dia.set_weights([np.zeros_like(k), bias])
    return model
