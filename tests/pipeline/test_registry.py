"""The promotion gate against a real MLflow registry (SQLite): the paired DeLong gate on synthetic
scores, aliases, tags, the stored per-version scores and the one-time re-score, compare-and-set,
failure safety, and two concurrent promotions under the Prefect limit."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from sklearn.metrics import roc_auc_score

from model.dpa import DPA
from tasks.registry.mlflow_model import load_reference_scores
from tasks.registry.promotion import (
    CHALLENGER,
    CHAMPION,
    GateRule,
    PromotionDecision,
    ensure_promotion_limit,
    promote_model,
    promote_version,
    promotion_limit_name,
)
from tasks.registry.registration import RegistryConflict, register_model
from tasks.registry.version_scores import ScoredSet, load_scores, log_scores, scorer_on_test_split
from tasks.training.evaluation import ModelEvaluation
from tasks.training.metrics import evaluate_scores
from tests.pipeline.conftest import ImageSet, register, run_config


def never_rescore(model_uri: str) -> ScoredSet:
    raise AssertionError(f"re-scored {model_uri}, but the champion has scores on this data version")


@pytest.fixture
def name(mlflow_store: str) -> str:
    return f"dpa-reg-{uuid.uuid4().hex[:8]}"


def new_version(name: str, tmp_path: Path) -> str:
    """A registry entry backed by a run but without a real model: enough for gates that never load it."""
    client = MlflowClient()
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    with mlflow.start_run() as run:
        pass
    return str(client.create_model_version(name, source=tmp_path.as_uri(), run_id=run.info.run_id).version)


N = 150
LABELS = np.repeat([0, 1], N)
_rng = np.random.default_rng(7)
SHARED = _rng.normal(size=2 * N) + 0.9 * LABELS  # what both models see in each image
NOISE = _rng.normal(0, 0.5, size=(8, 2 * N))


def scored(signal: float = 0.0, noise: int = 0) -> ScoredSet:
    """Synthetic test scores of one model: the shared part, its own noise, `signal` more separation."""
    return ScoredSet(paths=[f"img{i}.png" for i in range(2 * N)], labels=LABELS.tolist(),
                     scores=(SHARED + NOISE[noise] + signal * LABELS).tolist())


def auroc(scores: ScoredSet) -> float:
    return float(roc_auc_score(scores.labels, scores.scores))


def run_gate(name: str, version: str, scores: ScoredSet, data: str = "d1", floor: float = 0.6,
             rescore: Callable[[str], ScoredSet] = never_rescore, **rule: object) -> PromotionDecision:
    return promote_version(name, version, scores, data, rule=GateRule(auroc_floor=floor, **rule), score_champion=rescore)


def alias(name: str, which: str) -> str | None:
    version = MlflowClient().get_registered_model(name).aliases.get(which)
    return None if version is None else str(version)


def tags(name: str, version: str) -> dict[str, str]:
    return MlflowClient().get_model_version(name, version).tags


def test_first_version_is_promoted_if_above_floor(name: str, tmp_path: Path) -> None:
    v1 = new_version(name, tmp_path)
    decision = run_gate(name, v1, scored())
    assert decision.outcome == "promoted" and decision.champion is None and decision.comparison is None
    assert alias(name, CHAMPION) == alias(name, CHALLENGER) == v1
    assert tags(name, v1)["promotion.decision"] == "promoted"
    assert tags(name, v1)["test_auroc"] == f"{auroc(scored()):.6f}" and tags(name, v1)["data_version"] == "d1"
    assert "no previous champion" in decision.summary
    run_id = MlflowClient().get_model_version(name, v1).run_id
    assert load_scores(MlflowClient(), run_id, "d1") == scored()  # kept for the next challenger


def test_below_floor_is_rejected_even_without_champion(name: str, tmp_path: Path) -> None:
    v1 = new_version(name, tmp_path)
    assert run_gate(name, v1, scored(), floor=0.99).outcome == "rejected: below floor"
    assert alias(name, CHAMPION) is None and alias(name, CHALLENGER) == v1


@pytest.mark.parametrize(
    ("challenger", "rule", "outcome", "significant"),
    [
        (scored(0.6, noise=1), {}, "promoted", True),  # clearly better
        (scored(0.05, noise=1), {}, "kept champion", False),  # better, within noise
        (scored(-0.4, noise=1), {}, "kept champion", False),  # worse
        (scored(-0.02, noise=1), {"gate": "non_inferiority", "non_inferiority_margin": 0.05}, "promoted", True),
        (scored(-0.02, noise=1), {"gate": "superiority"}, "kept champion", False),  # the same model, other gate
        (scored(-0.4, noise=1), {"gate": "non_inferiority", "non_inferiority_margin": 0.05}, "kept champion", False),
        (scored(0.6, noise=1), {"promotion_margin": 0.2}, "kept champion", False),  # better, not by the margin
    ],
    ids=["significantly-better", "better-not-significant", "worse", "non-inferior-within-margin",
         "same-but-superiority", "inferior", "better-below-margin"],
)
def test_paired_gate_on_synthetic_scores(
    name: str, tmp_path: Path, challenger: ScoredSet, rule: dict, outcome: str, significant: bool
) -> None:
    v1, v2 = new_version(name, tmp_path), new_version(name, tmp_path)
    champion = scored()
    run_gate(name, v1, champion)
    decision = run_gate(name, v2, challenger, **rule)
    assert decision.outcome == outcome, decision.summary
    assert (decision.comparison.p_value < 0.05) == significant
    assert alias(name, CHALLENGER) == v2
    assert alias(name, CHAMPION) == (v2 if outcome == "promoted" else v1)
    recorded = tags(name, v2)
    c = decision.comparison
    assert recorded["promotion.decision"] == outcome
    assert recorded["promotion.champion_version"] == v1 and recorded["promotion.champion_auroc"] == f"{auroc(champion):.6f}"
    assert recorded["promotion.challenger_auroc"] == f"{auroc(challenger):.6f}" and recorded["promotion.champion_rescored"] == "false"
    assert float(recorded["promotion.auroc_difference"]) == pytest.approx(auroc(challenger) - auroc(champion), abs=1e-6)
    assert float(recorded["promotion.p_value"]) == pytest.approx(c.p_value, rel=1e-5)
    assert recorded["promotion.difference_ci"] == f"[{c.ci_low:.6f}, {c.ci_high:.6f}] (90%)"
    assert recorded["promotion.gate"] == rule.get("gate", "superiority") and recorded["promotion.alpha"] == "0.05"
    assert "p " in recorded["promotion.summary"] and "CI" in recorded["promotion.summary"]


def test_champion_from_other_data_is_rescored_once_on_this_test_set(
    name: str, tiny_dpa: DPA, image_set: ImageSet, tmp_path: Path
) -> None:
    v1 = register(tiny_dpa, name)
    run_gate(name, v1, scored(), data="old", floor=0.0)
    expected = image_set.expected_scores(tiny_dpa)
    rescore = scorer_on_test_split(image_set.root)
    calls = []

    def counting(model_uri: str) -> ScoredSet:
        calls.append(model_uri)
        return rescore(model_uri)

    v2 = new_version(name, tmp_path)
    same = rescore(f"models:/{name}/{v1}")  # the challenger: the very same scores
    decision = run_gate(name, v2, same, data="new", floor=0.0, rescore=counting)
    assert decision.outcome == "kept champion", decision.summary
    assert calls == [f"models:/{name}/{v1}"]
    np.testing.assert_allclose(same.scores, expected, rtol=1e-4, atol=1e-6)
    assert decision.champion.rescored and decision.comparison.difference == 0 and decision.comparison.p_value == 0.5
    assert alias(name, CHAMPION) == v1
    recorded = tags(name, v2)
    assert recorded["promotion.champion_rescored"] == "true" and recorded["promotion.champion_data_version"] == "old"
    assert "re-scored on data new" in recorded["promotion.summary"]

    v3 = new_version(name, tmp_path)  # the next challenger on the same data: the stored scores, no re-score
    decision = run_gate(name, v3, same, data="new", floor=0.0, rescore=never_rescore)
    assert not decision.champion.rescored and calls == [f"models:/{name}/{v1}"]


def test_failure_while_deciding_keeps_the_champion(name: str, tmp_path: Path) -> None:
    v1, v2 = new_version(name, tmp_path), new_version(name, tmp_path)
    run_gate(name, v1, scored(), data="old")

    def broken(model_uri: str) -> ScoredSet:
        raise OSError("test images unreadable")

    with pytest.raises(OSError):
        run_gate(name, v2, scored(2.0, noise=1), data="new", rescore=broken)
    assert alias(name, CHAMPION) == v1
    assert "promotion.decision" not in tags(name, v2)


def test_scores_of_another_image_set_are_refused(name: str, tmp_path: Path) -> None:
    v1, v2 = new_version(name, tmp_path), new_version(name, tmp_path)
    run_gate(name, v1, scored())
    other = scored(2.0, noise=1).model_copy(update={"paths": [f"other{i}.png" for i in range(2 * N)]})
    with pytest.raises(ValueError, match="not scored on the same test split"):
        run_gate(name, v2, other)
    assert alias(name, CHAMPION) == v1


def test_champion_changed_meanwhile_is_decided_again(name: str, tmp_path: Path) -> None:
    """While the old champion is re-scored, another run promotes a better model: compare-and-set
    sees the change and re-decides against the new champion instead of overwriting it."""
    v1, v2, v3 = (new_version(name, tmp_path) for _ in range(3))
    run_gate(name, v1, scored(), data="old")
    client = MlflowClient()
    strong = scored(1.5, noise=2)
    log_scores(client, client.get_model_version(name, v2).run_id, "new", strong)
    client.set_model_version_tag(name, v2, "data_version", "new")

    def rescore_while_another_run_promotes(model_uri: str) -> ScoredSet:
        client.set_registered_model_alias(name, CHAMPION, v2)
        return scored(-1.0)

    decision = run_gate(name, v3, scored(0.6, noise=1), data="new", rescore=rescore_while_another_run_promotes)
    assert decision.outcome == "kept champion" and decision.champion.version == v2
    assert alias(name, CHAMPION) == v2
    assert tags(name, v3)["promotion.champion_version"] == v2


def test_register_model_task_logs_a_servable_version(name: str, tiny_dpa: DPA, image_set: ImageSet) -> None:
    cfg = run_config().model_copy(update={"registry": run_config().registry.model_copy(update={"model_name": name})})
    evaluation = ModelEvaluation(metrics=evaluate_scores([0, 1], [0.0, 1.0]), threshold=0.1, threshold_rule="rule",
                                 normal_scores=[0.01, 0.02, 0.05, 0.1])
    with mlflow.start_run() as run:
        version = register_model.fn(tiny_dpa, evaluation, cfg, run.info.run_id)
    model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    assert model.metadata.run_id == run.info.run_id and model.metadata.metadata["threshold"] == 0.1
    reference = load_reference_scores(f"models:/{name}/{version}")
    assert reference.scores == [0.01, 0.02, 0.05, 0.1] and reference.rule == "rule"
    assert reference.source == evaluation.normal_source and reference.quantile == evaluation.threshold_quantile
    assert reference.threshold_at(0.5) == pytest.approx(0.035)


def test_each_preset_registers_its_own_model_and_no_other_preset_can_move_its_champion(name: str, tiny_dpa: DPA) -> None:
    from tasks.config import PipelineParams, model_name_of, resolve_run_config

    assert model_name_of("demo") == "dpa-phantoms" and model_name_of("nih_pa_wo_pg") == "dpa-nih_pa_wo_pg"
    assert resolve_run_config(PipelineParams(preset="cifar10_class0")).registry.model_name == "dpa-cifar10_class0"
    evaluation = ModelEvaluation(metrics=evaluate_scores([0, 1], [0.0, 1.0]), threshold=0.1, threshold_rule="rule",
                                 normal_scores=[0.01, 0.02, 0.05, 0.1])

    def config(preset: str, **registry: object):
        cfg = run_config()
        return cfg.model_copy(update={"preset": preset, "registry": cfg.registry.model_copy(update={"model_name": name, **registry})})

    with mlflow.start_run() as run:
        v1 = register_model.fn(tiny_dpa, evaluation, config("demo"), run.info.run_id)
    MlflowClient().set_registered_model_alias(name, CHAMPION, v1)
    assert tags(name, v1)["preset"] == "demo"
    with mlflow.start_run() as run, pytest.raises(RegistryConflict, match=r"holds versions of preset\(s\) \['demo'\]; this run is preset 'nih_pa_wo_pg'"):
        register_model.fn(tiny_dpa, evaluation, config("nih_pa_wo_pg"), run.info.run_id)
    assert [str(v.version) for v in MlflowClient().search_model_versions(f"name = '{name}'")] == [v1]  # nothing logged
    assert alias(name, CHAMPION) == v1
    with mlflow.start_run() as run:
        v2 = register_model.fn(tiny_dpa, evaluation, config("nih_pa_wo_pg", allow_other_presets=True), run.info.run_id)
    assert v2 != v1 and tags(name, v2)["preset"] == "nih_pa_wo_pg"


def test_concurrent_promotions_leave_exactly_the_best_champion(prefect_server: None, name: str, tmp_path: Path) -> None:
    versions = {new_version(name, tmp_path): signal for signal in (0.0, 1.5)}
    start, decisions, errors = threading.Barrier(len(versions)), [], []

    def finish_run(version: str, signal: float) -> None:
        start.wait()
        try:
            decisions.append(promote_model(name, version, scored(signal, noise=int(signal)), "d1", GateRule(), never_rescore))
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


def test_a_challenger_that_does_not_beat_the_best_baseline_is_not_promoted(name: str, tmp_path: Path) -> None:
    """The demo's case: a DPA (AUROC ~0.78) behind the PCA baseline (~0.86) on the same images."""
    v1 = new_version(name, tmp_path)
    weak, strong_pca = scored(), scored(signal=0.8, noise=1)
    baselines = {"pca": strong_pca.scores, "mean_image": scored(noise=2).scores}
    decision = promote_version(name, v1, weak, "d1", rule=GateRule(auroc_floor=0.6), score_champion=never_rescore,
                               baselines=baselines, vgg_weights="random:seed=0 (auto fallback: imagenet unavailable)")
    assert decision.outcome == "rejected: does not beat baseline" and not decision.promoted
    assert alias(name, CHAMPION) is None and alias(name, CHALLENGER) == v1
    assert decision.baseline_name == "pca" and decision.baseline.champion_auroc == pytest.approx(auroc(strong_pca))
    recorded = tags(name, v1)
    assert recorded["promotion.beat_baseline"] == "true" and recorded["promotion.baseline"] == "pca"
    assert float(recorded["promotion.baseline_p_value"]) > 0.05
    assert recorded["promotion.vgg_weights"].startswith("random") and "RANDOM VGG19 weights" in decision.summary

    beats = promote_version(name, v1, scored(signal=1.5, noise=3), "d1", rule=GateRule(auroc_floor=0.6),
                            score_champion=never_rescore, baselines=baselines)
    assert beats.outcome == "promoted" and beats.baseline.p_value < 0.05

    off = GateRule(auroc_floor=0.6, beat_baseline=False)
    v2 = new_version(name, tmp_path)
    kept = promote_version(name, v2, weak, "d1", rule=off, score_champion=never_rescore, baselines=baselines)
    assert kept.outcome != "rejected: does not beat baseline" and tags(name, v2)["promotion.beat_baseline"] == "false"


def test_the_gate_resamples_patients_when_the_test_images_name_them(name: str, tmp_path: Path) -> None:
    v1 = new_version(name, tmp_path)
    per_patient = scored(signal=1.5).model_copy(update={"groups": [f"p{i // 3}" for i in range(2 * N)]})
    decision = promote_version(name, v1, per_patient, "d1", rule=GateRule(auroc_floor=0.6), score_champion=never_rescore,
                               baselines={"pca": scored(noise=1).scores})
    assert decision.baseline.method == f"Obuchowski clustered ({2 * N // 3} patients)"
    assert tags(name, v1)["promotion.test_method"] == decision.baseline.method
    run_id = MlflowClient().get_model_version(name, v1).run_id
    assert load_scores(MlflowClient(), run_id, "d1").groups == per_patient.groups  # stored for the next comparison
