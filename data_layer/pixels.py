"""What every image reader shares: the decompression-bomb guard, turning any decoder failure into
an `ImageReadError` that names the file, and the conversion of pixel arrays to 8-bit images.

Pixels that are not 8-bit already (16-bit PNG/TIFF, NPY arrays) are mapped onto 0..255 through a
robust window: the `ROBUST_WINDOW` percentiles of the image become 0 and 255. Min..max would let one
hot or dead pixel (a 65535 on a 12-bit detector) rescale the whole image and move its score; the
percentiles do not move for a few pixels. Medical 16-bit files rarely use the 16-bit range, so
scaling by the dtype's range would leave them nearly black. Training, validation and scoring all
decode through here, so an image is scaled the same way wherever it is read.

Its own module so that `data_layer.images` (the dispatcher) and `data_layer.dicom` (one of the
readers) both build on it without importing each other.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_MAX_PIXELS = 64_000_000
"""64 megapixels: above the largest clinical radiographs (about 4k x 5k), far below memory trouble."""
ROBUST_WINDOW = (0.5, 99.5)
"""Percentiles of a non-8-bit image that become grey 0 and 255 (values beyond them clip)."""

class ImageReadError(ValueError):
    """A file cannot be decoded into an image; the message names the file and what to do."""


@contextmanager
def decoding(path: Path, *extra_errors: type[BaseException]) -> Iterator[None]:
    """Turn any decoder failure into an `ImageReadError` that names the file."""
    try:
        yield
    except ImageReadError:
        raise
    except (
        OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error, Image.DecompressionBombError,
        AttributeError, KeyError, IndexError, TypeError, NotImplementedError, ArithmeticError, *extra_errors,
    ) as exc:
        raise ImageReadError(
            f"{path}: cannot decode ({type(exc).__name__}: {exc}). The file is corrupt, truncated "
            "or not what its suffix says: re-export it from the source or remove it."
        ) from exc


def check_pixel_count(path: Path, width: int, height: int, max_pixels: int) -> None:
    """Refuse an image from its header size, before its pixels are decoded."""
    if width * height == 0:
        raise ImageReadError(f"{path}: {width}x{height}: the image has no pixels. Re-export it or remove it.")
    if width * height > max_pixels:
        raise ImageReadError(
            f"{path}: {width}x{height} = {width * height:,} pixels exceeds the limit of "
            f"{max_pixels:,} (decompression-bomb guard). Downscale the image, or raise max_pixels "
            "if the file is trusted."
        )


def scale_to_uint8(array: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map [low, high] linearly onto 0..255 (clipping outside); a degenerate range gives zeros."""
    if not high > low:
        return np.zeros(array.shape, dtype=np.uint8)
    scaled = (array.astype(np.float64) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def robust_window(array: np.ndarray) -> tuple[float, float]:
    """The `ROBUST_WINDOW` percentiles of `array`; min..max when they coincide (a sparse image whose
    few bright pixels are its content), so only a truly constant image maps to all zeros."""
    low, high = np.percentile(array, ROBUST_WINDOW)
    if not high > low:
        low, high = array.min(), array.max()
    return float(low), float(high)


def array_to_image(array: np.ndarray) -> Image.Image:
    """HxW or HxWx1 -> mode L, HxWx3 -> RGB; non-uint8 data goes through the robust window."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
        raise ValueError(f"expected an HxW, HxWx1 or HxWx3 array, got shape {array.shape}")
    if array.dtype != np.uint8:
        if not np.isfinite(array).all():
            raise ValueError("array contains NaN or infinite values")
        array = scale_to_uint8(array, *robust_window(array))
    return Image.fromarray(np.ascontiguousarray(array), mode="L" if array.ndim == 2 else "RGB")
