"""Results back into the study: a Structured Report and a heat-map image for each scored DICOM input.

For each DICOM file scored, two new objects go into the source's study, each in a new series with
new UIDs (highdicom builds both, so their modules are what the standard asks for):

- a **Comprehensive 3D SR** holding a TID 1500 Measurement Report with one image-level measurement
  group (TID 1501) that references the source image: the anomaly score, the threshold and the
  specificity it came from, the decision (SNOMED CT "Abnormal"/"Normal"), and the model as the
  algorithm identification (name, version, and its `models:/` URI as a parameter);
- an RGB **Secondary Capture** of the source as displayed (its modality and VOI LUT or window, and
  MONOCHROME1 inversion, applied by `data_layer.dicom`) with the heat map laid over the part the model
  saw, at the source's size.

Patient and study attributes come from the source only; nothing from this machine (no path, no
host name) is written. Concepts without a standard code use the private coding scheme `99DPA`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pydicom
from PIL import Image
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from data_layer.images import is_dicom_file, read_image
from data_layer.preprocessing import PreprocessConfig, model_view_box

if TYPE_CHECKING:
    import highdicom as hd

SCHEME = "99DPA"
ANOMALY_SCORE = Code("DPA001", SCHEME, "Anomaly score")
SCORE_THRESHOLD = Code("DPA002", SCHEME, "Anomaly score threshold")
THRESHOLD_SPECIFICITY = Code("DPA003", SCHEME, "Specificity of the threshold on reference normal images")
ANOMALY_DECISION = Code("DPA004", SCHEME, "Anomaly decision")
IMAGING_PROCEDURE = Code("363679005", "SCT", "Imaging procedure")
MODEL_URI_PARAMETER = "model_uri="
"""Prefix of the algorithm parameter that names the registered version (`dpa lineage` reads it)."""
SR_SERIES, SC_SERIES = 9901, 9902
MANUFACTURER = "dpa-pipeline"
OVERLAY_OPACITY = 0.6
"""Opacity of the red where the local anomaly level is twice the threshold or more; it fades to none
at the threshold, so only what is above the operating point shows."""


@dataclass(frozen=True)
class DicomResult:
    """One scored image as the SR states it; `heat` is the anomaly map in threshold units (1 = threshold)."""

    score: float
    threshold: float
    specificity: float | None
    is_anomaly: bool
    heat: np.ndarray
    model_name: str
    model_version: str
    model_uri: str


DICOM_SR, DICOM_HEATMAP = "dicom_sr", "dicom_heatmap"
NOT_DICOM = "(not a DICOM input: no DICOM written)"


@dataclass(frozen=True)
class DicomOutput:
    """Where one scoring run writes its DICOM results, and what every report states besides the score."""

    root: Path
    model_name: str
    model_version: str
    model_uri: str
    threshold: float
    specificity: float | None
    preprocess: PreprocessConfig

    def write(self, source: Path, relative: str, score: float, is_anomaly: bool, heat: np.ndarray) -> tuple[str, str]:
        """The SR and heat-map image of one scored file (paths relative to `root`, mirroring the input
        layout), or the `NOT_DICOM` note for both when the input is not DICOM."""
        if not is_dicom_file(source):
            return NOT_DICOM, NOT_DICOM
        result = DicomResult(score, self.threshold, self.specificity, is_anomaly, heat, self.model_name,
                             self.model_version, self.model_uri)
        files = write_dicom_results(source, read_image(source), result, self.preprocess, self.root / relative)
        return tuple(f.relative_to(self.root).as_posix() for f in files)


STUDY_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
               "ReferringPhysicianName", "StudyID", "AccessionNumber")
"""Patient and study attributes a derived object must carry (Type 2: present, possibly empty). A source
that lacks one gives an empty one, never a value."""


def write_dicom_results(
    source: Path, display: Image.Image, result: DicomResult, preprocess: PreprocessConfig, stem: Path
) -> tuple[Path, Path]:
    """Write `<stem>.sr.dcm` and `<stem>.heatmap.dcm` for the scored DICOM `source`; their paths."""
    dataset = pydicom.dcmread(source)
    for keyword in STUDY_TYPE2:
        if keyword not in dataset:
            setattr(dataset, keyword, None)
    stem.parent.mkdir(parents=True, exist_ok=True)
    sr_file, sc_file = stem.with_name(stem.name + ".sr.dcm"), stem.with_name(stem.name + ".heatmap.dcm")
    structured_report(dataset, result).save_as(sr_file, enforce_file_format=True)
    heatmap_capture(dataset, overlay(display, result.heat, preprocess)).save_as(sc_file, enforce_file_format=True)
    return sr_file, sc_file


def structured_report(source: pydicom.Dataset, result: DicomResult) -> hd.sr.Comprehensive3DSR:
    import highdicom as hd  # here, as in heatmap_capture: half a second to import, paid only by runs that write DICOM

    algorithm = hd.sr.AlgorithmIdentification(
        name=result.model_name, version=result.model_version, parameters=[MODEL_URI_PARAMETER + result.model_uri],
    )
    measurements = [
        hd.sr.Measurement(name=ANOMALY_SCORE, value=result.score, unit=codes.UCUM.NoUnits, algorithm_id=algorithm),
        hd.sr.Measurement(name=SCORE_THRESHOLD, value=result.threshold, unit=codes.UCUM.NoUnits, algorithm_id=algorithm),
    ]
    if result.specificity is not None:
        measurements.append(hd.sr.Measurement(name=THRESHOLD_SPECIFICITY, value=result.specificity * 100,
                                              unit=codes.UCUM.Percent, algorithm_id=algorithm))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="DPA anomaly score"),
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(
            name=ANOMALY_DECISION, value=codes.SCT.Abnormal if result.is_anomaly else codes.SCT.Normal)],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name="DPA anomaly detector", manufacturer_name=MANUFACTURER, model_name=result.model_name),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=IMAGING_PROCEDURE,
        imaging_measurements=[group],
        title=codes.DCM.ImagingMeasurementReport,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[source], content=report, series_instance_uid=hd.UID(), series_number=SR_SERIES,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER, is_complete=True,
        series_description="DPA anomaly report",
    )
    scheme = pydicom.Dataset()
    scheme.CodingSchemeDesignator, scheme.CodingSchemeName = SCHEME, "DPA pipeline anomaly-detection concepts"
    scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
    sr.CodingSchemeIdentificationSequence = [scheme]  # declares the private scheme, as PS3.3 C.12.1.1.3.1 asks
    return sr


def heatmap_capture(source: pydicom.Dataset, pixels: np.ndarray) -> hd.sc.SCImage:
    """The overlay as a Secondary Capture in the source's study. Its patient orientation and laterality
    are the source's, verbatim, or empty (Type 2C) when the source has none: highdicom asks for an
    orientation to build the image, which is then replaced, so none is invented."""
    import highdicom as hd

    capture = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", patient_orientation=("L", "F"),
        series_instance_uid=hd.UID(), series_number=SC_SERIES, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer=MANUFACTURER, series_description="DPA anomaly heat map",
    )
    capture.PatientOrientation = source.get("PatientOrientation")
    capture.Laterality = source.get("Laterality")  # Type 2C: the source's, or empty
    return capture


def overlay(display: Image.Image, heat: np.ndarray, preprocess: PreprocessConfig) -> np.ndarray:
    """The displayed image in RGB with the heat map in red over the model's view of it: clear where the
    local anomaly level is at or below the threshold, growing to `OVERLAY_OPACITY` at twice it."""
    base = np.asarray(display.convert("RGB"), dtype=np.float32)
    left, top, right, bottom = model_view_box(display.width, display.height, preprocess.center_crop)
    level = Image.fromarray(np.clip(heat - 1.0, 0.0, 1.0).astype(np.float32), mode="F")
    alpha = np.asarray(level.resize((right - left, bottom - top), Image.Resampling.BILINEAR)) * OVERLAY_OPACITY
    view = base[top:bottom, left:right]
    red = np.array([255.0, 0.0, 0.0], dtype=np.float32)
    base[top:bottom, left:right] = view * (1 - alpha[..., None]) + red * alpha[..., None]
    return np.rint(base).clip(0, 255).astype(np.uint8)


def model_uri_of_report(file: Path) -> str | None:
    """The `models:/` URI a DPA report names (its algorithm parameter), or None."""
    dataset = pydicom.dcmread(file)
    for item in _content_items(dataset):
        text = str(item.get("TextValue", ""))
        if text.startswith(MODEL_URI_PARAMETER):
            return text.removeprefix(MODEL_URI_PARAMETER)
    return None


def _content_items(dataset: pydicom.Dataset):  # noqa: ANN202 - a generator of nested content items
    for item in dataset.get("ContentSequence", []):
        yield item
        yield from _content_items(item)
