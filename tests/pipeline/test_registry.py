"""The promotion gate against a real MLflow registry (SQLite): aliases, tags, the re-score path,
compare-and-set, failure safety, and two concurrent promotions under the Prefect limit."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from sklearn.metrics import roc_auc_score

from model.dpa import DPA
from tasks.evaluation import ModelEvaluation, evaluate_scores
from tasks.registry import (
    CHALLENGER,
    CHAMPION,
    PromotionDecision,
    ensure_promotion_limit,
    promote_model,
    promote_version,
    promotion_limit_name,
    register_model,
)
from tasks.scoring import auroc_rescorer
from tests.pipeline.conftest import ImageSet, register, run_config


def never_rescore(model_uri: str) -> float:
    raise AssertionError(f"re-scored {model_uri}, but the champion was evaluated on the same data")


@pytest.fixture
def name(mlflow_store: str) -> str:
    return f"dpa-reg-{uuid.uuid4().hex[:8]}"


def new_version(name: str, tmp_path: Path) -> str:
    """A registry entry without a real model: enough for gates that never load it."""
    client = MlflowClient()
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    return str(client.create_model_version(name, source=tmp_path.as_uri()).version)


def run_gate(name: str, version: str, auroc: float, data: str = "d1", margin: float = 0.0, floor: float = 0.6,
             rescore: Callable[[str], float] = never_rescore) -> PromotionDecision:
    return promote_version(name, version, auroc, data, promotion_margin=margin, auroc_floor=floor, rescore=rescore)


def alias(name: str, which: str) -> str | None:
    version = MlflowClient().get_registered_model(name).aliases.get(which)
    return None if version is None else str(version)


def tags(name: str, version: str) -> dict[str, str]:
    return MlflowClient().get_model_version(name, version).tags


def test_first_version_is_promoted_if_above_floor(name: str, tmp_path: Path) -> None:
    v1 = new_version(name, tmp_path)
    decision = run_gate(name, v1, 0.7)
    assert decision.outcome == "promoted" and decision.champion is None
    assert alias(name, CHAMPION) == alias(name, CHALLENGER) == v1
    assert tags(name, v1)["promotion.decision"] == "promoted"
    assert tags(name, v1)["test_auroc"] == "0.700000" and tags(name, v1)["data_version"] == "d1"
    assert "no previous champion" in decision.summary


def test_below_floor_is_rejected_even_without_champion(name: str, tmp_path: Path) -> None:
    v1 = new_version(name, tmp_path)
    assert run_gate(name, v1, 0.55).outcome == "rejected: below floor"
    assert alias(name, CHAMPION) is None and alias(name, CHALLENGER) == v1


@pytest.mark.parametrize(
    ("challenger", "margin", "outcome"),
    [(0.85, 0.0, "promoted"), (0.75, 0.0, "kept champion"), (0.80, 0.0, "kept champion"),
     (0.81, 0.02, "kept champion"), (0.83, 0.02, "promoted"), (0.59, 0.0, "rejected: below floor")],
)
def test_challenger_against_champion_on_same_data(name: str, tmp_path: Path, challenger: float, margin: float, outcome: str) -> None:
    v1, v2 = new_version(name, tmp_path), new_version(name, tmp_path)
    run_gate(name, v1, 0.80)
    decision = run_gate(name, v2, challenger, margin=margin)
    assert decision.outcome == outcome
    assert alias(name, CHALLENGER) == v2
    assert alias(name, CHAMPION) == (v2 if outcome == "promoted" else v1)
    recorded = tags(name, v2)
    assert recorded["promotion.decision"] == outcome
    assert recorded["promotion.champion_version"] == v1 and recorded["promotion.champion_auroc"] == "0.800000"
    assert recorded["promotion.challenger_auroc"] == f"{challenger:.6f}" and recorded["promotion.champion_rescored"] == "false"


def test_champion_from_other_data_is_rescored_on_this_test_set(name: str, tiny_dpa: DPA, image_set: ImageSet, tmp_path: Path) -> None:
    v1 = register(tiny_dpa, name)
    run_gate(name, v1, 0.0, data="old", floor=0.0)  # recorded figure: worse than anything
    rescored = roc_auc_score([label == "abnormal" for label in image_set.labels], image_set.expected_scores(tiny_dpa))
    v2 = new_version(name, tmp_path)
    decision = run_gate(name, v2, rescored - 0.01, data="new", floor=0.0, rescore=auroc_rescorer(image_set.root))
    assert decision.outcome == "kept champion", decision.summary
    assert decision.champion.rescored and decision.champion.auroc == pytest.approx(rescored, abs=1e-6)
    assert alias(name, CHAMPION) == v1
    recorded = tags(name, v2)
    assert recorded["promotion.champion_rescored"] == "true" and recorded["promotion.champion_data_version"] == "old"
    assert "re-scored on data new" in recorded["promotion.summary"]


def test_failure_while_deciding_keeps_the_champion(name: str, tmp_path: Path) -> None:
    v1, v2 = new_version(name, tmp_path), new_version(name, tmp_path)
    run_gate(name, v1, 0.7, data="old")

    def broken(model_uri: str) -> float:
        raise OSError("test images unreadable")

    with pytest.raises(OSError):
        run_gate(name, v2, 0.99, data="new", rescore=broken)
    assert alias(name, CHAMPION) == v1
    assert "promotion.decision" not in tags(name, v2)


def test_champion_changed_meanwhile_is_decided_again(name: str, tmp_path: Path) -> None:
    """While the old champion is re-scored, another run promotes a better model: compare-and-set
    sees the change and re-decides against the new champion instead of overwriting it."""
    v1, v2, v3 = (new_version(name, tmp_path) for _ in range(3))
    run_gate(name, v1, 0.7, data="old")
    MlflowClient().set_model_version_tag(name, v2, "test_auroc", "0.950000")
    MlflowClient().set_model_version_tag(name, v2, "data_version", "new")

    def rescore_while_another_run_promotes(model_uri: str) -> float:
        MlflowClient().set_registered_model_alias(name, CHAMPION, v2)
        return 0.5

    decision = run_gate(name, v3, 0.9, data="new", rescore=rescore_while_another_run_promotes)
    assert decision.outcome == "kept champion" and decision.champion.version == v2
    assert alias(name, CHAMPION) == v2
    assert tags(name, v3)["promotion.champion_version"] == v2


def test_register_model_task_logs_a_servable_version(name: str, tiny_dpa: DPA, image_set: ImageSet) -> None:
    cfg = run_config().model_copy(update={"registry": run_config().registry.model_copy(update={"model_name": name})})
    evaluation = ModelEvaluation(metrics=evaluate_scores([0, 1], [0.0, 1.0]), threshold=0.1, threshold_rule="rule", normal_scores=[0.05, 0.1])
    with mlflow.start_run() as run:
        version = register_model.fn(tiny_dpa, evaluation, cfg, run.info.run_id)
    model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    assert model.metadata.run_id == run.info.run_id and model.metadata.metadata["threshold"] == 0.1


def test_concurrent_promotions_leave_exactly_the_best_champion(prefect_server: None, name: str, tmp_path: Path) -> None:
    versions = {new_version(name, tmp_path): auroc for auroc in (0.80, 0.90)}
    start, decisions, errors = threading.Barrier(len(versions)), [], []

    def finish_run(version: str, auroc: float) -> None:
        start.wait()
        try:
            decisions.append(promote_model(name, version, auroc, "d1", 0.0, 0.6, never_rescore))
        except Exception as exc:  # surfaced below, with the thread's traceback
            errors.append(exc)

    threads = [threading.Thread(target=finish_run, args=item) for item in versions.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    best = max(versions, key=versions.get)
    assert alias(name, CHAMPION) == best
    assert sorted(d.champion is None for d in decisions) == [False, True]  # the second saw the first
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(promotion_limit_name(name)).limit == 1


def test_a_loosened_promotion_limit_is_repaired_to_one_active_slot(prefect_server: None, name: str) -> None:
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=promotion_limit_name(name), limit=4, active=False)
        )
        ensure_promotion_limit(name)
        limit = client.read_global_concurrency_limit_by_name(promotion_limit_name(name))
    assert (limit.limit, limit.active) == (1, True)
