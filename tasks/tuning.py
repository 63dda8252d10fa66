"""The paper's few-anomaly hyperparameter search (dpa_method.md §6) as plain functions and Prefect tasks.

The search only ever sees a *train/val view* of the dataset: a dataset directory whose manifest
lacks the test rows and whose test files are not linked, built before anything is decoded. On it:

- folds: K group-disjoint folds of the normal `train` images (no patient in two folds); a fold
  trains on the other folds' normals and validates on its own;
- validation anomalies: at most `n` abnormal train/val images of one chosen type. Every fold
  validates against all of them: anomalies never enter training, so sharing them leaks nothing,
  and with a few dozen anomalies a per-fold share would make each fold's AUROC mostly noise;
- trials: one grid point (ladder rung × VGG layers × progressive growing) trained on every fold,
  with validation AUROC every `val_every` iterations of the last stage and early stopping; its
  score is the mean CV AUROC. Each trial is an MLflow child run of the search's parent run;
- the study: Optuna on a database (never in memory), so a restarted search skips finished trials
  and reruns the ones a dead run left unfinished.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on workers and CI

import matplotlib.pyplot as plt
import mlflow
import numpy as np
import optuna
import pandas as pd
import torch
import yaml
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold

from data_layer.manifest import (
    ABNORMAL,
    ANOMALY_TYPE,
    GROUP,
    LABEL,
    MANIFEST_NAME,
    NORMAL,
    PATH,
    SPLIT,
    read_manifest,
    resolve_path,
    staged_dataset,
    write_manifest,
)
from data_layer.preprocessing import PreprocessConfig, PreprocessedDataset, preprocess_dataset
from model.config import DPAConfig, canonical_layer, resolution_levels
from model.dpa import DPA
from model.scoring import score_images
from model.trainer import Trainer
from tasks.config import CONFIG_DIR, PipelineParams, RunConfig, apply_overrides, flatten, resolve_run_config
from tasks.tracking import configure_tracking, tracking_uri

SEARCH_SPACE_DIR = CONFIG_DIR / "search_spaces"
STUDY_STORAGE_ENV = "DPA_STUDY_STORAGE"
STUDY_TAG = "dpa.study"
TUNING_SPLITS = ("train", "val")
"""The only splits the search may touch; the test split is for the final model alone."""


# --- search space -------------------------------------------------------------------------------


class Rung(BaseModel):
    """One step of the capacity/lr ladder: bottleneck d, width at every resolution, Adam lr."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    latent_dim: int = Field(ge=1)
    width: int = Field(ge=1)
    lr: float = Field(gt=0)

    @property
    def label(self) -> str:
        """The rung as one categorical value (grid values must be str/int/float/bool/None)."""
        return f"d{self.latent_dim}-w{self.width}-lr{self.lr:g}"


class ProgressiveSchedule(BaseModel):
    """Stages below max_res when progressive growing is on; they are not searched."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    initial_res: int = 8
    stab_iters: int = Field(ge=1)
    trns_iters: int = Field(ge=1)
    layers: dict[int, dict[str, float]] = Field(description="loss layers per resolution below max_res")


class EarlyStopping(BaseModel):
    """Validation AUROC every `val_every` iterations of the last stage; stop after `patience`
    evaluations without an improvement above `min_delta` (smaller gains neither reset the
    patience nor move the best point)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    val_every: int = Field(ge=1)
    patience: int = Field(ge=1)
    min_delta: float = Field(ge=0)


