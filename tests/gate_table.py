"""One table of input-gate cases, run through the Python gate (dermedge/quality.py,
edge_demo/gate.py) and the page's gate.js (in Node and in Chromium): the photos' measures must
be bit-identical, and every check's decision and text must match to the character."""

from __future__ import annotations

from typing import Any

import numpy as np

THRESHOLDS = {"min_side": 32.0, "mean_luma_min": 40.0, "dark_share_max": 0.5,
              "clipped_share_max": 0.25, "sharpness_min": 3.0, "ood_max": 0.6}
GOOD = {"side": 600.0, "mean_luma": 150.0, "dark_share": 0.01, "clipped_share": 0.0,
        "sharpness": 6.5, "ood": 0.2}


def photos() -> list[tuple[str, np.ndarray]]:
    """Decoded photos (H, W, 3) uint8: both sides of the 448-px cap, odd sizes, flat frames,
    smooth and sharp content."""
    rng = np.random.default_rng(36)
    yy, xx = np.mgrid[0:480, 0:640]
    blob = np.exp(-(((xx - 320) / 150.0) ** 2 + ((yy - 240) / 120.0) ** 2))
    smooth = np.clip(np.array([205, 160, 140]) - blob[..., None] * [130, 100, 90], 0, 255)
    checker = ((np.indices((520, 520)).sum(0) // 7) % 2 * 255).astype(np.uint8)
    return [
        ("black frame", np.zeros((300, 400, 3), np.uint8)),
        ("white frame", np.full((700, 500, 3), 255, np.uint8)),
        ("noise above the cap", rng.integers(0, 256, (450, 600, 3), dtype=np.uint8)),
        ("noise below the cap", rng.integers(0, 256, (61, 77, 3), dtype=np.uint8)),
        ("smooth lesion, no texture", smooth.astype(np.uint8)),
        ("smooth lesion with grain", np.clip(smooth + rng.normal(0, 6, smooth.shape), 0,
                                             255).astype(np.uint8)),
        ("checkerboard", np.repeat(checker[..., None], 3, axis=2)),
        ("smallest", rng.integers(0, 256, (3, 5, 3), dtype=np.uint8)),
        ("colour ramps", np.stack(np.broadcast_arrays(
            (xx[:449, :451] % 256), (yy[:449, :451] % 256),
            ((xx[:449, :451] + yy[:449, :451]) % 256)), axis=2).astype(np.uint8)),
        # the g k square sits one pixel off the centred square's own centre (602 x 451)
        ("noise, odd margins", rng.integers(0, 256, (451, 602, 3), dtype=np.uint8)),
    ]


def _with(**over) -> dict[str, Any]:
    return {**GOOD, **over}


# (name, values, threshold overrides, enabled)
DECISIONS: list[tuple[str, dict[str, Any], dict[str, Any], bool]] = [
    ("everything passes", GOOD, {}, True),
    ("too small", _with(side=31.0), {}, True),
    ("side at the threshold passes", _with(side=32.0), {}, True),
    ("too dark on average", _with(mean_luma=12.25), {}, True),
    ("mostly near black", _with(dark_share=0.75), {}, True),
    ("black frame: both dark checks, one advice", _with(mean_luma=0.0, dark_share=1.0,
                                                        sharpness=0.0), {}, True),
    ("blown out", _with(clipped_share=0.3), {}, True),
    ("blurry", _with(sharpness=1.125), {}, True),
    ("close to a threshold: more decimals", _with(sharpness=2.9996), {}, True),
    ("not dermoscopy", _with(ood=0.91), {}, True),
    ("ood at the threshold passes", _with(ood=0.6), {}, True),
    ("no ood output", _with(ood=None), {}, True),
    ("no ood threshold", GOOD, {"ood_max": None}, True),
    ("a tie in binary rounds up", _with(mean_luma=40.125), {"mean_luma_min": 40.625}, True),
    ("everything at once", {"side": 10.0, "mean_luma": 3.0, "dark_share": 0.9,
                            "clipped_share": 0.3, "sharpness": 0.5, "ood": 1.0}, {}, True),
    ("gate off", _with(sharpness=0.0, ood=1.0), {}, False),
]
