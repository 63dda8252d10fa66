"""The search's results: leaderboard, AUROC-vs-hyperparameter plot, best config and parent run.

The leaderboard and the best config are read back from the study; the best config is the winning
point as the training flow takes it (a preset plus dotted overrides). All of it is published on the
study's parent MLflow run, resumed by every restart of the same study, and as Prefect artifacts.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on workers and CI

import matplotlib.pyplot as plt
import mlflow
import numpy as np
import optuna
import pandas as pd
import yaml
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from optuna.trial import TrialState
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.config import RunConfig
from tasks.registry.tracking import log_config_params
from tasks.tuning.space import SearchSpace

STUDY_TAG = "dpa.study"


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
    at max_res (the paper's final iteration counts are such means, docs/method.md §4)."""
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
        log_config_params(protocol)
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
