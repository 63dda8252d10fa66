"""Fixtures of the pipeline tests: a throwaway MLflow store (SQLite + local artifacts), a tiny
trained DPA registered as a pyfunc champion, image files in every supported format, and a
temporary Prefect server.

The MLflow store, the model and the Prefect server are session-scoped because each costs seconds;
tests that promote use their own registered-model names, so they never see each other's aliases.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from data_layer.expectations import ValidationRules
from data_layer.images import read_image, write_png
from data_layer.manifest import write_manifest
from data_layer.preprocessing import PreprocessConfig, preprocess_images
from model.dpa import DPA
from model.scoring import score_images
from model.trainer import train_dpa
from tasks.registry.mlflow_model import CHAMPION, log_dpa_model
from tasks.training.metrics import VAL_NORMALS, operating_threshold, threshold_rule
from tests.model_core.conftest import blob_images, tiny_config

if TYPE_CHECKING:
    from tasks.config import RunConfig

RES = 16
PREPROCESS = PreprocessConfig(channels=1, size=RES)
INPUT_RULES = ValidationRules(min_size=RES)


@dataclass(frozen=True)
class RegisteredDPA:
    name: str
    version: str
    dpa: DPA
    threshold: float
    normal_scores: tuple[float, ...] = ()

    @property
    def champion_uri(self) -> str:
        return f"models:/{self.name}@{CHAMPION}"


@dataclass(frozen=True)
class ImageSet:
    """Test images on disk: a dataset dir with manifest.csv, and the in-process reference scores."""

    root: Path
    files: list[Path]
    labels: list[str]

    def expected_scores(self, dpa: DPA) -> np.ndarray:
        images = preprocess_images([read_image(f) for f in self.files], PREPROCESS)
        return score_images(dpa, images).double().numpy()


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """MLFLOW_TRACKING_URI → a fresh SQLite file; the active experiment keeps artifacts beside it."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        experiment = MlflowClient().create_experiment("pipeline-tests", artifact_location=(root / "artifacts").as_uri())
        patch.setenv("MLFLOW_EXPERIMENT_ID", experiment)
        yield uri


@pytest.fixture(scope="session")
def tiny_dpa() -> DPA:
    """A 16×16 grey DPA (random VGG weights) trained for a few seconds on smooth blobs: 100 steps
    separate striped squares from blobs (AUROC ~0.97; 30 steps: ~0.85)."""
    return train_dpa(tiny_config(res=RES, stab_iters=100), blob_images(64, RES, seed=0), progress=False)


def run_config() -> RunConfig:
    """A resolved run configuration around the tiny DPA (tasks.config imports GX: seconds, so lazily)."""
    from tasks.config import RunConfig

    return RunConfig(preset="pipeline-test", preprocess=PREPROCESS, dpa=tiny_config(res=RES, stab_iters=100))


def register(dpa: DPA, name: str, threshold: float = 1.0, normal_scores: list[float] | None = None) -> str:
    """Log and register `dpa` in a fresh run; the new version number. The reference normal scores
    default to ones whose 0.95 quantile is `threshold`."""
    normals = normal_scores if normal_scores is not None else [threshold * k / 20 for k in range(21)]
    with mlflow.start_run():
        info = log_dpa_model(dpa, PREPROCESS, threshold, name, threshold_rule(0.95),
                             normal_scores=normals, normal_source=VAL_NORMALS, quantile=0.95, input_rules=INPUT_RULES)
    return str(info.registered_model_version)


@pytest.fixture(scope="session")
def champion(mlflow_store: str, tiny_dpa: DPA) -> RegisteredDPA:
    """The tiny DPA registered under its own name with the `champion` alias."""
    normals = score_images(tiny_dpa, blob_images(32, RES, seed=1)).numpy()
    threshold = operating_threshold(normals, 0.95)
    name = f"dpa-test-{uuid.uuid4().hex[:8]}"
    version = register(tiny_dpa, name, threshold, normals.tolist())
    MlflowClient().set_registered_model_alias(name, CHAMPION, version)
    return RegisteredDPA(name, version, tiny_dpa, threshold, tuple(normals.tolist()))


@pytest.fixture(scope="session")
def image_set(tmp_path_factory: pytest.TempPathFactory) -> ImageSet:
    """Normal blobs and blobs with a striped square, as PNG, JPEG, TIFF, NPY and DICOM files, listed
    in a manifest (some files larger than the model, so preprocessing really resizes)."""
    root = tmp_path_factory.mktemp("images")
    (root / "images").mkdir()
    normal, abnormal = blob_images(4, 2 * RES, seed=2), blob_images(4, 2 * RES, seed=3, anomalous=True)
    pixels = [p[0].numpy() for p in torch.cat([normal, abnormal])]
    labels = ["normal"] * len(normal) + ["abnormal"] * len(abnormal)
    writers = (_write_png, _write_jpeg, _write_tiff, _write_npy, _write_dicom)
    files = [writers[i % len(writers)](root / "images" / f"img{i}", array) for i, array in enumerate(pixels)]
    rows = [{"path": f.relative_to(root).as_posix(), "label": label, "split": "test", "group": f.stem} for f, label in zip(files, labels)]
    write_manifest(pd.DataFrame(rows), root)
    return ImageSet(root, files, labels)


def _write_png(stem: Path, array: np.ndarray) -> Path:
    write_png(Image.fromarray(array, mode="L"), stem.with_suffix(".png"))
    return stem.with_suffix(".png")


def _write_jpeg(stem: Path, array: np.ndarray) -> Path:
    Image.fromarray(array, mode="L").save(stem.with_suffix(".jpg"), quality=95)
    return stem.with_suffix(".jpg")


def _write_tiff(stem: Path, array: np.ndarray) -> Path:
    Image.fromarray(array, mode="L").save(stem.with_suffix(".tif"))
    return stem.with_suffix(".tif")


def _write_npy(stem: Path, array: np.ndarray) -> Path:
    np.save(stem.with_suffix(".npy"), array)
    return stem.with_suffix(".npy")


def _write_dicom(stem: Path, array: np.ndarray) -> Path:
    """A 12-bit monochrome DICOM Part-10 file, as a modality writes it."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(stem), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.Modality, ds.SamplesPerPixel, ds.PhotometricInterpretation = "PAT-1", "DX", 1, "MONOCHROME2"
    ds.Rows, ds.Columns = array.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (array.astype(np.uint16) * 16).tobytes()
    ds.save_as(stem.with_suffix(".dcm"), enforce_file_format=True)
    return stem.with_suffix(".dcm")
