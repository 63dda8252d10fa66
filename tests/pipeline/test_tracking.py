"""Where a new experiment keeps its artifacts: beside a SQLite store's database (for the embedded
store, in the project), never in the working directory of the process that happened to create it
(MLflow's default, which scattered them over workers' and test runners' checkouts)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import mlflow
import pytest
from mlflow import MlflowClient

from tasks.registry.tracking import ensure_experiment, sqlite_database


def test_a_sqlite_store_outside_the_project_keeps_artifacts_beside_its_database(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "shared store" / "mlflow.db"  # a space: the URI quotes it
    store.parent.mkdir()
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    mlflow.set_tracking_uri(f"sqlite:///{quote(str(store))}")
    try:
        experiment = MlflowClient().get_experiment(ensure_experiment("elsewhere"))
        with mlflow.start_run(experiment_id=experiment.experiment_id):
            mlflow.log_text("logged", "note.txt")
    finally:
        mlflow.set_tracking_uri(None)  # back to MLFLOW_TRACKING_URI, as the other tests expect
    artifacts = store.parent / "mlartifacts" / "elsewhere"
    assert experiment.artifact_location == artifacts.as_uri()
    assert [p.read_text() for p in artifacts.rglob("note.txt")] == ["logged"]
    assert list(workdir.iterdir()) == [] and not (project / "mlartifacts").exists()


def test_the_embedded_store_keeps_artifacts_in_the_project(project: Path) -> None:
    experiment = MlflowClient().get_experiment(ensure_experiment("embedded"))  # the project fixture's store
    assert experiment.artifact_location == (project / "mlartifacts" / "embedded").as_uri()


def test_only_a_sqlite_uri_names_a_database() -> None:
    assert sqlite_database("sqlite:////data/mlflow%20store/mlflow.db") == Path("/data/mlflow store/mlflow.db")
    assert sqlite_database("sqlite:///relative.db") == Path.cwd() / "relative.db"
    for uri in ("http://127.0.0.1:5000", "postgresql://postgres@127.0.0.1/mlflow", "databricks"):
        assert sqlite_database(uri) is None
