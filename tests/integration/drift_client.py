"""The scoring side of the drift → retraining test, run as its own process like a nightly scoring
job: `python -m tests.integration.drift_client <dir>` with PREFECT_API_URL and MLFLOW_TRACKING_URI set.

It registers a tiny `dpa-phantoms` champion whose reference normals are its scores on 64 normal
phantoms, then runs the batch-scoring flow on three batches of 80 other normal phantoms (about 44
patients: drift is tested on one image per patient, and needs 30): one as the
default generator makes them, two from a shifted acquisition (lower contrast, as another scanner
would give). Writes {batch name: scores.csv} to `<dir>/batches.json`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from data_layer.images import read_image
from data_layer.manifest import PATH, read_manifest
from data_layer.phantoms import PhantomSpec, generate_phantoms
from data_layer.preprocessing import preprocess_images
from flows.scoring import batch_scoring
from model.scoring import score_images
from model.trainer import train_dpa
from tasks.registry.mlflow_model import CHAMPION
from tasks.registry.tracking import configure_tracking, ensure_experiment
from tasks.training.metrics import operating_threshold
from tests.model_core.conftest import blob_images, tiny_config
from tests.pipeline.conftest import PREPROCESS, RES, register

MODEL_NAME = "dpa-phantoms"
"""The model prefect.yaml's retraining trigger watches."""
SHIFT = {"contrast_scale": 0.6}
BATCHES = {"in-distribution": {"seed": 1}, "shifted-a": {"seed": 1, **SHIFT}, "shifted-b": {"seed": 2, **SHIFT}}


def phantoms(root: Path, n: int, **spec: float) -> Path:
    """`n` normal phantoms at the model's resolution (a batch to score, no labels needed)."""
    counts = {"n_train_normal": 0, "n_val_normal": 0, "n_test_normal": n, "n_val_abnormal": 0, "n_test_abnormal": 0}
    return generate_phantoms(root, PhantomSpec(size=RES, **counts, **spec))


def main(root: Path) -> dict[str, str]:
    configure_tracking()
    mlflow.set_experiment(experiment_id=ensure_experiment("drift-loop-test"))
    dpa = train_dpa(tiny_config(res=RES), blob_images(64, RES, seed=0), progress=False)
    reference = phantoms(root / "reference", 64, seed=0)
    images = [read_image(reference / p) for p in read_manifest(reference)[PATH]]
    normals = score_images(dpa, preprocess_images(images, PREPROCESS)).numpy()
    version = register(dpa, MODEL_NAME, operating_threshold(normals, 0.95), normals.tolist())
    MlflowClient().set_registered_model_alias(MODEL_NAME, CHAMPION, version)
    return {
        name: batch_scoring(input=str(phantoms(root / name, 80, **spec)), out=str(root / f"{name}-scores"),
                            model_uri=f"models:/{MODEL_NAME}@{CHAMPION}", heatmaps=False)
        for name, spec in BATCHES.items()
    }


if __name__ == "__main__":
    root = Path(sys.argv[1])
    (root / "batches.json").write_text(json.dumps(main(root)))
