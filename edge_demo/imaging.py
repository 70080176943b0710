"""Decode uploads safely and apply the card's resize (Pillow and numpy only).

``center_crop_resize`` re-implements ``trainer.data.load_image`` (the reference) line for
line: EXIF orientation -> 8-bit RGB (alpha dropped) -> centred square crop of side
min(w, h) -> ``resize((S, S), BILINEAR, reducing_gap=None)``.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import RequestError

ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP")
RESIZE_MODES: tuple[str, ...] = ("center_crop_resize",)


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


def decode_upload(data: bytes, *, max_pixels: int) -> Image.Image:
    """Bytes of an upload -> an upright 8-bit RGB image, or a ``RequestError`` (4xx).

    The pixel count is checked from the header, before the pixels are decoded.
    """
    if not data:
        raise RequestError(
            "The uploaded file is empty (0 bytes). Send a JPEG, PNG or WebP photo in the"
            " multipart field 'image'.", status=400, code="empty_file")
    try:
        im = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_many_pixels(None, max_pixels) from exc
    except UnidentifiedImageError as exc:
        raise RequestError(
            f"The uploaded file ({len(data)} bytes) is not an image Pillow can identify."
            " Send a JPEG, PNG or WebP photo.", status=400, code="not_an_image") from exc
    except Exception as exc:  # noqa: BLE001 - any header failure is a bad file
        raise RequestError(
            f"Cannot read the uploaded image header ({type(exc).__name__}: {exc})."
            " Send an intact JPEG, PNG or WebP photo.", status=400, code="bad_image") from exc
    if im.format not in ALLOWED_FORMATS:
        raise RequestError(
            f"Unsupported image format {im.format!r}. Accepted formats: JPEG, PNG, WebP;"
            " convert the photo to one of them.", status=415, code="unsupported_format")
    w, h = im.size
    if w <= 0 or h <= 0:
        raise RequestError(f"The image declares an empty size {w}x{h}.", status=400,
                           code="bad_image")
    if w * h > max_pixels:
        raise _too_many_pixels((w, h), max_pixels)
    try:
        im.load()
        im = ImageOps.exif_transpose(im)
        return to_rgb8(im)
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt pixel data
        raise RequestError(
            f"The uploaded {im.format} image could not be decoded ({type(exc).__name__}:"
            f" {exc}); it is truncated or corrupt. Upload the complete file again.",
            status=400, code="corrupt_image") from exc


def _too_many_pixels(size: tuple[int, int] | None, max_pixels: int) -> RequestError:
    got = f"{size[0]}x{size[1]} = {size[0] * size[1]:,} pixels" if size else "a huge size"
    return RequestError(
        f"The image declares {got}, over the limit of {max_pixels:,} pixels (a guard against"
        " decompression bombs). Resize the photo before uploading.",
        status=413, code="too_many_pixels")


def center_crop_resize(im: Image.Image, size: int) -> np.ndarray:
    """``(size, size, 3)`` uint8: centred square crop of side min(w, h), bilinear resize."""
    im = to_rgb8(im)
    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    im = im.crop((left, top, left + s, top + s))
    im = im.resize((int(size), int(size)), Image.BILINEAR, reducing_gap=None)
    return np.asarray(im, dtype=np.uint8).copy()


def load_path(path, size: int, *, max_pixels: int = 40_000_000) -> np.ndarray:
    """A file on disk -> the model input, with the same checks as an upload."""
    with open(path, "rb") as f:
        data = f.read()
    return center_crop_resize(decode_upload(data, max_pixels=max_pixels), size)
