"""The training flow's evaluation stage: score the test split, set the threshold, log it all to the run.

The pieces are plain functions elsewhere (`tasks.training.metrics`, `tasks.training.baseline_evaluation`,
`tasks.training.evaluation_report`), so tests call them without a Prefect server or an MLflow run.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.utils.time import get_current_time_millis
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel
from sklearn.metrics import roc_auc_score

from data_layer.manifest import ANOMALY_TYPE, GROUP, PATH
from data_layer.preprocessing import PreprocessedDataset
from model.dpa import DPA
from model.scoring import anomaly_maps, score_images
from tasks.training.baseline_evaluation import baseline_evaluations, baseline_metrics, baseline_test_scores, baseline_warning
from tasks.training.evaluation_report import evaluation_artifacts, model_card
from tasks.training.metrics import (
    TRAIN_NORMALS,
    VAL_NORMALS,
    Evaluation,
    OperatingPoint,
    evaluate_scores,
    operating_threshold,
    threshold_rule,
)

if TYPE_CHECKING:  # tasks.config imports the GX gate: seconds, only needed by type checkers here
    from tasks.config import RunConfig

log = logging.getLogger(__name__)


class ModelEvaluation(BaseModel):
    """What the evaluation stage hands to registration: the test metrics and the operating threshold."""

    metrics: Evaluation
    threshold: float
    threshold_rule: str
    val_auroc: float | None = None
    baselines: dict[str, Evaluation] = {}

    operating_point: OperatingPoint | None = None
    """Test sensitivity and specificity at `threshold`: what serving does by default."""
    test_paths: list[str] = []
    test_labels: list[int] = []
    test_groups: list[str] = []
    test_scores: list[float] = []
    """Per-image test scores (manifest paths, 1 = abnormal, patient groups): the paired promotion gate compares them."""
    baseline_scores: dict[str, list[float]] = {}
    """Each pixel baseline's per-image test scores, in the same order: the gate's baseline check."""
    normal_scores: list[float] = []
    """The scores the threshold was set on: the version's reference distribution (drift, specificity)."""
    normal_source: str = VAL_NORMALS
    threshold_quantile: float = 0.95

    @property
    def val_normal_loss(self) -> float | None:
        """The mean loss (score) of the normal validation images: held out from training."""
        return sum(self.normal_scores) / len(self.normal_scores) if self.normal_source == VAL_NORMALS else None

    @property
    def baseline_warning(self) -> str | None:
        return baseline_warning(self.metrics.auroc, self.baselines)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(dpa: DPA, data: PreprocessedDataset, cfg: RunConfig, data_version: str, run_id: str) -> ModelEvaluation:
    """Score the test split, set the threshold on the normal validation images (the training
    normals when there are none, said in the rule), and log metrics,
    plots and the model card to the run (explicit `run_id`: the task may run in another thread)."""
    batch, quantile = cfg.dpa.train.score_batch_size, cfg.registry.threshold_quantile
    test, val = data.subset(split="test"), data.subset(split="val")
    test_labels, test_scores = test.labels.numpy(), score_images(dpa, test.images, batch).numpy()
    val_labels, val_scores = val.labels.numpy(), score_images(dpa, val.images, batch).numpy()
    normal_scores, source = val_scores[val_labels == 0], VAL_NORMALS
    if normal_scores.size == 0:  # e.g. the paper's one-vs-rest protocol: every normal image is for training
        log.warning("no normal validation images: the threshold comes from the training normals")
        normal_scores = score_images(dpa, data.subset(split="train", label="normal").images, batch).numpy()
        source = TRAIN_NORMALS
    groups, seed = test.manifest[GROUP].astype(str).to_numpy(), cfg.dpa.train.seed
    threshold = operating_threshold(normal_scores, quantile)
    baseline_scores = baseline_test_scores(data, dpa.max_res)
    result = ModelEvaluation(
        metrics=evaluate_scores(test_labels, test_scores, seed=seed, groups=groups),
        threshold=threshold,
        threshold_rule=threshold_rule(quantile, source),
        operating_point=OperatingPoint.of(test_labels, test_scores, threshold),
        val_auroc=float(roc_auc_score(val_labels, val_scores)) if 0 < val_labels.sum() < len(val_labels) else None,
        baselines=baseline_evaluations(data, dpa.max_res, seed=seed, scores=baseline_scores),
        test_paths=test.manifest[PATH].astype(str).tolist(), test_labels=test_labels.astype(int).tolist(),
        test_groups=groups.tolist(), test_scores=test_scores.astype(float).tolist(),
        baseline_scores={name: s.astype(float).tolist() for name, s in baseline_scores.items()},
        normal_scores=normal_scores.astype(float).tolist(), normal_source=source, threshold_quantile=quantile,
    )
    if result.baseline_warning:
        log.warning(result.baseline_warning)
    _log_metrics(result, run_id)
    card = model_card(
        result.metrics, model_name=cfg.registry.model_name, data_version=data_version,
        dataset=cfg.description or cfg.dataset.importer, threshold=result.threshold,
        threshold_rule=result.threshold_rule, vgg_source=dpa.vgg_source,
        image_size=cfg.preprocess.size, image_channels=cfg.preprocess.channels,
        feature_stats=dpa.feature_stats, dead_channels=dpa.perceptual.dead_channel_summary(), baselines=result.baselines,
        operating_point=result.operating_point,
    )
    types = test.manifest[ANOMALY_TYPE]
    with tempfile.TemporaryDirectory() as tmp:
        anomaly_types = types.tolist() if (types != "").any() else None

        def maps_of(indices: list[int]) -> torch.Tensor:
            return anomaly_maps(dpa, test.images[indices], batch)

        evaluation_artifacts(result.metrics, test_labels, test_scores, test.images, maps_of, tmp, anomaly_types)
        (Path(tmp) / "model_card.md").write_text(card)
        MlflowClient().log_artifacts(run_id, tmp, "evaluation")
    return result


def _log_metrics(result: ModelEvaluation, run_id: str) -> None:
    point = result.operating_point
    figures = (result.metrics.as_mlflow_metrics() | {"operating_threshold": result.threshold}
               | {"test_sensitivity_at_threshold": point.sensitivity, "test_specificity_at_threshold": point.specificity}
               | baseline_metrics(result.baselines))
    if result.val_auroc is not None:
        figures["val_auroc"] = result.val_auroc
    now = get_current_time_millis()
    MlflowClient().log_batch(run_id, metrics=[Metric(key, value, now, 0) for key, value in figures.items()])
