"""MLflow tracking conventions (README "Tracking, registry and promotion"): where runs go, what every run is tagged with."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from urllib.parse import unquote

import mlflow
from mlflow.tracking import MlflowClient

from model.trainer import StepInfo
from tasks.config import flatten
from tasks.paths import PROJECT_ROOT, project_dir


def embedded_tracking_uri() -> str:
    return f"sqlite:///{project_dir() / 'mlflow.db'}"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the embedded SQLite store in the project directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or embedded_tracking_uri()


def tracking_ui_url() -> str:
    """The MLflow UI that shows these runs: the tracking server, or `mlflow ui`'s default address."""
    uri = tracking_uri()
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else os.environ.get("MLFLOW_UI_URL", "http://127.0.0.1:5000")


def configure_tracking() -> str:
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(os.environ.get("MLFLOW_REGISTRY_URI") or uri)
    return uri


def ensure_experiment(name: str) -> str:
    """The experiment's id. A new experiment in a SQLite store keeps its artifacts beside the database
    (`mlartifacts/<name>`; for the embedded store, in the project): MLflow's default, `./mlruns` of
    whatever directory the process runs in, would scatter them over workers' working directories."""
    client = MlflowClient()
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    database = sqlite_database(mlflow.get_tracking_uri())  # (not MLFLOW_TRACKING_URI: set_tracking_uri exports it)
    location = (database.parent / "mlartifacts" / name).as_uri() if database else None
    return client.create_experiment(name, artifact_location=location)


def sqlite_database(uri: str) -> Path | None:
    """The database file of a `sqlite:///<path>` tracking URI; None for a server or any other store."""
    return Path(unquote(uri.removeprefix("sqlite:///"))).resolve() if uri.startswith("sqlite:///") else None


def log_config_params(config: dict, run_id: str | None = None) -> None:
    """Log a nested config as flat MLflow params (`dpa.train.lr`) to the active run or `run_id`;
    lists and empty dicts as JSON."""
    mlflow.log_params({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in flatten(config).items()}, run_id=run_id)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class MetricsLogger:
    """A `model.trainer` callback that logs the training curve to one MLflow run (explicit run id:
    Prefect may run a task in another thread than the one that started the run)."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.client = MlflowClient()

    def __call__(self, info: StepInfo) -> None:
        metrics = {"train_loss": info.loss, "train_images_per_s": info.images_per_sec, "pg_stage": info.stage_index}
        if info.alpha is not None:
            metrics["pg_alpha"] = info.alpha
        self.client.log_batch(
            self.run_id,
            metrics=[mlflow.entities.Metric(k, float(v), int(mlflow.utils.time.get_current_time_millis()), info.iteration)
                     for k, v in metrics.items()],
        )
