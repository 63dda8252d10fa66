"""Patient-level uncertainty: several images of one patient are not independent.

On synthetic clustered scores with a known AUROC, the clustered intervals (Obuchowski's variance,
the cluster bootstrap) cover it about 95% of the time and today's per-image ones do not; the
clustered paired test keeps its level where the per-image DeLong test rejects too often; with one
image per patient, both reduce exactly to the per-image methods. On published clustered data, the
paired test gives the figures of the reference program of Obuchowski's department and of pROC.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm

from tasks.registry.paired_auc import delong_covariance, paired_delong
from tasks.training.metrics import cluster_bootstrap_auroc_ci, evaluate_scores

REPETITIONS = 1000
SHIFT, PATIENT_SD, IMAGE_SD = 1.0, 1.0, 0.5  # intra-patient correlation 0.8, as the demo's r ≈ 0.9
TRUE_AUROC = norm.cdf(SHIFT / np.sqrt(2 * (PATIENT_SD**2 + IMAGE_SD**2)))


def clustered_study(rng: np.random.Generator, patients: int = 100, models: int = 1):
    """Half the patients abnormal, 1-4 images each; a score = shift·label + patient effect + noise,
    each model with its own patient effects (how it sees that patient) and noise: equally good models."""
    sizes = rng.integers(1, 5, patients)
    group = np.repeat(np.arange(patients), sizes)
    labels = (group < patients // 2).astype(int)
    effect = rng.normal(0, PATIENT_SD, (models, patients))[:, group]
    scores = SHIFT * labels + effect + rng.normal(0, IMAGE_SD, (models, len(group)))
    return labels, scores, group


def test_one_image_per_patient_is_exactly_delong_and_the_per_image_bootstrap() -> None:
    rng = np.random.default_rng(0)
    labels, scores = rng.integers(0, 2, 80), rng.normal(size=(2, 80)).round(1)  # ties included
    auroc, cov = delong_covariance(labels, scores)
    auroc_g, cov_g = delong_covariance(labels, scores, groups=np.arange(80)[::-1])
    assert np.allclose(auroc, auroc_g, atol=0, rtol=1e-15) and np.allclose(cov, cov_g, rtol=1e-12, atol=0)
    a = evaluate_scores(labels, scores[0], seed=3)
    b = evaluate_scores(labels, scores[0], seed=3, groups=[f"p{i}" for i in range(80)])
    assert a.model_dump() == b.model_dump() and a.n_groups == 80


def test_the_clustered_covariance_is_obuchowskis_formula() -> None:
    """The rank-based computation against the definition, written out pair by pair (Obuchowski 1997,
    eq. 3-5), on clusters that mix normal and abnormal images, with ties."""
    labels = np.array([1, 0, 0, 1, 1, 0, 1, 0, 0, 1, 0, 1])
    group = np.array([0, 0, 1, 1, 2, 3, 3, 3, 4, 5, 5, 6])
    scores = np.array([[2.0, 1.0, 1.5, 1.5, 3.0, 0.5, 2.5, 2.0, 1.0, 0.7, 1.2, 2.2],
                       [1.0, 1.0, 0.2, 2.0, 2.5, 1.5, 0.1, 1.8, 0.4, 1.1, 1.1, 0.9]])
    x, y = labels == 1, labels == 0
    m, n, groups = x.sum(), y.sum(), np.unique(group)
    psi = lambda a, b: (a > b) + 0.5 * (a == b)  # noqa: E731
    theta = np.array([psi(s[x][:, None], s[y][None, :]).mean() for s in scores])
    v10 = np.array([[psi(s[i], s[y]).mean() for i in np.flatnonzero(x)] for s in scores])
    v01 = np.array([[psi(s[x], s[j]).mean() for j in np.flatnonzero(y)] for s in scores])
    a = np.array([[v[group[x] == g].sum() - (group[x] == g).sum() * t for g in groups] for v, t in zip(v10, theta)])
    b = np.array([[v[group[y] == g].sum() - (group[y] == g).sum() * t for g in groups] for v, t in zip(v01, theta)])
    i10, i01, i = len(np.unique(group[x])), len(np.unique(group[y])), len(groups)
    s10, s01, s11 = i10 / ((i10 - 1) * m) * a @ a.T, i01 / ((i01 - 1) * n) * b @ b.T, i / (i - 1) * a @ b.T
    expected = s10 / m + s01 / n + (s11 + s11.T) / (m * n)
    auroc, cov = delong_covariance(labels, scores, group)
    assert np.allclose(auroc, theta) and np.allclose(cov, expected, rtol=1e-12)


MITOTIC_FIGURES = Path(__file__).parents[1] / "data" / "mitotic_figures_scanner_a.csv"
# Printed by tests/data/mitotic_figures_reference.R (R 4.2.2): the Cleveland Clinic QHS program for
# Obuchowski (1997) clustered ROC data, cells grouped by region of interest ("roi") or each its own
# ("target_id"), and pROC 1.18.0's DeLong test (each cell its own).
REFERENCE = [line for line in (MITOTIC_FIGURES.parent / "mitotic_figures_reference.out").read_text().splitlines()
             if line.startswith(("QHS", "pROC"))]


def _reference_figures(line: str) -> tuple[int, int, str, dict[str, list[float]]]:
    """'QHS  observers 1 vs 2 by roi: auc a b var c d var_diff e p f' → (1, 2, 'roi', {'auc': [a, b], ...})."""
    head, _, figures = line.partition(": ")
    _, _, first, _, second, _, unit = head.split()
    named = re.findall(r"([a-z_]+)((?: [-+.\deE]+)+)", figures)
    return int(first), int(second), unit, {key: [float(v) for v in values.split()] for key, values in named}


@pytest.mark.parametrize("line", REFERENCE, ids=lambda line: line.partition(":")[0].replace(" ", "-").replace("--", "-"))
def test_the_clustered_paired_test_matches_the_reference_program(line: str) -> None:
    """Five pathologists' binary calls on 155 candidate mitotic figures in 38 regions of four slides
    (FDA's CC0 data, tests/data/README.md): regions hold both true and false figures, so every term of
    Obuchowski's covariance counts, and binary calls make almost every score a tie."""
    first, second, unit, expected = _reference_figures(line)
    cells = pd.read_csv(MITOTIC_FIGURES)
    scores = cells[[f"observer_{first}", f"observer_{second}"]].to_numpy(dtype=float).T
    groups = cells["roi"].to_numpy() if unit == "roi" else None
    auroc, cov = delong_covariance(cells["truth"], scores, groups)
    paired = paired_delong(cells["truth"], scores[0], scores[1], groups=groups)
    ours = {"auc": list(auroc), "var": [cov[0, 0], cov[1, 1]], "var_diff": [cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]],
            "z": [paired.z], "p": [2 * norm.sf(abs(paired.z))]}
    assert expected and all(np.allclose(ours[k], value, rtol=1e-10, atol=0) for k, value in expected.items()), (ours, expected)
    assert paired.n_groups == (38 if unit == "roi" else 155)


