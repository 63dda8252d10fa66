"""Promotion through registry aliases: every new version is `challenger`; a paired gate decides `champion`.

A challenger becomes champion only when its test AUROC is at least `auroc_floor`, it beats the best
pixel baseline on the same test images (`beat_baseline`: a one-sided paired test at `alpha`, H0:
difference ≤ 0), and a one-sided paired test on the *same test images* says it is better than the
champion's (`superiority`: the difference exceeds `promotion_margin`) or not worse by more than a
margin (`non_inferiority`), at level `alpha`. The paired tests are Obuchowski's clustered test where
the test images name their patients (DeLong's where each image is its own), so several images of
one patient do not count as independent evidence. Both versions' per-image test scores are stored in their runs keyed by data version
(`tasks.registry.version_scores`); a champion without scores on this data version is re-scored once
(`score_champion`) and its scores kept for the next challenger.

Order of writes: the challenger's tags (its evaluation, then the decision), and the `champion` alias
last, so a failure anywhere leaves the previous champion in place. Two runs finishing together are
serialised by a Prefect global concurrency limit (`promote_model`); inside it, `promote_version` re-reads
the champion right before moving the alias and re-decides if it changed (compare-and-set).

`promote_version`, `decide` and `PromotionDecision` need no Prefect server; `promote_model` at the
bottom is what the training flow calls (after `tasks.registry.registration.register_model`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import numpy as np
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from pydantic import BaseModel, Field
from sklearn.metrics import roc_auc_score

from tasks.registry.mlflow_model import CHAMPION
from tasks.registry.paired_auc import PairedAUROC, paired_delong
from tasks.registry.version_scores import ScoredSet, aligned, load_scores, log_scores

if TYPE_CHECKING:  # tasks.config imports the GX gate: seconds, only needed by type checkers here
    from tasks.config import RegistryConfig

CHALLENGER = "challenger"
TAG_AUROC, TAG_DATA_VERSION = "test_auroc", "data_version"
"""Every version's own evaluation, written when it is registered as challenger."""
DECISION_PREFIX = "promotion."
MAX_DECISIONS = 5
"""Re-decisions allowed when the champion keeps changing under us (compare-and-set retries)."""
PROMOTION_WAIT_S = 3600
"""How long a promotion waits for another one (re-scoring a champion can take minutes) before failing."""

Outcome = Literal["promoted", "kept champion", "rejected: below floor", "rejected: does not beat baseline"]


class GateRule(BaseModel):
    """What a challenger must show: the floor, then a one-sided paired DeLong test at `alpha`."""

    gate: Literal["superiority", "non_inferiority"] = "superiority"
    alpha: float = Field(0.05, gt=0, lt=0.5)
    promotion_margin: float = 0.0
    non_inferiority_margin: float = Field(0.02, ge=0)
    auroc_floor: float = 0.6
    beat_baseline: bool = True

    @classmethod
    def of(cls, registry: RegistryConfig) -> GateRule:
        return cls.model_validate(registry.model_dump(include=set(cls.model_fields)))

    @property
    def null_difference(self) -> float:
        """H0 of the test: AUROC(challenger) − AUROC(champion) ≤ this."""
        return self.promotion_margin if self.gate == "superiority" else -self.non_inferiority_margin

    @property
    def summary(self) -> str:
        baseline = "; must beat the best pixel baseline (one-sided p < alpha)" if self.beat_baseline else "; baselines not checked"
        return (f"{self.gate}: promote if AUROC difference > {self.null_difference:g} at one-sided paired "
                f"p < {self.alpha:g}; floor {self.auroc_floor:g}{baseline}")


class ChampionFigure(BaseModel):
    """The champion's AUROC as compared: on this data version's test images, stored or re-scored."""

    version: str
    auroc: float
    data_version: str
    rescored: bool


