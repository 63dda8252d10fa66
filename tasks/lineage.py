"""Lineage records: which data trained a run, logged as an MLflow dataset input.

The dataset input's digest is the DVC hash of data/ (the run's data version), its source the DVC
remote that holds that version, and its rows the manifest's counts per split and label, so the
MLflow UI shows, for every model, the data it was trained and tested on and where to get them back.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
from dvc.config import Config

from data_layer.manifest import LABEL, SPLIT, read_manifest

DATASET_NAME = "data"
DATASET_CONTEXT = "training"


def manifest_counts(dataset_dir: str | Path) -> pd.DataFrame:
    """One row per (split, label) with its image count, in a stable order."""
    manifest = read_manifest(dataset_dir)
    counts = manifest.groupby([SPLIT, LABEL]).size().rename("images").reset_index()
    return counts.sort_values([SPLIT, LABEL], ignore_index=True)


def dvc_remote_url(project: str | Path) -> str:
    """The URL of the project's default DVC remote (local paths made absolute), or '' when none."""
    dvc_dir = Path(project) / ".dvc"
    if not dvc_dir.is_dir():
        return ""
    config = Config(dvc_dir=str(dvc_dir))
    name = config["core"].get("remote")
    url = config["remote"].get(name, {}).get("url", "") if name else ""
    if url and "://" not in url:
        url = str((dvc_dir / url).resolve())
    return url


def log_dataset_input(dataset_dir: str | Path, data_version: str, project: str | Path) -> mlflow.data.Dataset:
    """`mlflow.log_input` of the run's dataset into the active run; returns what was logged."""
    source = dvc_remote_url(project) or str(Path(dataset_dir).resolve())
    dataset = mlflow.data.from_pandas(manifest_counts(dataset_dir), source=source, name=DATASET_NAME, digest=data_version)
    mlflow.log_input(dataset, context=DATASET_CONTEXT)
    return dataset
