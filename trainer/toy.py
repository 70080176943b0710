"""A small synthetic dermoscopy-like dataset in the HAM10000 download layout.

The quickstart trains on it with no download. Each class is a blob with its own colour,
shape and texture on noisy skin, with random position, rotation and size; classes are
imbalanced like HAM10000 and ~15% of lesions have a second image (so lesion grouping matters).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from dermedge.files import replace_dir
from dermedge.labels import DIAGNOSIS_LABELS
from trainer.errors import DataError

# HAM10000 class shares (of 10,015 images).
HAM_SHARES: dict[str, float] = {
    "akiec": 327, "bcc": 514, "bkl": 1099, "df": 115, "mel": 1113, "nv": 6705, "vasc": 142,
}
# Written into every toy dataset; a run trained on it gets ``data.synthetic: true`` in its card.
SYNTHETIC_MARKER = "SYNTHETIC.txt"
SITES = ("back", "lower extremity", "trunk", "upper extremity", "abdomen", "face", "chest",
         "foot", "neck", "scalp", "hand", "ear")
SKIN_TONES = ((236, 198, 170), (224, 172, 138), (205, 150, 115), (240, 210, 190),
              (190, 130, 100))
# (mean age, dx_type choices) per class, loosely following HAM10000.
_CLINICAL = {
    "akiec": (67, ("histo",)), "bcc": (66, ("histo",)), "bkl": (62, ("histo", "consensus")),
    "df": (52, ("histo", "consensus")), "mel": (61, ("histo",)),
    "nv": (42, ("follow_up", "histo", "consensus")), "vasc": (50, ("histo", "consensus")),
}


def class_counts(n_lesions: int, min_per_class: int = 20) -> dict[str, int]:
    """Lesions per class: ``min_per_class`` each, the rest shared like HAM10000."""
    k = len(DIAGNOSIS_LABELS)
    if n_lesions < k * min_per_class:
        raise ValueError(f"n_lesions must be at least {k * min_per_class} ({min_per_class} per "
                         f"class × {k} classes); received {n_lesions}.")
    total = sum(HAM_SHARES.values())
    extra = n_lesions - k * min_per_class
    counts = {c: min_per_class + int(extra * HAM_SHARES[c] / total) for c in DIAGNOSIS_LABELS}
    counts["nv"] += n_lesions - sum(counts.values())
    return counts


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1], (size, size)."""
    small = rng.normal(size=(cells, cells)).astype(np.float32)
    img = Image.fromarray(small).resize((size, size), Image.BICUBIC)
    return np.asarray(img)


def _lesion_params(rng: np.random.Generator, dx: str) -> dict:
    """What stays the same across the images of one lesion."""
    radius = {"df": 0.14, "vasc": 0.17, "nv": 0.22, "bkl": 0.24, "bcc": 0.22, "akiec": 0.24,
              "mel": 0.27}[dx] * rng.uniform(0.8, 1.2)
    irregular = {"mel": 0.22, "akiec": 0.12, "bkl": 0.08, "bcc": 0.06}.get(dx, 0.03)
    harmonics = [(k, rng.uniform(0, irregular) / (1 + 0.3 * k), rng.uniform(0, 2 * np.pi))
                 for k in range(2, 8)]
    return {
        "dx": dx, "radius": radius, "harmonics": harmonics,
        "aspect": rng.uniform(0.75, 1.0),
        "skin": np.array(SKIN_TONES[rng.integers(len(SKIN_TONES))]),
        "tint": rng.uniform(0.85, 1.15) * rng.uniform(0.93, 1.07, size=3),
        "seed": int(rng.integers(2**31)),
    }


def _draw(params: dict, size: int, rng: np.random.Generator) -> np.ndarray:
    """One (size, size, 3) uint8 image of the lesion, with a fresh pose and fresh noise."""
    dx = params["dx"]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    cx, cy = 0.5 + rng.uniform(-0.12, 0.12, size=2)
    theta = rng.uniform(0, 2 * np.pi)
    scale = rng.uniform(0.9, 1.1)
    dx_, dy_ = xx - cx, yy - cy
    u = np.cos(theta) * dx_ + np.sin(theta) * dy_
    v = (-np.sin(theta) * dx_ + np.cos(theta) * dy_) / params["aspect"]
    dist = np.hypot(u, v)
    ang = np.arctan2(v, u)
    r = np.full_like(dist, params["radius"] * scale)
    for k, a, phase in params["harmonics"]:
        r = r * (1 + a * np.cos(k * ang + phase))
    edge = 0.012 if dx in ("mel", "akiec") else 0.02
    alpha = np.clip((r - dist) / edge, 0, 1)[..., None]
    rel = (dist / np.maximum(r, 1e-6))[..., None]  # 0 at the centre, 1 at the border

    # Skin with low-frequency shading and pixel noise.
    skin = params["skin"] * (1 + 0.06 * _smooth_noise(rng, size, 4))[..., None]
    skin = skin + rng.normal(0, 4, size=(size, size, 3))

    lrng = np.random.default_rng(params["seed"])  # texture tied to the lesion, not the image
    tex = _smooth_noise(lrng, size, 12)[..., None]
    fine = rng.normal(0, 1, size=(size, size, 1))
    if dx == "nv":  # round, uniform brown
        col = np.array([125, 82, 52]) * (1 + 0.05 * tex) + 4 * fine
    elif dx == "mel":  # dark, irregular, several colours (black, brown, blue-grey, red)
        blotch = _smooth_noise(lrng, size, 6)[..., None]
        col = np.where(blotch > 0.3, [40, 30, 30], np.where(blotch < -0.4, [95, 100, 130],
                                                                [95, 55, 40]))
        col = col + np.where(tex > 0.8, 1, 0) * np.array([70, 10, 10]) + 8 * fine
    elif dx == "bkl":  # light brown, waxy mottled
        col = np.array([175, 135, 95]) * (1 + 0.12 * tex) + 14 * fine
    elif dx == "bcc":  # pinkish with branching red lines
        col = np.array([222, 160, 160]) + 6 * fine
        lines = np.abs(np.sin(18 * u + 3 * np.sin(9 * v))) < 0.12
        col = np.where(lines[..., None], [170, 40, 55], col)
    elif dx == "akiec":  # scaly red with white scale
        col = np.array([198, 92, 80]) * (1 + 0.08 * tex) + 10 * fine
        scale_mask = rng.random((size, size, 1)) < 0.09
        col = np.where(scale_mask, [240, 230, 220], col)
    elif dx == "df":  # small, firm brown ring with a pale centre
        col = np.where(rel < 0.45, [228, 200, 180], [135, 90, 65]) + 5 * fine
    elif dx == "vasc":  # red-purple lobules
        lob = np.cos(28 * u) * np.cos(28 * v)
        col = np.where((lob > 0.2)[..., None], [150, 30, 75], [110, 25, 80]) + 5 * fine
    else:  # pragma: no cover - DIAGNOSIS_LABELS are all handled above
        raise ValueError(dx)
    img = skin * (1 - alpha) + col * params["tint"] * alpha
    return np.clip(img, 0, 255).astype(np.uint8)


