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


# EXIF orientation -> the transposition that makes the photo upright (as ImageOps.exif_transpose).
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
              6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


def orientation(im: Image.Image) -> int:
    """The photo's EXIF orientation, 1-8 (1 when absent or not a valid value)."""
    value = im.getexif().get(0x0112, 1)
    return value if isinstance(value, int) and value in _TRANSPOSE else 1


def upright_rgb8(im: Image.Image, *, copy: bool = True) -> Image.Image:
    """The decoded photo as the contract sees it before cropping: EXIF-upright 8-bit RGB.

    ``copy=False`` returns ``im`` itself when it is upright RGB already, saving a full-size
    copy per photo: only for an image the caller owns and does not close afterwards."""
    if copy or orientation(im) != 1:
        return to_rgb8(ImageOps.exif_transpose(im))
    return to_rgb8(im)


def crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of the centred square of side min(width, height)."""
    s = min(int(width), int(height))
    left, top = (int(width) - s) // 2, (int(height) - s) // 2
    return left, top, left + s, top + s


def center_crop_resize(im: Image.Image, size: int, *, scale: int = 1,
                       full_size: tuple[int, int] | None = None,
                       flipped: tuple[bool, bool] = (False, False)) -> np.ndarray:
    """An upright image -> ``(size, size, 3)`` uint8: centred square crop, bilinear resize.

    ``scale`` > 1: ``im`` is a photo of upright ``full_size`` decoded at 1/scale (JPEG DCT
    scaling, see :func:`draft_scale`). The reference crop box is then mapped onto it in
    fractional pixels (``flipped``: which upright axes EXIF reversed, from :func:`flips`), so
    the geometry is the reference's and only the pixels' filtering differs."""
    if int(size) <= 0:
        raise ValueError(f"size must be a positive number of pixels; received {size!r}.")
    im = to_rgb8(im)
    if scale == 1:
        im = im.crop(crop_box(*im.size))
        im = im.resize((int(size), int(size)), Image.BILINEAR, reducing_gap=None)
        return np.asarray(im, dtype=np.uint8).copy()
    if full_size is None:
        raise ValueError("full_size (the photo's upright full-resolution size) is needed with"
                         " scale > 1.")
    box = decoded_box(crop_box(*full_size), im.size, scale, full_size, flipped)
    im = im.resize((int(size), int(size)), Image.BILINEAR, box=box,
                   reducing_gap=None)
    return np.asarray(im, dtype=np.uint8).copy()


def decoded_box(box: tuple[int, int, int, int], decoded_size: tuple[int, int], scale: int,
                full_size: tuple[int, int], flipped: tuple[bool, bool] = (False, False)
                ) -> tuple[float, float, float, float]:
    """A box in the upright full-resolution photo, in fractional pixels of its decode at
    1/``scale`` (see :func:`center_crop_resize`)."""
    left, top, right, bottom = box
    # a reversed axis starts with the partial decoded pixel that held the far edge
    pad_x = decoded_size[0] * scale - int(full_size[0]) if flipped[0] else 0
    pad_y = decoded_size[1] * scale - int(full_size[1]) if flipped[1] else 0
    return ((left + pad_x) / scale, (top + pad_y) / scale,
            min((right + pad_x) / scale, decoded_size[0]),
            min((bottom + pad_y) / scale, decoded_size[1]))


def load_image(path: str | Path, size: int) -> np.ndarray:
    """THE reference: an image file -> ``(size, size, 3)`` uint8 RGB per the contract."""
    if int(size) <= 0:
        raise ValueError(f"size must be a positive number of pixels; received {size!r}.")
    try:
        with Image.open(path) as im:
            im.load()
            return center_crop_resize(upright_rgb8(im, copy=False), size)
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
# The crop side a reduced-scale decode keeps where it can, in model sides (see draft_scale).
DRAFT_MIN_CROP = 2.0


def draft_scale(width: int, height: int, size: int, min_crop: float = DRAFT_MIN_CROP) -> int:
    """The JPEG DCT scale (8, 4, 2 or 1) to decode at for a model of ``size`` pixels: the
    largest whose centred crop keeps a side of at least ``min_crop * size``; a photo too small
    for that at any reduced scale is decoded at the largest that keeps at least ``size`` (the
    resize then never enlarges) rather than in full: a 600 x 450 photo at 1/2 for 224 px."""
    side = min(int(width), int(height))
    for want in (min_crop * int(size), int(size)):
        for scale in DRAFT_SCALES[:-1]:
            if side // scale >= want:
                return scale
    return 1


def draft_for_size(im: Image.Image, size: int, min_crop: float = DRAFT_MIN_CROP, *,
                   keep: int = 0) -> int:
    """Ask an opened (not yet loaded) JPEG/MPO to decode at a reduced scale for a model of
    ``size`` pixels (EXIF rotation does not matter: the crop side is min(w, h) either way).
    ``keep``: the decoded crop must also keep at least ``keep`` pixels where a reduced scale
    allows it (the input gate's image, dermedge.quality). Returns the scale applied; other
    formats are left alone (1)."""
    if im.format not in DRAFT_FORMATS:
        return 1
    w, h = im.size
    scale = draft_scale(w, h, size, min_crop)
    if keep:
        scale = min(scale, draft_scale(w, h, keep, 1.0))
    if scale > 1:
        im.draft("RGB", (w // scale, h // scale))
    return scale


# Which upright axes (x, y) run backwards through the stored image, per EXIF orientation.
_FLIPS = {1: (False, False), 2: (True, False), 3: (True, True), 4: (False, True),
          5: (False, False), 6: (True, False), 7: (True, True), 8: (False, True)}


def flips(orient: int) -> tuple[bool, bool]:
    """For :func:`center_crop_resize`'s ``flipped``: the upright axes EXIF ``orient`` reversed."""
    return _FLIPS.get(orient, (False, False))


def upright_size(size: tuple[int, int], orient: int) -> tuple[int, int]:
    """A stored ``(width, height)`` as it is once EXIF ``orient`` is applied (5-8 swap)."""
    return (size[1], size[0]) if orient in (5, 6, 7, 8) else (size[0], size[1])


def first_frame(im: Image.Image) -> Image.Image:
    """The first image of a multi-image file (an MPO phone photo holds the photo first and
    a preview or second view after it); single-image files are returned as they are."""
    if getattr(im, "n_frames", 1) > 1 and im.tell() != 0:
        im.seek(0)
    return im
