"""Metrics of anomaly scores against labels, and the operating-threshold rule.

Plain functions (no Prefect, no MLflow). Labels are 1/True for abnormal (or the manifest strings
`normal`/`abnormal`); higher scores mean more anomalous, as `model.scoring.score_images` returns them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from data_layer.manifest import ABNORMAL, LABELS

FIXED_SPECIFICITY = 0.95


class Evaluation(BaseModel):
    """Test-set metrics of one model; `auroc_ci_*` is a stratified-bootstrap 95% percentile interval."""

    auroc: float
    auprc: float
    sensitivity_at_95_specificity: float
    auroc_ci_low: float
    auroc_ci_high: float
    n_normal: int
    n_abnormal: int

    def as_mlflow_metrics(self, prefix: str = "test_") -> dict[str, float]:
        """The figures as MLflow metric names (`test_auroc`, ...)."""
        return {f"{prefix}{key}": float(value) for key, value in self.model_dump().items()}


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
    labels: Sequence | np.ndarray, scores: Sequence | np.ndarray, seed: int = 0, n_bootstrap: int = 1000
) -> Evaluation:
    """AUROC, AUPRC and sensitivity at 95% specificity, with a bootstrap CI on the AUROC.

    The CI resamples normals and abnormals separately (stratified), so every resample keeps the
    test set's class balance and AUROC is always defined.
    """
    y, s = binary_labels(labels), np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape:
        raise ValueError(f"{len(y)} labels but {len(s)} scores")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values: the model diverged or an input is broken")
    n_abnormal = int(y.sum())
    if n_abnormal == 0 or n_abnormal == len(y):
        raise ValueError("AUROC needs both normal and abnormal test images; the test split has only one class")
    low, high = _bootstrap_auroc_ci(s[y == 0], s[y == 1], np.random.default_rng(seed), n_bootstrap)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return Evaluation(
        auroc=float(roc_auc_score(y, s)),
        auprc=float(average_precision_score(y, s)),
        sensitivity_at_95_specificity=float(tpr[fpr <= 1.0 - FIXED_SPECIFICITY].max()),
        auroc_ci_low=low,
        auroc_ci_high=high,
        n_normal=len(y) - n_abnormal,
        n_abnormal=n_abnormal,
    )


def _bootstrap_auroc_ci(
    normal: np.ndarray, abnormal: np.ndarray, rng: np.random.Generator, n: int
) -> tuple[float, float]:
    """All resamples at once: AUROC per row from the Mann-Whitney rank sum (ties count one half)."""
    normal_rows = normal[rng.integers(0, len(normal), (n, len(normal)))]
    abnormal_rows = abnormal[rng.integers(0, len(abnormal), (n, len(abnormal)))]
    resampled = np.concatenate([normal_rows, abnormal_rows], axis=1)
    abnormal_ranks = rankdata(resampled, axis=1)[:, len(normal) :].sum(axis=1)
    aurocs = (abnormal_ranks - len(abnormal) * (len(abnormal) + 1) / 2) / (len(normal) * len(abnormal))
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
