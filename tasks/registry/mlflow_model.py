"""Logging and loading the DPA pyfunc model: what `mlflow models serve` and batch scoring load.

No Prefect here. The model is logged from code (`tasks/registry/dpa_model_code.py`, MLflow's models from
code): a version holds that file, the project packages (`code/`), the weights as a state_dict
(read back with `weights_only=True`), the serving config and the reference normal scores
(`reference_scores.json`). Loading it unpickles nothing. What the model accepts and returns is
described in `tasks.registry.pyfunc_model`; what a served request may contain in `tasks.serving.request`.

Versions logged before models from code hold a pickled `python_model.pkl`. `load_scorer` refuses
them with a message to retrain; `load_dpa_scorer` (batch scoring, re-scoring a champion) reads
their weights and config with the current code, without unpickling, and warns.
"""

from __future__ import annotations

import base64
import io
import logging
import tempfile
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.models import Model, ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.pyfunc import PyFuncModel
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema
from PIL import Image

from data_layer.expectations import ValidationRules
from data_layer.preprocessing import PreprocessConfig
from model.dpa import DPA, save_dpa
from tasks.registry.model_code import check_model_code, sys_path_kept
from tasks.registry.pyfunc_model import (
    HEATMAP,
    HEATMAP_SATURATION,
    IS_ANOMALY,
    REFERENCE_SCORES,
    REFERENCE_SCORES_FILE,
    SCORE,
    SERVING_CONFIG,
    SPECIFICITY,
    THRESHOLD,
    WEIGHTS,
    DPAPyfuncModel,
    ReferenceScores,
    ServingConfig,
    decode_heatmap,
    reference_scores,
)
from tasks.serving.request import IMAGE, PATH

__all__ = [
    "CHAMPION", "HEATMAP", "HEATMAP_SATURATION", "IS_ANOMALY", "SCORE", "THRESHOLD", "DPAPyfuncModel",
    "LegacyModelError", "ReferenceScores", "decode_heatmap", "log_dpa_model", "load_scorer", "load_champion",
    "load_dpa_scorer", "load_reference_scores", "champion_uri",
]

MODEL_ARTIFACT = "model"
CHAMPION = "champion"
MODEL_CODE = Path(__file__).with_name("dpa_model_code.py")
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", IMAGE, required=False), ColSpec("string", PATH, required=False)]),
    outputs=Schema([
        ColSpec("double", SCORE), ColSpec("boolean", IS_ANOMALY), ColSpec("double", THRESHOLD),
        ColSpec("string", HEATMAP, required=False),
    ]),
    params=ParamSchema([
        ParamSpec(HEATMAP, "boolean", False), ParamSpec(THRESHOLD, "double", None), ParamSpec(SPECIFICITY, "double", None),
    ]),
)
_PROJECT_PACKAGES = ("model", "data_layer", "tasks")
_REQUIREMENTS = ("mlflow", "torch", "numpy", "pandas", "pillow", "pydicom", "pydantic")
_PYFUNC = "python_function"

log = logging.getLogger(__name__)


class LegacyModelError(RuntimeError):
    """A version logged as a pickled Python object, which this code does not unpickle."""


def input_example(cfg: PreprocessConfig) -> pd.DataFrame:
    """One grey-ramp PNG of the model's input size: a request the server accepts as is (a blank
    image would be refused by the input checks)."""
    ramp = Image.linear_gradient("L").resize((cfg.size, cfg.size))
    image = ramp.convert("L" if cfg.channels == 1 else "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return pd.DataFrame({IMAGE: [base64.b64encode(buffer.getvalue()).decode("ascii")]})


def log_dpa_model(
    dpa: DPA,
    preprocess_cfg: PreprocessConfig,
    threshold: float,
    registered_model_name: str,
    threshold_rule: str,
    *,
    normal_scores: Sequence[float],
    normal_source: str,
    quantile: float,
    input_rules: ValidationRules,
) -> ModelInfo:
    """Log the DPA as pyfunc `model` (from code) in the active run and register it as a new version.

    `normal_scores` are the normal-image scores the threshold was set on (`normal_source` says
    which images; `threshold` is their `quantile`): stored as `reference_scores.json` for
    thresholds by specificity at inference and for drift checks. `input_rules` (the training gate's)
    are checked on every image scoring and serving receive. The project packages travel as
    `code_paths`, so the model loads with the code it was trained with; third-party requirements are
    pinned to this environment's versions.
    """
    if mlflow.active_run() is None:
        raise RuntimeError("log_dpa_model needs an active MLflow run: call it inside `with mlflow.start_run():`")
    serving = ServingConfig(preprocess=preprocess_cfg, threshold=threshold, threshold_rule=threshold_rule, input_rules=input_rules)
    reference = reference_scores(normal_scores, normal_source, quantile, threshold_rule)
    with tempfile.TemporaryDirectory() as tmp:
        weights, config, ref = Path(tmp) / "dpa.pt", Path(tmp) / "serving_config.json", Path(tmp) / REFERENCE_SCORES_FILE
        save_dpa(dpa, weights)
        config.write_text(serving.model_dump_json(indent=2))
        ref.write_text(reference.model_dump_json())
        return mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=str(MODEL_CODE),
            artifacts={WEIGHTS: str(weights), SERVING_CONFIG: str(config), REFERENCE_SCORES: str(ref)},
            code_paths=[str(Path(__file__).resolve().parents[2] / package) for package in _PROJECT_PACKAGES],
            pip_requirements=[f"{name}=={version(name)}" for name in _REQUIREMENTS],
            signature=SIGNATURE,
            input_example=input_example(preprocess_cfg),
            registered_model_name=registered_model_name,
            metadata={
                "threshold": threshold, "threshold_rule": threshold_rule, "vgg_source": dpa.vgg_source,
                "reference_scores": f"artifacts/{REFERENCE_SCORES_FILE}",
            },
        )


