"""The benchmark flow for paper tables (`dpa benchmark`), read top to bottom:

presets (names, globs, YAML files) × seeds → cells, each keyed by preset, seed and a digest of its
data source, preprocessing and method → the cells already recorded in the out dir are skipped →
the remaining presets' data imported once, validated and cached → cells fanned out through a task
runner (threads here; a Dask cluster with a cluster address) → each finished cell's record written
at once → one table: CSV + Markdown in the out dir, the parent MLflow run (one child run per cell),
a Prefect artifact.

A rerun with the same out dir resumes: finished cells are not run again, a cell that failed or was
killed runs again (from its checkpoint when one was written), and the parent run is the same one.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.futures import as_completed
from pydantic import BaseModel, Field

from tasks.benchmark.cells import BenchmarkCell, load_record, run_cell, save_record
from tasks.benchmark.data import load_config, prepare_dataset, preset_files, source_digest
from tasks.benchmark.parent import parent_run
from tasks.benchmark.table import benchmark_table, log_table, markdown, write_table
from tasks.config import RunConfig
from tasks.paths import project_dir
from tasks.runtime.task_runners import make_task_runner
from tasks.training.preprocessing import preprocess
from tasks.training.runs import config_digest
from tasks.training.seeds import seed_config, seed_list
from tasks.tuning.data import SearchData


class BenchmarkParams(BaseModel):
    """What a person chooses when starting a benchmark."""

    presets: list[str] = Field(
        min_length=1, description="preset names or globs over configs/ (e.g. 'cifar10_class*'), or paths/globs of preset .yaml files"
    )
    seeds: int = Field(3, ge=1, description="training seeds per preset: train.seed, train.seed + 1, …")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted keys applied to every preset, e.g. {'dpa.train.device': 'cuda'}")
    dataset_root: str | None = Field(None, description="dataset.root of the presets whose importer reads a local download")
    out_dir: str | None = Field(None, description="cell records and the table; rerun with the same to resume; default: outputs/benchmark")
    cluster_address: str | None = Field(None, description="Dask scheduler, e.g. tcp://host:8786 (default: $DPA_DASK_ADDRESS); none: threads here")
    max_workers: int = Field(2, ge=1, description="cells at once on this machine (several small ones may share a GPU)")
    experiment: str = Field("dpa-benchmark", description="MLflow experiment of the parent run")


def plan_cells(params: BenchmarkParams) -> tuple[list[RunConfig], list[BenchmarkCell]]:
    """Every preset resolved with the overrides, and its cells, one per seed."""
    overrides = {**params.overrides, "dpa.train.seeds": params.seeds}
    configs = [load_config(file, overrides, params.dataset_root) for file in preset_files(params.presets)]
    cells = []
    for cfg in configs:
        for seed in seed_list(cfg):
            seeded = seed_config(cfg, seed)
            digest = hashlib.sha256(f"{source_digest(seeded)}:{config_digest(seeded)}".encode()).hexdigest()[:16]
            cells.append(BenchmarkCell(seeded, digest))
    return configs, cells


def cell_data(cfg: RunConfig, project: Path) -> SearchData:
    """The preset's data validated and decoded into the preprocessing cache; cells get the reference
    and load the cache themselves (a shared file system on a cluster)."""
    dataset = prepare_dataset(cfg, project)
    cache_dir = project / ".dpa" / "cache"
    preprocess(dataset.path, cfg.preprocess, cache_dir, dataset.version)
    return SearchData(dataset.path, cfg.preprocess, cache_dir, dataset.version)


def run_cells(todo: list[BenchmarkCell], params: BenchmarkParams, out_dir: Path, experiment_id: str, parent_run_id: str) -> dict[str, str]:
    """Every preset's data first (a data problem stops the benchmark before any training), then the
    cells fanned out; each record is written as its cell finishes. Returns the failed cells' errors."""
    project, futures, failures = project_dir(), {}, {}
    data = {preset: cell_data(cfg, project) for preset, cfg in {cell.preset: cell.cfg for cell in todo}.items()}
    with make_task_runner(None, params.max_workers, params.cluster_address) as runner:
        for cell in todo:
            parameters = {"cell": cell, "data": data[cell.preset], "checkpoint_dir": cell.checkpoint_dir(out_dir),
                          "experiment_id": experiment_id, "parent_run_id": parent_run_id}
            futures[runner.submit(run_cell, parameters)] = cell
        for future in as_completed(list(futures)):
            cell = futures[future]
            try:
                record = future.result()
            except Exception as error:  # one failed cell must not lose the others; the rerun retries it
                failures[cell.name] = f"{type(error).__name__}: {error}"
                print(f"cell {cell.name} failed: {failures[cell.name]}")
                continue
            save_record(record, cell.record_path(out_dir))
            shutil.rmtree(cell.checkpoint_dir(out_dir), ignore_errors=True)
            print(f"cell {cell.name}: test AUROC {record.test_auroc:.4f} in {record.wall_seconds:.0f} s")
    return failures


@flow(name="dpa-benchmark", log_prints=True)
def benchmark_pipeline(params: BenchmarkParams) -> dict:
    """Presets × seeds, trained and evaluated as parallel cells, summarised in one table."""
    started = time.perf_counter()
    out_dir = Path(params.out_dir or project_dir() / "outputs" / "benchmark").resolve()
    configs, cells = plan_cells(params)
    todo = [cell for cell in cells if not cell.record_path(out_dir).is_file()]
    print(f"{len(cells)} cells ({len(configs)} presets × {params.seeds} seeds): {len(cells) - len(todo)} already finished in {out_dir}")
    with parent_run(out_dir, params.experiment, params.presets, params.seeds) as (experiment_id, parent_run_id):
        failures = run_cells(todo, params, out_dir, experiment_id, parent_run_id) if todo else {}
        records: dict[str, list] = {cfg.preset: [] for cfg in configs}
        for cell in cells:
            if (record := load_record(cell.record_path(out_dir))) is not None:
                records[cell.preset].append(record)
        table = benchmark_table(configs, records, params.seeds)
        title = f"DPA benchmark: {len(configs)} presets × {params.seeds} seeds"
        csv_path, md_path = write_table(table, out_dir, title)
        log_table(table, (csv_path, md_path), parent_run_id)
    print(markdown(table, title))
    summary = {"out_dir": str(out_dir), "csv": str(csv_path), "markdown": str(md_path), "parent_run_id": parent_run_id,
               "experiment_id": experiment_id, "cells": len(cells), "ran": len(todo) - len(failures), "skipped": len(cells) - len(todo),
               "failed": failures, "seconds": time.perf_counter() - started, "table": table.to_dict(orient="records")}
    if failures:
        raise RuntimeError(f"{len(failures)} benchmark cell(s) failed: {failures}; the table in {out_dir} has the others; "
                           "rerun the same command to retry them")
    return summary
