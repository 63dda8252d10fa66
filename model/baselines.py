"""Reference detectors a DPA has to beat, fitted on the same training normals.

Both work in pixel space on the images the DPA sees: PCA reconstruction error (components by a
rule fixed in advance, 95% explained variance of the training normals, never by a test figure) and
the distance to the mean normal image. A DPA that cannot beat them has not earned its cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.decomposition import PCA

EXPLAINED_VARIANCE = 0.95
BASELINE_NAMES = ("pca", "mean_image")
DESCRIPTIONS = {
    "pca": f"PCA reconstruction error in pixel space ({EXPLAINED_VARIANCE:.0%} explained variance of the training normals)",
    "mean_image": "Euclidean distance to the mean normal training image",
}


def flatten_images(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """N×C×H×W uint8 (0–255) or float images → N×(C·H·W) float64 in [0, 1] for uint8 input."""
    array = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    flat = array.reshape(len(array), -1).astype(np.float64)
    return flat / 255.0 if array.dtype == np.uint8 else flat


@dataclass(frozen=True)
class FittedBaselines:
    """The baselines' parameters, all from the training normals."""

    mean_image: np.ndarray
    pca: PCA

    @property
    def n_components(self) -> int:
        return int(self.pca.n_components_)

    def score(self, images: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
        """Anomaly scores (higher = more anomalous) of each baseline, per image."""
        x = flatten_images(images)
        reconstruction = self.pca.inverse_transform(self.pca.transform(x))
        return {
            "pca": ((x - reconstruction) ** 2).mean(axis=1),
            "mean_image": np.linalg.norm(x - self.mean_image, axis=1),
        }


def fit_baselines(train_normals: torch.Tensor | np.ndarray, explained_variance: float = EXPLAINED_VARIANCE) -> FittedBaselines:
    """Fit every baseline on the training normals only."""
    x = flatten_images(train_normals)
    if len(x) < 2:
        raise ValueError(f"the baselines need at least 2 normal training images, got {len(x)}")
    pca = PCA(n_components=explained_variance, svd_solver="full").fit(x)
    return FittedBaselines(mean_image=x.mean(axis=0), pca=pca)
