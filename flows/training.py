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
from typing import TYPE_CHECKING

import mlflow
from mlflow import MlflowClient
from prefect import flow
from prefect.artifacts import create_link_artifact, create_table_artifact

from tasks.config import PipelineParams, RunConfig, resolve_run_config
from tasks.data import DatasetRef, commit_dataset, pull_dataset, stage_dataset
from tasks.baseline_evaluation import baseline_metrics
from tasks.evaluation import ModelEvaluation, evaluate
from tasks.lineage import log_dataset_input
from tasks.paths import project_dir
from tasks.preprocessing import PreprocessedDataset, preprocess
from tasks.registry import GateRule, promote_model, register_model
from tasks.seeds import SeedCandidate, final_train_loss, seed_config, seed_list, seed_spread, select_seed
from tasks.tracking import configure_tracking, ensure_experiment, git_commit, log_config_params, tracking_ui_url
from tasks.training import train
from tasks.validation import validate
from tasks.version_scores import ScoredSet, scorer_on_test_split

if TYPE_CHECKING:
    from model.dpa import DPA


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
    baselines: dict[str, dict[str, float]]
    baseline_warning: str | None
    seeds: dict[str, object] | None = None


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
         *baseline_rows(summary),
         *seed_rows(summary.seeds),
         {"metric": "data version", "value": summary.data_version},
         {"metric": "model version", "value": f"{summary.model_name} v{summary.version}"}],
        key="dpa-metrics", description="Test metrics of this training run",
    )
    create_link_artifact(tracking_url, link_text="MLflow run", key="dpa-mlflow-run")


def baseline_summary(evaluation: ModelEvaluation) -> dict[str, dict[str, float]]:
    """Each baseline's test AUROC and CI, for the summary the CLI prints."""
    return {name: {"auroc": e.auroc, "ci_low": e.auroc_ci_low, "ci_high": e.auroc_ci_high}
            for name, e in evaluation.baselines.items()}


def baseline_rows(summary: TrainingSummary) -> list[dict[str, str]]:
    """Metrics-table rows: each baseline beside the DPA, and the warning when the DPA loses."""
    rows = [{"metric": f"baseline {name} test AUROC",
             "value": f"{b['auroc']:.4f} [{b['ci_low']:.4f}, {b['ci_high']:.4f}]"} for name, b in summary.baselines.items()]
    return rows + ([{"metric": "warning", "value": summary.baseline_warning}] if summary.baseline_warning else [])


def baseline_line(summary: dict) -> str:
    """One line for the console: the DPA beside the baselines, and the warning when it loses."""
    figures = ", ".join(f"{name} {b['auroc']:.3f}" for name, b in summary["baselines"].items())
    line = f"test AUROC: DPA {summary['auroc']:.3f}; baselines {figures}"
    return line + (f"\n{summary['baseline_warning']}" if summary["baseline_warning"] else "")


@dataclass(frozen=True)
class Trained:
    """One trained and evaluated model, and the MLflow run that holds it."""

    dpa: DPA
    evaluation: ModelEvaluation
    run_id: str
    checkpoints: tuple[Path, ...]
    seeds: dict[str, object] | None = None


def train_one(cfg: RunConfig, data: PreprocessedDataset, data_version: str, project: Path, run_id: str) -> Trained:
    checkpoints = project / ".dpa" / "checkpoints" / data_version / config_digest(cfg)
    dpa = train(cfg.dpa, data.subset(split="train", label="normal").images, checkpoints, run_id)
    return Trained(dpa, evaluate(dpa, data, cfg, data_version, run_id), run_id, (checkpoints,))


def train_seeds(cfg: RunConfig, data: PreprocessedDataset, data_version: str, project: Path, parent: mlflow.ActiveRun) -> Trained:
    """`train.seeds` seeds as parallel tasks on the same data, one child run each; the seed to
    register is chosen by `select_seed` (never the test split); the spread, the chosen seed's
    figures and its model go on the parent run."""
    client, images = MlflowClient(), data.subset(split="train", label="normal").images
    futures = {}
    for seed in seed_list(cfg):
        seed_cfg = seed_config(cfg, seed)
        child = client.create_run(
            parent.info.experiment_id, run_name=f"{parent.info.run_name}-seed{seed}",
            tags={"mlflow.parentRunId": parent.info.run_id, "seed": str(seed), "data_version": data_version},
        ).info.run_id
        checkpoints = project / ".dpa" / "checkpoints" / data_version / config_digest(seed_cfg)
        dpa = train.submit(seed_cfg.dpa, images, checkpoints, child)
        futures[seed] = (dpa, evaluate.submit(dpa, data, seed_cfg, data_version, child), child, checkpoints)
    done = {seed: Trained(d.result(), e.result(), child, (ckpt,)) for seed, (d, e, child, ckpt) in futures.items()}
    for trained in done.values():
        client.set_terminated(trained.run_id)
    chosen, rule = select_seed([
        SeedCandidate(seed, t.evaluation.val_auroc, final_train_loss(t.run_id)) for seed, t in done.items()
    ])
    aurocs = {seed: t.evaluation.metrics.auroc for seed, t in done.items()}
    spread = seed_spread(aurocs)
    mlflow.log_metrics({"seed_test_auroc_mean": spread["mean"], "seed_test_auroc_std": spread["std"]}
                       | {f"seed_{seed}_test_auroc": auroc for seed, auroc in aurocs.items()})
    best = done[chosen].evaluation  # the registered model's figures, on the run it is registered in
    mlflow.log_metrics(best.metrics.as_mlflow_metrics() | baseline_metrics(best.baselines))
    mlflow.set_tags({"registered_seed": str(chosen), "seed_rule": rule})
    report = {"per_seed_auroc": aurocs, **spread, "registered_seed": chosen, "rule": rule}
    checkpoints = tuple(c for t in done.values() for c in t.checkpoints)
    return Trained(done[chosen].dpa, best, parent.info.run_id, checkpoints, report)


def seed_rows(seeds: dict[str, object] | None) -> list[dict[str, str]]:
    if not seeds:
        return []
    per_seed = ", ".join(f"{seed}: {auroc:.4f}" for seed, auroc in seeds["per_seed_auroc"].items())
    return [{"metric": f"test AUROC over {len(seeds['per_seed_auroc'])} seeds", "value": f"{seeds['mean']:.4f} ± {seeds['std']:.4f} ({per_seed})"},
            {"metric": "registered seed", "value": f"{seeds['registered_seed']} by {seeds['rule']}"}]


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
        )
    for checkpoints in trained.checkpoints:
        shutil.rmtree(checkpoints, ignore_errors=True)  # registered: nothing left to resume
    summary = TrainingSummary(
        run_id=run_id, experiment_id=run.info.experiment_id, model_name=cfg.registry.model_name,
        version=decision.version, data_version=dataset.version, auroc=evaluation.metrics.auroc,
        auroc_ci=(evaluation.metrics.auroc_ci_low, evaluation.metrics.auroc_ci_high), promoted=decision.promoted,
        decision=decision.summary, baselines=baseline_summary(evaluation),
        baseline_warning=evaluation.baseline_warning, seeds=trained.seeds,
    )
    publish(summary, f"{tracking_ui_url()}/#/experiments/{run.info.experiment_id}/runs/{run_id}")
    print(f"test AUROC {summary.auroc:.4f} (95% CI {summary.auroc_ci[0]:.4f}–{summary.auroc_ci[1]:.4f}); {decision.summary}")
    result = asdict(summary)
    print(baseline_line(result))
    return result
