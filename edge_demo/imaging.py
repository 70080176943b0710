"""Decode uploads safely; the resize itself is the shared image contract (dermedge.image)."""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from dermedge import quality
from dermedge.image import (
    DRAFT_MIN_CROP,
    RESIZE,
    center_crop_resize,
    draft_for_size,
    first_frame,
    flips,
    orientation,
    to_rgb8,
    upright_rgb8,
    upright_size,
)

from .errors import RequestError

__all__ = ["ALLOWED_FORMATS", "RESIZE_MODES", "DecodeBudget", "Photo", "Upload",
           "center_crop_resize", "decode_upload", "load_path", "open_upload",
           "reuse_image_memory", "to_rgb8"]

# MPO is the multi-picture JPEG many phone cameras write; its first image is the photo.
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "MPO", "PNG", "WEBP")
RESIZE_MODES: tuple[str, ...] = (RESIZE,)
# A 50 MP phone sensor's full-resolution JPEG is 8160 x 6120 = 49.9 MP (48 MP: 8064 x 6048).
DEFAULT_MAX_PIXELS = 50_000_000
# Pixels actually decoded into memory (after reduced-scale JPEG decoding): a 16 MP camera's
# photo saved as PNG/WebP (4608 x 3456) fits; 16 MP of RGB is 48 MB.
DEFAULT_MAX_DECODED_PIXELS = 16_000_000


# Pillow frees each image's memory at once by default, so every upload pays for fresh pages
# (a large part of a small photo's decode, benchmarks/serving.md). Keeping a few freed 1 MB
# blocks for reuse bounds what is held to blocks x size = 32 MB.
IMAGE_BLOCK_SIZE = 1 << 20
IMAGE_BLOCKS_KEPT = 32


def reuse_image_memory(environ=None) -> None:
    """Let Pillow reuse freed image blocks (process-wide); ``PILLOW_BLOCK_SIZE`` and
    ``PILLOW_BLOCKS_MAX`` in the environment, Pillow's own settings, win."""
    environ = os.environ if environ is None else environ
    if "PILLOW_BLOCK_SIZE" not in environ:
        Image.core.set_block_size(IMAGE_BLOCK_SIZE)
    if "PILLOW_BLOCKS_MAX" not in environ:
        Image.core.set_blocks_max(IMAGE_BLOCKS_KEPT)


class DecodeBudget:
    """Bounds the pixels being decoded at once across threads (memory is 4 bytes a pixel,
    a few copies at most); a decode waits for room, or gets 503 after ``timeout`` s.
    One decode larger than the whole budget runs alone."""

    def __init__(self, pixels: int, timeout: float = 30.0):
        self.pixels = int(pixels)
        self.timeout = float(timeout)
        self.in_use = 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, n: int) -> Iterator[None]:
        n = int(n)
        with self._cond:
            ok = self._cond.wait_for(
                lambda: self.in_use == 0 or self.in_use + n <= self.pixels, self.timeout)
            if not ok:
                raise RequestError(
                    f"The server is busy decoding other large images (more than"
                    f" {self.pixels:,} pixels at once) and this one waited {self.timeout:g} s."
                    " Retry in a moment, or send a smaller photo.", status=503,
                    code="busy_decoding")
            self.in_use += n
        try:
            yield
        finally:
            with self._cond:
                self.in_use -= n
                self._cond.notify_all()


@dataclass(frozen=True)
class Photo:
    """A decoded upload: upright 8-bit RGB, at 1/``scale`` of its full resolution."""

    image: Image.Image
    scale: int = 1
    full_size: tuple[int, int] | None = None  # upright, full resolution
    flipped: tuple[bool, bool] = (False, False)  # upright axes EXIF reversed

    def gate_input(self) -> tuple[np.ndarray, int]:
        """The input gate's luma image (dermedge.quality: the centred square at its own side
        capped at ``SIDE_CAP``, mapped onto a reduced-scale decode as :meth:`model_input`
        does) and the square's side at full resolution."""
        full = self.full_size or self.image.size
        return (quality.gate_image(self.image, scale=self.scale, full_size=self.full_size,
                                   flipped=self.flipped), min(full))

    def model_input(self, size: int) -> np.ndarray:
        """The ``(size, size, 3)`` uint8 model input: the contract's crop and resize, with the
        crop box mapped onto a reduced-scale decode (dermedge.image.center_crop_resize)."""
        return center_crop_resize(self.image, size, scale=self.scale,
                                  full_size=self.full_size, flipped=self.flipped)


