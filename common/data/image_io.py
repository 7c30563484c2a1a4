"""Decode one face image file into a square uint8 RGB array.

Every loader goes through ``read_image`` so that all sources are cropped and resized the same
way, and so that a bad file always surfaces as one exception type (``SampleError``) naming the
path and what was expected. Decoding is restricted to a few raster formats (a smaller attack
surface than everything Pillow can open) and honours ``PIL.Image.MAX_IMAGE_PIXELS``.
"""

from __future__ import annotations

import os
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "BMP", "GIF", "WEBP")
"""Pillow formats a loader will decode; anything else is rejected as not an image."""

IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"})
"""File name suffixes (lower case) that loaders treat as images when listing a folder."""

MIN_SIDE = 8
"""Images whose shorter side is below this many pixels are rejected as the wrong size."""

# Pillow reports corrupt data through several exception types depending on the codec.
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, EOFError, ValueError, struct.error)


class SampleError(ValueError):
    """One sample (image file or its annotation) is unusable.

    ``str(err)`` is ``"<path>: <reason>"``; loaders raise it in strict mode and record
    ``path`` / ``reason`` when skipping in lenient mode.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def is_image_name(name: str) -> bool:
    """True for a visible file name with an image suffix (hidden and temp files are not data)."""
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES


def read_image(path: str | os.PathLike[str], image_size: int) -> np.ndarray:
    """Decode ``path``, centre-crop it to a square and resize it to ``image_size`` pixels.

    Returns an (image_size, image_size, 3) uint8 array. EXIF orientation is applied first so
    that photos taken sideways are upright. Downscaling uses LANCZOS (anti-aliased),
    upscaling BILINEAR (no ringing); an image already at the target size is copied unchanged,
    which keeps PNG round trips exact.

    Raises:
        SampleError: the file is missing, not one of ``IMAGE_FORMATS``, corrupt or truncated,
            larger than ``Image.MAX_IMAGE_PIXELS``, or smaller than ``MIN_SIDE``.
    """
    p = Path(path)
    try:
        # A decompression-bomb *warning* (between 1x and 2x the limit) is treated as an error:
        # the limit is a limit, not a suggestion.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p, formats=IMAGE_FORMATS) as im:
                width, height = im.size
                if min(width, height) < MIN_SIDE:
                    raise SampleError(p, f"image is {width}x{height} pixels; expected at least "
                                         f"{MIN_SIDE} pixels on each side")
                rgb = ImageOps.exif_transpose(im).convert("RGB")
    except SampleError:
        raise
    except FileNotFoundError:
        raise SampleError(p, "image file is missing") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise SampleError(p, f"image exceeds Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS} "
                             f"({exc})") from None
    except _DECODE_ERRORS as exc:
        raise SampleError(p, f"cannot decode image ({type(exc).__name__}: {exc}); expected a "
                             f"complete {'/'.join(IMAGE_FORMATS)} file") from None
    return np.asarray(_square(rgb, image_size), dtype=np.uint8)


def _square(img: Image.Image, size: int) -> Image.Image:
    """Centre-crop ``img`` to a square and resize it to ``size`` x ``size``."""
    width, height = img.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    # Crop first: resizing with ``box=`` would let the filter read pixels outside the square.
    square = img.crop((left, top, left + side, top + side))
    if side == size:
        return square
    resample = Image.Resampling.LANCZOS if side > size else Image.Resampling.BILINEAR
    return square.resize((size, size), resample=resample)
