"""Promotion through registry aliases: every new version is `challenger`; the gate decides `champion`.

A challenger becomes champion only when its test AUROC is at least `auroc_floor` and beats the
champion's by more than `promotion_margin` *on the same data version*. When the champion was
evaluated on another data version, its recorded AUROC is not comparable, so the champion is
re-scored on the challenger's test set (`rescore`) and that figure is compared instead.

Order of writes: the challenger's tags (its evaluation, then the decision), and the `champion` alias
last, so a failure anywhere leaves the previous champion in place. Two runs finishing together are
serialised by a Prefect global concurrency limit (`promote_model`); inside it, `promote_version` re-reads
the champion right before moving the alias and re-decides if it changed (compare-and-set).

`promote_version`, `decide` and `PromotionDecision` need no Prefect server; the tasks at the bottom
(`register_model`, `promote_model`) are what the training flow calls.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from pydantic import BaseModel

from model.dpa import DPA
from tasks.evaluation import ModelEvaluation
from tasks.mlflow_model import CHAMPION, log_dpa_model

if TYPE_CHECKING:  # tasks.config imports the GX gate: seconds, only needed by type checkers here
    from tasks.config import RunConfig

CHALLENGER = "challenger"
TAG_AUROC, TAG_DATA_VERSION = "test_auroc", "data_version"
"""Every version's own evaluation, written when it is registered as challenger."""
DECISION_PREFIX = "promotion."
MAX_DECISIONS = 5
"""Re-decisions allowed when the champion keeps changing under us (compare-and-set retries)."""
PROMOTION_WAIT_S = 3600
"""How long a promotion waits for another one (re-scoring a champion can take minutes) before failing."""

Outcome = Literal["promoted", "kept champion", "rejected: below floor"]


class ChampionFigure(BaseModel):
    """The champion's AUROC as compared: recorded on the same data, or re-scored on this test set."""

    version: str
    auroc: float
    data_version: str
    rescored: bool


class PromotionDecision(BaseModel):
    """The gate's verdict with both figures, as written to the challenger's tags."""

    model_name: str
    version: str
    outcome: Outcome
    challenger_auroc: float
    data_version: str
    champion: ChampionFigure | None
    promotion_margin: float
    auroc_floor: float

    @property
    def promoted(self) -> bool:
        return self.outcome == "promoted"

    @property
    def summary(self) -> str:
        challenger = f"{self.model_name} v{self.version} (test AUROC {self.challenger_auroc:.4f}, data {self.data_version})"
        rule = f"margin {self.promotion_margin:g}, floor {self.auroc_floor:g}"
        return f"{self.outcome}: {challenger} vs {self._against()}; {rule}"

    def _against(self) -> str:
        champion = self.champion
        if champion is None:
            return "no previous champion"
        if champion.rescored:
            how = f"re-scored on data {self.data_version}, recorded on {champion.data_version}"
        else:
            how = f"on data {champion.data_version}"
        return f"champion v{champion.version} AUROC {champion.auroc:.4f} ({how})"

    def tags(self) -> dict[str, str]:
        champion = self.champion
        return {
            f"{DECISION_PREFIX}decision": self.outcome,
            f"{DECISION_PREFIX}summary": self.summary,
            f"{DECISION_PREFIX}challenger_auroc": f"{self.challenger_auroc:.6f}",
            f"{DECISION_PREFIX}challenger_data_version": self.data_version,
            f"{DECISION_PREFIX}champion_version": champion.version if champion else "",
            f"{DECISION_PREFIX}champion_auroc": f"{champion.auroc:.6f}" if champion else "",
            f"{DECISION_PREFIX}champion_data_version": champion.data_version if champion else "",
            f"{DECISION_PREFIX}champion_rescored": str(bool(champion and champion.rescored)).lower(),
        }


def decide(
    challenger_auroc: float, champion_auroc: float | None, promotion_margin: float, auroc_floor: float
) -> Outcome:
    """The gate itself: floor first, then strictly more than the margin over the champion."""
    if challenger_auroc < auroc_floor:
        return "rejected: below floor"
    if champion_auroc is None or challenger_auroc > champion_auroc + promotion_margin:
        return "promoted"
    return "kept champion"


