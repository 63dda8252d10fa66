"""The training flow end to end, in process: temporary Prefect server, SQLite MLflow, a tiny run.

What a user relies on: a run is fully tracked and registered; a bad dataset stops at the gate,
registers nothing and leaves the previous data version in place; a retrain that is not
significantly better keeps the champion, with the paired test in its tags.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from data_layer.validation import DataValidationError
from data_layer.versioning import data_version
from tests.tiny import tiny_training


def run_flow(params: dict):
    from flows.training import training_pipeline
    from tasks.config import PipelineParams

    return training_pipeline(PipelineParams.model_validate(params))


def test_a_run_is_tracked_registered_and_promoted_then_a_second_gets_a_decision(project: Path, prefect_server) -> None:
    name = f"flow-{uuid.uuid4().hex[:8]}"
    first = run_flow(tiny_training(name, **{"registry.auroc_floor": 0.0}))
    assert first["version"] == "1" and first["promoted"]

    client = MlflowClient()
    run = client.get_run(first["run_id"])
    assert run.data.tags["data_version"] == first["data_version"] == data_version(project, "demo")  # the preset's workspace
    assert run.data.tags["dataset"] == "demo"
    assert run.data.tags["vgg_weights"] == "random:seed=0" and run.data.tags["device"] == "cpu"
    assert run.data.tags["feature_stats"] == "train"  # auto with random weights
    assert re.fullmatch(r"r\d\d \d+/\d+(, r\d\d \d+/\d+)*", run.data.tags["dead_channels"])
    assert set(first["baselines"]) == {"pca", "mean_image"}
    for baseline, figures in first["baselines"].items():
        assert run.data.metrics[f"test_baseline_{baseline}_auroc"] == figures["auroc"]
    beaten = first["auroc"] > max(b["auroc"] for b in first["baselines"].values())
    assert (first["baseline_warning"] is None) == beaten
    assert run.info.artifact_uri.startswith((project / "mlartifacts").as_uri())  # the embedded store keeps artifacts in the project
    assert run.data.params["dpa.train.stab_iters"] == "20"
    assert re.fullmatch(r"bootstrap over \d+ patients .*", first["auroc_ci_method"])  # the phantoms name their patients
    for metric in ("test_auroc", "test_auprc", "test_auroc_ci_low", "test_auroc_ci_high", "train_loss"):
        assert metric in run.data.metrics, metric
    assert len(client.get_metric_history(first["run_id"], "train_loss")) >= 1
    logged = {a.path for a in client.list_artifacts(first["run_id"])}
    assert {"config", "validation", "evaluation", "test_scores"} <= logged, logged
    champion = client.get_model_version_by_alias(name, "champion")
    assert str(champion.version) == "1" and champion.run_id == first["run_id"]

    # a retrain with another seed on the same 28 test images: a small difference, not significant
    second = run_flow(tiny_training(name, **{"registry.auroc_floor": 0.0, "dpa.train.seed": 1}))
    assert second["version"] == "2" and second["data_version"] == first["data_version"]
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "2"
    tags = client.get_model_version(name, "2").tags
    assert tags["promotion.decision"] == "kept champion" and not second["promoted"], tags["promotion.summary"]
    assert float(tags["promotion.p_value"]) >= 0.05 and tags["promotion.champion_rescored"] == "false"
    assert float(tags["promotion.champion_auroc"]) == pytest.approx(first["auroc"], abs=1e-6)
    assert float(tags["promotion.auroc_difference"]) == pytest.approx(second["auroc"] - first["auroc"], abs=1e-6)
    assert "one-sided p" in second["decision"] and "CI" in second["decision"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"


def test_a_bad_dataset_stops_at_the_gate_registers_nothing_and_keeps_the_data_version(project: Path, prefect_server) -> None:
    name = f"flow-{uuid.uuid4().hex[:8]}"
    run_flow(tiny_training(name, **{"registry.auroc_floor": 0.0}))
    pointer = (project / "datasets" / "demo.dvc").read_text()
    runs_before = len(mlflow.search_runs(search_all_experiments=True))

    bad = tiny_training(name)
    bad["overrides"]["dataset.n_train_normal"] = 3  # below the gate's minimum of training normals
    with pytest.raises(DataValidationError, match="train"):
        run_flow(bad)

    assert (project / "datasets" / "demo.dvc").read_text() == pointer
    assert len(mlflow.search_runs(search_all_experiments=True)) == runs_before
    assert [str(v.version) for v in MlflowClient().search_model_versions(f"name='{name}'")] == ["1"]


def test_an_import_never_changes_the_production_dataset_unless_the_run_promotes_it(project: Path, prefect_server) -> None:
    """What scheduled retraining reads (production, data/) moves only by an explicit promotion."""
    name = f"flow-{uuid.uuid4().hex[:8]}"
    promoted = run_flow(tiny_training(name, **{"registry.auroc_floor": 0.0, "dataset.promote": True}))
    production = data_version(project)
    assert promoted["data_version"] == production == data_version(project, "demo")
    pointer = (project / "data.dvc").read_bytes()

    experiment = run_flow(tiny_training(name, **{"registry.auroc_floor": 0.0, "dataset.seed": 7}))  # another draw
    assert experiment["data_version"] == data_version(project, "demo") != production
    assert (project / "data.dvc").read_bytes() == pointer  # the experiment went to its workspace only

    retraining = run_flow({**tiny_training(name, **{"registry.auroc_floor": 0.0}), "dataset": {"importer": "dvc", "workspace": "production"}})
    assert retraining["data_version"] == production
