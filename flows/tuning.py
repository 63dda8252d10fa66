"""The few-anomaly hyperparameter search (docs/method.md §6), read top to bottom:

resolve data → train/val view → preprocess (no test image is ever decoded) → folds + validation
anomalies → study (resumed when it exists) → trials fanned out through a task runner →
leaderboard, plot and best config on the parent MLflow run → optionally the training flow on the
best config (all normal training data, test evaluation, registration, promotion gate).

Trials are asked from the study here, in the flow's thread, and only then submitted: two workers
can never draw the same grid point. One search runs a given study at a time (the `tune`
deployment's concurrency limit); a restart fails the trials a dead run left RUNNING and reruns them.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any, Literal

import optuna
from prefect import flow
from prefect.futures import PrefectFuture
from pydantic import Field

from flows.training import resolve_data, training_pipeline
from tasks.config import DataSource, PipelineParams, RunConfig, resolve_run_config
from tasks.paths import project_dir
from tasks.registry.tracking import configure_tracking, ensure_experiment
from tasks.runtime.task_runners import make_task_runner
from tasks.training.data import DatasetRef
from tasks.training.preprocessing import preprocess
from tasks.tuning.data import CVPlan, SearchData, build_trainval_view, plan_cross_validation
from tasks.tuning.plan import plan_search
from tasks.tuning.results import best_config, leaderboard, publish_search, search_run
from tasks.tuning.runner import run_trials
from tasks.tuning.space import SearchSpace, load_search_space, point_key, trial_configs
from tasks.tuning.study import open_study, requeue_unfinished, study_storage_url
from tasks.tuning.trial import run_trial

TPE_DEFAULT_TRIALS = 20


class TuningParams(PipelineParams):
    """What a person chooses when starting a search: the base preset (+ overrides, data source),
    the search space, the validation protocol, the study and where trials run."""

    search_space: str = Field("ladder", description="a file in configs/search_spaces/ (by name) or a path to a .yaml file")
    search_overrides: dict[str, Any] = Field(
        default_factory=dict, description="dotted keys into the search space, e.g. {'max_iters': 5000, 'progressive': [false]}"
    )
    folds: int = Field(3, ge=2, description="cross-validation folds over the normal training images (grouped by patient)")
    val_anomaly_type: str = Field(description="anomaly_type of the validation anomalies (train/val abnormal images only)")
    n_anomalies: int = Field(50, ge=1, description="at most this many validation anomalies")
    sampler: Literal["grid", "tpe"] = Field("grid", description="grid search (the paper's practice) or Optuna's TPE")
    n_trials: int | None = Field(
        None, ge=1, description=f"complete trials wanted in the study; default: every grid point (grid), {TPE_DEFAULT_TRIALS} (tpe)"
    )
    study_name: str | None = Field(None, description="rerun with the same name to resume; default: <preset>-<val_anomaly_type>")
    study_storage: str | None = Field(None, description="study database URL; default: $DPA_STUDY_STORAGE or optuna.db beside mlflow.db")
    task_runner: Literal["threads", "processes", "dask", "ray"] | None = Field(
        None, description="where trials run; default: dask when a cluster address is given (or $DPA_DASK_ADDRESS is set), else threads"
    )
    max_workers: int = Field(2, ge=1, description="trials running at the same time")
    cluster_address: str | None = Field(
        None, description="Dask scheduler (tcp://host:8786; default $DPA_DASK_ADDRESS) or Ray address; dask without one: a local cluster"
    )
    seed: int = Field(0, description="folds, the anomaly sample and the sampler")
    train_best: bool = Field(False, description="then train, evaluate, register and gate the best configuration")


def protocol(params: TuningParams, space: SearchSpace, data_version: str) -> dict[str, Any]:
    """What makes two trials' AUROCs comparable; a study only resumes under the same protocol."""
    return {
        "preset": params.preset, "overrides": params.overrides, "data_version": data_version,
        "search_space": space.model_dump(mode="json"), "folds": params.folds, "sampler": params.sampler,
        "val_anomaly_type": params.val_anomaly_type, "n_anomalies": params.n_anomalies, "seed": params.seed,
    }


