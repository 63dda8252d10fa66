"""The pixel-space baselines on synthetic cases whose scores and AUROCs are known exactly."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from model.baselines import fit_baselines


def _plane_normals(n: int = 50, seed: int = 0) -> np.ndarray:
    """Normals spanning the first two of four pixels, equal variance in both: PCA keeps exactly 2."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 1, 2, 2))
    x[:, 0, 0, :] = rng.normal(0.0, 1.0, (n, 2))
    return x - x.mean(axis=0)


def test_pca_keeps_the_components_for_95_percent_and_scores_off_plane_distance() -> None:
    fitted = fit_baselines(_plane_normals())
    assert fitted.n_components == 2
    # in-plane content is reconstructed; an off-plane offset d scores d²/4 (mean over 4 pixels)
    offsets = np.array([1.0, 3.0, 2.0, 4.0])
    test = np.zeros((4, 1, 2, 2))
    test[:, 0, 0, :] = [[0.5, -0.3]] * 4
    test[:, 0, 1, 0] = offsets
    scores = fitted.score(test)
    assert scores["pca"] == pytest.approx(offsets**2 / 4)
    labels = [0, 0, 1, 1]  # normals at 1, 3; abnormals at 2, 4 → 3 of 4 pairs ordered: AUROC 0.75
    assert roc_auc_score(labels, scores["pca"]) == pytest.approx(0.75)


def test_mean_image_distance() -> None:
    fitted = fit_baselines(np.array([[[[0.0, 0.0]]], [[[2.0, 0.0]]]]))  # mean (1, 0)
    test = np.array([[[[1.0, 1.0]]], [[[1.0, 3.0]]], [[[3.0, 0.0]]], [[[1.0, -4.0]]]])
    scores = fitted.score(test)["mean_image"]
    assert scores == pytest.approx([1.0, 3.0, 2.0, 4.0])
    assert roc_auc_score([0, 0, 1, 1], scores) == pytest.approx(0.75)


def test_uint8_images_are_scaled_to_unit_range() -> None:
    images = np.array([[[[0, 255], [51, 0]]], [[[255, 255], [0, 0]]]], dtype=np.uint8)
    assert fit_baselines(images).mean_image == pytest.approx([0.5, 1.0, 0.1, 0.0])


def test_one_image_is_not_enough() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        fit_baselines(np.zeros((1, 1, 2, 2)))
