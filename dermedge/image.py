"""The image contract: how a photo becomes the model's input. Pillow and numpy only.

EXIF orientation -> 8-bit RGB (alpha dropped) -> centred square crop of side min(w, h)
(offsets ``(w - s) // 2``, ``(h - s) // 2``) -> ``resize((S, S), BILINEAR,
reducing_gap=None)`` -> ``(S, S, 3)`` uint8, raw pixels 0-255 (normalisation is inside the
model). The trainer's cache, the export's calibration and validation images, the demo's
uploads, the browser page and the MediaPipe snippets all follow this one definition.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from dermedge.errors import ImageError

RESIZE = "center_crop_resize"
COLOR = "RGB"
RANGE = (0, 255)
DTYPE = "uint8"


def describe(size: int) -> dict:
    """The contract as recorded in model cards (``input``)."""
    return {"name": "image", "shape": [int(size), int(size), 3], "dtype": DTYPE,
            "range": list(RANGE), "color": COLOR, "resize": RESIZE}


def to_rgb8(im: Image.Image) -> Image.Image:
    """8-bit RGB. Alpha is dropped (not composited); 16/32-bit grey keeps its high byte."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im).astype(np.int64)
        a = (np.clip(a, 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(a).convert("RGB")
    if im.mode == "F":
        a = np.clip(np.asarray(im), 0, 255).astype(np.uint8)
        return Image.fromarray(a).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im.convert("RGB") if im.mode != "RGB" else im


def upright_rgb8(im: Image.Image) -> Image.Image:
    """The decoded photo as the contract sees it before cropping: EXIF-upright 8-bit RGB."""
    return to_rgb8(ImageOps.exif_transpose(im))


def crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of the centred square of side min(width, height)."""
    s = min(int(width), int(height))
    left, top = (int(width) - s) // 2, (int(height) - s) // 2
    return left, top, left + s, top + s


def center_crop_resize(im: Image.Image, size: int) -> np.ndarray:
    """An upright image -> ``(size, size, 3)`` uint8: centred square crop, bilinear resize."""
    if int(size) <= 0:
        raise ValueError(f"size must be a positive number of pixels; received {size!r}.")
    im = to_rgb8(im)
    im = im.crop(crop_box(*im.size))
    im = im.resize((int(size), int(size)), Image.BILINEAR, reducing_gap=None)
    return np.asarray(im, dtype=np.uint8).copy()


def load_image(path: str | Path, size: int) -> np.ndarray:
    """THE reference: an image file -> ``(size, size, 3)`` uint8 RGB per the contract."""
    if int(size) <= 0:
        raise ValueError(f"size must be a positive number of pixels; received {size!r}.")
    try:
        with Image.open(path) as im:
            im.load()
            return center_crop_resize(upright_rgb8(im), size)
    except FileNotFoundError as exc:
        raise ImageError(f"Image file not found: {path}.") from exc
    except Exception as exc:  # noqa: BLE001 - any decode failure is a bad file
        raise ImageError(
            f"Cannot read the image {path} ({type(exc).__name__}: {exc}). The file is unreadable,"
            " truncated or not an image; replace or remove it.") from exc


# --- the demo's fast path: reduced-scale decoding --------------------------------------
# A JPEG can be decoded at 1/2, 1/4 or 1/8 scale inside the DCT (Pillow's ``draft``), which
# is cheaper and needs far less memory than decoding every pixel and resizing. It changes
# pixels against the reference above (tests/test_server_hardening.py states the tolerance
# on real photos), so only the demo server uses it; training and export keep load_image.
DRAFT_FORMATS = ("JPEG", "MPO")
DRAFT_SCALES = (8, 4, 2, 1)


def draft_scale(width: int, height: int, size: int, min_crop: float = 2.0) -> int:
    """The largest JPEG DCT scale (8, 4, 2 or 1) whose centred crop keeps a side of at least
    ``min_crop * size`` pixels, so the final resize never enlarges below that."""
    side = min(int(width), int(height))
    for scale in DRAFT_SCALES:
        if side // scale >= min_crop * int(size):
            return scale
    return 1


def draft_for_size(im: Image.Image, size: int, min_crop: float = 2.0) -> int:
    """Ask an opened (not yet loaded) JPEG/MPO to decode at a reduced scale for a model of
    ``size`` pixels (EXIF rotation does not matter: the crop side is min(w, h) either way).
    Returns the scale applied; other formats are left alone (1)."""
    if im.format not in DRAFT_FORMATS:
        return 1
    w, h = im.size
    scale = draft_scale(w, h, size, min_crop)
    if scale > 1:
        im.draft("RGB", (w // scale, h // scale))
    return scale


def first_frame(im: Image.Image) -> Image.Image:
    """The first image of a multi-image file (an MPO phone photo holds the photo first and
    a preview or second view after it); single-image files are returned as they are."""
    if getattr(im, "n_frames", 1) > 1 and im.tell() != 0:
        im.seek(0)
    return im
