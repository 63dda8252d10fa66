"""The score-drift statistics (tasks.monitoring.drift) on synthetic scores: calibrated on in-distribution
batches (where a plain binomial test is not), sensitive to a shift of the bulk and of the tail,
silent on a batch too small to judge."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from tasks.monitoring.drift import DRIFTED, IN_DISTRIBUTION, TOO_FEW, DriftLevels, drift_report, one_per_group

REFERENCE = np.random.default_rng(7).normal(1.0, 0.1, 200)
THRESHOLD = float(np.quantile(REFERENCE, 0.95))


def test_in_distribution_batches_alarm_at_most_alpha_where_a_binomial_test_would_not() -> None:
    """New reference and batch each time (each version has its own reference): the false-alarm
    rate stays under alpha; treating 1 − specificity as exact would alarm several times as often."""
    rng, levels, trials = np.random.default_rng(0), DriftLevels(alpha=0.05), 300
    alarms = naive = 0
    for _ in range(trials):
        reference, batch = rng.normal(1.0, 0.1, 200), rng.normal(1.0, 0.1, 1000)
        threshold = float(np.quantile(reference, 0.95))
        report = drift_report(batch, reference, threshold, levels)
        alarms += report.drifted
        naive += binomtest(int((batch > threshold).sum()), batch.size, 0.05, alternative="greater").pvalue < levels.alpha / 2
    assert alarms / trials <= levels.alpha + 0.02  # allowance for the noise of 300 trials
    assert naive / trials > 3 * levels.alpha


def test_an_in_distribution_batch_reads_as_such() -> None:
    report = drift_report(np.random.default_rng(1).normal(1.0, 0.1, 100), REFERENCE, THRESHOLD)
    assert report.verdict == IN_DISTRIBUTION and not report.drifted
    assert report.expected_above == pytest.approx(0.05) and report.n_reference == 200
    assert min(report.ks_pvalue, report.exceedance_pvalue) >= report.alpha / 2


def test_a_shifted_batch_drifts_on_both_tests() -> None:
    report = drift_report(np.random.default_rng(2).normal(1.1, 0.1, 100), REFERENCE, THRESHOLD)
    assert report.verdict == DRIFTED and report.drifted
    assert report.ks_pvalue < 1e-6 and report.exceedance_pvalue < 1e-6 and report.observed_above > 0.2
    assert "drifted" in report.summary() and f"{report.observed_above:.1%}" in report.summary()


def test_more_alarms_than_expected_drift_on_the_exceedance_test() -> None:
    """Most of the batch like the reference, but 20% of it just above the threshold instead of 5%:
    the exceedance test is the sharp one."""
    rng = np.random.default_rng(3)
    batch = np.concatenate([rng.choice(REFERENCE[REFERENCE <= THRESHOLD], 160), THRESHOLD + rng.uniform(0.01, 0.05, 40)])
    report = drift_report(batch, REFERENCE, THRESHOLD)
    assert report.drifted and report.observed_above == pytest.approx(0.2)
    assert report.exceedance_pvalue < report.alpha / 2 and report.exceedance_pvalue < report.ks_pvalue / 100


def test_a_batch_below_min_batch_gets_no_verdict() -> None:
    report = drift_report(np.full(29, 3.0), REFERENCE, THRESHOLD, DriftLevels(min_batch=30))
    assert report.verdict == TOO_FEW and not report.drifted and report.n == 29
    assert report.ks_pvalue is None and report.exceedance_pvalue is None and report.observed_above is None
    assert report.summary() == "score drift: no verdict, 29 scored images (fewer than 30)"


def test_bad_levels_and_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="alpha"):
        DriftLevels(alpha=0)
    with pytest.raises(ValueError, match="finite"):
        drift_report([1.0, float("nan")], REFERENCE, THRESHOLD)
    with pytest.raises(ValueError, match="non-empty reference"):
        drift_report([1.0], [], THRESHOLD)


def test_one_image_per_patient_keeps_the_false_alarm_rate_on_clustered_batches() -> None:
    """In-distribution batches of 30 patients × 8 images whose scores share a patient effect
    (correlation 0.8; every image's marginal is the reference's N(0, 1)): tested per image, the
    drift tests fire far above alpha = 0.01 (17% here); one image per patient keeps them below it."""
    rng = np.random.default_rng(3)
    reference = rng.normal(size=300)
    threshold = float(np.quantile(reference, 0.95))
    groups = np.repeat([f"p{k}" for k in range(30)], 8)
    alarms = {"per image": 0, "per patient": 0}
    repetitions = 400
    for _ in range(repetitions):
        scores = np.repeat(rng.normal(scale=0.8**0.5, size=30), 8) + rng.normal(scale=0.2**0.5, size=240)
        alarms["per image"] += drift_report(scores, reference, threshold).drifted
        alarms["per patient"] += drift_report(one_per_group(scores, groups), reference, threshold).drifted
    rates = {k: v / repetitions for k, v in alarms.items()}
    assert rates["per patient"] <= 0.02 and rates["per image"] >= 0.1, rates


def test_one_per_group_takes_each_groups_first_score_and_changes_nothing_without_clusters() -> None:
    np.testing.assert_array_equal(one_per_group([5.0, 1.0, 2.0, 3.0], ["b", "a", "b", "c"]), [5.0, 1.0, 3.0])
    np.testing.assert_array_equal(one_per_group([0.3, 0.1, 0.2], ["x", "y", "z"]), [0.3, 0.1, 0.2])