def _coverage(interval) -> float:
    rng = np.random.default_rng(2026)
    hits = 0
    for _ in range(REPETITIONS):
        labels, scores, group = clustered_study(rng)
        low, high = interval(labels, scores[0], group, rng)
        hits += low <= TRUE_AUROC <= high
    return hits / REPETITIONS


def _wald(groups_known: bool):
    def interval(labels, scores, group, rng):
        auroc, cov = delong_covariance(labels, scores, group if groups_known else None)
        half = 1.96 * np.sqrt(cov[0, 0])
        return auroc[0] - half, auroc[0] + half
    return interval


def _bootstrap(groups_known: bool):
    def interval(labels, scores, group, rng):
        cluster = group if groups_known else np.arange(len(labels))
        return cluster_bootstrap_auroc_ci(labels, scores, cluster, rng, 1000)  # as evaluate_scores
    return interval


@pytest.mark.parametrize("method", [_wald, _bootstrap], ids=["obuchowski", "cluster-bootstrap"])
def test_clustered_intervals_cover_the_true_auroc_and_per_image_ones_do_not(method) -> None:
    clustered, per_image = _coverage(method(True)), _coverage(method(False))
    assert 0.93 <= clustered <= 0.97, clustered
    assert per_image < 0.90, per_image


def test_the_clustered_paired_test_keeps_its_level_where_per_image_delong_does_not() -> None:
    """Two equally good models: a one-sided test at 5% may reject about 5% of the time."""
    rng = np.random.default_rng(7)
    rejected = {"clustered": 0, "per image": 0}
    for _ in range(REPETITIONS):
        labels, scores, group = clustered_study(rng, models=2)
        rejected["clustered"] += paired_delong(labels, scores[0], scores[1], groups=group).p_value < 0.05
        rejected["per image"] += paired_delong(labels, scores[0], scores[1]).p_value < 0.05
    assert rejected["clustered"] / REPETITIONS <= 0.07, rejected
    assert rejected["per image"] / REPETITIONS > 0.09, rejected  # 13.8%: the gate would promote on noise