class SearchSpace(BaseModel):
    """What the search varies (see configs/search_spaces/ladder.yaml for the meaning of each key)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ladder: list[Rung] = Field(min_length=1)
    vgg_layers: list[list[str]] = Field(min_length=1)
    progressive: list[bool] = Field([False], min_length=1)
    pg: ProgressiveSchedule
    max_iters: int = Field(ge=1)
    val_every: int = Field(ge=1)
    patience: int = Field(ge=1)
    min_delta: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> SearchSpace:
        labels = [rung.label for rung in self.ladder]
        if len(set(labels)) != len(labels):
            raise ValueError(f"ladder rungs must differ: {labels}")
        for layers in self.vgg_layers:
            if not layers:
                raise ValueError("an entry of vgg_layers is empty")
            for layer in layers:
                canonical_layer(layer)
        return self

    @property
    def stopping(self) -> EarlyStopping:
        return EarlyStopping(val_every=self.val_every, patience=self.patience, min_delta=self.min_delta)

    def choices(self) -> dict[str, list[Any]]:
        """Optuna parameter name → categorical values; their product is the grid."""
        return {
            "capacity": [rung.label for rung in self.ladder],
            "vgg_layers": ["+".join(canonical_layer(layer) for layer in layers) for layers in self.vgg_layers],
            "progressive": list(self.progressive),
        }

    def distributions(self) -> dict[str, CategoricalDistribution]:
        return {name: CategoricalDistribution(values) for name, values in self.choices().items()}

    def grid(self) -> list[dict[str, Any]]:
        """Every point of the search space, in a fixed order."""
        names, values = zip(*self.choices().items())
        return [dict(zip(names, combo)) for combo in itertools.product(*values)]

    def overrides(self, point: dict[str, Any], cfg: RunConfig, last_stage_iters: int | None = None) -> dict[str, Any]:
        """Dotted overrides (tasks.config.apply_overrides) that turn the base config into `point`'s.

        `last_stage_iters` replaces the budget: the tuned config trains that many iterations at max_res.
        """
        rung = {r.label: r for r in self.ladder}[point["capacity"]]
        network = cfg.dpa.network
        widths = {res: rung.width for res in resolution_levels(network.first_res, network.max_res)}
        top = {canonical_layer(layer): 1.0 for layer in point["vgg_layers"].split("+")}
        iters = last_stage_iters or self.max_iters
        out: dict[str, Any] = {
            "dpa.network.latent_dim": rung.latent_dim,
            "dpa.network.enc_channels": widths,
            "dpa.network.dec_channels": widths,
            "dpa.train.lr": rung.lr,
        }
        if not point["progressive"]:
            return out | {
                "dpa.train.initial_res": None,
                "dpa.train.stab_iters": iters,
                "dpa.train.iters_per_res": {},
                "dpa.loss.layers": {network.max_res: top},
            }
        lower = resolution_levels(self.pg.initial_res, network.max_res)[:-1]
        missing = [res for res in lower if res not in self.pg.layers]
        if missing:
            raise ValueError(f"pg.layers lacks resolutions {missing} (progressive growing from {self.pg.initial_res})")
        return out | {
            "dpa.train.initial_res": self.pg.initial_res,
            "dpa.train.stab_iters": self.pg.stab_iters,
            "dpa.train.trns_iters": self.pg.trns_iters,
            "dpa.train.iters_per_res": {network.max_res: {"stab": iters}},
            "dpa.loss.layers": {**{res: self.pg.layers[res] for res in lower}, network.max_res: top},
        }


def load_search_space(name: str = "ladder", overrides: dict[str, Any] | None = None) -> SearchSpace:
    """A file in configs/search_spaces/ (by stem) or a path, plus dotted overrides."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else SEARCH_SPACE_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SEARCH_SPACE_DIR.glob("*.yaml")))
        raise ValueError(f"unknown search space {name!r}; known: {known}, or a path to a .yaml file")
    return SearchSpace.model_validate(apply_overrides(yaml.safe_load(path.read_text()), overrides or {}))


def point_key(point: dict[str, Any]) -> str:
    """A point as a stable string: two trials with the same key trained the same configuration."""
    return json.dumps(point, sort_keys=True)


def trial_configs(params: PipelineParams, space: SearchSpace, cfg: RunConfig) -> dict[str, DPAConfig]:
    """Every grid point's method config, resolved exactly as the training flow would, before any
    data work: a point the model rejects fails the search now, not hours in."""
    configs = {}
    for point in space.grid():
        overrides = {**params.overrides, **space.overrides(point, cfg)}
        try:
            configs[point_key(point)] = resolve_run_config(params.model_copy(update={"overrides": overrides})).dpa
        except ValueError as exc:
            raise ValueError(f"search point {point} gives an invalid config: {exc}") from exc
    return configs


# --- the data the search may see ----------------------------------------------------------------


def trainval_view(dataset_dir: Path, out_dir: Path) -> Path:
    """A dataset directory with only the train/val rows, its files linked to the originals.

    Everything the search decodes comes from here, so no step of it can read a test image: the
    test rows are not in the manifest and the test files are not in the directory. The view of a
    data version never changes, so an existing one is reused.
    """
    if (out_dir / MANIFEST_NAME).is_file():
        return out_dir
    manifest = read_manifest(dataset_dir)
    keep = manifest[manifest[SPLIT].isin(TUNING_SPLITS)]
    with staged_dataset(out_dir, overwrite=True) as stage:
        for rel in keep[PATH]:
            link = resolve_path(stage, rel)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(resolve_path(dataset_dir, rel).resolve())
        write_manifest(keep, stage)
    return out_dir


