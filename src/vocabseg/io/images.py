"""Reading user images safely: any mode and bit depth to 8-bit RGB, EXIF orientation, a decoded-size limit."""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from vocabseg.errors import UsageError

#: Largest image (in pixels) decoded by default; override with ``VOCABSEG_MAX_PIXELS`` or ``max_pixels=``.
DEFAULT_MAX_PIXELS = 50_000_000


class ImageError(UsageError):
    """An image that cannot be used: missing, unreadable, or too large."""


class ImageTooLargeError(ImageError):
    """An image with more pixels than the limit (refused before decoding)."""


def max_pixels_default() -> int:
    text = os.environ.get("VOCABSEG_MAX_PIXELS", "")
    if not text.strip():
        return DEFAULT_MAX_PIXELS
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise ImageError(f"VOCABSEG_MAX_PIXELS must be a positive whole number of pixels (got {text!r})")
    return value


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """8-bit RGB ``H,W,3`` from a PIL image of any mode (RGBA, LA, P, L, 1, I;16, I, F, CMYK...)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        array = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(array[..., None], 3, axis=2)
    if image.mode != "RGB":
        image = image.convert("RGBA" if "A" in image.mode or image.mode == "P" else image.mode).convert("RGB")
    return np.asarray(image, dtype=np.uint8).copy()


def load_image(source, max_pixels: int | None = None) -> np.ndarray:
    """An image path, encoded bytes (a file's contents), PIL image or array -> uint8 RGB ``H,W,3``.

    Files, bytes and PIL images larger than ``max_pixels`` are refused before decoding (arrays are already
    decoded); for files and bytes it replaces Pillow's own decompression-bomb limit, higher or lower.
    """
    limit = max_pixels or max_pixels_default()
    if isinstance(source, np.ndarray):
        array = source
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=2)
        if array.ndim != 3 or array.shape[2] not in (3, 4):
            raise ImageError(f"expected an H x W x 3 array, got shape {array.shape}")
        if array.dtype != np.uint8:
            raise ImageError(f"expected a uint8 array, got {array.dtype}")
        return np.ascontiguousarray(array[..., :3])
    if isinstance(source, Image.Image):
        _check_size(source.size, limit, "image")
        return to_rgb_array(source)
    if isinstance(source, bytes | bytearray):
        return _decode(io.BytesIO(source), limit, "image")
    path = Path(source)
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    return _decode(path, limit, str(path))


def _decode(file: Path | io.BytesIO, limit: int, what: str) -> np.ndarray:
    try:
        with _open_lazily(file) as image:  # the size is known before decoding
            _check_size(image.size, limit, what)
            image.load()
            return to_rgb_array(image)
    except ImageError:
        raise
    except Image.UnidentifiedImageError as exc:  # its text holds the path or the buffer's repr
        raise ImageError(f"{what}: cannot read image (not in an image format Pillow knows)") from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"{what}: cannot read image ({exc})") from exc


_pillow_limit = threading.Lock()


def _open_lazily(file: Path | io.BytesIO) -> Image.Image:
    """``Image.open`` (the header only) without Pillow's own decompression-bomb limit, so that ``max_pixels`` is
    the one limit, with its message, whether it is lower or higher than Pillow's: Pillow's module-wide limit is
    lifted for the header read alone, under a lock, and restored at once."""
    with _pillow_limit:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(file)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _check_size(size: tuple[int, int], limit: int, what: str) -> None:
    width, height = size
    if width * height > limit:
        raise ImageTooLargeError(f"{what}: {width}x{height} ({width * height:,} pixels) exceeds the limit of {limit:,} "
                         "pixels; resize it first or raise the limit (--max-pixels / VOCABSEG_MAX_PIXELS)")
