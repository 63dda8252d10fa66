"""DICOM files as a modality writes them, for the tests that score PACS exports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid


def radiograph(path: Path, pixels: np.ndarray, photometric: str, voi: str, **patient: str) -> Path:
    """A 12-bit DX-like file as a modality writes it; `voi` is "window" or "lut" (a VOI LUT Sequence)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    for keyword, value in patient.items():
        setattr(ds, keyword, value)
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "DX", 1, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if voi == "window":
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
    else:
        lut = pydicom.Dataset()
        lut.add_new("LUTDescriptor", "US", [4096, 0, 12])
        lut.add_new("LUTData", "US", [round(4095 * (v / 4095) ** 0.8) for v in range(4096)])  # a gamma-like VOI LUT
        lut.LUTExplanation = "GAMMA 0.8"
        ds.VOILUTSequence = Sequence([lut])
    stored = pixels.astype(np.uint16) * 16
    ds.PixelData = (4095 - stored if photometric == "MONOCHROME1" else stored).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path
