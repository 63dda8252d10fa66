"""Results back into the study: for each scored DICOM input (MONOCHROME1 and MONOCHROME2, with a VOI
LUT or a window), a Structured Report and a heat-map Secondary Capture that read back with pydicom and
highdicom, pass Debian's `dciodvfy` with no errors, reference the source's UIDs, carry no
patient-identifying attribute the source lacked, and lead `dpa lineage` to the model version."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.sr.codedict import codes

from data_layer.images import read_image
from tasks.registry.lineage import lineage
from tasks.serving.dicom_results import ANOMALY_SCORE, NOT_DICOM, SCORE_THRESHOLD, THRESHOLD_SPECIFICITY
from tasks.serving.scoring import score_inputs, summarize
from tests.model_core.conftest import blob_images
from tests.pipeline.conftest import RegisteredDPA
from tests.pipeline.dicom_files import radiograph

PHI = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "OtherPatientIDs", "PatientAddress",
    "ReferringPhysicianName", "AccessionNumber", "StudyID", "StudyDate", "StudyTime", "StudyDescription",
    "InstitutionName", "InstitutionAddress", "StationName", "OperatorsName", "PerformingPhysicianName",
    "DeviceSerialNumber", "IssuerOfPatientID",
)
"""Attributes that identify a patient, a visit or a site (PS3.15 Table E.1-1, the ones a radiograph carries)."""
TEXT_VRS = ("AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT")


def content_items(dataset: pydicom.Dataset) -> list[pydicom.Dataset]:
    items = []
    for item in dataset.get("ContentSequence", []):
        items += [item, *content_items(item)]
    return items


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two DICOM radiographs of one patient (MONOCHROME2 with a window, MONOCHROME1 with a VOI LUT, one
    without some patient attributes) and a PNG, as a PACS export folder."""
    folder = tmp_path_factory.mktemp("study")
    blobs = [b[0].numpy() for b in blob_images(2, 32, seed=11)] + [blob_images(1, 32, seed=12, anomalous=True)[0, 0].numpy()]
    radiograph(folder / "IM0001", blobs[0], "MONOCHROME2", "window", PatientName="Doe^Jane", PatientID="PAT-7",
               PatientBirthDate="19700101", PatientSex="F", StudyDate="20261201", StudyTime="101500",
               AccessionNumber="ACC42", ReferringPhysicianName="Who^Doctor", StudyID="S1", InstitutionName="General Hospital")
    radiograph(folder / "IM0002", blobs[2], "MONOCHROME1", "lut", PatientID="PAT-7")
    Image.fromarray(blobs[1]).save(folder / "photo.png")
    return folder


@pytest.fixture(scope="module")
def written(champion: RegisteredDPA, study: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, Path]:
    root = tmp_path_factory.mktemp("scored")
    csv = score_inputs(champion.champion_uri, str(study), str(root / "out"), dicom_out=str(root / "dicom"))
    return pd.read_csv(csv, keep_default_na=False, dtype=str).set_index("path"), root / "dicom"


def test_each_dicom_input_gets_a_report_and_a_heatmap_image_and_other_inputs_a_note(
    champion: RegisteredDPA, written: tuple[pd.DataFrame, Path], study: Path
) -> None:
    scores, dicom = written
    assert scores.loc["photo.png", ["dicom_sr", "dicom_heatmap"]].tolist() == [NOT_DICOM, NOT_DICOM]
    for name in ("IM0001", "IM0002"):
        assert scores.at[name, "dicom_sr"] == f"{name}.sr.dcm" and scores.at[name, "dicom_heatmap"] == f"{name}.heatmap.dcm"
        assert (dicom / scores.at[name, "dicom_sr"]).is_file() and (dicom / scores.at[name, "dicom_heatmap"]).is_file()
    summary = {row["metric"]: row["value"] for row in summarize(dicom.parent / "out" / "scores.csv")}
    assert summary["DICOM reports + heat-map images written"] == "2" and summary["not DICOM (no DICOM written)"] == "1"


