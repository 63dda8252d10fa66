"""Fixtures that write small files in the real on-disk formats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid


def _write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    patient_id: str = "PAT-001",
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    frames: int = 1,
    **tags: object,
) -> Path:
    """A real DICOM Part-10 file (preamble, file meta, explicit VR little endian)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient_id
    ds.PatientName = "Doe^Jane"
    ds.Modality = "DX"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    for name, value in tags.items():
        setattr(ds, name, value)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def ramp() -> np.ndarray:
    """A 16x20 ramp over the 12-bit range: distinct values make mappings checkable."""
    return np.linspace(0, 4095, 16 * 20).reshape(16, 20).round().astype(np.uint16)


@pytest.fixture
def write_dicom():
    """The DICOM writer above, as a fixture so test modules need not import conftest."""
    return _write_dicom
