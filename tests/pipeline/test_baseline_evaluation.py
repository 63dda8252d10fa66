"""Baselines in the evaluation stage: fitted on the training normals only, scored on the test
split, logged as metrics, shown in the model card, with a warning when the DPA does not beat them."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from sklearn.metrics import roc_auc_score

import tasks.training.baseline_evaluation as baseline_evaluation
from model.baselines import fit_baselines
from model.dpa import DPA
from tasks.training.baseline_evaluation import baseline_evaluations, baseline_warning
from tasks.training.evaluation import evaluate
from tasks.training.evaluation_report import model_card
from tasks.training.metrics import Evaluation, threshold_rule
from tests.pipeline.conftest import RES, run_config
from tests.pipeline.test_evaluation import _dataset


def test_baselines_are_fitted_on_the_training_normals_only(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _dataset()
    seen: list[torch.Tensor] = []

    def spy(images: torch.Tensor) -> object:
        seen.append(images.clone())
        return fit_baselines(images)

    monkeypatch.setattr(baseline_evaluation, "fit_baselines", spy)
    result = baseline_evaluations(data, RES)
    train_normals = data.subset(split="train", label="normal").images
    assert len(seen) == 1 and torch.equal(seen[0], train_normals)
    # each fitted image is a training normal; no test or validation image is among them
    others = data.images[torch.tensor((data.manifest["split"] != "train").to_numpy())]
    assert not any(torch.equal(fitted, other) for fitted in seen[0] for other in others)
    test = data.subset(split="test")
    expected = fit_baselines(train_normals).score(test.images)
    for name, e in result.items():
        assert e.auroc == pytest.approx(roc_auc_score(test.labels.numpy(), expected[name]))
        assert e.auroc_ci_low <= e.auroc <= e.auroc_ci_high
    assert result["pca"].auroc > 0.9 and result["mean_image"].auroc > 0.9  # stripes are far from smooth blobs


def test_larger_images_are_centre_cropped_like_the_dpa_sees_them() -> None:
    data = _dataset()
    cropped = baseline_evaluations(data, RES // 2)
    centre = data.images[..., RES // 4 : RES // 4 + RES // 2, RES // 4 : RES // 4 + RES // 2]
    train = centre[torch.tensor(((data.manifest["split"] == "train") & (data.manifest["label"] == "normal")).to_numpy())]
    test_mask = torch.tensor((data.manifest["split"] == "test").to_numpy())
    scores = fit_baselines(train).score(centre[test_mask])["pca"]
    labels = (data.manifest["label"][test_mask.numpy()] == "abnormal").to_numpy()
    assert cropped["pca"].auroc == pytest.approx(roc_auc_score(labels, scores))


def _e(auroc: float) -> Evaluation:
    return Evaluation(auroc=auroc, auprc=0.5, sensitivity_at_95_specificity=0.1, auroc_ci_low=auroc - 0.05,
                      auroc_ci_high=min(auroc + 0.05, 1.0), n_normal=10, n_abnormal=10)


def test_warning_only_when_the_dpa_does_not_beat_the_best_baseline() -> None:
    baselines = {"pca": _e(0.83), "mean_image": _e(0.70)}
    assert baseline_warning(0.90, baselines) is None
    warning = baseline_warning(0.76, baselines)
    assert "does not beat the pca baseline" in warning and "0.760" in warning and "0.830" in warning
    assert baseline_warning(0.83, baselines) is not None  # a tie is not a win
    card = model_card(
        _e(0.76), model_name="m", data_version="v", dataset="d", threshold=1.0, threshold_rule=threshold_rule(0.95),
        vgg_source="random:seed=0", image_size=32, image_channels=1, feature_stats="train", dead_channels="r32 3/256",
        baselines=baselines,
    )
    assert "| DPA (this model) | 0.7600 |" in card and "0.8300 (0.7800–0.8800)" in card
    assert "does not beat the pca baseline" in card and "feature statistics: train" in card
    assert "no weight (they never fire on the statistics' images; dead of all, per layer): r32 3/256" in card


def test_evaluate_logs_baseline_metrics_and_card(mlflow_store: str, tiny_dpa: DPA) -> None:
    data = _dataset()
    with mlflow.start_run() as run:
        result = evaluate.fn(tiny_dpa, data, run_config(), "data-v1", run.info.run_id)
    assert set(result.baselines) == {"pca", "mean_image"}
    logged = MlflowClient().get_run(run.info.run_id).data.metrics
    for name, e in result.baselines.items():
        assert logged[f"test_baseline_{name}_auroc"] == pytest.approx(e.auroc)
        assert logged[f"test_baseline_{name}_auroc_ci_low"] == pytest.approx(e.auroc_ci_low)
    card_path = MlflowClient().download_artifacts(run.info.run_id, "evaluation/model_card.md")
    card = open(card_path).read()
    assert "## Baselines" in card and f"{result.baselines['pca'].auroc:.4f}" in card
    assert np.isfinite(result.metrics.auroc)


def test_metrics_table_and_console_line_show_the_baselines_and_the_warning() -> None:
    from dataclasses import asdict

    from tasks.training.summary import TrainingSummary, baseline_line, baseline_rows

    warning = baseline_warning(0.76, {"pca": _e(0.83)})
    summary = TrainingSummary(
        run_id="r", experiment_id="e", model_name="m", version="1", data_version="v", auroc=0.76,
        auroc_ci=(0.7, 0.8), promoted=False, decision="kept", baseline_warning=warning,
        baselines={"pca": {"auroc": 0.83, "ci_low": 0.78, "ci_high": 0.88}},
    )
    assert baseline_rows(summary) == [
        {"metric": "baseline pca test AUROC", "value": "0.8300 [0.7800, 0.8800]"},
        {"metric": "warning", "value": warning},
    ]
    line = baseline_line(asdict(summary))
    assert line.startswith("test AUROC: DPA 0.760; baselines pca 0.830\nWARNING: the DPA")
