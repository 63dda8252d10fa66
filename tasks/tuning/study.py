"""The study: Optuna on a database (never in memory), its sampler, restarts and recorded results.

A restarted search skips finished trials and reruns the ones a dead run left unfinished: the
study is stored beside (never inside) MLflow's database, is refused when resumed under another
protocol, and keeps the folds' AUROCs, best iterations and MLflow run id of every complete trial.
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import quote

import optuna
from optuna.trial import FrozenTrial, TrialState

from tasks.registry.tracking import sqlite_database, tracking_uri
from tasks.tuning.space import SearchSpace, point_key
from tasks.tuning.trial import TrialResult

STUDY_STORAGE_ENV = "DPA_STUDY_STORAGE"


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
    if database := sqlite_database(tracking):
        return f"sqlite:///{quote(str(database.with_name('optuna.db')))}"
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

    def grid_point(self, grid_id: int) -> dict[str, Any]:
        """Every parameter of grid point `grid_id` (the sampler's seeded order, the same on resume)."""
        return dict(zip(self._param_names, self._all_grids[grid_id]))


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


def full_point(study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
    """All parameters of a trial, also of one a kill interrupted while `ask` was still setting them
    one by one: from its enqueued `fixed_params`, else its grid point, else what it got."""
    if "fixed_params" in trial.system_attrs:
        return trial.system_attrs["fixed_params"]
    if isinstance(study.sampler, AskTellGridSampler) and "grid_id" in trial.system_attrs:
        return study.sampler.grid_point(trial.system_attrs["grid_id"])
    return trial.params


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
        point = full_point(study, trial)
        if point and point_key(point) not in settled:
            study.enqueue_trial(point, user_attrs={"retry_of": trial.number})
            settled.add(point_key(point))
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
