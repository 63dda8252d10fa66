"""The training pipeline (DESIGN.md §4), read top to bottom as the process it runs:

resolve data → validate (GX) → preprocess → train → evaluate → register → promote.

A failed gate raises before an MLflow run exists, so a bad dataset registers nothing.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
from prefect import flow
from prefect.artifacts import create_link_artifact, create_table_artifact

from tasks.config import PipelineParams, RunConfig, project_dir, resolve_run_config
from tasks.data import DatasetRef, commit_dataset, pull_dataset, stage_dataset
from tasks.evaluation import evaluate
from tasks.lineage import log_dataset_input
from tasks.preprocessing import PreprocessedDataset, preprocess
from tasks.registry import GateRule, promote_model, register_model
from tasks.tracking import configure_tracking, ensure_experiment, git_commit, log_config_params, tracking_ui_url
from tasks.training import train
from tasks.validation import validate
from tasks.version_scores import ScoredSet, scorer_on_test_split


@dataclass(frozen=True)
class TrainingSummary:
    """What the flow returns and the CLI prints."""

    run_id: str
    experiment_id: str
    model_name: str
    version: str
    data_version: str
    auroc: float
    auroc_ci: tuple[float, float]
    promoted: bool
    decision: str


def resolve_data(cfg: RunConfig, project: Path, report_dir: Path) -> DatasetRef:
    """Imported data pass the gate in staging before they become the versioned data/."""
    if cfg.dataset.importer == "dvc":
        dataset = pull_dataset(project)
        validate(dataset.path, cfg.validation, report_dir)
        return dataset
    staged = stage_dataset(cfg.dataset, project / ".dpa" / "staging")
    validate(staged, cfg.validation, report_dir)
    return commit_dataset(project, staged)


def config_digest(cfg: RunConfig) -> str:
    """Checkpoints are keyed by data version, preprocessing and method: only a rerun of the same
    crashed run resumes from them."""
    key = {"preprocess": cfg.preprocess.model_dump(mode="json"), "dpa": cfg.dpa.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def start_run(cfg: RunConfig, dataset: DatasetRef, report_dir: Path) -> mlflow.ActiveRun:
    configure_tracking()
    experiment_id = ensure_experiment(cfg.experiment or cfg.preset)
    run = mlflow.start_run(experiment_id=experiment_id, run_name=f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    resolved = cfg.model_dump(mode="json")
    log_config_params(resolved)
    mlflow.set_tags({"data_version": dataset.version, "git_commit": git_commit(), "preset": cfg.preset})
    mlflow.log_dict(resolved, "config/resolved_config.json")
    log_dataset_input(dataset.path, dataset.version, project_dir())
    mlflow.log_artifacts(str(report_dir), "validation")
    return run


def publish(summary: TrainingSummary, tracking_url: str) -> None:
    """Results a person reads in the Prefect UI (the gate and the promotion task publish their own)."""
    create_table_artifact(
        [{"metric": "test AUROC", "value": f"{summary.auroc:.4f}"},
         {"metric": "AUROC 95% CI", "value": f"[{summary.auroc_ci[0]:.4f}, {summary.auroc_ci[1]:.4f}]"},
         {"metric": "data version", "value": summary.data_version},
         {"metric": "model version", "value": f"{summary.model_name} v{summary.version}"}],
        key="dpa-metrics", description="Test metrics of this training run",
    )
    create_link_artifact(tracking_url, link_text="MLflow run", key="dpa-mlflow-run")


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
        checkpoints = project / ".dpa" / "checkpoints" / dataset.version / config_digest(cfg)
        dpa = train(cfg.dpa, data.subset(split="train", label="normal").images, checkpoints, run_id)
        mlflow.set_tags({"vgg_weights": dpa.vgg_source, "device": str(next(dpa.parameters()).device)})
        evaluation = evaluate(dpa, data, cfg, dataset.version, run_id)
        version = register_model(dpa, evaluation, cfg, run_id)
        decision = promote_model(
            cfg.registry.model_name, version, ScoredSet.of(evaluation), dataset.version,
            GateRule.of(cfg.registry), scorer_on_test_split(dataset.path),
        )
    shutil.rmtree(checkpoints, ignore_errors=True)  # registered: nothing left to resume
    summary = TrainingSummary(
        run_id=run_id, experiment_id=run.info.experiment_id, model_name=cfg.registry.model_name,
        version=decision.version, data_version=dataset.version, auroc=evaluation.metrics.auroc,
        auroc_ci=(evaluation.metrics.auroc_ci_low, evaluation.metrics.auroc_ci_high), promoted=decision.promoted,
        decision=decision.summary,
    )
    publish(summary, f"{tracking_ui_url()}/#/experiments/{run.info.experiment_id}/runs/{run_id}")
    print(f"test AUROC {summary.auroc:.4f} (95% CI {summary.auroc_ci[0]:.4f}–{summary.auroc_ci[1]:.4f}); {decision.summary}")
    return asdict(summary)
