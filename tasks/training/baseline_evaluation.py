"""The pixel-space baselines scored beside the DPA on every evaluation, and the warning when they win.

A DPA that cannot beat PCA reconstruction error or the distance to the mean normal image has not
earned its place; the figures go into the metrics, the model card and the CLI summary.
"""

from __future__ import annotations

import numpy as np
import torch

from data_layer.manifest import GROUP
from data_layer.preprocessing import PreprocessedDataset
from model.baselines import DESCRIPTIONS, fit_baselines
from model.dpa import center_crop
from tasks.training.metrics import Evaluation, evaluate_scores


def baseline_test_scores(data: PreprocessedDataset, crop: int) -> dict[str, np.ndarray]:
    """Each pixel-space baseline fitted on the training normals only, its scores of the test split.

    Images are centre-cropped to `crop` (the DPA's max_res) as the DPA scores them."""
    def view(images: torch.Tensor) -> torch.Tensor:
        return center_crop(images, crop) if images.shape[-1] > crop else images

    fitted = fit_baselines(view(data.subset(split="train", label="normal").images))
    return fitted.score(view(data.subset(split="test").images))


def baseline_evaluations(
    data: PreprocessedDataset, crop: int, seed: int = 0, scores: dict[str, np.ndarray] | None = None
) -> dict[str, Evaluation]:
    """Each baseline's test metrics, with the DPA's interval (patients resampled where the manifest
    names them); `scores` from `baseline_test_scores` when already computed."""
    test = data.subset(split="test")
    scores = baseline_test_scores(data, crop) if scores is None else scores
    groups = test.manifest[GROUP].astype(str).to_numpy()
    return {name: evaluate_scores(test.labels.numpy(), s, seed=seed, groups=groups) for name, s in scores.items()}


def baseline_warning(dpa_auroc: float, baselines: dict[str, Evaluation]) -> str | None:
    """A plain sentence when the DPA's test AUROC does not beat the best baseline's."""
    if not baselines:
        return None
    name, best = max(baselines.items(), key=lambda item: item[1].auroc)
    if dpa_auroc > best.auroc:
        return None
    return (
        f"WARNING: the DPA (test AUROC {dpa_auroc:.3f}) does not beat the {name} baseline "
        f"({best.auroc:.3f}; {DESCRIPTIONS[name]}). Check the VGG weights (random weights are not the "
        "paper's perceptual space), the feature statistics and the schedule before trusting this model."
    )


def baseline_metrics(baselines: dict[str, Evaluation]) -> dict[str, float]:
    """MLflow metric names `test_baseline_<name>_auroc`, `..._auroc_ci_low`, `..._auroc_ci_high`."""
    return {
        f"test_baseline_{name}_{key}": float(getattr(e, key))
        for name, e in baselines.items()
        for key in ("auroc", "auroc_ci_low", "auroc_ci_high")
    }


def baseline_section(dpa_auroc: float, baselines: dict[str, Evaluation]) -> str:
    if not baselines:
        return ""
    rows = "\n".join(
        f"| {name}: {DESCRIPTIONS[name]} | {e.auroc:.4f} ({e.auroc_ci_low:.4f}–{e.auroc_ci_high:.4f}) |"
        for name, e in baselines.items()
    )
    warning = baseline_warning(dpa_auroc, baselines)
    return (
        "\n\n## Baselines (same training normals, same test split)\n| detector | test AUROC (95% CI) |\n|---|---|\n"
        f"| DPA (this model) | {dpa_auroc:.4f} |\n{rows}" + (f"\n\n**{warning}**" if warning else "")
    )
