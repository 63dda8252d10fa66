"""The paired DeLong test: a hand-worked example, the 1988 definition, and a paired bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from tasks.paired_auc import delong_covariance, paired_delong


def test_hand_worked_example() -> None:
    """Normals score (1, 2, 3) for both models; abnormals (2.5, 4, 5) for A and (1.5, 2.5, 4) for B.

    Structural components (DeLong et al. 1988): V10 (per abnormal, fraction of normals below it)
    A = (2/3, 1, 1), B = (1/3, 2/3, 1); V01 (per normal, fraction of abnormals above it) A = (1, 1, 2/3),
    B = (1, 2/3, 1/3). AUROCs 8/9 and 6/9, difference 2/9. The differences of the components,
    (1/3, 1/3, 0) and (0, 1/3, 1/3), each have sample variance 1/27, so var = 1/27/3 + 1/27/3 = 2/81,
    SE = √2/9, z = √2 and the one-sided p = Φ(−√2) ≈ 0.0786."""
    labels = np.array([0, 0, 0, 1, 1, 1])
    a = np.array([1, 2, 3, 2.5, 4, 5])
    b = np.array([1, 2, 3, 1.5, 2.5, 4])
    result = paired_delong(labels, a, b)
    assert result.challenger_auroc == pytest.approx(8 / 9) and result.champion_auroc == pytest.approx(6 / 9)
    assert result.difference == pytest.approx(2 / 9)
    assert result.standard_error == pytest.approx(math.sqrt(2) / 9)
    assert result.z == pytest.approx(math.sqrt(2))
    assert result.p_value == pytest.approx(0.07864960, abs=1e-7)
    assert result.ci_low == pytest.approx(2 / 9 - norm.ppf(0.95) * math.sqrt(2) / 9)
    assert result.confidence == pytest.approx(0.90)


def delong_by_definition(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong et al. (1988) literally: the kernel ψ over every abnormal × normal pair, O(k·m·n)."""
    positives, negatives = scores[:, labels == 1], scores[:, labels == 0]
    psi = (positives[:, :, None] > negatives[:, None, :]) + 0.5 * (positives[:, :, None] == negatives[:, None, :])
    v10, v01 = psi.mean(axis=2), psi.mean(axis=1)
    return v10.mean(axis=1), np.cov(v10) / positives.shape[1] + np.cov(v01) / negatives.shape[1]


def correlated_scores(n: int, shift: float, seed: int, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Labels and two models' scores sharing a per-image component (as two DPAs on the same images do)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1], n)
    shared = rng.normal(size=2 * n) + labels
    scores = np.vstack([shared + rng.normal(0, 0.6, 2 * n) + shift * labels, shared + rng.normal(0, 0.6, 2 * n)])
    return labels, np.round(scores, 1) if ties else scores


@pytest.mark.parametrize("ties", [False, True])
def test_fast_delong_equals_the_definition(ties: bool) -> None:
    labels, scores = correlated_scores(40, 0.3, seed=1, ties=ties)
    aurocs, cov = delong_covariance(labels, scores)
    expected_aurocs, expected_cov = delong_by_definition(labels, scores)
    np.testing.assert_allclose(aurocs, expected_aurocs, rtol=1e-12)
    np.testing.assert_allclose(cov, expected_cov, rtol=1e-10)
    np.testing.assert_allclose(aurocs, [roc_auc_score(labels, s) for s in scores], rtol=1e-12)


def test_standard_error_agrees_with_a_paired_bootstrap() -> None:
    """Resample images (stratified, the same images for both models): the spread of the AUROC
    difference matches DeLong's standard error."""
    labels, scores = correlated_scores(150, 0.2, seed=2)
    result = paired_delong(labels, scores[0], scores[1])
    rng = np.random.default_rng(0)
    normals, abnormals = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    differences = []
    for _ in range(2000):
        rows = np.concatenate([rng.choice(normals, normals.size), rng.choice(abnormals, abnormals.size)])
        y = labels[rows]
        differences.append(roc_auc_score(y, scores[0, rows]) - roc_auc_score(y, scores[1, rows]))
    assert np.std(differences, ddof=1) == pytest.approx(result.standard_error, rel=0.1)
    assert np.mean(differences) == pytest.approx(result.difference, abs=0.01)


def test_p_value_and_interval_tell_the_same_story() -> None:
    labels, scores = correlated_scores(100, 0.15, seed=3)
    for null in (-0.05, 0.0, 0.02, 0.2):
        result = paired_delong(labels, scores[0], scores[1], null_difference=null, alpha=0.05)
        assert (result.p_value < 0.05) == (result.ci_low > null)


def test_identical_models_are_not_significantly_different() -> None:
    labels, scores = correlated_scores(50, 0.0, seed=4)
    result = paired_delong(labels, scores[0], scores[0])
    assert result.difference == 0 and result.standard_error == 0 and result.p_value == 0.5


def test_too_few_images_of_a_class_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="at least 2 abnormal"):
        paired_delong(np.array([0, 0, 0, 1]), np.arange(4.0), np.arange(4.0))
