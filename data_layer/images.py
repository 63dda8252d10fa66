"""The single image decoder of the project: every file becomes an 8-bit PIL image (mode L or RGB).

Training, evaluation, validation and serving all read pixels through `read_image`, so a format
quirk is handled in exactly one place. Rules for data that are not 8-bit already:

- 16-bit or 32-bit PNG/TIFF and non-uint8 NPY arrays are mapped to 0..255 through a robust window
  (their 0.5th..99.5th percentiles; `data_layer.pixels`), so a hot pixel cannot rescale the image;
  a constant image becomes all zeros, which the validation gate and scoring refuse.
- DICOM follows its header instead (modality LUT, VOI LUT/window, photometric interpretation): see
  `data_layer.dicom`.

Every failure raises `ImageReadError` naming the file: nothing is skipped or half-decoded (PIL's
LOAD_TRUNCATED_IMAGES is never used), and images above `max_pixels` (or with no pixels) are refused
from their header, before their pixels are decoded (decompression-bomb guard). Served images are
untrusted bytes: Pillow and pydicom answer malformed headers with many exception types (a missing
DICOM attribute is an AttributeError, an unknown transfer syntax a NotImplementedError), and each
becomes an `ImageReadError`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from data_layer.pixels import DEFAULT_MAX_PIXELS, ImageReadError, array_to_image, check_pixel_count, decoding

PNG_COMPRESS_LEVEL = 6
"""Fixed zlib level so that the same pixels always give the same PNG bytes (and DVC hash)."""

_GRAYSCALE_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def read_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode any supported file into an 8-bit PIL image of mode L or RGB.

    The reader is chosen by suffix, else by the file's magic bytes (PACS exports write DICOM
    files without a suffix; uploads arrive without a name)."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: file not found. Restore it or remove its manifest row.")
    reader = _reader_for(path)
    if reader is None:
        raise ImageReadError(
            f"{path}: unsupported file type {path.suffix!r}; "
            f"supported: {', '.join(sorted(SUPPORTED_SUFFIXES))}, or DICOM without a suffix. Convert the file or remove it."
        )
    with decoding(path):
        return reader(path, max_pixels)


def is_image_file(path: Path) -> bool:
    """A file `read_image` knows how to read (by suffix or magic bytes); cheap: reads 132 bytes at most."""
    return _reader_for(path) is not None


def is_dicom_file(path: Path) -> bool:
    """A file `read_image` reads as DICOM (by suffix, or by the Part-10 preamble without one)."""
    return _reader_for(path) is _read_dicom


def _reader_for(path: Path) -> Callable[[Path, int], Image.Image] | None:
    reader = _READERS.get(path.suffix.lower())
    if reader is not None:
        return reader
    with path.open("rb") as stream:
        head = stream.read(132)
    if head[128:132] == b"DICM":
        return _read_dicom
    return next((_READERS[suffix] for magic, suffix in _MAGIC_SUFFIXES if head.startswith(magic)), None)


def pixel_hash(image: Image.Image) -> str:
    """sha256 of the decoded pixels (mode, size and bytes): equal images hash equal across formats."""
    digest = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def write_png(image: Image.Image, path: Path) -> None:
    """Save as PNG with fixed settings, so identical pixels always give identical bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False)


def _read_pil(path: Path, max_pixels: int) -> Image.Image:
    with Image.open(path) as image:
        check_pixel_count(path, image.width, image.height, max_pixels)
        image.load()
        return _to_8bit(image)


def _to_8bit(image: Image.Image) -> Image.Image:
    if image.mode in ("L", "RGB"):
        return image.copy()
    if image.mode in ("1", "LA"):
        return image.convert("L")
    if image.mode in _GRAYSCALE_MODES:
        return array_to_image(np.asarray(image))
    return image.convert("RGB")


def _read_npy(path: Path, max_pixels: int) -> Image.Image:
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    if array.ndim < 2:
        raise ValueError(f"expected an HxW, HxWx1 or HxWx3 array, got shape {array.shape}")
    if array.dtype.kind not in "biuf":
        raise ValueError(f"expected an array of real numbers (bool, int or float), got dtype {array.dtype}")
    check_pixel_count(path, array.shape[1], array.shape[0], max_pixels)
    return array_to_image(np.array(array))


def _read_dicom(path: Path, max_pixels: int) -> Image.Image:
    from data_layer.dicom import read_dicom  # here: pydicom loads only when a DICOM file is read

    return read_dicom(path, max_pixels)


_READERS: dict[str, Callable[[Path, int], Image.Image]] = {
    **dict.fromkeys((".png", ".jpg", ".jpeg", ".tif", ".tiff"), _read_pil),
    ".npy": _read_npy,
    ".dcm": _read_dicom,
    ".dicom": _read_dicom,
}
SUPPORTED_SUFFIXES = frozenset(_READERS)
_MAGIC_SUFFIXES = (
    (b"\x89PNG\r\n\x1a\n", ".png"), (b"\xff\xd8\xff", ".jpg"), (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"),
    (b"\x93NUMPY", ".npy"),
)