build_trainval_view = task(name="tuning-trainval-view", cache_policy=NO_CACHE)(trainval_view)


@dataclass(frozen=True)
class Fold:
    """Row positions (into the train/val view) of one fold's training and validation normals."""

    train_rows: tuple[int, ...]
    val_rows: tuple[int, ...]


@dataclass(frozen=True)
class CVPlan:
    folds: tuple[Fold, ...]
    anomaly_rows: tuple[int, ...]
    """The validation anomalies, shared by every fold."""


def make_folds(manifest: pd.DataFrame, n_folds: int, seed: int = 0) -> tuple[Fold, ...]:
    """K folds over the normal `train` images, grouped by `group` so no patient is in two folds."""
    if n_folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {n_folds}")
    normals = np.flatnonzero(((manifest[SPLIT] == "train") & (manifest[LABEL] == NORMAL)).to_numpy())
    groups = manifest[GROUP].to_numpy()[normals]
    n_groups = len(set(groups))
    if n_groups < n_folds:
        raise ValueError(f"{n_folds} folds need at least {n_folds} patient groups of normal train images; found {n_groups}")
    splitter = GroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return tuple(
        Fold(tuple(int(i) for i in normals[train]), tuple(int(i) for i in normals[val]))
        for train, val in splitter.split(normals, groups=groups)
    )


def select_validation_anomalies(manifest: pd.DataFrame, anomaly_type: str, n: int, seed: int = 0) -> tuple[int, ...]:
    """At most `n` abnormal train/val images of `anomaly_type` (a seeded sample), never test ones."""
    abnormal = (manifest[LABEL] == ABNORMAL) & manifest[SPLIT].isin(TUNING_SPLITS)
    rows = np.flatnonzero((abnormal & (manifest[ANOMALY_TYPE] == anomaly_type)).to_numpy())
    if len(rows) == 0:
        available = sorted(set(manifest.loc[abnormal, ANOMALY_TYPE]) - {""})
        raise ValueError(
            f"no abnormal train/val images of anomaly type {anomaly_type!r}; available types: {available or 'none'}"
        )
    if len(rows) < n:
        warnings.warn(f"only {len(rows)} validation anomalies of type {anomaly_type!r} (asked for {n}); using all", stacklevel=2)
    chosen = np.random.default_rng(seed).choice(rows, size=min(n, len(rows)), replace=False)
    return tuple(int(i) for i in np.sort(chosen))


def plan_cross_validation(manifest: pd.DataFrame, n_folds: int, anomaly_type: str, n_anomalies: int, seed: int = 0) -> CVPlan:
    return CVPlan(make_folds(manifest, n_folds, seed), select_validation_anomalies(manifest, anomaly_type, n_anomalies, seed))


@dataclass(frozen=True)
class SearchData:
    """Where a trial finds the decoded train/val view: its preprocessing cache. A reference, not
    tensors, so a process or cluster worker loads the cache (shared file system) instead of
    receiving a pickled copy of the dataset with every trial."""

    view_dir: Path
    preprocess: PreprocessConfig
    cache_dir: Path
    data_version: str

    def load(self) -> PreprocessedDataset:
        return _load_view(self)


@functools.lru_cache(maxsize=1)
def _load_view(data: SearchData) -> PreprocessedDataset:
    """One copy per worker process, shared by the trials it runs."""
    return preprocess_dataset(data.view_dir, data.preprocess, data.cache_dir, data.data_version)


# --- one trial ----------------------------------------------------------------------------------


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


_BUILD_LOCK = threading.Lock()
"""Trainer seeds torch's global RNG, then initialises the network from it: two trials building at
once in threads would interleave those draws and lose reproducibility."""


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
    with _BUILD_LOCK:
        trainer = Trainer(cfg, train, progress=False)
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


# --- the study ----------------------------------------------------------------------------------


