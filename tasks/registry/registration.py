"""Registering a trained DPA: one registered model per task, each version tagged with its preset.

A registered model's `champion` is what scheduled scoring and `dpa score` use, so a run of another
preset (another dataset, another task) must not add versions to it and move its champion: such a
registration is refused before anything is logged, naming both presets and the fix, unless
`registry.allow_other_presets` says it is intended. Versions registered before presets were
recorded carry no tag and refuse nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import mlflow
from mlflow import MlflowClient
from prefect import task
from prefect.cache_policies import NO_CACHE

from model.dpa import DPA
from tasks.registry.mlflow_model import log_dpa_model
from tasks.training.evaluation import ModelEvaluation

if TYPE_CHECKING:  # tasks.config imports the GX gate: seconds, only needed by type checkers here
    from tasks.config import RunConfig

TAG_PRESET = "preset"


class RegistryConflict(ValueError):
    """A run would register into a model whose versions belong to another preset."""


def other_presets(client: MlflowClient, model_name: str, preset: str) -> set[str]:
    """Presets other than `preset` that versions of `model_name` were trained from."""
    versions = client.search_model_versions(f"name = '{model_name}'")
    return {v.tags[TAG_PRESET] for v in versions if v.tags.get(TAG_PRESET, preset) != preset}


def check_owner(cfg: RunConfig, client: MlflowClient | None = None) -> None:
    others = other_presets(client or MlflowClient(), cfg.registry.model_name, cfg.preset)
    if others and not cfg.registry.allow_other_presets:
        raise RegistryConflict(
            f"registered model {cfg.registry.model_name!r} holds versions of preset(s) {sorted(others)}; this run is "
            f"preset {cfg.preset!r}, and registering it there could move their champion. Register under its own "
            f"name (--model-name, or registry.model_name; the default is dpa-<preset>), or set "
            "registry.allow_other_presets: true if the presets really are one task"
        )


@contextmanager
def _in_run(run_id: str) -> Iterator[None]:
    """Make `run_id` the active MLflow run of this thread (Prefect may run a task in another thread)."""
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield
        return
    with mlflow.start_run(run_id=run_id):
        yield


@task(name="register-model", cache_policy=NO_CACHE)
def register_model(dpa: DPA, evaluation: ModelEvaluation, cfg: RunConfig, run_id: str) -> str:
    """Log the pyfunc model (with its reference normal scores) into the run and register it, tagged
    with its preset; returns the new version number. Refused first when the model belongs to
    another preset (`check_owner`)."""
    check_owner(cfg)
    with _in_run(run_id):
        info = log_dpa_model(
            dpa, cfg.preprocess, evaluation.threshold, cfg.registry.model_name, evaluation.threshold_rule,
            normal_scores=evaluation.normal_scores, normal_source=evaluation.normal_source,
            quantile=evaluation.threshold_quantile, input_rules=cfg.validation,
        )
    version = str(info.registered_model_version)
    MlflowClient().set_model_version_tag(cfg.registry.model_name, version, TAG_PRESET, cfg.preset)
    return version
