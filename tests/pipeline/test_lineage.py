"""The run's dataset as an MLflow dataset input: digest = data version, source = DVC remote, counts per split and label."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient

from data_layer.manifest import write_manifest
from tasks.lineage import DATASET_CONTEXT, DATASET_NAME, log_dataset_input, manifest_counts


def small_dataset(root: Path) -> Path:
    rows = [{"path": f"{i}.png", "label": label, "split": split, "group": str(i)}
            for i, (split, label) in enumerate([("train", "normal")] * 3 + [("test", "normal"), ("test", "abnormal")] * 2)]
    write_manifest(pd.DataFrame(rows), root)
    return root


def test_dataset_input_records_version_source_and_counts(mlflow_store: str, tmp_path: Path) -> None:
    dataset = small_dataset(tmp_path / "data")
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text("[core]\n    remote = local\n['remote \"local\"']\n    url = ../remote\n")
    with mlflow.start_run() as run:
        log_dataset_input(dataset, "abc123.dir", tmp_path)
    inputs = MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs
    assert len(inputs) == 1
    logged = inputs[0].dataset
    assert (logged.name, logged.digest) == (DATASET_NAME, "abc123.dir")
    assert json.loads(logged.source)["uri"] == str((tmp_path / "remote").resolve())
    assert inputs[0].tags[0].value == DATASET_CONTEXT
    counts = manifest_counts(dataset)
    assert counts.to_dict("records") == [
        {"split": "test", "label": "abnormal", "images": 2}, {"split": "test", "label": "normal", "images": 2},
        {"split": "train", "label": "normal", "images": 3},
    ]


def test_without_a_dvc_remote_the_source_is_the_dataset_directory(mlflow_store: str, tmp_path: Path) -> None:
    dataset = small_dataset(tmp_path / "data")
    with mlflow.start_run() as run:
        log_dataset_input(dataset, "v1", tmp_path)
    logged = MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs[0].dataset
    assert json.loads(logged.source)["uri"] == str(dataset.resolve())