def study_storage_url(explicit: str | None = None) -> str:
    """Where the study lives: `explicit`, else $DPA_STUDY_STORAGE, else `optuna.db` beside the
    embedded MLflow SQLite file.

    Not *in* MLflow's database: Optuna and MLflow both keep their schema revision in alembic's
    `alembic_version` table, and each refuses the other's revision. With a PostgreSQL MLflow
    server, point DPA_STUDY_STORAGE at another database (or schema) of the same server.
    """
    url = explicit or os.environ.get(STUDY_STORAGE_ENV)
    if url:
        return url
    tracking = tracking_uri()
    if tracking.startswith("sqlite:///"):
        return f"sqlite:///{Path(tracking.removeprefix('sqlite:///')).with_name('optuna.db')}"
    raise ValueError(
        f"MLflow tracks to {tracking!r}, so the study database cannot be derived from it: set {STUDY_STORAGE_ENV} "
        "(or study_storage) to a database URL, e.g. postgresql://user:pw@host/optuna — a database other than MLflow's"
    )


class AskTellGridSampler(optuna.samplers.GridSampler):
    """GridSampler without its automatic `Study.stop()`: that only works inside `Study.optimize`
    and makes `tell` raise after the last grid point (optuna#4121, #5141). The flow decides when
    the grid is done, from the trials' states."""

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Any) -> None:
        return None


def open_study(name: str, storage_url: str, space: SearchSpace, sampler: str, protocol: dict[str, Any], seed: int = 0) -> optuna.Study:
    """Create the study, or load it when it exists, refusing one created under another protocol
    (other data, folds, anomalies or search space): its AUROCs would not be comparable."""
    chosen = AskTellGridSampler(space.choices(), seed=seed) if sampler == "grid" else optuna.samplers.TPESampler(seed=seed)
    study = optuna.create_study(
        storage=optuna.storages.RDBStorage(storage_url), study_name=name, sampler=chosen, direction="maximize", load_if_exists=True
    )
    protocol = json.loads(json.dumps(protocol))  # the form it takes once stored
    stored = study.user_attrs.get("protocol")
    if stored is None:
        study.set_user_attr("protocol", protocol)
    elif stored != protocol:
        changed = sorted(key for key in stored.keys() | protocol.keys() if stored.get(key) != protocol.get(key))
        raise ValueError(f"study {name!r} was run with other {', '.join(changed)}; resume it unchanged or choose a new study name")
    return study


def point_of(trial: FrozenTrial) -> dict[str, Any]:
    """A trial's parameters; an enqueued (WAITING) trial holds them as `fixed_params` until asked."""
    return trial.params or trial.system_attrs.get("fixed_params", {})


def requeue_unfinished(study: optuna.Study) -> list[int]:
    """Make a restarted search rerun what a dead run left unfinished, and nothing else.

    One search runs a study at a time, so a trial still RUNNING belongs to a run that died: it is
    failed. Every failed point without a COMPLETE trial is enqueued once more (with all its
    parameters fixed, which the grid sampler accepts). COMPLETE trials are never touched.
    Returns the numbers of the trials whose points were enqueued.
    """
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL)
    settled = {point_key(point_of(t)) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.WAITING))}
    requeued = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        if trial.params and point_key(trial.params) not in settled:
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            settled.add(point_key(trial.params))
            requeued.append(trial.number)
    return requeued


def record_result(trial: optuna.Trial, result: TrialResult) -> None:
    """What the leaderboard and the hand-off read back from the study, then the trial's value."""
    for key in ("fold_aurocs", "best_iterations", "started_at", "finished_at", "mlflow_run_id"):
        value = getattr(result, key)
        trial.set_user_attr(key, list(value) if isinstance(value, tuple) else value)
    trial.study.tell(trial, result.mean_auroc)


def record_failure(trial: optuna.Trial, error: BaseException) -> None:
    trial.set_user_attr("error", f"{type(error).__name__}: {error}"[:1000])
    trial.study.tell(trial, state=TrialState.FAIL)


# --- results ------------------------------------------------------------------------------------


def leaderboard(study: optuna.Study) -> pd.DataFrame:
    """Complete trials, best mean CV AUROC first."""
    rows = [
        {
            "trial": t.number,
            **t.params,
            "mean_cv_auroc": t.value,
            "std_cv_auroc": float(np.std(t.user_attrs["fold_aurocs"])),
            "fold_aurocs": t.user_attrs["fold_aurocs"],
            "best_iterations": t.user_attrs["best_iterations"],
            "mlflow_run_id": t.user_attrs["mlflow_run_id"],
        }
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    ]
    board = pd.DataFrame(rows)
    return board.sort_values(["mean_cv_auroc", "trial"], ascending=[False, True], ignore_index=True) if rows else board


