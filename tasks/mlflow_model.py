"""The DPA as an MLflow pyfunc model: what `mlflow models serve` and batch scoring load.

No Prefect here: the model server imports this module. Images reach the model through the same
`read_image` + `preprocess_images` code as training, so a served score equals the training-time
score of the same file.

Input: a DataFrame with one row per image and, per row, exactly one of
- `image`: the file's bytes (PNG, JPEG, TIFF, DICOM or NPY), base64-encoded;
- `path`: a file path readable by the model process (batch use; don't expose it to untrusted clients).
Params: `{"heatmap": true}` adds the anomaly map of each image.
Output: `anomaly_score` (float, higher = more anomalous), `is_anomaly` (score > threshold) and,
with the heatmap param, `heatmap`: a base64 8-bit grey PNG at the model's resolution where grey
level g means a local anomaly level of (g / 255) × 2 × threshold (128 ≈ the threshold; 255 = twice
the threshold or more). The map's mean is about the image's score, so it reads on the same scale.
"""

from __future__ import annotations

import base64
import io
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PyFuncModel, PythonModel, PythonModelContext
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema
from PIL import Image
from pydantic import BaseModel

from data_layer.images import ImageReadError, is_image_file, read_image
from data_layer.preprocessing import PreprocessConfig, preprocess_images
from model.dpa import DPA, load_dpa, save_dpa
from model.scoring import score_images, scores_and_maps

MODEL_ARTIFACT = "model"
CHAMPION = "champion"
WEIGHTS, SERVING_CONFIG = "dpa_weights", "serving_config"
HEATMAP_SATURATION = 2.0
"""Heat-map grey 255 stands for this multiple of the threshold (and above)."""

IMAGE, PATH, SCORE, IS_ANOMALY, HEATMAP = "image", "path", "anomaly_score", "is_anomaly", "heatmap"
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", IMAGE, required=False), ColSpec("string", PATH, required=False)]),
    outputs=Schema(
        [ColSpec("double", SCORE), ColSpec("boolean", IS_ANOMALY), ColSpec("string", HEATMAP, required=False)]
    ),
    params=ParamSchema([ParamSpec(HEATMAP, "boolean", False)]),
)
_PROJECT_PACKAGES = ("model", "data_layer", "tasks")
_REQUIREMENTS = ("mlflow", "torch", "numpy", "pandas", "pillow", "pydicom", "pydantic")


class ServingConfig(BaseModel):
    """Everything besides the weights that turns a file into a decision."""

    preprocess: PreprocessConfig
    threshold: float
    threshold_rule: str


class DPAPyfuncModel(PythonModel):
    """Decode → preprocess → score → threshold, with optional heat maps."""

    def load_context(self, context: PythonModelContext) -> None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.dpa: DPA = load_dpa(Path(context.artifacts[WEIGHTS]), map_location="cpu").to(device)
        self.config = ServingConfig.model_validate_json(Path(context.artifacts[SERVING_CONFIG]).read_text())

    @property
    def threshold(self) -> float:
        return self.config.threshold

    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """Every bad row is named in one error (HTTP 400 when served), rather than failing on the first."""
        images, errors = [], []
        for row, (data, path) in enumerate(zip(_column(model_input, IMAGE), _column(model_input, PATH))):
            try:
                images.append(self.prepare([_row_image(data, path)]))
            except (ImageReadError, ValueError) as exc:
                errors.append(f"row {row}: {exc}")
        if errors:
            raise MlflowException("; ".join(errors), error_code=INVALID_PARAMETER_VALUE)
        batch = torch.cat(images) if images else self.prepare([])
        return self.score(batch, heatmap=bool((params or {}).get(HEATMAP, False)))

    def prepare(self, images: list[Image.Image]) -> torch.Tensor:
        """Decoded images → uint8 N×C×S×S model input, by the training transform."""
        return preprocess_images(images, self.config.preprocess)

    def score(self, images: torch.Tensor, heatmap: bool = False) -> pd.DataFrame:
        """Scores (and heat maps) of preprocessed uint8 images, one output row per image."""
        if not heatmap:
            scores = score_images(self.dpa, images).double().numpy()
            return pd.DataFrame({SCORE: scores, IS_ANOMALY: scores > self.threshold})
        scores, maps = scores_and_maps(self.dpa, images)
        scores = scores.double().numpy()
        return pd.DataFrame({
            SCORE: scores, IS_ANOMALY: scores > self.threshold, HEATMAP: [encode_heatmap(m, self.threshold) for m in maps],
        })


