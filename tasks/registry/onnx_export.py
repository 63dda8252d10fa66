"""`dpa export`: a registered version as an ONNX scoring graph that scores what PyTorch scores, or no export.

The graph (`model.export`) takes preprocessed uint8 images and returns scores (and with heat maps,
the anomaly maps). Before anything is kept, ONNX Runtime (CPU) scores the version's test images
and must agree with PyTorch within `TOLERANCE` (relative): otherwise the export fails, says by how
much and on which image, and leaves nothing behind. A kept export is `model.onnx` plus
`model.json` (the sidecar: input, preprocessing, thresholds by specificity, the version, the parity
figures), and both are logged with the parity metrics to the version's MLflow run (`onnx/`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from importlib.metadata import version as package_version
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from mlflow import MlflowClient

from data_layer.images import read_image
from data_layer.manifest import PATH, read_manifest, resolve_path, select
from data_layer.versioning import DatasetNotFound, data_version, dataset_paths
from model.export import INPUT, MAP, OPSET, SCORE, export_onnx
from model.scoring import score_images
from tasks.paths import project_dir
from tasks.registry.mlflow_model import DPAPyfuncModel, load_dpa_scorer
from tasks.registry.model_uri import registered_name, registered_version
from tasks.serving.journal import resolve_model
from tasks.serving.scoring import FILE, list_inputs

TOLERANCE = 1e-4
"""Largest relative difference between ONNX Runtime's and PyTorch's score of one image."""
ONNX_FILE, SIDECAR_FILE, ARTIFACT_DIR = "model.onnx", "model.json", "onnx"
SPECIFICITIES = (0.9, 0.95, 0.98, 0.99, 0.995, 0.999)
PREPROCESSING = (
    "decode to 8 bits (DICOM through its modality and VOI LUT or window, MONOCHROME1 inverted; other non-8-bit "
    "images through their 0.5th..99.5th percentile window), convert to grey (channels 1) or RGB, centre crop "
    "(center_crop: pixels, or a fraction of the shorter side), histogram-equalise if equalize, bilinear resize "
    "to size x size; feed uint8 N x C x size x size"
)


class ExportParityError(RuntimeError):
    """ONNX Runtime scores differ from PyTorch's by more than the tolerance: nothing was exported."""


class ExportInputError(ValueError):
    """The images to check the export on cannot be found."""


@dataclass(frozen=True)
class ExportResult:
    onnx_file: Path
    sidecar: Path
    images: int
    max_relative_difference: float


def export_version(model_uri: str, out_dir: str | Path, heatmaps: bool = False, images_dir: str | Path | None = None) -> ExportResult:
    """Export `model_uri` (pinned to its version) to `out_dir`, checked on its test images (or `images_dir`)."""
    model = resolve_model(model_uri)
    run_id = registered_version(model.uri).run_id
    scorer = load_dpa_scorer(model.uri)
    files = _parity_files(model.uri, run_id, images_dir)
    images = torch.cat([scorer.prepare([read_image(f)]) for f in files])
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_file = Path(tmp) / ONNX_FILE
        cfg = scorer.config.preprocess
        export_onnx(scorer.dpa, cfg.channels, cfg.size, onnx_file, maps=heatmaps)
        worst, image = _parity(onnx_file, scorer, images)
        if worst > TOLERANCE:
            raise ExportParityError(
                f"ONNX Runtime scores differ from PyTorch's by up to {worst:.3g} (relative; tolerance {TOLERANCE:g}), "
                f"worst on {files[image]}: nothing was exported. Report this with the model version and torch "
                f"{torch.__version__} / onnxruntime {onnxruntime.__version__}."
            )
        sidecar = Path(tmp) / SIDECAR_FILE
        sidecar.write_text(json.dumps(_sidecar(model.uri, model.version, scorer, heatmaps, len(files), worst), indent=2))
        out_dir.mkdir(parents=True, exist_ok=True)
        for file in (onnx_file, sidecar):
            shutil.copy(file, out_dir / file.name)
    _log_to_version(run_id, out_dir, len(files), worst)
    return ExportResult(out_dir / ONNX_FILE, out_dir / SIDECAR_FILE, len(files), worst)


def _parity(onnx_file: Path, scorer: DPAPyfuncModel, images: torch.Tensor) -> tuple[float, int]:
    """The largest relative score difference between ONNX Runtime (CPU) and PyTorch (fp32), and where."""
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    exported = session.run([SCORE], {INPUT: images.numpy()})[0].astype(np.float64)
    dpa = scorer.dpa.float().cpu()
    reference = score_images(dpa, images).double().numpy()
    relative = np.abs(exported - reference) / np.maximum(np.abs(reference), np.finfo(np.float32).tiny)
    return float(relative.max()), int(relative.argmax())


def _parity_files(model_uri: str, run_id: str, images_dir: str | Path | None) -> list[Path]:
    """`images_dir`'s images, else the test split of the dataset version the model (logged by run
    `run_id`) was trained on, when this project still holds that version."""
    if images_dir is not None:
        return list(list_inputs(images_dir)[FILE])
    tags = MlflowClient().get_run(run_id).data.tags
    name, wanted = tags.get("dataset", "production"), tags.get("data_version", "")
    try:
        current = data_version(project_dir(), name)
    except DatasetNotFound:
        current = None
    if current != wanted or not wanted:
        raise ExportInputError(
            f"{model_uri} was trained on data version {wanted or 'unknown'} of dataset {name}, which this project "
            f"{'holds at version ' + current if current else 'does not hold'}: give the images to check the export on "
            "with --images DIR (a folder, or a dataset with manifest.csv)"
        )
    dataset = project_dir() / dataset_paths(name)[0]
    test = select(read_manifest(dataset), split="test")
    return [resolve_path(dataset, p) for p in test[PATH]]


def _sidecar(model_uri: str, version: str, scorer: DPAPyfuncModel, heatmaps: bool, n_images: int, worst: float) -> dict:
    cfg = scorer.config.preprocess
    table = {f"{s:g}": scorer.reference.threshold_at(s) for s in SPECIFICITIES} if scorer.reference else {}
    return {
        "model_uri": model_uri, "model_name": registered_name(model_uri), "model_version": version,
        "input": {"name": INPUT, "dtype": "uint8", "shape": ["batch", cfg.channels, cfg.size, cfg.size]},
        "outputs": [SCORE, *([MAP] if heatmaps else [])],
        "preprocessing": {**cfg.model_dump(mode="json"), "steps": PREPROCESSING},
        "input_rules": scorer.config.input_rules.model_dump(mode="json", include={"min_size", "expected_channels"}),
        "threshold": scorer.config.threshold, "threshold_rule": scorer.config.threshold_rule,
        "threshold_at_specificity": table, "decision": "anomaly if anomaly_score > threshold",
        "parity": {"images": n_images, "max_relative_difference": worst, "tolerance": TOLERANCE, "runtime": "onnxruntime CPU"},
        "exported_with": {"torch": torch.__version__, "onnxruntime": package_version("onnxruntime"), "opset": OPSET},
    }


def _log_to_version(run_id: str, out_dir: Path, n_images: int, worst: float) -> None:
    client = MlflowClient()
    for name in (ONNX_FILE, SIDECAR_FILE):
        client.log_artifact(run_id, str(out_dir / name), ARTIFACT_DIR)
    client.log_metric(run_id, "onnx_parity_max_relative_difference", worst)
    client.log_metric(run_id, "onnx_parity_images", n_images)
