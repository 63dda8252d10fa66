"""Metrics on inputs with known answers, the bootstrap CI against a slow reference, the plots and
the model card, and the training flow's evaluation stage logging into a real MLflow run."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image
from sklearn.metrics import roc_auc_score

from data_layer.preprocessing import PreprocessedDataset
from model.dpa import DPA
from model.scoring import score_images
from tasks.training.evaluation import evaluate
from tasks.training.evaluation_report import evaluation_artifacts, model_card
from tasks.training.metrics import Evaluation, OperatingPoint, evaluate_scores, operating_threshold, threshold_rule
from tests.model_core.conftest import blob_images
from tests.pipeline.conftest import RES, run_config


def test_perfect_separation() -> None:
    e = evaluate_scores([0, 0, 0, 1, 1], [0.1, 0.2, 0.3, 0.8, 0.9])
    assert (e.auroc, e.auprc, e.sensitivity_at_95_specificity) == (1.0, 1.0, 1.0)
    assert 0.0 <= e.auroc_ci_low <= e.auroc_ci_high <= 1.0
    assert (e.n_normal, e.n_abnormal) == (3, 2)


def test_known_auroc_and_manifest_labels() -> None:
    e = evaluate_scores(["normal", "normal", "abnormal", "abnormal"], [0.1, 0.4, 0.35, 0.8])
    assert e.auroc == pytest.approx(0.75)
    assert e.auprc == pytest.approx(5 / 6)


def test_sensitivity_at_95_specificity() -> None:
    normal = np.arange(100.0)  # at most 5 normals may score above the threshold
    abnormal = np.array([200.0] * 4 + [94.5] * 3 + [50.0] * 3)
    e = evaluate_scores(np.r_[np.zeros(100), np.ones(10)], np.r_[normal, abnormal])
    assert e.sensitivity_at_95_specificity == pytest.approx(0.7)


def test_bootstrap_ci_matches_a_per_resample_reference() -> None:
    rng = np.random.default_rng(5)
    labels = np.r_[np.zeros(30, int), np.ones(12, int)]
    scores = np.round(np.r_[rng.normal(0, 1, 30), rng.normal(1, 1, 12)], 1)  # rounding makes ties
    e = evaluate_scores(labels, scores, seed=3, n_bootstrap=200)
    ref_rng = np.random.default_rng(3)
    normal_idx = ref_rng.integers(0, 30, (200, 30))
    abnormal_idx = ref_rng.integers(0, 12, (200, 12))
    reference = [
        roc_auc_score(np.r_[np.zeros(30), np.ones(12)], np.r_[scores[:30][n], scores[30:][a]])
        for n, a in zip(normal_idx, abnormal_idx)
    ]
    assert (e.auroc_ci_low, e.auroc_ci_high) == pytest.approx(tuple(np.percentile(reference, [2.5, 97.5])))
    assert e.auroc_ci_low < e.auroc < e.auroc_ci_high
    assert evaluate_scores(labels, scores, seed=3, n_bootstrap=200) == e


def test_uninformative_scores_give_a_ci_around_one_half() -> None:
    rng = np.random.default_rng(0)
    e = evaluate_scores(rng.integers(0, 2, 2000), rng.random(2000))
    assert e.auroc_ci_low < 0.5 < e.auroc_ci_high
    assert e.auroc_ci_high - e.auroc_ci_low < 0.06


@pytest.mark.parametrize(
    ("labels", "scores", "message"),
    [
        ([0, 0, 0], [0.1, 0.2, 0.3], "only one class"),
        (["normal", "sick"], [0.1, 0.2], "sick"),
        ([0, 2], [0.1, 0.2], "0 \\(normal\\) or 1"),
        ([0, 1], [0.1, float("nan")], "NaN"),
        ([0, 1, 1], [0.1, 0.2], "3 labels but 2 scores"),
    ],
)
def test_bad_inputs_are_refused(labels: list, scores: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        evaluate_scores(labels, scores)


def test_threshold_is_the_quantile_of_normal_scores() -> None:
    assert operating_threshold(np.arange(101.0), 0.95) == pytest.approx(95.0)
    assert "0.95 quantile" in threshold_rule(0.95)
    with pytest.raises(ValueError, match="no"):
        operating_threshold([], 0.95)


def test_artifacts_are_png_plots(tmp_path) -> None:
    images = torch.cat([blob_images(6, RES, seed=4), blob_images(6, RES, seed=5, anomalous=True)])
    labels, scores = [0] * 6 + [1] * 6, np.linspace(0, 1, 12)
    maps = torch.rand(12, RES, RES)
    e = evaluate_scores(labels, scores)
    paths = evaluation_artifacts(e, labels, scores, images, lambda idx: maps[idx], tmp_path / "out", anomaly_types=[""] * 6 + ["a", "b"] * 3)
    assert sorted(p.name for p in paths) == ["heatmaps.png", "roc_curve.png", "score_histogram.png", "score_histogram_by_type.png"]
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 100
    without_types = evaluation_artifacts(e, labels, scores, images, lambda idx: maps[idx], tmp_path / "plain")
    assert "score_histogram_by_type.png" not in {p.name for p in without_types}


def test_model_card_states_use_metrics_threshold_and_limits() -> None:
    e = Evaluation(auroc=0.91, auprc=0.8, sensitivity_at_95_specificity=0.5, auroc_ci_low=0.88, auroc_ci_high=0.94, n_normal=200, n_abnormal=100)
    card = model_card(
        e, model_name="dpa-x", data_version="abc123", dataset="phantoms", threshold=0.25,
        threshold_rule=threshold_rule(0.95), vgg_source="random:seed=0", image_size=32, image_channels=1,
    )
    for expected in ("# Model card: dpa-x", "`abc123`", "0.9100", "0.8800–0.9400", "0.95 quantile", "0.25",
                     "random:seed=0", "random, not ImageNet", "Not a medical device", "200 normal, 100 abnormal",
                     "stratified bootstrap over images", "fitted on these test scores (optimistic"):
        assert expected in card
    per_patient = model_card(
        e.model_copy(update={"n_groups": 120}), model_name="dpa-x", data_version="abc123", dataset="phantoms",
        threshold=0.25, threshold_rule=threshold_rule(0.95), vgg_source="imagenet", image_size=32, image_channels=1,
        operating_point=OperatingPoint(threshold=0.25, sensitivity=0.46, specificity=0.965),
    )
    assert "bootstrap over 120 patients" in per_patient
    assert "At this threshold, on the test split: sensitivity 0.4600, specificity 0.9650" in per_patient


def test_evaluate_stage_logs_metrics_plots_and_card(mlflow_store: str, tiny_dpa: DPA) -> None:
    data = _dataset()
    cfg = run_config()
    with mlflow.start_run() as run:
        result = evaluate.fn(tiny_dpa, data, cfg, "data-v1", run.info.run_id)
    val_normal = score_images(tiny_dpa, data.subset(split="val", label="normal").images).numpy()
    assert result.threshold == pytest.approx(np.quantile(val_normal, cfg.registry.threshold_quantile))
    assert result.metrics.n_abnormal == 8 and result.val_auroc is not None
    logged = MlflowClient().get_run(run.info.run_id).data.metrics
    assert logged["test_auroc"] == pytest.approx(result.metrics.auroc)
    assert logged["operating_threshold"] == pytest.approx(result.threshold)
    # the operating point is what serving does at the registered threshold, on the test split
    test = data.subset(split="test")
    flagged = score_images(tiny_dpa, test.images).numpy() > result.threshold
    labels = test.labels.numpy() == 1
    assert logged["test_sensitivity_at_threshold"] == pytest.approx(flagged[labels].mean())
    assert logged["test_specificity_at_threshold"] == pytest.approx((~flagged[~labels]).mean())
    assert result.test_groups == test.manifest["group"].astype(str).tolist()
    assert set(result.baseline_scores) == {"pca", "mean_image"} and len(result.baseline_scores["pca"]) == len(test)
    names = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/roc_curve.png", "evaluation/model_card.md", "evaluation/score_histogram_by_type.png"} <= names


def test_without_normal_validation_images_the_threshold_comes_from_the_training_normals(
    mlflow_store: str, tiny_dpa: DPA
) -> None:
    data = _dataset(val_normals=False)  # the paper's one-vs-rest protocol: all normals train
    cfg = run_config()
    with mlflow.start_run() as run:
        result = evaluate.fn(tiny_dpa, data, cfg, "data-v1", run.info.run_id)
    train_normal = score_images(tiny_dpa, data.subset(split="train", label="normal").images).numpy()
    assert result.threshold == pytest.approx(np.quantile(train_normal, cfg.registry.threshold_quantile))
    assert "normal training images" in result.threshold_rule


def _dataset(val_normals: bool = True) -> PreprocessedDataset:
    parts = [
        ("train", "normal", "", blob_images(8, RES, seed=9)),
        ("test", "normal", "", blob_images(8, RES, seed=10)),
        ("test", "abnormal", "stripes", blob_images(8, RES, seed=11, anomalous=True)),
        ("val", "normal", "", blob_images(8 if val_normals else 0, RES, seed=12)),
        ("val", "abnormal", "stripes", blob_images(2, RES, seed=13, anomalous=True)),
    ]
    rows = [
        {"path": f"{split}/{label}{i}.png", "label": label, "split": split, "group": f"{split}{label}{i}", "anomaly_type": kind}
        for split, label, kind, images in parts for i in range(len(images))
    ]
    return PreprocessedDataset(torch.cat([p[3] for p in parts]), pd.DataFrame(rows))
