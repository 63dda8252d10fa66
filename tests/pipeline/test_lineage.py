"""The run's dataset as an MLflow dataset input: digest = data version, source = DVC remote, counts per split and label."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient

from data_layer.manifest import write_manifest
from tasks.registry.lineage import DATASET_CONTEXT, DATASET_NAME, lineage, log_dataset_input, manifest_counts


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


def test_lineage_of_a_model_and_of_a_scores_csv(mlflow_store: str, tmp_path: Path) -> None:
    dataset = small_dataset(tmp_path / "data")
    with mlflow.start_run() as run:
        mlflow.set_tags({"git_commit": "deadbeef", "data_version": "def456.dir"})
        log_dataset_input(dataset, "def456.dir", tmp_path)
    client = MlflowClient()
    name = f"lineage-{run.info.run_id[:8]}"
    client.create_registered_model(name)
    version = client.create_model_version(name, source=tmp_path.as_uri(), run_id=run.info.run_id).version
    client.set_registered_model_alias(name, "champion", version)

    chain = "\n".join(lineage(f"models:/{name}@champion"))
    assert f"model version: {name} v{version}" in chain and f"run: {run.info.run_id}" in chain
    assert "git commit: deadbeef" in chain and "data version: def456.dir" in chain
    assert "manifest counts: test/abnormal=2, test/normal=2, train/normal=3" in chain
    assert f"import source: {dataset.resolve()}" in chain and "MISSING" not in chain

    scores = tmp_path / "scores.csv"
    pd.DataFrame({"path": ["a.png"], "anomaly_score": [0.1], "model_uri": [f"models:/{name}@champion"],
                  "model_version": [str(version)]}).to_csv(scores, index=False)
    (tmp_path / "data" / "manifest.csv").unlink()
    shutil.rmtree(tmp_path / "data")
    chain = lineage(str(scores))
    assert chain[0] == f"scores: {scores} (1 rows)" and chain[1].startswith(f"model version: {name} v{version}")
    assert "MISSING: no longer there" in chain[-1]


def test_lineage_says_plainly_what_is_missing(mlflow_store: str, tmp_path: Path) -> None:
    with mlflow.start_run() as run:
        pass
    chain = "\n".join(lineage(run.info.run_id))
    assert "MISSING: the run has no git_commit tag" in chain and "MISSING: the run logged no dataset input" in chain
    old = tmp_path / "scores.csv"
    pd.DataFrame({"path": ["a.png"], "anomaly_score": [0.1]}).to_csv(old, index=False)
    assert "MISSING: scores.csv has no model_uri column" in lineage(str(old))[-1]
