"""The training task on 2 processes through torchrun (CPU, gloo): it returns the model of a
1-process run, rank 0 logs the same curve to MLflow and checkpoints, and a rank that fails fails
the task with that rank's error and traceback; `dpa train --nproc-per-node` sets the processes."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from typer.testing import CliRunner

from flows.cli import app
from model.trainer import CHECKPOINT_NAME, StepInfo, Trainer
from tasks.training.distributed_training import RankFailed
from tasks.training.train import train
from tests.model_core.conftest import blob_images, tiny_config


def _config(nproc: int, **train):
    """Every VGG channel kept (loss.min_channel_std 0): with two channels of these blobs masked as
    dead, some weights get gradients near zero, where Adam's first normalised steps turn the float
    rounding of 2 × B/2 against 1 × B (and of 1 against 2 threads) into ±lr; the weights then differ
    by ~1e-3 after 20 steps, in either process count alone too. Kept, the dead channels' large terms
    keep every gradient far from zero and the comparison at 1e-5 meaningful."""
    cfg = tiny_config(res=16, stab_iters=20, batch_size=8, log_every=5, nproc_per_node=nproc, **train)
    return cfg.model_copy(update={"loss": cfg.loss.model_copy(update={"min_channel_std": 0.0})})


def _images() -> torch.Tensor:
    return blob_images(24, 16, seed=2)


def test_two_processes_train_the_model_of_one_and_rank_0_logs_and_checkpoints(mlflow_store: str, tmp_path: Path) -> None:
    with mlflow.start_run() as run:
        dpa = train.fn(_config(2), _images(), tmp_path, run.info.run_id)
    curve: list[StepInfo] = []
    one = Trainer(_config(1), _images(), callbacks=[curve.append], progress=False).fit()
    assert (dpa.vgg_source, dpa.feature_stats, dpa.training) == (one.vgg_source, one.feature_stats, False)
    expected = one.state_dict()
    for key, value in dpa.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-5, msg=key)
    logged = MlflowClient().get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in logged] == [s.iteration for s in curve] == [5, 10, 15, 20]
    assert [m.value for m in logged] == pytest.approx([s.loss for s in curve], abs=1e-5)  # the global batch's loss
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["position"][2] == 20


def test_a_failing_rank_fails_the_task_with_its_error(mlflow_store: str, tmp_path: Path) -> None:
    with mlflow.start_run() as run, pytest.raises(RankFailed) as failed:
        train.fn(_config(2, lr=1e6), _images(), tmp_path, run.info.run_id)
    report = str(failed.value)
    assert report.startswith("rank ") and " failed: TrainingDiverged: training diverged: loss=" in report
    assert "train.lr=1000000.0" in report
    assert "Traceback (most recent call last)" in report and "_check_loss" in report  # the rank's own traceback


def test_the_cli_flag_sets_the_processes_and_a_batch_they_cannot_share_is_refused() -> None:
    result = CliRunner().invoke(app, ["train", "--nproc-per-node", "3"])  # the demo's batch is 32
    assert result.exit_code != 0
    assert "train.batch_size=32 must be divisible by train.nproc_per_node=3" in str(result.exception)
