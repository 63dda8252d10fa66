"""The DPA as an MLflow `PythonModel`: decode → preprocess → score → threshold, with optional heat maps.

No Prefect here: the model server imports this module (through the models-from-code file
`tasks/registry/dpa_model_code.py`). Images reach the model through the same `read_image` +
`preprocess_images` code as training, so a served score equals the training-time score of the
same file, and pass the training gate's per-image checks first (size, channels, not blank), so an
image training would have refused is refused here too, with its reason. What a request may contain is checked by `tasks.serving.request`.

Input: a DataFrame with one row per image and, per row, exactly one of
- `image`: the file's bytes (PNG, JPEG, TIFF, DICOM or NPY), base64-encoded;
- `path`: a file inside the folder named by `DPA_SERVE_PATH_ROOT` (refused when it is unset).
Params: `heatmap` (bool) adds the anomaly map of each image; `threshold` (a score) or
`specificity` (e.g. 0.99: the threshold is that quantile of the version's stored normal scores,
`reference_scores.json`) set the operating point for this request; default: the registered one.
Output: `anomaly_score` (float, higher = more anomalous), `is_anomaly` (score > threshold),
`threshold` (the one applied) and, with the heatmap param, `heatmap`: a base64 8-bit grey PNG at the
model's resolution where grey level g means a local anomaly level of (g / 255) × 2 × threshold
(128 ≈ the threshold; 255 = twice the threshold or more). The map's mean is about the image's
score, so it reads on the same scale.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel, PythonModelContext
from PIL import Image
from pydantic import BaseModel, Field

from data_layer.admission import check_image
from data_layer.expectations import ValidationRules
from data_layer.images import is_image_file, read_image
from data_layer.pixels import ImageReadError
from data_layer.preprocessing import PreprocessConfig, preprocess_images
from model.dpa import DPA, load_dpa
from model.scoring import score_images, scores_and_maps
from tasks.serving.request import RequestError, ServingLimits, request_rows, row_source

WEIGHTS, SERVING_CONFIG, REFERENCE_SCORES = "dpa_weights", "serving_config", "reference_scores"
REFERENCE_SCORES_FILE = "reference_scores.json"
"""Artifact of every version logged since thresholds-at-inference: the normal scores its threshold
came from (see `ReferenceScores`); under `artifacts/` in the logged model directory."""
HEATMAP_SATURATION = 2.0
"""Heat-map grey 255 stands for this multiple of the threshold (and above)."""

SCORE, IS_ANOMALY, THRESHOLD, HEATMAP, SPECIFICITY = "anomaly_score", "is_anomaly", "threshold", "heatmap", "specificity"
INTERNAL_FAILURE = "the server failed to score this request (an internal error, logged on the server)"

log = logging.getLogger(__name__)


UNRECORDED_RULES = ValidationRules(min_size=1)
"""The input rules of versions logged before they were recorded: only the blank-image check, which
needs no training setting, so those versions still score everything they scored before."""


class ServingConfig(BaseModel):
    """Everything besides the weights that turns a file into a decision. `input_rules` are the
    training gate's rules, applied to every image before it is scored (`data_layer.admission`)."""

    preprocess: PreprocessConfig
    threshold: float
    threshold_rule: str
    input_rules: ValidationRules = UNRECORDED_RULES


class ReferenceScores(BaseModel):
    """The scores of the normal images the threshold was set on (validation normals, else training
    normals: `source` says which). The registered threshold is `threshold_at(quantile)`, with numpy's
    default (linear) quantile; drift checks compare new score distributions against `scores`."""

    scores: list[float] = Field(min_length=1)
    source: str
    quantile: float = Field(ge=0, le=1)
    rule: str

    def threshold_at(self, specificity: float) -> float:
        """The score that this fraction of the reference normals do not exceed."""
        return float(np.quantile(np.asarray(self.scores, dtype=np.float64), specificity))