def _column(frame: pd.DataFrame, name: str) -> list[Any]:
    return frame[name].tolist() if name in frame.columns else [None] * len(frame)


def _row_image(data: Any, path: Any) -> Image.Image:
    has_data, has_path = isinstance(data, str) and data != "", isinstance(path, str) and path != ""
    if has_data == has_path:
        raise ValueError(f"give exactly one of the columns {IMAGE!r} (base64 file bytes) or {PATH!r} (a file path)")
    return decode_image_bytes(_b64decode(data)) if has_data else read_image(path)


def _b64decode(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as exc:
        raise ValueError(f"column {IMAGE!r} is not valid base64 ({exc}); send base64.b64encode(file_bytes)") from exc


def decode_image_bytes(data: bytes) -> Image.Image:
    """File bytes → image through `read_image` (which takes paths and tells the type from the
    magic bytes when there is no suffix), via a nameless temp file."""
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "upload"
        file.write_bytes(data)
        if not is_image_file(file):
            raise ValueError("the bytes are not a PNG, JPEG, TIFF, DICOM (Part 10) or NPY file")
        try:
            return read_image(file)
        except ImageReadError as exc:  # the temp path means nothing to the sender
            raise ImageReadError(str(exc).replace(str(file), "uploaded file")) from exc


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


def input_example(cfg: PreprocessConfig) -> pd.DataFrame:
    """One mid-grey PNG of the model's input size: a request the server accepts as is."""
    image = Image.new("L", (cfg.size, cfg.size), color=128).convert("L" if cfg.channels == 1 else "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return pd.DataFrame({IMAGE: [base64.b64encode(buffer.getvalue()).decode("ascii")]})


def log_dpa_model(
    dpa: DPA, preprocess_cfg: PreprocessConfig, threshold: float, registered_model_name: str, threshold_rule: str
) -> ModelInfo:
    """Log the DPA as pyfunc `model` in the active run and register it as a new version.

    The project packages travel as `code_paths`, so the model loads with the code it was trained
    with; third-party requirements are pinned to this environment's versions.
    """
    if mlflow.active_run() is None:
        raise RuntimeError("log_dpa_model needs an active MLflow run: call it inside `with mlflow.start_run():`")
    serving = ServingConfig(preprocess=preprocess_cfg, threshold=threshold, threshold_rule=threshold_rule)
    with tempfile.TemporaryDirectory() as tmp:
        weights, config = Path(tmp) / "dpa.pt", Path(tmp) / "serving_config.json"
        save_dpa(dpa, weights)
        config.write_text(serving.model_dump_json(indent=2))
        return mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=DPAPyfuncModel(),
            artifacts={WEIGHTS: str(weights), SERVING_CONFIG: str(config)},
            code_paths=[str(Path(__file__).resolve().parents[1] / package) for package in _PROJECT_PACKAGES],
            pip_requirements=[f"{name}=={version(name)}" for name in _REQUIREMENTS],
            signature=SIGNATURE,
            input_example=input_example(preprocess_cfg),
            registered_model_name=registered_model_name,
            metadata={"threshold": threshold, "threshold_rule": threshold_rule, "vgg_source": dpa.vgg_source},
        )


def champion_uri(model_name: str) -> str:
    return f"models:/{model_name}@{CHAMPION}"


def load_scorer(model_uri: str) -> PyFuncModel:
    """Any logged DPA (`runs:/…`, `models:/name/3`, `models:/name@alias`) as a pyfunc model."""
    return mlflow.pyfunc.load_model(model_uri)


def load_champion(model_name: str) -> PyFuncModel:
    return load_scorer(champion_uri(model_name))


def load_dpa_scorer(model_uri: str) -> DPAPyfuncModel:
    """The loaded `DPAPyfuncModel` behind a pyfunc, for callers that decode and batch files themselves."""
    python_model = load_scorer(model_uri).unwrap_python_model()
    if not isinstance(python_model, DPAPyfuncModel):
        raise TypeError(f"{model_uri} is a {type(python_model).__name__}, not a model logged by log_dpa_model")
    return python_model
