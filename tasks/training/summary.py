"""What a person reads of a training run: the summary the flow returns and the CLI prints, its
console lines and the Prefect artifacts (metrics table, MLflow link), with the baselines and the
seed spread beside the DPA's figures."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from prefect.artifacts import create_link_artifact, create_table_artifact

from tasks.config import RunConfig
from tasks.training.evaluation import ModelEvaluation
from tasks.training.evaluation_report import PER_IMAGE_INTERVAL, interval_name

if TYPE_CHECKING:
    from mlflow.entities import RunInfo

    from tasks.registry.promotion import PromotionDecision
    from tasks.training.runs import Trained


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
    auroc_ci_method: str = PER_IMAGE_INTERVAL
    """What the interval resampled: patients where the test set names them (see interval_name)."""

    @classmethod
    def of(cls, run: RunInfo, cfg: RunConfig, data_version: str, trained: Trained, decision: PromotionDecision) -> TrainingSummary:
        metrics = trained.evaluation.metrics
        return cls(
            run_id=run.run_id, experiment_id=run.experiment_id, model_name=cfg.registry.model_name,
            version=decision.version, data_version=data_version, auroc=metrics.auroc,
            auroc_ci=(metrics.auroc_ci_low, metrics.auroc_ci_high), promoted=decision.promoted,
            decision=decision.summary, baselines=baseline_summary(trained.evaluation),
            baseline_warning=trained.evaluation.baseline_warning, seeds=trained.seeds,
            auroc_ci_method=interval_name(metrics),
        )


def publish(summary: TrainingSummary, tracking_url: str) -> None:
    """Results a person reads in the Prefect UI (the gate and the promotion task publish their own)."""
    create_table_artifact(
        [{"metric": "test AUROC", "value": f"{summary.auroc:.4f}"},
         {"metric": "AUROC 95% CI", "value": f"[{summary.auroc_ci[0]:.4f}, {summary.auroc_ci[1]:.4f}], {summary.auroc_ci_method}"},
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


def seed_rows(seeds: dict[str, object] | None) -> list[dict[str, str]]:
    if not seeds:
        return []
    per_seed = ", ".join(f"{seed}: {auroc:.4f}" for seed, auroc in seeds["per_seed_auroc"].items())
    return [{"metric": f"test AUROC over {len(seeds['per_seed_auroc'])} seeds", "value": f"{seeds['mean']:.4f} ± {seeds['std']:.4f} ({per_seed})"},
            {"metric": "registered seed", "value": f"{seeds['registered_seed']} by {seeds['rule']}"}]