def search_data(cfg: RunConfig, params: TuningParams) -> tuple[DatasetRef, SearchData, CVPlan]:
    """The dataset (validated, versioned), its train/val view decoded into the cache the trials
    load, and the folds and validation anomalies drawn from that view."""
    project = project_dir()
    dataset = resolve_data(cfg, project, project / ".dpa" / "reports" / time.strftime("%Y%m%d-%H%M%S"))
    view = build_trainval_view(dataset.path, project / ".dpa" / "tuning" / dataset.version)
    data = SearchData(view, cfg.preprocess, project / ".dpa" / "cache", dataset.version)
    manifest = preprocess(view, cfg.preprocess, data.cache_dir, dataset.version).manifest
    return dataset, data, plan_cross_validation(manifest, params.folds, params.val_anomaly_type, params.n_anomalies, params.seed)


def trials_wanted(params: TuningParams, n_points: int) -> int:
    if params.sampler == "grid":
        return min(params.n_trials or n_points, n_points)
    return params.n_trials or TPE_DEFAULT_TRIALS


@flow(name="dpa-tuning", log_prints=True)
def tuning_pipeline(params: TuningParams) -> dict:
    """Cross-validated few-anomaly search; with `train_best`, the winner goes through the training flow."""
    cfg = resolve_run_config(params)
    space = load_search_space(params.search_space, params.search_overrides)
    configs = trial_configs(params, space, cfg)
    dataset, data, plan = search_data(cfg, params)
    study_name = params.study_name or f"{cfg.preset}-{params.val_anomaly_type}"
    study = open_study(study_name, study_storage_url(params.study_storage), space, params.sampler,
                       protocol(params, space, dataset.version), params.seed)
    requeued = requeue_unfinished(study)
    if requeued:
        print(f"study {study_name!r}: rerunning the unfinished trials {requeued}")
    configure_tracking()
    experiment_id = ensure_experiment(f"{cfg.experiment or cfg.preset}-tuning")
    with search_run(experiment_id, study_name, study.user_attrs["protocol"]) as parent_run_id:
        shared = {"stopping": space.stopping, "data": data, "plan": plan, "experiment_id": experiment_id, "parent_run_id": parent_run_id}
        with make_task_runner(params.task_runner, params.max_workers, params.cluster_address) as runner:
            def launch(trial: optuna.Trial) -> PrefectFuture:
                point = trial.params
                return runner.submit(run_trial, {"number": trial.number, "point": point, "cfg": configs[point_key(point)], **shared})

            target = trials_wanted(params, len(configs))
            warmup_images = data.load().images[list(plan.folds[0].train_rows)]
            print(plan_search(space, configs, target, len(plan.folds), params.max_workers, warmup_images).describe())
            run_trials(study, space.distributions(), launch, params.max_workers, target)
        board = leaderboard(study)
        if board.empty:
            raise RuntimeError(f"no trial of study {study_name!r} completed; each failed trial's error is in its user attrs")
        best = best_config(study, space, cfg, params.overrides)
        publish_search(board, best, space, len(plan.anomaly_rows))
    print(f"best: trial {best.trial} {best.point}, mean CV AUROC {best.mean_cv_auroc:.4f} over {len(plan.folds)} folds")
    summary = {"study": study_name, "data_version": dataset.version, "parent_run_id": parent_run_id, "n_complete": len(board),
               "best": asdict(best)}
    if params.train_best:  # on the versioned data/ the folds came from, not a fresh import that could differ
        summary["training"] = training_pipeline(
            PipelineParams(preset=best.preset, overrides=best.overrides, dataset=DataSource(importer="dvc", workspace=dataset.name),
                           model_name=params.model_name)
        )
    return summary