class PromotionDecision(BaseModel):
    """The gate's verdict with both figures and the paired test, as written to the challenger's tags."""

    model_name: str
    version: str
    outcome: Outcome
    challenger_auroc: float
    data_version: str
    champion: ChampionFigure | None
    comparison: PairedAUROC | None
    rule: GateRule
    baseline_name: str | None = None
    baseline: PairedAUROC | None = None
    """The challenger against the best pixel baseline on the same images (None: no baseline scores)."""
    vgg_weights: str = ""

    @property
    def promoted(self) -> bool:
        return self.outcome == "promoted"

    @property
    def summary(self) -> str:
        challenger = f"{self.model_name} v{self.version} (test AUROC {self.challenger_auroc:.4f}, data {self.data_version})"
        return (f"{self.outcome}: {challenger} vs {self._against()}{self._paired()}{self._baseline()}"
                f"{self._weights()}; rule {self.rule.summary}")

    def _baseline(self) -> str:
        b = self.baseline
        if b is None:
            return "; no baseline scores to check" if self.rule.beat_baseline else ""
        return (f"; vs the {self.baseline_name} baseline (AUROC {b.champion_auroc:.4f}): difference "
                f"{b.difference:+.4f}, one-sided p {b.p_value:.4g} ({b.method})")

    def _weights(self) -> str:
        if "random" not in self.vgg_weights:
            return ""
        return f"; trained with RANDOM VGG19 weights ({self.vgg_weights}), not the paper's perceptual space"

    def _against(self) -> str:
        champion = self.champion
        if champion is None:
            return "no previous champion"
        if champion.rescored:
            how = f"re-scored on data {self.data_version}, recorded on {champion.data_version}"
        else:
            how = f"on data {champion.data_version}"
        return f"champion v{champion.version} AUROC {champion.auroc:.4f} ({how})"

    def _paired(self) -> str:
        c = self.comparison
        if c is None:
            return ""
        return (f"; difference {c.difference:+.4f} ({c.confidence:.0%} CI {c.ci_low:+.4f} to {c.ci_high:+.4f}), "
                f"{c.method} z {c.z:.2f}, one-sided p {c.p_value:.4g}")

    def tags(self) -> dict[str, str]:
        champion, c, b = self.champion, self.comparison, self.baseline
        return {
            f"{DECISION_PREFIX}beat_baseline": str(self.rule.beat_baseline).lower(),
            f"{DECISION_PREFIX}baseline": self.baseline_name or "",
            f"{DECISION_PREFIX}baseline_auroc": f"{b.champion_auroc:.6f}" if b else "",
            f"{DECISION_PREFIX}baseline_p_value": f"{b.p_value:.6g}" if b else "",
            f"{DECISION_PREFIX}test_method": (c or b).method if (c or b) else "",
            f"{DECISION_PREFIX}vgg_weights": self.vgg_weights,
            f"{DECISION_PREFIX}decision": self.outcome,
            f"{DECISION_PREFIX}summary": self.summary,
            f"{DECISION_PREFIX}rule": self.rule.summary,
            f"{DECISION_PREFIX}gate": self.rule.gate,
            f"{DECISION_PREFIX}alpha": f"{self.rule.alpha:g}",
            f"{DECISION_PREFIX}challenger_auroc": f"{self.challenger_auroc:.6f}",
            f"{DECISION_PREFIX}challenger_data_version": self.data_version,
            f"{DECISION_PREFIX}champion_version": champion.version if champion else "",
            f"{DECISION_PREFIX}champion_auroc": f"{champion.auroc:.6f}" if champion else "",
            f"{DECISION_PREFIX}champion_data_version": champion.data_version if champion else "",
            f"{DECISION_PREFIX}champion_rescored": str(bool(champion and champion.rescored)).lower(),
            f"{DECISION_PREFIX}auroc_difference": f"{c.difference:.6f}" if c else "",
            f"{DECISION_PREFIX}difference_ci": f"[{c.ci_low:.6f}, {c.ci_high:.6f}] ({c.confidence:.0%})" if c else "",
            f"{DECISION_PREFIX}p_value": f"{c.p_value:.6g}" if c else "",
            f"{DECISION_PREFIX}delong_z": f"{c.z:.6g}" if c else "",
        }

    def markdown(self) -> str:
        """The Prefect artifact: the verdict, then both figures and the test as a table."""
        c, champion = self.comparison, self.champion
        rows = [("outcome", self.outcome), ("rule", self.rule.summary),
                ("challenger", f"v{self.version}: AUROC {self.challenger_auroc:.4f} on data {self.data_version}")]
        if champion is not None:
            rows.append(("champion", f"v{champion.version}: AUROC {champion.auroc:.4f}"
                                     f"{' (re-scored on this test set)' if champion.rescored else ''}"))
        if c is not None:
            rows += [("AUROC difference", f"{c.difference:+.4f}"),
                     (f"{c.confidence:.0%} CI", f"{c.ci_low:+.4f} to {c.ci_high:+.4f}"),
                     ("H0", f"difference ≤ {c.null_difference:g}"), (f"{c.method} z", f"{c.z:.3f}"),
                     ("one-sided p", f"{c.p_value:.4g}"), ("test images", f"{c.n_normal} normal, {c.n_abnormal} abnormal")]
        if self.baseline is not None:
            b = self.baseline
            rows += [(f"{self.baseline_name} baseline", f"AUROC {b.champion_auroc:.4f}; difference {b.difference:+.4f}, "
                                                        f"one-sided p {b.p_value:.4g}")]
        if "random" in self.vgg_weights:
            rows.append(("VGG19 weights", f"{self.vgg_weights}: random, not the paper's perceptual space"))
        table = "\n".join(f"| {k} | {v} |" for k, v in rows)
        return f"## Promotion decision\n\n{self.summary}\n\n| | |\n|---|---|\n{table}\n"


