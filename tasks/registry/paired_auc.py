"""Paired comparison of two AUROCs measured on the same images: DeLong's test for correlated ROC curves.

Neither scipy nor scikit-learn implements it, so this is the fast algorithm of Sun & Xu (2014,
"Fast implementation of DeLong's algorithm for comparing the areas under correlated receiver
operating characteristic curves", IEEE Signal Processing Letters 21(11)): the structural components
of DeLong, DeLong & Clarke-Pearson (1988) from three mid-rankings per model, O(n log n).
Pure numpy/scipy: no MLflow, no Prefect.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel
from scipy.stats import norm, rankdata


class PairedAUROC(BaseModel):
    """Challenger minus champion on the same images, with the one-sided test of H0: difference ≤ `null_difference`."""

    challenger_auroc: float
    champion_auroc: float
    difference: float
    standard_error: float
    ci_low: float
    ci_high: float
    confidence: float
    null_difference: float
    z: float
    p_value: float
    n_normal: int
    n_abnormal: int


def delong_covariance(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs (k,) and their DeLong covariance (k, k) for `scores` of shape (k, n); labels 1 = abnormal.

    Ties count one half (mid-ranks), as in the Mann-Whitney form of the AUROC."""
    y = np.asarray(labels).astype(bool)
    s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    if s.shape[1] != y.size:
        raise ValueError(f"{y.size} labels but {s.shape[1]} scores per model")
    m, n = int(y.sum()), int((~y).sum())
    if m < 2 or n < 2:
        raise ValueError(f"DeLong needs at least 2 abnormal and 2 normal images; got {m} and {n}")
    positives, negatives = s[:, y], s[:, ~y]
    combined = rankdata(np.concatenate([positives, negatives], axis=1), axis=1)
    within_pos, within_neg = rankdata(positives, axis=1), rankdata(negatives, axis=1)
    v10 = (combined[:, :m] - within_pos) / n  # per abnormal: fraction of normals scored below it
    v01 = 1.0 - (combined[:, m:] - within_neg) / m  # per normal: fraction of abnormals scored above it
    aurocs = v10.mean(axis=1)
    covariance = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return aurocs, covariance


def paired_delong(
    labels: np.ndarray, challenger: np.ndarray, champion: np.ndarray, null_difference: float = 0.0, alpha: float = 0.05
) -> PairedAUROC:
    """One-sided DeLong test that the challenger's AUROC exceeds the champion's by more than `null_difference`
    (0: superiority; a negative margin: non-inferiority). The interval is the two-sided 1 − 2α one, so
    its lower end is above `null_difference` exactly when p < α."""
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5); got {alpha}")
    y = np.asarray(labels).astype(int)
    aurocs, cov = delong_covariance(y, np.vstack([challenger, champion]))
    difference = float(aurocs[0] - aurocs[1])
    se = float(np.sqrt(max(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1], 0.0)))
    if se > 0:
        z = (difference - null_difference) / se
    else:  # identical rankings (or a degenerate set): the difference is known exactly
        z = 0.0 if np.isclose(difference, null_difference) else np.copysign(np.inf, difference - null_difference)
    half = float(norm.ppf(1 - alpha)) * se
    return PairedAUROC(
        challenger_auroc=float(aurocs[0]), champion_auroc=float(aurocs[1]), difference=difference,
        standard_error=se, ci_low=difference - half, ci_high=difference + half, confidence=1 - 2 * alpha,
        null_difference=null_difference, z=float(z), p_value=float(norm.sf(z)),
        n_normal=int((y == 0).sum()), n_abnormal=int(y.sum()),
    )
