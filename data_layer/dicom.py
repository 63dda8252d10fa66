"""DICOM decoding with pydicom, and the only place that touches patient-identifying tags.

Pixels go through the display pipeline the header asks for: Modality LUT (rescale
slope/intercept) -> VOI LUT or window -> MONOCHROME1 inversion -> 8 bits. The 8-bit mapping comes
from the header, not from the image content: the full stored range (BitsStored) is pushed through
the same LUTs and its ends become 0 and 255. So a window maps to 0..255 exactly, and the same
tissue gets the same grey level across a series. Only `dicom_group_id`, a salted hash of
PatientID, leaves this module; no tag value is ever logged or put in an error message.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from data_layer.manifest import salted_group_id
from data_layer.pixels import (
    DEFAULT_MAX_PIXELS,
    ImageReadError,
    array_to_image,
    check_pixel_count,
    decoding,
    scale_to_uint8,
)


def read_dicom(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode a single-frame DICOM file into an 8-bit PIL image (L for monochrome, else RGB)."""
    path = Path(path)
    with decoding(path, InvalidDicomError):
        dataset = pydicom.dcmread(path)
        _check_decodable(path, dataset, max_pixels)
        pixels = dataset.pixel_array
        if dataset.get("SamplesPerPixel", 1) != 1:
            return array_to_image(pixels)
        return Image.fromarray(_monochrome_to_uint8(dataset, pixels), mode="L")


def dicom_group_id(path: str | Path, salt: str) -> str:
    """Salted hash of the file's PatientID: the one patient-derived value allowed out."""
    path = Path(path)
    with decoding(path, InvalidDicomError):
        dataset = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
    patient_id = str(dataset.get("PatientID", "") or "").strip()
    if not patient_id:
        raise ImageReadError(
            f"{path}: DICOM file has no PatientID, so its images cannot be kept in one split. "
            "Fill PatientID (a pseudonym is fine) or import through a CSV with a group column."
        )
    return salted_group_id(patient_id, salt)


def _check_decodable(path: Path, dataset: pydicom.Dataset, max_pixels: int) -> None:
    if "PixelData" not in dataset or "Rows" not in dataset or "Columns" not in dataset:
        raise ImageReadError(
            f"{path}: DICOM file has no pixel data (truncated, or not an image object such as a "
            "report). Re-export the image or remove the file."
        )
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageReadError(
            f"{path}: multi-frame DICOM ({frames} frames) is not supported. Export the frame you "
            "want as a single-frame file (one image per manifest row)."
        )
    check_pixel_count(path, int(dataset.Columns), int(dataset.Rows), max_pixels)


def _monochrome_to_uint8(dataset: pydicom.Dataset, pixels: np.ndarray) -> np.ndarray:
    values = apply_voi_lut(apply_modality_lut(pixels, dataset), dataset)
    low, high = sorted(_display_range(dataset))
    if not (np.isfinite(values).all() and np.isfinite([low, high]).all()):
        raise ValueError("the header's rescale or window values give NaN or infinite pixel values")
    image = scale_to_uint8(values, low, high)
    if dataset.get("PhotometricInterpretation") == "MONOCHROME1":
        image = 255 - image
    return image


def _display_range(dataset: pydicom.Dataset) -> tuple[float, float]:
    """Ends of the stored value range after the same Modality and VOI LUTs as the pixels."""
    bits = int(dataset.get("BitsStored", dataset.get("BitsAllocated", 8)))
    signed = int(dataset.get("PixelRepresentation", 0)) == 1
    stored = np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1] if signed else [0, 2**bits - 1])
    low, high = apply_voi_lut(apply_modality_lut(stored, dataset), dataset)
    return float(low), float(high)
