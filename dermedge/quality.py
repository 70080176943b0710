"""The input gate's photo measures: size, exposure and blur. Pillow and numpy only.

Every measure is taken on the **gate image** of the decoded, upright photo: the centred
square's side ``s = min(w, h)`` is reduced by the smallest whole factor ``k`` that brings it to
at most ``SIDE_CAP`` px (``k = ceil(s / SIDE_CAP)``, side ``g = s // k``); the centred
``g k`` square is converted to luma (Pillow's ``convert("L")``:
``Y = (19595 R + 38470 G + 7471 B + 32768) >> 16``) and averaged in ``k x k`` blocks
(``(sum + k^2 // 2) // k^2``). Never enlarged: a 224-px photo is judged at 224 px, a 600x450
one at 225 px, a 12 MP one (3000 px square) at 428 px, where defocus is still visible (the
224-px model input hides it). Everything is integer arithmetic, so Python and the page's
``static/gate.js`` give bit-identical values on the same decoded pixels
(tests/test_gate_table.py); docs/MOBILE.md spells it out for apps. A photo decoded at reduced
scale (the server's JPEG fast path) averages the same box with Pillow's box filter instead,
within the tolerance tests/test_gate_api.py states.

``side``           the centred square's side in the decoded photo, px (before the cap)
``mean_luma``      mean of Y, 0-255
``dark_share``     share of pixels with Y <= ``DARK_LEVEL`` (near black)
``clipped_share``  share of pixels with Y >= ``CLIP_LEVEL`` (blown-out white)
``sharpness``      RMS of the 4-neighbour Laplacian of Y over the interior pixels, relative to
                   the brightness (exposure scales both, so a dark photo does not read as
                   blurred): ``sqrt(sum((4 Y[r, c] - Y[r-1, c] - Y[r+1, c] - Y[r, c-1]
                   - Y[r, c+1])^2) / (g - 2)^2) * 128 / mean_luma`` (0 for a black frame)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image

from dermedge.image import decoded_box, to_rgb8

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
            "reduce": "k = ceil(min(w, h) / side_cap), g = min(w, h) // k: the centred g k"
                      " square, luma, k x k block means (sum + k^2 // 2) // k^2"}


def gate_geometry(width: int, height: int) -> tuple[int, int, tuple[int, int, int, int]]:
    """``(g, k, box)``: the gate image's side, the block size, and the centred ``g k``
    square it averages, ``(left, top, right, bottom)`` in the upright photo."""
    s = min(int(width), int(height))
    k = -(-s // SIDE_CAP)
    g = s // k
    left, top = (int(width) - g * k) // 2, (int(height) - g * k) // 2
    return g, k, (left, top, left + g * k, top + g * k)


def gate_side(width: int, height: int) -> int:
    """The gate image's side for an upright photo of ``width`` x ``height``."""
    return gate_geometry(width, height)[0]


def gate_image(im: Image.Image, *, scale: int = 1, full_size: tuple[int, int] | None = None,
               flipped: tuple[bool, bool] = (False, False)) -> np.ndarray:
    """An upright RGB photo -> the ``(g, g)`` uint8 luma gate image. ``scale``, ``full_size``,
    ``flipped``: a photo decoded at 1/``scale`` (dermedge.image.center_crop_resize): the same
    box is then averaged with Pillow's box filter, in fractional pixels."""
    im = to_rgb8(im)
    full = full_size or im.size
    g, k, box = gate_geometry(*full)
    if scale == 1:
        y = np.asarray(im.crop(box).convert(LUMA), dtype=np.uint16)
        if k == 1:
            return y.astype(np.uint8)
        sums = y.reshape(g, k, g, k).sum(axis=(1, 3), dtype=np.uint32)
        return ((sums + k * k // 2) // (k * k)).astype(np.uint8)
    left, top, right, bottom = decoded_box(box, im.size, scale, full, flipped)
    x0, y0 = int(left), int(top)  # convert only the pixels the box touches
    part = im.crop((x0, y0, math.ceil(right), math.ceil(bottom))).convert(LUMA)
    return np.asarray(part.resize((g, g), Image.BOX,
                                  box=(left - x0, top - y0, right - x0, bottom - y0)),
                      dtype=np.uint8)


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
    mean = int(y.sum(dtype=np.int64)) / n
    rms = math.sqrt(int(sq.sum(dtype=np.int64)) / sq.size)
    return {"side": float(y.shape[0] if side is None else int(side)),
            "mean_luma": mean,
            "dark_share": int(np.count_nonzero(y <= DARK_LEVEL)) / n,
            "clipped_share": int(np.count_nonzero(y >= CLIP_LEVEL)) / n,
            "sharpness": rms * 128 / mean if mean > 0 else 0.0}


def measure_image(im: Image.Image) -> dict[str, float]:
    """An upright RGB photo at full scale -> its measures (the reference the page follows)."""
    return measure(gate_image(im), min(im.size))
