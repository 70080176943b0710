"""Decode uploads safely; the resize itself is the shared image contract (dermedge.image)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from dermedge.image import RESIZE, center_crop_resize, to_rgb8, upright_rgb8

from .errors import RequestError

__all__ = ["ALLOWED_FORMATS", "RESIZE_MODES", "center_crop_resize", "decode_upload",
           "load_path", "to_rgb8"]

ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP")
RESIZE_MODES: tuple[str, ...] = (RESIZE,)


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
        return upright_rgb8(im)
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


def load_path(path, size: int, *, max_pixels: int = 40_000_000) -> np.ndarray:
    """A file on disk -> the model input, with the same checks as an upload."""
    with open(path, "rb") as f:
        data = f.read()
    return center_crop_resize(decode_upload(data, max_pixels=max_pixels), size)