def champion_uri(model_name: str) -> str:
    return f"models:/{model_name}@{CHAMPION}"


def _download(model_uri: str) -> tuple[Path, dict]:
    """The model's local directory and its pyfunc flavor configuration."""
    local = Path(mlflow.artifacts.download_artifacts(model_uri))
    flavor = Model.load(local).flavors.get(_PYFUNC)
    if flavor is None:
        raise TypeError(f"{model_uri} is not a pyfunc model: log it with tasks.registry.mlflow_model.log_dpa_model")
    return local, flavor


def _is_legacy(flavor: dict) -> bool:
    return "model_code_path" not in flavor


def _legacy_message(model_uri: str) -> str:
    return (
        f"{model_uri} was logged before models from code: it stores the model as a pickled Python object, "
        "which this project does not unpickle (loading it could run arbitrary code). Retrain it "
        "(`dpa train`) to register a version logged from code."
    )


def load_scorer(model_uri: str) -> PyFuncModel:
    """Any DPA logged from code (`runs:/…`, `models:/name/3`, `models:/name@alias`) as a pyfunc model,
    in this process: with this checkout's code, checked against the version's (`tasks.registry.model_code`)."""
    local, flavor = _download(model_uri)
    if _is_legacy(flavor):
        raise LegacyModelError(_legacy_message(model_uri))
    return _load_pyfunc(model_uri, local, flavor)


def _load_pyfunc(model_uri: str, local: Path, flavor: dict) -> PyFuncModel:
    with sys_path_kept():
        model = mlflow.pyfunc.load_model(str(local))
    check_model_code(model_uri, local / flavor["code"] if flavor.get("code") else None)
    return model


def load_champion(model_name: str) -> PyFuncModel:
    return load_scorer(champion_uri(model_name))


def load_dpa_scorer(model_uri: str, threshold: float | None = None, specificity: float | None = None) -> DPAPyfuncModel:
    """The `DPAPyfuncModel` behind a logged DPA, for callers that decode and batch files themselves,
    with its operating threshold set (`threshold`, `specificity` or the registered one, as the
    serving params). Versions logged before models from code are read from their artifacts."""
    local, flavor = _download(model_uri)
    if not _is_legacy(flavor):
        scorer = _load_pyfunc(model_uri, local, flavor).unwrap_python_model()
        if not isinstance(scorer, DPAPyfuncModel):
            raise TypeError(f"{model_uri} is a {type(scorer).__name__}, not a model logged by log_dpa_model")
    else:
        scorer = _load_legacy(model_uri, local, flavor)
    scorer.threshold = scorer.operating_threshold(threshold, specificity)
    return scorer


def _load_legacy(model_uri: str, local: Path, flavor: dict) -> DPAPyfuncModel:
    artifacts = {name: str(local / info["path"]) for name, info in flavor.get("artifacts", {}).items()}
    scorer = DPAPyfuncModel()
    try:
        scorer.load_artifacts(artifacts)
    except (KeyError, OSError, ValueError, RuntimeError) as exc:
        raise LegacyModelError(f"{_legacy_message(model_uri)} Its artifacts did not load either: {exc}") from exc
    log.warning("%s Loaded its weights and config without unpickling, for batch scoring only.", _legacy_message(model_uri))
    return scorer


def load_reference_scores(model_uri: str) -> ReferenceScores:
    """The normal-score reference distribution stored with a version (`reference_scores.json`)."""
    local, flavor = _download(model_uri)
    info = flavor.get("artifacts", {}).get(REFERENCE_SCORES)
    if info is None:
        raise LegacyModelError(f"{model_uri} has no {REFERENCE_SCORES_FILE} (logged before thresholds at inference): retrain it")
    return ReferenceScores.model_validate_json((local / info["path"]).read_text())
