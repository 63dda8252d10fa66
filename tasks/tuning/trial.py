"""One trial: one grid point trained on every fold, scored by the mean cross-validated AUROC.

Each fold trains on the other folds' normals, with validation AUROC every `val_every` iterations
of the last stage and early stopping; the trial's score is the mean of the folds' best validation
AUROCs. Each trial is an MLflow child run of the search's parent run, and `run_trial` is the
Prefect task the flow fans out through its task runner.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from prefect import task
from prefect.cache_policies import NO_CACHE
from sklearn.metrics import roc_auc_score

from model.config import DPAConfig
from model.dpa import DPA
from model.scoring import score_images
from model.trainer import Trainer
from tasks.registry.tracking import configure_tracking
from tasks.runtime.interrupt import checkpoint_on_stop
from tasks.tuning.data import CVPlan, SearchData
from tasks.tuning.space import EarlyStopping


@dataclass(frozen=True)
class FoldOutcome:
    best_auroc: float
    best_iteration: int
    """Iterations into the last stage at the best validation AUROC."""
    curve: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class TrialResult:
    number: int
    fold_aurocs: tuple[float, ...]
    best_iterations: tuple[int, ...]
    started_at: float
    finished_at: float
    mlflow_run_id: str

    @property
    def mean_auroc(self) -> float:
        return float(np.mean(self.fold_aurocs))


def validation_auroc(dpa: DPA, normals: torch.Tensor, anomalies: torch.Tensor, batch_size: int) -> float:
    scores = score_images(dpa, torch.cat([normals, anomalies]), batch_size).numpy()
    if not np.isfinite(scores).all():
        raise FloatingPointError("validation scores are not finite: the model diverged (learning rate too high?)")
    return float(roc_auc_score(np.r_[np.zeros(len(normals)), np.ones(len(anomalies))], scores))


def train_fold(
    cfg: DPAConfig,
    train: torch.Tensor,
    normals: torch.Tensor,
    anomalies: torch.Tensor,
    stopping: EarlyStopping,
    on_eval: Callable[[int, float], None] = lambda iteration, auroc: None,
) -> FoldOutcome:
    """Train on one fold's normals; validate only in the last stage (as the paper does) and stop early."""
    trainer = Trainer(cfg, train, progress=False)  # built under the trainer's own lock: seeded draws stay per trial
    trainer.callbacks.append(checkpoint_on_stop(trainer))  # no checkpoint dir: a stop request just stops it
    last_start = trainer.total_iterations - trainer.stages[-1].iters
    trainer.fit(until=last_start)
    best, best_at, stale, curve = -math.inf, 0, 0, []
    for until in range(last_start + stopping.val_every, trainer.total_iterations + stopping.val_every, stopping.val_every):
        until = min(until, trainer.total_iterations)
        auroc = validation_auroc(trainer.fit(until=until), normals, anomalies, cfg.train.score_batch_size)
        step = until - last_start
        curve.append((step, auroc))
        on_eval(step, auroc)
        if auroc > best + stopping.min_delta:
            best, best_at, stale = auroc, step, 0
        else:
            stale += 1
            if stale >= stopping.patience:
                break
    return FoldOutcome(best, best_at, tuple(curve))


@contextmanager
def child_run(experiment_id: str, parent_run_id: str, name: str, params: dict[str, Any]) -> Iterator[tuple[MlflowClient, str]]:
    """An MLflow run under the search's parent run, addressed by id (trials run in other threads
    or processes than the parent's `mlflow.start_run`); FAILED when the block raises."""
    configure_tracking()
    client = MlflowClient()
    run_id = client.create_run(experiment_id, run_name=name, tags={MLFLOW_PARENT_RUN_ID: parent_run_id}).info.run_id
    for key, value in params.items():
        client.log_param(run_id, key, value)
    try:
        yield client, run_id
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")


@task(name="tuning-trial", cache_policy=NO_CACHE, task_run_name="trial-{number}")
def run_trial(
    number: int,
    point: dict[str, Any],
    cfg: DPAConfig,
    stopping: EarlyStopping,
    data: SearchData,
    plan: CVPlan,
    experiment_id: str,
    parent_run_id: str,
) -> TrialResult:
    """Train `point` on every fold; the trial's score is the mean of the folds' best validation AUROCs.

    No retries: a failed trial is recorded as such in the study and rerun when the search restarts.
    """
    started = time.time()
    view = data.load()
    anomalies = view.images[list(plan.anomaly_rows)]
    outcomes = []
    with child_run(experiment_id, parent_run_id, f"trial-{number:03d}", {**point, "trial": number}) as (client, run_id):
        for k, fold in enumerate(plan.folds):
            def log_eval(iteration: int, auroc: float, k: int = k) -> None:
                client.log_metric(run_id, f"fold{k}_val_auroc", auroc, step=iteration)

            outcome = train_fold(cfg, view.images[list(fold.train_rows)], view.images[list(fold.val_rows)], anomalies, stopping, log_eval)
            client.log_metric(run_id, f"fold{k}_auroc", outcome.best_auroc)
            client.log_metric(run_id, f"fold{k}_best_iteration", outcome.best_iteration)
            outcomes.append(outcome)
        result = TrialResult(
            number, tuple(o.best_auroc for o in outcomes), tuple(o.best_iteration for o in outcomes), started, time.time(), run_id
        )
        client.log_metric(run_id, "mean_cv_auroc", result.mean_auroc)
    return result
