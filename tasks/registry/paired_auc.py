"""Paired comparison of two AUROCs measured on the same images: DeLong's test for correlated ROC
curves, and its clustered generalisation when images come in groups (several per patient).

Neither scipy nor scikit-learn implements either. The structural components (per abnormal image,
the fraction of normals scored below it; per normal, the fraction of abnormals above it) come from
three mid-rankings per model, as in the fast algorithm of Sun & Xu (2014, IEEE Signal Processing
Letters 21(11)). Their covariance is Obuchowski's (1997, "Nonparametric analysis of clustered ROC
curve data", Biometrics 53(2):567-578): components are summed per group and the groups, not the
images, are the independent units. With one image per group it is exactly the covariance of
DeLong, DeLong & Clarke-Pearson (1988). Images of one patient are correlated (the demo's test
images of one patient score at r ≈ 0.9), so treating them as independent makes p-values too small.
Pure numpy/scipy: no MLflow, no Prefect.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel
from scipy.stats import norm, rankdata

from tasks.training.metrics import group_codes


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
    n_groups: int = 0
    """Independent units of the test: patients (groups), or images when every image is its own."""
    method: str = "DeLong"


def delong_covariance(
    labels: np.ndarray, scores: np.ndarray, groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs (k,) and their covariance (k, k) for `scores` of shape (k, n); labels 1 = abnormal.

    `groups` (n,) names each image's patient: the clustered (Obuchowski) covariance; without it,
    every image is its own group, which is DeLong's. Ties count one half (mid-ranks)."""
    y = np.asarray(labels).astype(bool)
    s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    if s.shape[1] != y.size:
        raise ValueError(f"{y.size} labels but {s.shape[1]} scores per model")
    m, n = int(y.sum()), int((~y).sum())
    if m < 2 or n < 2:
        raise ValueError(f"DeLong needs at least 2 abnormal and 2 normal images; got {m} and {n}")
    cluster = group_codes(groups, y.size)
    positives, negatives = s[:, y], s[:, ~y]
    combined = rankdata(np.concatenate([positives, negatives], axis=1), axis=1)
    within_pos, within_neg = rankdata(positives, axis=1), rankdata(negatives, axis=1)
    v10 = (combined[:, :m] - within_pos) / n  # per abnormal: fraction of normals scored below it
    v01 = 1.0 - (combined[:, m:] - within_neg) / m  # per normal: fraction of abnormals scored above it
    aurocs = v10.mean(axis=1)
    n_groups = int(cluster.max()) + 1
    d10 = _per_group(v10, cluster[y], n_groups) - np.outer(aurocs, np.bincount(cluster[y], minlength=n_groups))
    d01 = _per_group(v01, cluster[~y], n_groups) - np.outer(aurocs, np.bincount(cluster[~y], minlength=n_groups))
    with_abnormal, with_normal = len(np.unique(cluster[y])), len(np.unique(cluster[~y]))
    if min(with_abnormal, with_normal) < 2:
        raise ValueError(f"the paired test needs abnormal and normal images from at least 2 groups each; "
                         f"got {with_abnormal} and {with_normal}")
    s10 = with_abnormal / ((with_abnormal - 1) * m) * d10 @ d10.T
    s01 = with_normal / ((with_normal - 1) * n) * d01 @ d01.T
    s11 = n_groups / (n_groups - 1) * d10 @ d01.T
    covariance = s10 / m + s01 / n + (s11 + s11.T) / (m * n)
    return aurocs, covariance


def _per_group(components: np.ndarray, cluster: np.ndarray, n_groups: int) -> np.ndarray:
    """Sum each model's per-image components within each group: (k, G)."""
    out = np.zeros((components.shape[0], n_groups))
    np.add.at(out, (slice(None), cluster), components)
    return out


def paired_delong(
    labels: np.ndarray, challenger: np.ndarray, champion: np.ndarray, null_difference: float = 0.0, alpha: float = 0.05,
    groups: np.ndarray | None = None,
) -> PairedAUROC:
    """One-sided test that the challenger's AUROC exceeds the champion's by more than `null_difference`
    (0: superiority; a negative margin: non-inferiority), DeLong's, or Obuchowski's clustered one when
    `groups` names each image's patient. The interval is the two-sided 1 − 2α one, so its lower end is
    above `null_difference` exactly when p < α."""
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5); got {alpha}")
    y = np.asarray(labels).astype(int)
    aurocs, cov = delong_covariance(y, np.vstack([challenger, champion]), groups)
    difference = float(aurocs[0] - aurocs[1])
    se = float(np.sqrt(max(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1], 0.0)))
    if se > 0:
        z = (difference - null_difference) / se
    else:  # identical rankings (or a degenerate set): the difference is known exactly
        z = 0.0 if np.isclose(difference, null_difference) else np.copysign(np.inf, difference - null_difference)
    half = float(norm.ppf(1 - alpha)) * se
    n_groups = len(y) if groups is None else len(np.unique(np.asarray(groups)))
    return PairedAUROC(
        challenger_auroc=float(aurocs[0]), champion_auroc=float(aurocs[1]), difference=difference,
        standard_error=se, ci_low=difference - half, ci_high=difference + half, confidence=1 - 2 * alpha,
        null_difference=null_difference, z=float(z), p_value=float(norm.sf(z)),
        n_normal=int((y == 0).sum()), n_abnormal=int(y.sum()), n_groups=n_groups,
        method="DeLong" if n_groups == len(y) else f"Obuchowski clustered ({n_groups} patients)",
    )