def _metadata_row(rng: np.random.Generator, dx: str) -> dict:
    mean_age, types = _CLINICAL[dx]
    age = float(np.clip(5 * round(rng.normal(mean_age, 14) / 5), 5, 85))
    sex = rng.choice(["male", "female", "unknown"], p=[0.53, 0.45, 0.02])
    return {"dx_type": str(rng.choice(types)), "age": age, "sex": str(sex),
            "localization": str(rng.choice(SITES))}


def is_synthetic(data: str | Path | None) -> bool:
    """True when ``data`` (a dataset folder or a CSV in it) was written by ``trainer toy-data``."""
    if not data:
        return False
    path = Path(data).expanduser()
    folder = path if path.is_dir() else path.parent
    return (folder / SYNTHETIC_MARKER).is_file()


def make_toy_dataset(out_dir: str | Path, *, n_lesions: int = 420, size: int = 128,
                     seed: int = 0, overwrite: bool = False, min_per_class: int = 20,
                     second_image_fraction: float = 0.15) -> Path:
    """Write a seeded synthetic dataset in the HAM10000 download layout; returns ``out_dir``.

    ``out_dir/HAM10000_metadata.csv`` + ``HAM10000_images_part_{1,2}/ISIC_XXXXXXX.jpg``.
    Built in a temp folder next to ``out_dir`` and renamed into place.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    if int(size) < 16:
        raise ValueError(f"size must be at least 16 pixels; received {size!r}.")
    if not 0.0 <= float(second_image_fraction) <= 1.0:
        raise ValueError(f"second_image_fraction must be in [0, 1]; received "
                         f"{second_image_fraction!r}.")
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir} exists and is not a folder; choose another output path.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise DataError(f"{out_dir} already exists and is not empty; refusing to overwrite it. "
                        "Choose an empty or new folder, or pass overwrite=True (--overwrite).")
    counts = class_counts(int(n_lesions), int(min_per_class))
    rng = np.random.default_rng(seed)

    lesions = [dx for dx in DIAGNOSIS_LABELS for _ in range(counts[dx])]
    rng.shuffle(lesions)
    rows = []
    for j, dx in enumerate(lesions):
        params = _lesion_params(rng, dx)
        meta = _metadata_row(rng, dx)
        n_img = 2 if rng.random() < second_image_fraction else 1
        for _ in range(n_img):
            rows.append({"lesion_id": f"HAM_{9000000 + j:07d}", "dx": dx, **meta,
                         "_params": params, "_seed": int(rng.integers(2**31))})
    order = rng.permutation(len(rows))  # image ids do not reveal the class or the lesion
    rows = [rows[i] for i in order]

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        parts = [tmp / "HAM10000_images_part_1", tmp / "HAM10000_images_part_2"]
        for p in parts:
            p.mkdir(parents=True)
        half = (len(rows) + 1) // 2
        for i, row in enumerate(rows):
            row["image_id"] = f"ISIC_{9000000 + i:07d}"
            pixels = _draw(row.pop("_params"), int(size), np.random.default_rng(row.pop("_seed")))
            Image.fromarray(pixels).save(parts[i >= half] / f"{row['image_id']}.jpg",
                                         quality=92)
        meta = pd.DataFrame(rows)[["lesion_id", "image_id", "dx", "dx_type", "age", "sex",
                                   "localization"]]
        meta.sort_values(["lesion_id", "image_id"]).to_csv(tmp / "HAM10000_metadata.csv",
                                                            index=False)
        (tmp / SYNTHETIC_MARKER).write_text(
            "Synthetic images made by `trainer toy-data` (not dermoscopy). A model trained on "
            "them is a toy: its card says data.synthetic = true.\n")
        replace_dir(tmp, out_dir, overwrite=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
