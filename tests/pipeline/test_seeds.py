"""Seed spread: N seeds train as parallel tasks on one data version; the registered seed is chosen
by a rule that sees validation AUROC, the held-out normal loss or the recent training loss, never a test score."""

from __future__ import annotations

import dataclasses
import threading
import uuid
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from tasks.training.seeds import RULE_HELD_OUT, RULE_LOSS, RULE_VAL, SeedCandidate, recent_train_loss, seed_spread, select_seed
from tests.tiny import tiny_training


def test_the_rule_has_no_test_score_to_read() -> None:
    assert {f.name for f in dataclasses.fields(SeedCandidate)} == {"seed", "val_auroc", "val_normal_loss", "recent_train_loss"}


def test_validation_auroc_decides_when_every_seed_has_one() -> None:
    candidates = [SeedCandidate(0, 0.7, 0.2, 0.1), SeedCandidate(1, 0.9, 0.3, 0.5), SeedCandidate(2, 0.8, 0.1, 0.05)]
    assert select_seed(candidates) == (1, RULE_VAL)


def test_held_out_normal_loss_decides_without_validation_anomalies() -> None:
    candidates = [SeedCandidate(0, None, 0.3, 0.1), SeedCandidate(1, None, 0.2, 0.9), SeedCandidate(2, None, 0.4, 0.2)]
    assert select_seed(candidates) == (1, RULE_HELD_OUT)


def test_recent_training_loss_decides_without_validation_images() -> None:
    candidates = [SeedCandidate(0, None, None, 0.3), SeedCandidate(1, None, None, 0.2), SeedCandidate(2, None, None, 0.4)]
    assert select_seed(candidates) == (1, RULE_LOSS)
    with pytest.raises(ValueError, match="no trained seeds"):
        select_seed([])


def test_the_training_loss_rule_averages_the_last_logged_steps(mlflow_store: str) -> None:
    """The last minibatch alone is noise: one lucky batch must not pick the seed."""
    with mlflow.start_run() as run:
        for step, loss in enumerate([5.0] * 5 + [1.0] * 19 + [0.01]):
            mlflow.log_metric("train_loss", loss, step=step)
    assert recent_train_loss(run.info.run_id) == pytest.approx((9 * 1.0 + 0.01) / 10)


def test_spread_is_mean_and_sample_std() -> None:
    assert seed_spread({0: 0.6, 1: 0.8}) == pytest.approx({"mean": 0.7, "std": 0.1414213562})


def test_seeds_train_in_parallel_and_the_rule_is_recorded(project: Path, prefect_server, monkeypatch) -> None:
    import model.trainer as trainer
    from flows.training import training_pipeline
    from tasks.config import PipelineParams

    both_started = threading.Barrier(2, timeout=120)  # breaks (and the run fails) if the seeds ran one after the other
    fit = trainer.Trainer.fit

    def recording_fit(self, *args, **kwargs):
        both_started.wait()
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(trainer.Trainer, "fit", recording_fit)
    name = f"seeds-{uuid.uuid4().hex[:8]}"
    params = tiny_training(name, **{"registry.auroc_floor": 0.0, "dpa.train.seeds": 2, "dpa.train.stab_iters": 10})
    summary = training_pipeline(PipelineParams.model_validate(params))
    seeds = summary["seeds"]
    assert not both_started.broken
    assert set(seeds["per_seed_auroc"]) == {0, 1} and seeds["rule"] == RULE_VAL  # the demo's val split has anomalies
    client = MlflowClient()
    parent = client.get_run(summary["run_id"])
    assert parent.data.tags["seed_rule"] == RULE_VAL and parent.data.tags["registered_seed"] == str(seeds["registered_seed"])
    assert parent.data.metrics["seed_test_auroc_mean"] == pytest.approx(seeds["mean"])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{summary['run_id']}'")
    assert sorted(c.data.tags["seed"] for c in children) == ["0", "1"]
    val = {int(c.data.tags["seed"]): c.data.metrics["val_auroc"] for c in children}
    assert seeds["registered_seed"] == max(val, key=val.get)
    chosen = next(c for c in children if c.data.tags["seed"] == str(seeds["registered_seed"]))
    assert client.get_model_version(name, summary["version"]).run_id == summary["run_id"]
    assert parent.data.metrics["test_auroc"] == chosen.data.metrics["test_auroc"] == summary["auroc"]
