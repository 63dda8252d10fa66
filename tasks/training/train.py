"""Train the DPA on the normal training images, logging the curve to MLflow."""

from __future__ import annotations

from pathlib import Path

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from model.config import DPAConfig
from model.dpa import DPA
from model.trainer import Trainer
from tasks.registry.tracking import MetricsLogger
from tasks.runtime.interrupt import checkpoint_on_stop, stop_on_signal
from tasks.training.distributed_training import train_distributed


@task(name="train-dpa", cache_policy=NO_CACHE)
def train(cfg: DPAConfig, images: torch.Tensor, checkpoint_dir: Path, run_id: str) -> DPA:
    """No retries here: a crash resumes from the checkpoint when the same run is started again.

    SIGTERM/SIGINT stop training after the current step with a checkpoint written, so the rerun resumes there.
    With `train.nproc_per_node` > 1 the step runs on that many processes (DDP through torchrun).
    """
    with stop_on_signal():
        if cfg.train.nproc_per_node > 1:
            return train_distributed(cfg, images, checkpoint_dir, callbacks=[MetricsLogger(run_id)])
        trainer = Trainer(cfg, images, checkpoint_dir, callbacks=[MetricsLogger(run_id)])
        if trainer.iteration:
            print(f"resuming from {trainer.checkpoint_path} at iteration {trainer.iteration}/{trainer.total_iterations}")
        trainer.callbacks.append(checkpoint_on_stop(trainer))
        return trainer.fit()