def auroc_figure(board: pd.DataFrame, params: list[str]) -> plt.Figure:
    """Mean CV AUROC (dots) and the fold AUROCs (ticks) against each hyperparameter."""
    figure, axes = plt.subplots(1, len(params), figsize=(4 * len(params), 3.5), squeeze=False, sharey=True)
    for ax, name in zip(axes[0], params):
        values = sorted(board[name].astype(str).unique())
        x = board[name].astype(str).map(values.index).to_numpy(dtype=float)
        for xi, folds in zip(x, board["fold_aurocs"]):
            ax.scatter(np.full(len(folds), xi), folds, marker="_", color="0.6")
        ax.scatter(x, board["mean_cv_auroc"], color="C0", zorder=3)
        ax.set_xticks(range(len(values)), values, rotation=30, ha="right")
        ax.set_xlabel(name)
    axes[0][0].set_ylabel("validation AUROC (dot: mean over folds)")
    figure.tight_layout()
    return figure


@dataclass(frozen=True)
class BestConfig:
    """The winner as the training flow takes it: a preset plus dotted overrides."""

    trial: int
    point: dict[str, Any]
    mean_cv_auroc: float
    fold_aurocs: list[float]
    preset: str
    overrides: dict[str, Any] = field(default_factory=dict)


def best_config(study: optuna.Study, space: SearchSpace, cfg: RunConfig, base_overrides: dict[str, Any]) -> BestConfig:
    """The trial with the best mean CV AUROC; it trains for the mean of its folds' best iterations
    at max_res (the paper's final iteration counts are such means, dpa_method.md §4)."""
    best = study.best_trial
    iterations = round(float(np.mean(best.user_attrs["best_iterations"])))
    return BestConfig(
        trial=best.number,
        point=dict(best.params),
        mean_cv_auroc=float(best.value),
        fold_aurocs=list(best.user_attrs["fold_aurocs"]),
        preset=cfg.preset,
        overrides={**base_overrides, **space.overrides(best.params, cfg, iterations)},
    )


@contextmanager
def search_run(experiment_id: str, study_name: str, protocol: dict[str, Any]) -> Iterator[str]:
    """The study's parent MLflow run: created once, resumed by every restart of the same study
    (so all its trials stay under one run); child runs a dead search left RUNNING are marked KILLED."""
    client = MlflowClient()
    found = client.search_runs([experiment_id], filter_string=f"tags.`{STUDY_TAG}` = '{study_name}'", max_results=1)
    if found:
        run = mlflow.start_run(run_id=found[0].info.run_id)
        stale = f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{run.info.run_id}' and attributes.status = 'RUNNING'"
        for child in client.search_runs([experiment_id], filter_string=stale):
            client.set_terminated(child.info.run_id, "KILLED")
    else:
        run = mlflow.start_run(experiment_id=experiment_id, run_name=f"tune-{study_name}", tags={STUDY_TAG: study_name})
        mlflow.log_params({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in flatten(protocol).items()})
    with run:
        yield run.info.run_id


def publish_search(board: pd.DataFrame, best: BestConfig, space: SearchSpace, n_anomalies: int) -> None:
    """Leaderboard, AUROC-vs-hyperparameter plot and best config on the active (parent) run and as
    Prefect artifacts."""
    mlflow.log_text(board.to_csv(index=False), "leaderboard.csv")
    figure = auroc_figure(board, list(space.choices()))
    mlflow.log_figure(figure, "auroc_vs_hyperparameters.png")
    plt.close(figure)
    mlflow.log_text(yaml.safe_dump(asdict(best), sort_keys=False), "best_config.yaml")
    mlflow.log_metrics({"best_mean_cv_auroc": best.mean_cv_auroc, "n_complete_trials": len(board), "n_val_anomalies": n_anomalies})
    mlflow.set_tag("best_trial", best.trial)
    columns = ["trial", *space.choices(), "mean_cv_auroc", "std_cv_auroc"]
    create_table_artifact(board[columns].round(4).head(20).to_dict(orient="records"), key="dpa-tuning-leaderboard",
                          description="Best trials by mean cross-validated validation AUROC")
    create_markdown_artifact(
        f"## Best configuration (trial {best.trial})\n\n{best.point}: mean CV AUROC {best.mean_cv_auroc:.4f} "
        f"(folds {', '.join(f'{a:.4f}' for a in best.fold_aurocs)})\n\n```yaml\n{yaml.safe_dump(asdict(best), sort_keys=False)}```\n",
        key="dpa-tuning-best",
    )
