"""The input gate's photo measures: size, exposure and blur. Pillow and numpy only.

Every measure is taken on the **gate image**: the image contract's centred square of the
decoded, upright photo, as luma (Pillow's ``convert("L")``:
``Y = (19595 R + 38470 G + 7471 B + 32768) >> 16``), resized with Pillow's bilinear filter
(as :mod:`dermedge.image`) to its own side capped at ``SIDE_CAP`` px, never enlarged: a 12 MP
photo is judged at 448 px, where defocus is still visible (the 224-px model input hides it),
a 224-px photo at 224 px. The measures are integer sums divided once, so Python and the page's
``static/gate.js`` give bit-identical values on the same pixels (tests/test_gate_table.py);
docs/MOBILE.md spells them out for apps.

``side``           the centred square's side in the decoded photo, px (before the cap)
``mean_luma``      mean of Y, 0-255
``dark_share``     share of pixels with Y <= ``DARK_LEVEL`` (near black)
``clipped_share``  share of pixels with Y >= ``CLIP_LEVEL`` (blown-out white)
``sharpness``      RMS of the 4-neighbour Laplacian of Y over the interior pixels:
                   ``sqrt(sum((4 Y[r, c] - Y[r-1, c] - Y[r+1, c] - Y[r, c-1] - Y[r, c+1])^2)
                   / (g - 2)^2)``
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image

from dermedge.image import center_crop_resize

# The gate image's largest side: keeps a phone photo's defocus visible (see the docstring).
SIDE_CAP = 448
LUMA = "L"  # Pillow's ITU-R 601-2 luma, in 16-bit fixed point (the docstring's formula)
DARK_LEVEL = 24
CLIP_LEVEL = 250
MEASURES: tuple[str, ...] = ("side", "mean_luma", "dark_share", "clipped_share", "sharpness")


def params() -> dict[str, Any]:
    """The formulas' parameters, as cards, the page and docs/MOBILE.md carry them."""
    return {"side_cap": SIDE_CAP, "luma": "(19595 R + 38470 G + 7471 B + 32768) >> 16",
            "dark_level": DARK_LEVEL, "clip_level": CLIP_LEVEL,
            "resize": "centred square, luma, bilinear (Pillow) to min(side, side_cap)"}


def gate_side(width: int, height: int) -> int:
    """The gate image's side for an upright photo of ``width`` x ``height``."""
    return min(int(width), int(height), SIDE_CAP)


def gate_image(im: Image.Image, *, scale: int = 1, full_size: tuple[int, int] | None = None,
               flipped: tuple[bool, bool] = (False, False)) -> np.ndarray:
    """An upright RGB photo -> the ``(g, g)`` uint8 luma gate image. ``scale``, ``full_size``,
    ``flipped``: a photo decoded at reduced scale (see dermedge.image.center_crop_resize)."""
    full = full_size or im.size
    return center_crop_resize(im, gate_side(*full), scale=scale, full_size=full_size,
                              flipped=flipped, mode=LUMA)


def luma(rgb: np.ndarray) -> np.ndarray:
    """``(..., 3)`` uint8 RGB -> Pillow's luma, uint8 (what ``convert("L")`` gives)."""
    a = np.asarray(rgb, dtype=np.int32)
    y = (19595 * a[..., 0] + 38470 * a[..., 1] + 7471 * a[..., 2] + 32768) >> 16
    return y.astype(np.uint8)


def measure(plane: np.ndarray, side: int | None = None) -> dict[str, float]:
    """The gate image ``(g, g)`` uint8 luma -> ``{measure: value}``; ``side``: the centred
    square's side in the decoded photo (defaults to ``g``, for a photo no larger than the cap).
    """
    y = np.asarray(plane)
    if y.ndim != 2 or min(y.shape) < 3 or y.dtype != np.uint8:
        raise ValueError(f"measure() takes an (H, W) uint8 luma image of at least 3 x 3 (see"
                         f" gate_image); received shape {y.shape}, dtype {y.dtype}.")
    n = y.size
    y16 = y.astype(np.int16)
    lap = y16[1:-1, 1:-1] * 4  # |lap| <= 1020: int16; its square < 2**20: int32
    lap -= y16[:-2, 1:-1]
    lap -= y16[2:, 1:-1]
    lap -= y16[1:-1, :-2]
    lap -= y16[1:-1, 2:]
    sq = lap.astype(np.int32)
    sq *= sq
    return {"side": float(y.shape[0] if side is None else int(side)),
            "mean_luma": int(y.sum(dtype=np.int64)) / n,
            "dark_share": int(np.count_nonzero(y <= DARK_LEVEL)) / n,
            "clipped_share": int(np.count_nonzero(y >= CLIP_LEVEL)) / n,
            "sharpness": math.sqrt(int(sq.sum(dtype=np.int64)) / sq.size)}


def measure_image(im: Image.Image) -> dict[str, float]:
    """An upright RGB photo at full scale -> its measures (the reference the page follows)."""
    return measure(gate_image(im), min(im.size))