@pytest.mark.parametrize("name", ["IM0001", "IM0002"])
def test_the_report_states_the_result_and_references_the_source(
    champion: RegisteredDPA, written: tuple[pd.DataFrame, Path], study: Path, name: str
) -> None:
    scores, dicom = written
    source = pydicom.dcmread(study / name)
    report = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(dicom / f"{name}.sr.dcm"))
    assert report.StudyInstanceUID == source.StudyInstanceUID
    assert report.SeriesInstanceUID != source.SeriesInstanceUID and report.SOPInstanceUID != source.SOPInstanceUID
    evidence = report.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    referenced = evidence.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == source.SeriesInstanceUID
    assert referenced.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID

    (group,) = report.content.get_image_measurement_groups()
    assert [image.referenced_sop_instance_uid for image in group.source_images] == [source.SOPInstanceUID]
    values = {m.name.value: m.value for m in group.get_measurements()}
    assert values[ANOMALY_SCORE.value] == pytest.approx(float(scores.at[name, "anomaly_score"]), rel=1e-6)
    assert values[SCORE_THRESHOLD.value] == pytest.approx(champion.threshold, rel=1e-6)
    assert values[THRESHOLD_SPECIFICITY.value] == pytest.approx(95.0)  # the registered threshold's quantile
    (decision,) = group.get_qualitative_evaluations()
    assert decision.value == (codes.SCT.Abnormal if scores.at[name, "is_anomaly"] == "True" else codes.SCT.Normal)
    texts = {(item.ConceptNameCodeSequence[0].CodeMeaning, item.TextValue) for item in content_items(report) if "TextValue" in item}
    assert {("Algorithm Name", champion.name), ("Algorithm Version", champion.version),
            ("Algorithm Parameters", f"model_uri=models:/{champion.name}/{champion.version}")} <= texts
    assert lineage(str(dicom / f"{name}.sr.dcm"))[1] == f"model version: {champion.name} v{champion.version} (aliases champion)"


@pytest.mark.parametrize("name", ["IM0001", "IM0002"])
@pytest.mark.parametrize("kind", ["sr", "heatmap"])
def test_written_objects_pass_dciodvfy_and_carry_no_new_identifying_attribute(
    written: tuple[pd.DataFrame, Path], study: Path, tmp_path: Path, name: str, kind: str
) -> None:
    _, dicom = written
    file = dicom / f"{name}.{kind}.dcm"
    checked = subprocess.run(["dciodvfy", str(file)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (checked.stdout + checked.stderr).splitlines() if line.startswith("Error")]
    assert not errors, checked.stdout + checked.stderr
    source, written_object = pydicom.dcmread(study / name), pydicom.dcmread(file)
    for keyword in PHI:
        value = written_object.get(keyword)
        if value not in (None, ""):
            assert str(value) == str(source.get(keyword)), f"{keyword} is {value!r}, the source has {source.get(keyword)!r}"
    texts = [str(element.value) for element in written_object.iterall() if element.VR in TEXT_VRS]
    for text in texts:  # nothing of this machine: no path, no host name
        assert str(study) not in text and str(dicom) not in text and str(Path.home()) not in text, text
        assert socket.gethostname() not in text.split(), text


@pytest.mark.parametrize("name", ["IM0001", "IM0002"])
def test_the_heatmap_image_is_the_displayed_source_with_the_map_over_it(written: tuple[pd.DataFrame, Path], study: Path, name: str) -> None:
    _, dicom = written
    capture = hd.imread(dicom / f"{name}.heatmap.dcm")  # highdicom reads it back as an image
    pixels = capture.pixel_array
    displayed = np.asarray(read_image(study / name).convert("RGB")).astype(int)
    assert capture.PhotometricInterpretation == "RGB" and pixels.shape == displayed.shape
    assert capture.StudyInstanceUID == pydicom.dcmread(study / name).StudyInstanceUID
    red_shift = pixels[..., 0].astype(int) - displayed[..., 0]
    assert (red_shift >= -1).all() and (pixels[..., 1].astype(int) <= displayed[..., 1] + 1).all()  # red laid over, never other hues
    assert np.abs(pixels.astype(int) - displayed).max() > 10  # the map shows
