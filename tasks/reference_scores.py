"""The normal-score reference distribution of a model version: the scores its threshold was set on.

Stored in the version's MLflow run as `reference/normal_scores.json` (REFERENCE_ARTIFACT):
`{"source": ..., "threshold_quantile": q, "threshold": t, "scores": [...]}`. Drift monitoring compares
a batch's scores with it; a threshold by specificity is its quantile. `load_reference` takes a
`models:/name/version`, `models:/name@alias` or a run id.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from pydantic import BaseModel

REFERENCE_ARTIFACT = "reference/normal_scores.json"


class ReferenceScores(BaseModel):
    """Scores of normal images (validation, else training normals: `source` says which)."""

    source: str
    threshold_quantile: float
    threshold: float
    scores: list[float]

    def threshold_at(self, specificity: float) -> float:
        """The score that this fraction of the reference normals does not exceed."""
        if not 0 < specificity < 1:
            raise ValueError(f"specificity must be in (0, 1); got {specificity}")
        return float(np.quantile(np.asarray(self.scores), specificity))


def log_reference(client: MlflowClient, run_id: str, reference: ReferenceScores) -> None:
    path = Path(REFERENCE_ARTIFACT)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / path.name).write_text(reference.model_dump_json())
        client.log_artifact(run_id, str(Path(tmp) / path.name), path.parent.as_posix())


def run_of(model: str, client: MlflowClient | None = None) -> str:
    """The run id behind `models:/name/version`, `models:/name@alias`, or a run id itself."""
    client = client or MlflowClient()
    if not model.startswith("models:/"):
        return model
    name, sep, alias = model.removeprefix("models:/").partition("@")
    if sep:
        version = client.get_model_version_by_alias(name, alias)
    else:
        name, _, number = name.rpartition("/")
        version = client.get_model_version(name, number)
    if not version.run_id:
        raise ValueError(f"{model}: the model version has no MLflow run, so no stored reference scores")
    return version.run_id


def load_reference(model: str, client: MlflowClient | None = None) -> ReferenceScores:
    """The reference normal scores stored with a model version (or run); a clear error when absent."""
    client = client or MlflowClient()
    run_id = run_of(model, client)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, REFERENCE_ARTIFACT, tmp)
        except (MlflowException, OSError) as exc:
            raise FileNotFoundError(
                f"{model}: run {run_id} has no {REFERENCE_ARTIFACT} (registered before reference scores were "
                "stored); retrain it, or log one with tasks.reference_scores.log_reference"
            ) from exc
        return ReferenceScores.model_validate_json(Path(local).read_text())
