"""One benchmark cell: a preset trained with one seed and evaluated on its test split, as a Prefect
task that runs wherever the task runner puts it (a thread here, a Dask worker elsewhere).

The cell loads its data from the preprocessing cache itself (a reference travels, not tensors),
trains and evaluates through the training flow's own tasks into an MLflow child run of the
benchmark's parent run, and returns a `CellRecord`. The flow writes that record to disk once the
cell is done: a rerun with the same out dir finds it and skips the cell.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import Metric, RunTag
from mlflow.utils.time import get_current_time_millis
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from model.progressive import stage_schedule
from tasks.config import RunConfig
from tasks.registry.tracking import log_config_params
from tasks.training.evaluation import evaluate
from tasks.training.train import train
from tasks.tuning.data import SearchData
from tasks.tuning.trial import child_run

CELL_TAG = "dpa.benchmark.cell"


@dataclass(frozen=True)
class BenchmarkCell:
    """A preset with one training seed; `digest` covers its data source, preprocessing and method."""

    cfg: RunConfig
    digest: str

    @property
    def preset(self) -> str:
        return self.cfg.preset

    @property
    def seed(self) -> int:
        return self.cfg.dpa.train.seed

    @property
    def name(self) -> str:
        return f"{self.preset}-seed{self.seed}"

    def record_path(self, out_dir: Path) -> Path:
        return out_dir / "cells" / self.preset / f"seed{self.seed}-{self.digest}.json"

    def checkpoint_dir(self, out_dir: Path) -> Path:
        return out_dir / "checkpoints" / self.preset / f"seed{self.seed}-{self.digest}"


class CellRecord(BaseModel):
    """A finished cell's figures: what the table is built from."""

    preset: str
    seed: int
    digest: str
    data_version: str
    run_id: str
    test_auroc: float
    test_auroc_ci_low: float
    test_auroc_ci_high: float
    val_auroc: float | None
    baselines: dict[str, float]
    """Each pixel-space baseline's test AUROC (same training normals, same test split)."""
    train_images_per_s: float
    """Training images (iterations × batch size) per second of the training task, setup included."""
    train_seconds: float
    wall_seconds: float
    """The whole cell: loading the cached data, training, evaluating."""
    vgg_weights: str
    feature_stats: str
    device: str


def load_record(path: Path) -> CellRecord | None:
    return CellRecord.model_validate_json(path.read_text()) if path.is_file() else None


def save_record(record: CellRecord, path: Path) -> None:
    """Written whole or not at all: a crash mid-write must not leave a record that skips the cell."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(record.model_dump_json(indent=2))
    os.replace(partial, path)


@task(name="benchmark-cell", cache_policy=NO_CACHE, task_run_name="{cell.preset}-seed{cell.cfg.dpa.train.seed}")
def run_cell(cell: BenchmarkCell, data: SearchData, checkpoint_dir: Path, experiment_id: str, parent_run_id: str) -> CellRecord:
    """Train and evaluate one cell in its own child run (FAILED if it raises); no retries: a rerun
    of the benchmark retries it, resuming from its checkpoint when one was written."""
    started = time.perf_counter()
    with child_run(experiment_id, parent_run_id, cell.name, {}) as (client, run_id):
        log_config_params(cell.cfg.model_dump(mode="json"), run_id=run_id)
        client.log_batch(run_id, tags=[RunTag(CELL_TAG, cell.digest), RunTag("data_version", data.data_version)])
        dataset = data.load()
        train_started = time.perf_counter()
        dpa = train(cell.cfg.dpa, dataset.subset(split="train", label="normal").images, checkpoint_dir, run_id)
        train_seconds = time.perf_counter() - train_started
        evaluation = evaluate(dpa, dataset, cell.cfg, data.data_version, run_id)
        images = sum(stage.iters for stage in stage_schedule(cell.cfg.dpa)) * cell.cfg.dpa.train.batch_size
        record = CellRecord(
            preset=cell.preset, seed=cell.seed, digest=cell.digest, data_version=data.data_version, run_id=run_id,
            test_auroc=evaluation.metrics.auroc, test_auroc_ci_low=evaluation.metrics.auroc_ci_low,
            test_auroc_ci_high=evaluation.metrics.auroc_ci_high, val_auroc=evaluation.val_auroc,
            baselines={name: e.auroc for name, e in evaluation.baselines.items()},
            train_images_per_s=images / train_seconds, train_seconds=train_seconds,
            wall_seconds=time.perf_counter() - started, vgg_weights=dpa.vgg_source, feature_stats=dpa.feature_stats,
            device=str(next(dpa.parameters()).device),
        )
        now = get_current_time_millis()
        client.log_batch(
            run_id, tags=[RunTag("vgg_weights", record.vgg_weights), RunTag("feature_stats", record.feature_stats)],
            metrics=[Metric("cell_train_images_per_s", record.train_images_per_s, now, 0),
                     Metric("cell_wall_seconds", record.wall_seconds, now, 0)],
        )
    return record