class DPAPyfuncModel(PythonModel):
    """Decode → preprocess → score → threshold, with optional heat maps."""

    def load_context(self, context: PythonModelContext) -> None:
        self.load_artifacts(context.artifacts)

    def load_artifacts(self, artifacts: Mapping[str, str]) -> None:
        """Weights (a state_dict read with weights_only=True), serving config, reference scores, limits."""
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.dpa: DPA = load_dpa(Path(artifacts[WEIGHTS]), map_location="cpu").to(device)
        self.config = ServingConfig.model_validate_json(Path(artifacts[SERVING_CONFIG]).read_text())
        reference = artifacts.get(REFERENCE_SCORES)
        self.reference = ReferenceScores.model_validate_json(Path(reference).read_text()) if reference else None
        self.threshold = self.config.threshold
        self.limits = ServingLimits.from_env()

    def operating_threshold(self, threshold: float | None = None, specificity: float | None = None) -> float:
        """The threshold of a request: a given score, a quantile of the reference normals, or the registered one."""
        if threshold is not None and specificity is not None:
            raise ValueError(f"give param {THRESHOLD!r} or {SPECIFICITY!r}, not both")
        if threshold is not None:
            if not math.isfinite(threshold) or threshold < 0:
                raise ValueError(f"param {THRESHOLD!r} must be a finite score ≥ 0 (scores are relative perceptual "
                                 f"losses, never negative: below 0 every image is an anomaly), got {threshold}")
            return float(threshold)
        if specificity is None:
            return self.threshold
        if not 0.0 <= specificity <= 1.0:
            raise ValueError(f"param {SPECIFICITY!r} must be in [0, 1] (e.g. 0.99), got {specificity}")
        if self.reference is None:
            raise ValueError(
                f"this model version has no stored reference scores ({REFERENCE_SCORES_FILE}; logged before "
                f"thresholds at inference): retrain it, or give param {THRESHOLD!r}"
            )
        return self.reference.threshold_at(specificity)

    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """Every bad row is named in one error (HTTP 400 when served), rather than failing on the first.

        Any other failure is a fault of this server: it answers HTTP 500 with a fixed message and
        logs the traceback here, because MLflow would otherwise answer 400 with the traceback (the
        server's file paths) in the response."""
        try:
            return self._predict(model_input, params or {})
        except MlflowException:
            raise
        except Exception as exc:
            log.exception("scoring a request failed")
            raise MlflowException(INTERNAL_FAILURE, error_code=INTERNAL_ERROR) from exc

    def _predict(self, model_input: pd.DataFrame, params: dict[str, Any]) -> pd.DataFrame:
        try:
            threshold = self.operating_threshold(params.get(THRESHOLD), params.get(SPECIFICITY))
            rows = request_rows(model_input, self.limits)
        except (RequestError, ValueError) as exc:
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from exc
        images, errors = [], []
        for row, (data, path) in enumerate(rows):
            try:
                images.append(self.prepare([self._decode(row_source(data, path, self.limits))]))
            except (ImageReadError, ValueError) as exc:
                errors.append(f"row {row}: {exc}")
        if errors:
            raise MlflowException("; ".join(errors), error_code=INVALID_PARAMETER_VALUE)
        return self.score(torch.cat(images), heatmap=bool(params.get(HEATMAP, False)), threshold=threshold)

    def _decode(self, source: bytes | Path) -> Image.Image:
        if isinstance(source, bytes):
            return decode_image_bytes(source, self.limits.max_pixels)
        return read_image(source, self.limits.max_pixels)

    def prepare(self, images: list[Image.Image]) -> torch.Tensor:
        """Decoded images → uint8 N×C×S×S model input, by the training transform, after the training
        gate's per-image checks (`ImageRefused` names the broken rule)."""
        for image in images:
            check_image(image, self.config.input_rules)
        return preprocess_images(images, self.config.preprocess)

    def score(self, images: torch.Tensor, heatmap: bool = False, threshold: float | None = None) -> pd.DataFrame:
        """Scores (and heat maps) of preprocessed uint8 images, one output row per image."""
        threshold = self.threshold if threshold is None else threshold
        if not heatmap:
            scores = score_images(self.dpa, images).double().numpy()
            return pd.DataFrame({SCORE: scores, IS_ANOMALY: scores > threshold, THRESHOLD: threshold})
        scores, maps = scores_and_maps(self.dpa, images)
        scores = scores.double().numpy()
        return pd.DataFrame({
            SCORE: scores, IS_ANOMALY: scores > threshold, THRESHOLD: threshold,
            HEATMAP: [encode_heatmap(m, threshold) for m in maps],
        })


def decode_image_bytes(data: bytes, max_pixels: int) -> Image.Image:
    """File bytes → image through `read_image` (which takes paths and tells the type from the
    magic bytes when there is no suffix), via a nameless temp file."""
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "upload"
        file.write_bytes(data)
        if not is_image_file(file):
            raise ValueError("the bytes are not a PNG, JPEG, TIFF, DICOM (Part 10) or NPY file")
        try:
            return read_image(file, max_pixels)
        except ImageReadError as exc:  # the temp path means nothing to the sender
            raise ImageReadError(str(exc).replace(str(file), "uploaded file")) from exc


def reference_scores(scores: Sequence[float], source: str, quantile: float, rule: str) -> ReferenceScores:
    """The reference record logged with a version (`scores` must be finite)."""
    values = np.asarray(scores, dtype=np.float64)
    if values.size == 0 or not np.isfinite(values).all():
        raise ValueError("reference scores must be a non-empty list of finite normal-image scores")
    return ReferenceScores(scores=values.tolist(), source=source, quantile=quantile, rule=rule)


def encode_heatmap(anomaly_map: torch.Tensor, threshold: float) -> str:
    """Base64 grey PNG of `anomaly_map / threshold` (see the module docstring for the scale)."""
    relative = anomaly_map.float().numpy() / max(threshold, np.finfo(np.float32).tiny)
    grey = np.rint(np.clip(relative / HEATMAP_SATURATION, 0.0, 1.0) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(grey, mode="L").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_heatmap(text: str) -> np.ndarray:
    """A `heatmap` cell → float map in units of the threshold (1.0 = threshold level)."""
    grey = np.asarray(Image.open(io.BytesIO(base64.b64decode(text))), dtype=np.float64)
    return grey / 255 * HEATMAP_SATURATION
