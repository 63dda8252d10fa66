"""The training pipeline (docs/architecture.md), read top to bottom as the process it runs:

resolve data → validate (GX) → preprocess → train → evaluate → register → promote.

A failed gate raises before an MLflow run exists, so a bad dataset registers nothing.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict
from pathlib import Path

import mlflow
from prefect import flow

from tasks.config import PipelineParams, RunConfig, resolve_run_config
from tasks.paths import project_dir
from tasks.registry.lineage import log_dataset_input
from tasks.registry.promotion import GateRule, promote_model
from tasks.registry.registration import register_model
from tasks.registry.tracking import configure_tracking, ensure_experiment, git_commit, log_config_params, tracking_ui_url
from tasks.registry.version_scores import ScoredSet, scorer_on_test_split
from tasks.training.data import DatasetRef, commit_dataset, promote_dataset, pull_dataset, stage_dataset
from tasks.training.preprocessing import PreprocessedDataset, preprocess
from tasks.training.runs import train_one, train_seeds
from tasks.training.summary import TrainingSummary, baseline_line, publish
from tasks.training.validation import validate


def resolve_data(cfg: RunConfig, project: Path, report_dir: Path) -> DatasetRef:
    """Imported data pass the gate in staging before they become a version of their workspace; the
    production dataset changes only when the run asks for it (`dataset.promote`)."""
    workspace = cfg.dataset.workspace_for(cfg.preset)
    if cfg.dataset.importer == "dvc":
        dataset = pull_dataset(project, workspace)
        validate(dataset.path, cfg.validation, report_dir)
        return dataset
    staged = stage_dataset(cfg.dataset, project / ".dpa" / "staging")
    validate(staged, cfg.validation, report_dir)
    dataset = commit_dataset(project, staged, workspace)
    if cfg.dataset.promote:
        promote_dataset(project, workspace)
    return dataset


def start_run(cfg: RunConfig, dataset: DatasetRef, report_dir: Path) -> mlflow.ActiveRun:
    configure_tracking()
    experiment_id = ensure_experiment(cfg.experiment or cfg.preset)
    run = mlflow.start_run(experiment_id=experiment_id, run_name=f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    resolved = cfg.model_dump(mode="json")
    log_config_params(resolved)
    mlflow.set_tags({"data_version": dataset.version, "dataset": dataset.name, "git_commit": git_commit(), "preset": cfg.preset})
    mlflow.log_dict(resolved, "config/resolved_config.json")
    log_dataset_input(dataset.path, dataset.version, project_dir())
    mlflow.log_artifacts(str(report_dir), "validation")
    return run


@flow(name="dpa-training", log_prints=True)
def training_pipeline(params: PipelineParams = PipelineParams()) -> dict:
    """Train, evaluate, register and (if better) promote a DPA from a preset plus overrides."""
    cfg = resolve_run_config(params)
    project = project_dir()
    report_dir = project / ".dpa" / "reports" / time.strftime("%Y%m%d-%H%M%S")
    dataset = resolve_data(cfg, project, report_dir)
    data: PreprocessedDataset = preprocess(dataset.path, cfg.preprocess, project / ".dpa" / "cache", dataset.version)
    with start_run(cfg, dataset, report_dir) as run:
        run_id = run.info.run_id
        if cfg.dpa.train.seeds > 1:
            trained = train_seeds(cfg, data, dataset.version, project, run)
        else:
            trained = train_one(cfg, data, dataset.version, project, run_id)
        dpa, evaluation = trained.dpa, trained.evaluation
        mlflow.set_tags({"vgg_weights": dpa.vgg_source, "feature_stats": dpa.feature_stats,
                         "dead_channels": dpa.perceptual.dead_channel_summary(), "device": str(next(dpa.parameters()).device)})
        version = register_model(dpa, evaluation, cfg, trained.run_id)
        decision = promote_model(
            cfg.registry.model_name, version, ScoredSet.of(evaluation), dataset.version,
            GateRule.of(cfg.registry), scorer_on_test_split(dataset.path),
            baselines=evaluation.baseline_scores, vgg_weights=dpa.vgg_source,
        )
    for checkpoints in trained.checkpoints:
        shutil.rmtree(checkpoints, ignore_errors=True)  # registered: nothing left to resume
    summary = TrainingSummary.of(run.info, cfg, dataset.version, trained, decision)
    publish(summary, f"{tracking_ui_url()}/#/experiments/{run.info.experiment_id}/runs/{run_id}")
    result = asdict(summary)
    print(f"test AUROC {summary.auroc:.4f} (95% CI {summary.auroc_ci[0]:.4f}–{summary.auroc_ci[1]:.4f}, "
          f"{summary.auroc_ci_method}); {decision.summary}")
    print(baseline_line(result))
    return result
