"""The production profile (docs/deployments.md) with real processes: Prefect server on PostgreSQL, `mlflow
server` on PostgreSQL with artifacts on S3 (moto), the DVC remote on the same S3 endpoint. The
training pipeline runs as `dpa train`; a scorer that knows only the MLflow URL (no S3 credentials)
then pulls `models:/<name>@champion` through the server and scores the dataset."""

from __future__ import annotations

import csv
import json
import math
import os
import uuid
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import psycopg2
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import S3Bucket
from tests.integration.conftest import BIN, POSTGRES, PrefectServer, postgres_database, postgres_url, run_command
from tests.servers import Server, running_server
from tests.tiny import tiny_training

pytestmark = pytest.mark.integration


@pytest.fixture
def mlflow_db() -> Iterator[str]:
    with postgres_database("mlflow") as database:
        yield database


@pytest.fixture
def mlflow_server(mlflow_db: str, s3_bucket: S3Bucket, tmp_path: Path) -> Iterator[Server]:
    """`mlflow server` on PostgreSQL, proxying artifacts to s3://<bucket>/mlflow (clients need no S3 access)."""
    command = [
        str(BIN / "mlflow"), "server", "--host", "{host}", "--port", "{port}", "--workers", "1",
        "--backend-store-uri", postgres_url(mlflow_db, "postgresql+psycopg2"),
        "--artifacts-destination", f"s3://{s3_bucket.name}/mlflow",
    ]
    env = {"MLFLOW_S3_ENDPOINT_URL": s3_bucket.endpoint_url}  # AWS_* test credentials: from s3_bucket
    with running_server(command, "/health", env=env, log_file=tmp_path / "mlflow.log", timeout=120) as server:
        yield server


def dpa_train_args(params: dict) -> list[str]:
    args = ["train", "--preset", params["preset"], "--model-name", params["model_name"]]
    for key, value in params["overrides"].items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    return args


def test_training_on_the_production_profile(
    prefect_server: PrefectServer, mlflow_server: Server, mlflow_db: str, s3_bucket: S3Bucket,
    project: Path, tmp_path: Path,
) -> None:
    model_name = f"dpa-prod-{uuid.uuid4().hex[:8]}"
    params = tiny_training(model_name, **{"registry.auroc_floor": 0.0})  # a few iterations: promote whatever AUROC
    env = {
        **os.environ, **prefect_server.env,
        "MLFLOW_TRACKING_URI": mlflow_server.url,
        "DPA_PROJECT_DIR": str(project),
        "DPA_DVC_KIND": "s3", "DPA_DVC_BUCKET": s3_bucket.name, "DPA_DVC_PREFIX": "dvc",
        "DPA_DVC_ENDPOINT_URL": s3_bucket.endpoint_url,
    }
    run_command([str(BIN / "dpa"), *dpa_train_args(params)], env, timeout=300)

    # MLflow server (PostgreSQL): the run, its data version, the champion alias.
    client = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    champion = client.get_model_version_by_alias(model_name, "champion")
    run = client.get_run(champion.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["data_version"] and "test_auroc" in run.data.metrics
    with closing(psycopg2.connect(dbname=mlflow_db, **POSTGRES)) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT status FROM runs WHERE run_uuid = %s", (run.info.run_id,))
        assert cursor.fetchall() == [("FINISHED",)]

    # S3: MLflow artifacts (the model) under mlflow/, the dataset's DVC objects under dvc/.
    objects = s3_bucket.client().list_objects_v2(Bucket=s3_bucket.name)
    keys = [obj["Key"] for obj in objects.get("Contents", [])]
    assert any(k.startswith("mlflow/") and k.endswith("/MLmodel") for k in keys), keys
    assert any(k.startswith("dvc/") for k in keys), keys

    # Prefect server (PostgreSQL): the flow run is recorded as completed.
    runs = prefect_server.api("POST", "/flow_runs/filter", {"flows": {"name": {"any_": ["dpa-training"]}}})
    ours = [r for r in runs if r["parameters"]["params"]["model_name"] == model_name]
    assert [r["state_type"] for r in ours] == ["COMPLETED"]

    # A scoring host knows only the MLflow URL: the champion comes through the server's artifact proxy.
    scorer_env = {k: v for k, v in env.items() if not k.startswith(("AWS_", "MLFLOW_S3_", "DPA_DVC_"))}
    out = tmp_path / "scores"
    run_command([str(BIN / "dpa"), "score", "--model", f"models:/{model_name}@champion",
                 "--input", str(project / "datasets" / "demo"), "--out", str(out), "--no-heatmaps"], scorer_env, timeout=180)
    rows = read_csv(out / "scores.csv")
    assert len(rows) == len(read_csv(project / "datasets" / "demo" / "manifest.csv"))
    assert all(math.isfinite(float(r["anomaly_score"])) for r in rows)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))