def decide(
    challenger_auroc: float, comparison: PairedAUROC | None, rule: GateRule, baseline: PairedAUROC | None = None
) -> Outcome:
    """The gate itself: the floor, then the best baseline, then the paired test against the champion
    (a first version needs only the floor and the baseline)."""
    if challenger_auroc < rule.auroc_floor:
        return "rejected: below floor"
    if rule.beat_baseline and baseline is not None and not baseline.p_value < rule.alpha:
        return "rejected: does not beat baseline"
    if comparison is None or comparison.p_value < rule.alpha:
        return "promoted"
    return "kept champion"


def promote_version(
    model_name: str,
    version: str | int,
    test_scores: ScoredSet,
    data_version: str,
    *,
    rule: GateRule,
    score_champion: Callable[[str], ScoredSet],
    client: MlflowClient | None = None,
    baselines: dict[str, list[float]] | None = None,
    vgg_weights: str = "",
) -> PromotionDecision:
    """Make `version` the challenger and move `champion` to it if it passes the gate.

    `test_scores` are the challenger's per-image scores on this data version's test split (stored in
    its run); `score_champion(model_uri)` scores another version on the same split, called only when
    that version has no stored scores for this data version. `baselines` are the pixel baselines'
    scores of the same images, in the same order; `vgg_weights` the challenger's VGG source.
    """
    client, version = client or MlflowClient(), str(version)
    labels, scores = test_scores.labels, test_scores.scores
    if not all(map(math.isfinite, scores)) or not 0 < sum(labels) < len(labels):
        raise ValueError(
            f"{model_name} v{version}: the test scores are not finite or cover one class only; "
            "refusing to register a decision on them"
        )
    test_auroc = float(roc_auc_score(labels, scores))
    run_id = client.get_model_version(model_name, version).run_id
    if run_id:
        log_scores(client, run_id, data_version, test_scores)
    client.set_model_version_tag(model_name, version, TAG_AUROC, f"{test_auroc:.6f}")
    client.set_model_version_tag(model_name, version, TAG_DATA_VERSION, data_version)
    client.set_registered_model_alias(model_name, CHALLENGER, version)
    baseline_name, baseline = _against_best_baseline(test_scores, baselines or {}, rule)
    champion = _champion(client, model_name)
    for _ in range(MAX_DECISIONS):
        figure, comparison = _compare(client, champion, test_scores, data_version, rule, score_champion) if champion else (None, None)
        decision = PromotionDecision(
            model_name=model_name, version=version, outcome=decide(test_auroc, comparison, rule, baseline),
            challenger_auroc=test_auroc, data_version=data_version, champion=figure, comparison=comparison, rule=rule,
            baseline_name=baseline_name, baseline=baseline, vgg_weights=vgg_weights,
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


def _groups(scored: ScoredSet) -> np.ndarray | None:
    return np.asarray(scored.groups) if scored.groups else None


def _against_best_baseline(
    challenger: ScoredSet, baselines: dict[str, list[float]], rule: GateRule
) -> tuple[str | None, PairedAUROC | None]:
    """The challenger against the baseline with the highest AUROC on the same images (H0: not better)."""
    if not baselines:
        return None, None
    name = max(baselines, key=lambda b: roc_auc_score(challenger.labels, baselines[b]))
    return name, paired_delong(challenger.labels, challenger.scores, baselines[name], 0.0, rule.alpha, _groups(challenger))


def _champion(client: MlflowClient, model_name: str) -> ModelVersion | None:
    """Read through the model's alias map: a missing alias is an error code that differs by store."""
    version = client.get_registered_model(model_name).aliases.get(CHAMPION)
    return client.get_model_version(model_name, version) if version is not None else None


def _version_of(model_version: ModelVersion | None) -> str | None:
    return str(model_version.version) if model_version else None


def _compare(
    client: MlflowClient, champion: ModelVersion, challenger: ScoredSet, data_version: str, rule: GateRule,
    score_champion: Callable[[str], ScoredSet],
) -> tuple[ChampionFigure, PairedAUROC]:
    """The paired test on this data version's test images: the champion's stored scores, else a re-score
    (kept in the champion's run, so the next challenger on this data needs none)."""
    theirs = load_scores(client, champion.run_id, data_version)
    rescored = theirs is None
    if theirs is None:
        theirs = score_champion(f"models:/{champion.name}/{champion.version}")
        if champion.run_id:
            log_scores(client, champion.run_id, data_version, theirs)
    labels, ours, theirs_aligned = aligned(challenger, theirs)
    comparison = paired_delong(labels, ours, theirs_aligned, rule.null_difference, rule.alpha, _groups(challenger))
    figure = ChampionFigure(
        version=str(champion.version), auroc=comparison.champion_auroc,
        data_version=champion.tags.get(TAG_DATA_VERSION) or "unknown", rescored=rescored,
    )
    return figure, comparison


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


@task(name="promote-model", cache_policy=NO_CACHE)
def promote_model(
    model_name: str,
    version: str,
    test_scores: ScoredSet,
    data_version: str,
    rule: GateRule,
    score_champion: Callable[[str], ScoredSet],
    baselines: dict[str, list[float]] | None = None,
    vgg_weights: str = "",
) -> PromotionDecision:
    """`promote_version` under a one-slot global concurrency limit per model: runs that finish
    together (other processes, other machines) take turns at the champion alias."""
    limit = ensure_promotion_limit(model_name)
    with concurrency(limit, occupy=1, strict=True, timeout_seconds=PROMOTION_WAIT_S):
        decision = promote_version(
            model_name, version, test_scores, data_version, rule=rule, score_champion=score_champion,
            baselines=baselines, vgg_weights=vgg_weights,
        )
    get_run_logger().info(decision.summary)
    create_markdown_artifact(
        decision.markdown(),
        key=f"promotion-{re.sub(r'[^a-z0-9-]', '-', model_name.lower())}",  # artifact keys: [a-z0-9-]
        description=f"{model_name} v{version}",
    )
    return decision
