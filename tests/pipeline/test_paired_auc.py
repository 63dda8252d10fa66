"""The paired DeLong test: a hand-worked example, the published aSAH example of pROC, the 1988 definition,
and a paired bootstrap."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from tasks.registry.paired_auc import delong_covariance, paired_delong


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


ASAH = Path(__file__).resolve().parents[1] / "data" / "asah.csv"  # see tests/data/README.md


@pytest.mark.parametrize(
    ("first", "second", "z", "p", "ci_low", "ci_high"),
    [  # roc.test(r.first, r.second): two-sided z, p and the 95% interval of the difference, as pROC's tests expect them
        ("wfns", "s100b", 2.20898359144091, 0.0271757822291882, 0.0104061769564846, 0.174214419249478),
        ("wfns", "ndka", 2.79777591868904, 0.00514557970691098, 0.0634011709339876, 0.3600405634833566),
        ("ndka", "s100b", -1.39077002573558, 0.164295175223054, None, None),
    ],
)
def test_reproduces_proc_on_the_published_asah_example(first: str, second: str, z: float, p: float,
                                                       ci_low: float | None, ci_high: float | None) -> None:
    """The worked example of pROC's `roc.test` (Robin et al. 2011) on the aSAH data of Turck et al. (2010):
    our one-sided test at α = 0.025 has the same z, twice its p is pROC's two-sided p, and its 1 − 2α
    interval is pROC's 95% interval."""
    data = pd.read_csv(ASAH)
    assert (len(data), int(data.poor_outcome.sum())) == (113, 41)
    result = paired_delong(data.poor_outcome.to_numpy(), data[first].to_numpy(), data[second].to_numpy(), alpha=0.025)
    assert result.z == pytest.approx(z, rel=1e-10)
    assert 2 * min(result.p_value, 1 - result.p_value) == pytest.approx(p, rel=1e-9)
    if ci_low is not None:
        assert (result.ci_low, result.ci_high) == (pytest.approx(ci_low, rel=1e-9), pytest.approx(ci_high, rel=1e-9))


def test_reproduces_proc_variances_on_asah() -> None:
    """`var(roc(...))` (DeLong) for each marker, as pROC's test-var.R expects it; AUROCs as pROC prints them."""
    data = pd.read_csv(ASAH)
    aurocs, covariance = delong_covariance(data.poor_outcome.to_numpy(), data[["wfns", "ndka", "s100b"]].to_numpy().T)
    np.testing.assert_allclose(np.diag(covariance), [0.00146991470882363, 0.0031908105493913, 0.00266868245717244], rtol=1e-10)
    np.testing.assert_allclose(aurocs, [0.8237, 0.6120, 0.7314], atol=5e-5)
