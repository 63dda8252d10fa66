"""Metrics of anomaly scores against labels, and the operating-threshold rule.

Plain functions (no Prefect, no MLflow). Labels are 1/True for abnormal (or the manifest strings
`normal`/`abnormal`); higher scores mean more anomalous, as `model.scoring.score_images` returns them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from pydantic import BaseModel
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from data_layer.manifest import ABNORMAL, LABELS

FIXED_SPECIFICITY = 0.95


class Evaluation(BaseModel):
    """Test-set metrics of one model. `auroc_ci_*` is a 95% bootstrap percentile interval that
    resamples patients (groups) where the test set names them, images otherwise.
    `sensitivity_at_95_specificity` uses a threshold fitted on these same test scores: optimistic,
    a figure for comparing models, not what serving does (see `OperatingPoint`)."""

    auroc: float
    auprc: float
    sensitivity_at_95_specificity: float
    auroc_ci_low: float
    auroc_ci_high: float
    n_normal: int
    n_abnormal: int
    n_groups: int = 0
    """Patients resampled by the interval; equal to the image count when each image is its own."""

    def as_mlflow_metrics(self, prefix: str = "test_") -> dict[str, float]:
        """The figures as MLflow metric names (`test_auroc`, ...)."""
        return {f"{prefix}{key}": float(value) for key, value in self.model_dump().items()}


class OperatingPoint(BaseModel):
    """Sensitivity and specificity on the test split at the registered threshold: what serving does
    by default (the threshold was fitted on validation or training normals, never on test)."""

    threshold: float
    sensitivity: float
    specificity: float

    @classmethod
    def of(cls, labels: Sequence | np.ndarray, scores: Sequence | np.ndarray, threshold: float) -> OperatingPoint:
        y, flagged = binary_labels(labels), np.asarray(scores, dtype=np.float64) > threshold
        return cls(threshold=threshold, sensitivity=float(flagged[y == 1].mean()), specificity=float((~flagged[y == 0]).mean()))


def binary_labels(labels: Sequence | np.ndarray) -> np.ndarray:
    """1 for abnormal, 0 for normal, from bools/0-1 ints or the manifest's label strings."""
    array = np.asarray(labels)
    if array.dtype.kind in "OUS":
        unknown = sorted(set(array.astype(str)) - set(LABELS))
        if unknown:
            raise ValueError(f"labels must be {LABELS}; got {unknown}")
        return (array.astype(str) == ABNORMAL).astype(int)
    if not np.isin(array, (0, 1)).all():
        raise ValueError("numeric labels must be 0 (normal) or 1 (abnormal)")
    return array.astype(int)


def evaluate_scores(
    labels: Sequence | np.ndarray, scores: Sequence | np.ndarray, seed: int = 0, n_bootstrap: int = 1000,
    groups: Sequence | np.ndarray | None = None,
) -> Evaluation:
    """AUROC, AUPRC and sensitivity at 95% specificity, with a bootstrap CI on the AUROC.

    The CI resamples whole patients when `groups` names them (images of one patient are correlated,
    and an interval over images is too narrow), images otherwise; either way stratified (patients
    with an abnormal image apart from the others), so every resample keeps both classes.
    """
    y, s = binary_labels(labels), np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape:
        raise ValueError(f"{len(y)} labels but {len(s)} scores")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values: the model diverged or an input is broken")
    n_abnormal = int(y.sum())
    if n_abnormal == 0 or n_abnormal == len(y):
        raise ValueError("AUROC needs both normal and abnormal test images; the test split has only one class")
    cluster = group_codes(groups, len(y))
    low, high = cluster_bootstrap_auroc_ci(y, s, cluster, np.random.default_rng(seed), n_bootstrap)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return Evaluation(
        auroc=float(roc_auc_score(y, s)),
        auprc=float(average_precision_score(y, s)),
        sensitivity_at_95_specificity=float(tpr[fpr <= 1.0 - FIXED_SPECIFICITY].max()),
        auroc_ci_low=low,
        auroc_ci_high=high,
        n_normal=len(y) - n_abnormal,
        n_abnormal=n_abnormal,
        n_groups=int(cluster.max()) + 1,
    )


def group_codes(groups: Sequence | np.ndarray | None, n: int) -> np.ndarray:
    """0..G-1 per image in order of first appearance (so singletons keep the image order); every
    image its own group when `groups` is None."""
    if groups is None:
        return np.arange(n)
    codes = pd.factorize(np.asarray(groups))[0]
    if len(codes) != n:
        raise ValueError(f"{n} images but {len(codes)} group names")
    return codes


def cluster_bootstrap_auroc_ci(
    y: np.ndarray, s: np.ndarray, cluster: np.ndarray, rng: np.random.Generator, n: int
) -> tuple[float, float]:
    """95% percentile interval of the AUROC over `n` resamples of whole clusters (0..G-1 per image),
    drawn separately among clusters without and with an abnormal image. All resamples at once: a
    resample is a count per cluster, and its AUROC the count-weighted Mann-Whitney statistic (ties
    one half). With one image per cluster this is the stratified per-image bootstrap."""
    n_clusters = int(cluster.max()) + 1
    has_abnormal = np.zeros(n_clusters, bool)
    has_abnormal[cluster[y == 1]] = True
    counts = np.zeros((n, n_clusters))
    for stratum in (np.flatnonzero(~has_abnormal), np.flatnonzero(has_abnormal)):
        draws = stratum[rng.integers(0, len(stratum), (n, len(stratum)))]
        np.add.at(counts, (np.arange(n)[:, None], draws), 1.0)
    abnormal, normal = s[y == 1], s[y == 0]
    wins = (abnormal[:, None] > normal[None, :]) + 0.5 * (abnormal[:, None] == normal[None, :])
    w_abnormal, w_normal = counts[:, cluster[y == 1]], counts[:, cluster[y == 0]]
    aurocs = ((w_abnormal @ wins) * w_normal).sum(axis=1) / (w_abnormal.sum(axis=1) * w_normal.sum(axis=1))
    low, high = np.percentile(aurocs, [2.5, 97.5])
    return float(low), float(high)


VAL_NORMALS = "normal validation images"
TRAIN_NORMALS = "normal training images (the dataset has no normal validation images)"


def operating_threshold(normal_scores: Sequence | np.ndarray, quantile: float) -> float:
    """The served model's alarm threshold: this quantile of the normal validation scores."""
    scores = np.asarray(normal_scores, dtype=np.float64)
    if scores.size == 0:
        raise ValueError("the threshold needs normal validation images; the val split has none")
    return float(np.quantile(scores, quantile))


def threshold_rule(quantile: float, source: str = VAL_NORMALS) -> str:
    """The threshold rule in words, for the model card and the registered model."""
    caveat = "" if source == VAL_NORMALS else "; the model has seen them, so expect more false alarms on new normals"
    return (
        f"anomaly if score > the {quantile:.3g} quantile of the scores of {source} "
        f"(expected false-alarm rate on normal images ≈ {1 - quantile:.1%}{caveat})"
    )