@dataclass(frozen=True)
class Upload:
    """An identified and checked upload whose pixels are not decoded yet (:func:`open_upload`)."""

    image: Image.Image  # opened; a JPEG is set to decode at 1/scale
    scale: int
    full_size: tuple[int, int]  # as stored (before EXIF orientation), full resolution
    what: str = "uploaded file"

    @property
    def decoded_pixels(self) -> int:
        return self.image.size[0] * self.image.size[1]

    def load(self) -> Photo:
        """Decode the pixels: upright 8-bit RGB, or a ``RequestError`` (400) when corrupt."""
        im = self.image
        try:
            im.load()
            orient = orientation(im)
            image = upright_rgb8(im, copy=False)
        except Exception as exc:  # noqa: BLE001 - truncated or corrupt pixel data
            raise RequestError(
                f"The {self.what} ({im.format}) could not be decoded ({type(exc).__name__}:"
                f" {exc}); it is truncated or corrupt. Upload the complete file again.",
                status=400, code="corrupt_image") from exc
        return Photo(image, self.scale, upright_size(self.full_size, orient), flips(orient))


def decode_upload(data: bytes, *, max_pixels: int, size: int | None = None,
                  max_decoded_pixels: int | None = None, budget: DecodeBudget | None = None,
                  min_crop: float = DRAFT_MIN_CROP) -> Image.Image:
    """Bytes of an upload -> an upright 8-bit RGB image, or a ``RequestError`` (4xx).

    The pixel count is checked from the header, before the pixels are decoded. With ``size``
    (the model's input side) a JPEG is decoded at the smallest DCT scale that keeps its crop
    at least ``min_crop * size`` pixels (the demo's fast path; see dermedge.image.draft_scale).
    ``max_decoded_pixels`` bounds what is decoded after that; ``budget`` bounds concurrent
    decodes (the caller may hold the budget around later steps by passing none here).
    """
    upload = open_upload(data, max_pixels=max_pixels, size=size,
                         max_decoded_pixels=max_decoded_pixels, min_crop=min_crop)
    if budget is None:
        return upload.load().image
    with budget.hold(upload.decoded_pixels):
        return upload.load().image


def open_upload(data: bytes, *, max_pixels: int, size: int | None = None,
                max_decoded_pixels: int | None = None, min_crop: float = DRAFT_MIN_CROP,
                what: str = "uploaded file", gate: bool = False) -> Upload:
    """Identify and check an upload without decoding its pixels (see :func:`decode_upload`);
    ``gate``: a reduced-scale decode also keeps the input gate's image side (dermedge.quality)."""
    if not data:
        raise RequestError(
            f"The {what} is empty (0 bytes). Send a JPEG, PNG or WebP photo in the"
            " multipart field 'image'.", status=400, code="empty_file")
    try:
        im = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_many_pixels(None, max_pixels) from exc
    except UnidentifiedImageError as exc:
        raise RequestError(
            f"The {what} ({len(data)} bytes) is not an image Pillow can identify."
            " Send a JPEG, PNG or WebP photo.", status=400, code="not_an_image") from exc
    except Exception as exc:  # noqa: BLE001 - any header failure is a bad file
        raise RequestError(
            f"Cannot read the image header of the {what} ({type(exc).__name__}: {exc})."
            " Send an intact JPEG, PNG or WebP photo.", status=400, code="bad_image") from exc
    if im.format not in ALLOWED_FORMATS:
        raise RequestError(
            f"Unsupported image format {im.format!r}. Accepted formats: JPEG, PNG, WebP (and"
            " the multi-picture JPEG, MPO, that phones write); convert the photo to one of"
            " them.", status=415, code="unsupported_format")
    im = first_frame(im)
    w, h = im.size
    if w <= 0 or h <= 0:
        raise RequestError(f"The image declares an empty size {w}x{h}.", status=400,
                           code="bad_image")
    if w * h > max_pixels:
        raise _too_many_pixels((w, h), max_pixels)
    keep = quality.gate_side(w, h) if gate else 0
    scale = draft_for_size(im, size, min_crop, keep=keep) if size is not None else 1
    if max_decoded_pixels is not None and im.size[0] * im.size[1] > max_decoded_pixels:
        dw, dh = im.size
        raise RequestError(
            f"The {im.format} image is {dw}x{dh} = {dw * dh:,} pixels, which this server would"
            f" have to decode at full size; the limit is {max_decoded_pixels:,} pixels (JPEG"
            " photos are decoded at reduced scale, PNG and WebP are not). Send the photo as"
            " JPEG, or resize it.", status=413, code="too_many_pixels")
    return Upload(im, scale, (w, h), what)


def _too_many_pixels(size: tuple[int, int] | None, max_pixels: int) -> RequestError:
    got = f"{size[0]}x{size[1]} = {size[0] * size[1]:,} pixels" if size else "a huge size"
    return RequestError(
        f"The image declares {got}, over the limit of {max_pixels:,} pixels (a guard against"
        " decompression bombs; a 50 MP phone photo is 8160x6120). Resize the photo before"
        " uploading.", status=413, code="too_many_pixels")


def load_path(path, size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A file on disk -> the model input, with the same checks as an upload (reference
    decode at full scale, as training and export do)."""
    with open(path, "rb") as f:
        data = f.read()
    return center_crop_resize(decode_upload(data, max_pixels=max_pixels), size)