def promote_version(
    model_name: str,
    version: str | int,
    test_auroc: float,
    data_version: str,
    *,
    promotion_margin: float,
    auroc_floor: float,
    rescore: Callable[[str], float],
    client: MlflowClient | None = None,
) -> PromotionDecision:
    """Make `version` the challenger and move `champion` to it if it passes the gate.

    `rescore(model_uri)` returns the test AUROC of another version on *this* run's test set; it is
    called only when the champion was evaluated on a different data version.
    """
    if not math.isfinite(test_auroc):
        raise ValueError(f"{model_name} v{version}: test AUROC is {test_auroc}; refusing to register a decision on it")
    client, version = client or MlflowClient(), str(version)
    client.set_model_version_tag(model_name, version, TAG_AUROC, f"{test_auroc:.6f}")
    client.set_model_version_tag(model_name, version, TAG_DATA_VERSION, data_version)
    client.set_registered_model_alias(model_name, CHALLENGER, version)
    champion = _champion(client, model_name)
    for _ in range(MAX_DECISIONS):
        figure = _figure(champion, data_version, rescore) if champion else None
        outcome = decide(test_auroc, figure.auroc if figure else None, promotion_margin, auroc_floor)
        decision = PromotionDecision(
            model_name=model_name, version=version, outcome=outcome, challenger_auroc=test_auroc,
            data_version=data_version, champion=figure, promotion_margin=promotion_margin, auroc_floor=auroc_floor,
        )
        for key, value in decision.tags().items():
            client.set_model_version_tag(model_name, version, key, value)
        if not decision.promoted:
            return decision
        latest = _champion(client, model_name)
        if _version_of(latest) == _version_of(champion):
            client.set_registered_model_alias(model_name, CHAMPION, version)
            return decision
        champion = latest
    raise RuntimeError(
        f"{model_name}: the champion changed {MAX_DECISIONS} times while v{version} was being promoted; "
        "promotions are not serialised. Run promotion through the `promote_model` task (global concurrency limit)."
    )


def _champion(client: MlflowClient, model_name: str) -> ModelVersion | None:
    """Read through the model's alias map: a missing alias is an error code that differs by store."""
    version = client.get_registered_model(model_name).aliases.get(CHAMPION)
    return client.get_model_version(model_name, version) if version is not None else None


def _version_of(model_version: ModelVersion | None) -> str | None:
    return str(model_version.version) if model_version else None


def _figure(champion: ModelVersion, data_version: str, rescore: Callable[[str], float]) -> ChampionFigure:
    """The champion's recorded AUROC if it was tested on this data version, else a fresh re-score."""
    recorded_on = champion.tags.get(TAG_DATA_VERSION, "")
    if recorded_on == data_version and TAG_AUROC in champion.tags:
        auroc, rescored = float(champion.tags[TAG_AUROC]), False
    else:
        auroc, rescored = float(rescore(f"models:/{champion.name}/{champion.version}")), True
    return ChampionFigure(
        version=str(champion.version), auroc=auroc, data_version=recorded_on or "unknown", rescored=rescored
    )


def promotion_limit_name(model_name: str) -> str:
    """One Prefect global concurrency limit per registered model (names allow [A-Za-z0-9_.-])."""
    return "promote-" + re.sub(r"[^A-Za-z0-9_.-]", "-", model_name)


def ensure_promotion_limit(model_name: str) -> str:
    """Create (or repair) the limit with 1 slot: `concurrency()` does not limit a name that has no limit."""
    name = promotion_limit_name(model_name)
    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:  # a concurrent promotion created it first
                pass
            return name
        if limit.limit != 1 or not limit.active:
            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=1, active=True))
    return name


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
    """Log the pyfunc model into the run and register it; returns the new version number."""
    with _in_run(run_id):
        info = log_dpa_model(
            dpa, cfg.preprocess, evaluation.threshold, cfg.registry.model_name, evaluation.threshold_rule,
            normal_scores=evaluation.normal_scores, normal_source=evaluation.normal_source,
            quantile=evaluation.threshold_quantile,
        )
    return str(info.registered_model_version)


@task(name="promote-model", cache_policy=NO_CACHE)
def promote_model(
    model_name: str,
    version: str,
    test_auroc: float,
    data_version: str,
    promotion_margin: float,
    auroc_floor: float,
    rescore: Callable[[str], float],
) -> PromotionDecision:
    """`promote_version` under a one-slot global concurrency limit per model: runs that finish
    together (other processes, other machines) take turns at the champion alias."""
    limit = ensure_promotion_limit(model_name)
    with concurrency(limit, occupy=1, strict=True, timeout_seconds=PROMOTION_WAIT_S):
        decision = promote_version(
            model_name, version, test_auroc, data_version,
            promotion_margin=promotion_margin, auroc_floor=auroc_floor, rescore=rescore,
        )
    get_run_logger().info(decision.summary)
    create_markdown_artifact(
        f"## Promotion decision\n\n{decision.summary}",
        key=f"promotion-{re.sub(r'[^a-z0-9-]', '-', model_name.lower())}",  # artifact keys: [a-z0-9-]
        description=f"{model_name} v{version}",
    )
    return decision
