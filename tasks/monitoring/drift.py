"""Score drift: does a scored batch still look like the normal images its model version was set on?

Two tests against the version's reference normal scores (`reference_scores.json`, see
`tasks.registry.pyfunc_model.ReferenceScores`):
- two-sample Kolmogorov–Smirnov (`scipy.stats.ks_2samp`): any change of the score distribution's
  location or shape, e.g. a new scanner that makes every image look a bit less normal;
- one-sided exceedance test: more of the batch above the operating threshold than the share of
  reference normals above it (1 − specificity), i.e. more alarms than the threshold was set for.
  The threshold is itself a quantile of the finite reference, so the share of in-distribution
  scores above it is only estimated: with m of n_ref reference scores above it, that share is
  Beta(m + 1, n_ref − m + 1) (uniform prior) and the batch count above it beta-binomial under no
  drift (`scipy.stats.betabinom`). A plain binomial test against 1 − specificity ignores that
  and raises false alarms several times too often, the more so the larger the batch
  (tests/pipeline/test_drift.py measures both).

Several images of one patient are not independent draws: where the scored inputs carry a patient
group, the tests take one image per group (`one_per_group`), which keeps their false-alarm rate;
tests/pipeline/test_drift.py shows the per-image tests firing far too often on clustered batches.

Each test runs at `alpha / 2` (Bonferroni), so an in-distribution batch is called drifted with
probability at most `alpha`. Below `min_batch` scored images no verdict is given: the tests would
have too little power to clear a batch. The reference holds normal images only, so a batch with
many true anomalies departs from it too: the verdict says "not like the reference", not why.

Pure statistics, no Prefect or MLflow: `tasks.monitoring.monitor` logs and acts on the report.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field
from scipy.stats import betabinom, ks_2samp

DRIFTED, IN_DISTRIBUTION, TOO_FEW = "drifted", "in distribution", "too few scores"
Verdict = Literal["drifted", "in distribution", "too few scores"]


class DriftLevels(BaseModel):
    """When a batch counts as drifted."""

    alpha: float = Field(0.01, gt=0.0, lt=1.0, description="false-alarm rate on in-distribution batches")
    min_batch: int = Field(30, ge=1, description="fewer scored images than this: no verdict")


class DriftReport(BaseModel):
    """The comparison of one batch with the reference, and the levels it was judged by."""

    n: int
    n_reference: int
    threshold: float
    expected_above: float
    observed_above: float | None
    ks_statistic: float | None
    ks_pvalue: float | None
    exceedance_pvalue: float | None
    alpha: float
    min_batch: int
    verdict: Verdict
    drifted: bool

    def summary(self) -> str:
        """One line for a person."""
        if self.verdict == TOO_FEW:
            return f"score drift: no verdict, {self.n} scored images (fewer than {self.min_batch})"
        return (
            f"score drift: {self.verdict} (KS D={self.ks_statistic:.3f} p={self.ks_pvalue:.3g}; "
            f"{self.observed_above:.1%} above threshold {self.threshold:.4g}, expected {self.expected_above:.1%}, "
            f"p={self.exceedance_pvalue:.3g}; each test at alpha/2 = {self.alpha / 2:g}; "
            f"{self.n} images vs {self.n_reference} reference normals)"
        )


def one_per_group(scores: Sequence[float], groups: Sequence[str]) -> np.ndarray:
    """The first score of each group, in input order: independent draws from the per-image score
    distribution, which the reference normals share (a per-patient mean would be narrower than the
    reference and would hide drift in spread). Where every group has one image, `scores` as they are."""
    _, first = np.unique(np.asarray(groups, dtype=str), return_index=True)
    return np.asarray(scores, dtype=np.float64)[np.sort(first)]


def drift_report(
    scores: Sequence[float], reference: Sequence[float], threshold: float, levels: DriftLevels | None = None,
) -> DriftReport:
    """Compare a batch's `scores` with the `reference` normal scores at the operating `threshold`."""
    levels = levels or DriftLevels()
    batch, ref = np.asarray(scores, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if ref.size == 0 or not np.isfinite(ref).all() or not np.isfinite(batch).all() or not np.isfinite(threshold):
        raise ValueError("drift needs finite scores, a finite threshold and a non-empty reference")
    ref_above = int((ref > threshold).sum())
    common = {"n": int(batch.size), "n_reference": int(ref.size), "threshold": float(threshold),
              "expected_above": ref_above / ref.size, "alpha": levels.alpha, "min_batch": levels.min_batch}
    if batch.size < levels.min_batch:
        return DriftReport(**common, observed_above=None, ks_statistic=None, ks_pvalue=None, exceedance_pvalue=None,
                           verdict=TOO_FEW, drifted=False)
    ks = ks_2samp(batch, ref)
    above = int((batch > threshold).sum())
    exceedance = float(betabinom(batch.size, ref_above + 1, ref.size - ref_above + 1).sf(above - 1))
    drifted = min(ks.pvalue, exceedance) < levels.alpha / 2
    return DriftReport(
        **common, observed_above=above / batch.size, ks_statistic=float(ks.statistic), ks_pvalue=float(ks.pvalue),
        exceedance_pvalue=exceedance, verdict=DRIFTED if drifted else IN_DISTRIBUTION, drifted=bool(drifted),
    )
