"""What a reviewer looks at beside the metrics: ROC curve, score histograms, heat maps, a model card."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on workers and CI

import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.metrics import roc_curve

from model.dpa import center_crop
from tasks.training.baseline_evaluation import baseline_section
from tasks.training.metrics import FIXED_SPECIFICITY, Evaluation, OperatingPoint, binary_labels

HEATMAP_SAMPLES_PER_CLASS = 4


def evaluation_artifacts(
    evaluation: Evaluation,
    labels: Sequence | np.ndarray,
    scores: Sequence | np.ndarray,
    images_uint8: torch.Tensor,
    maps_of: Callable[[list[int]], torch.Tensor],
    out_dir: str | Path,
    anomaly_types: Sequence[str] | None = None,
) -> list[Path]:
    """Write the ROC curve, score histograms and a heat-map grid as PNGs into `out_dir`.

    `maps_of(indices)` computes the anomaly maps of just the images the grid shows."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    y, s = binary_labels(labels), np.asarray(scores, dtype=np.float64)
    groups = {"normal": s[y == 0], "abnormal": s[y == 1]}
    paths = [
        _save(_roc_figure(y, s, evaluation), out_dir / "roc_curve.png"),
        _save(_histogram_figure(groups, "Anomaly scores by class"), out_dir / "score_histogram.png"),
    ]
    if anomaly_types is not None:
        types = np.asarray(anomaly_types, dtype=str)
        by_type = {"normal": s[y == 0]} | {t: s[(y == 1) & (types == t)] for t in sorted(set(types[y == 1]))}
        figure = _histogram_figure(by_type, "Anomaly scores by anomaly type")
        paths.append(_save(figure, out_dir / "score_histogram_by_type.png"))
    paths.append(_save(_heatmap_figure(y, s, images_uint8, maps_of), out_dir / "heatmaps.png"))
    return paths


def _save(figure: plt.Figure, path: Path) -> Path:
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path


def _roc_figure(y: np.ndarray, s: np.ndarray, evaluation: Evaluation) -> plt.Figure:
    fpr, tpr, _ = roc_curve(y, s)
    figure, ax = plt.subplots(figsize=(4.5, 4.5))
    label = f"AUROC {evaluation.auroc:.3f} [{evaluation.auroc_ci_low:.3f}, {evaluation.auroc_ci_high:.3f}]"
    ax.plot(fpr, tpr, label=label)
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax.axvline(1 - FIXED_SPECIFICITY, linestyle="--", color="grey", linewidth=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (test)", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    return figure


def _histogram_figure(groups: dict[str, np.ndarray], title: str) -> plt.Figure:
    figure, ax = plt.subplots(figsize=(6, 4))
    bins = np.histogram_bin_edges(np.concatenate(list(groups.values())), bins=30)
    for name, values in groups.items():
        ax.hist(values, bins=bins, alpha=0.5, density=True, label=f"{name} (n={len(values)})")
    ax.set(xlabel="anomaly score", ylabel="density", title=title)
    ax.legend()
    return figure


def _heatmap_figure(
    y: np.ndarray, s: np.ndarray, images: torch.Tensor, maps_of: Callable[[list[int]], torch.Tensor]
) -> plt.Figure:
    """Top-scoring abnormal images (hits) and top-scoring normals (likely false alarms), one shared scale."""
    picks = [(i, label) for label in (1, 0) for i in _top(s, y == label)]
    shown = maps_of([i for i, _ in picks]).float().numpy()
    vmax = float(np.percentile(shown, 99)) if shown.size else 1.0
    figure, axes = plt.subplots(2, max(len(picks), 1), figsize=(2 * max(len(picks), 1), 4.4), squeeze=False)
    for column, (i, label) in enumerate(picks):
        image = center_crop(images[i], shown.shape[-1]).permute(1, 2, 0).numpy()
        image = image.squeeze(-1) if image.shape[-1] == 1 else image
        for row in (0, 1):
            axes[row, column].imshow(image, cmap="gray", vmin=0, vmax=255)
        axes[1, column].imshow(shown[column], cmap="jet", alpha=0.45, vmin=0, vmax=vmax)
        axes[0, column].set_title(f"{'abnormal' if label else 'normal'}\nscore {s[i]:.3g}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    figure.suptitle("Highest-scoring test images and their anomaly maps", fontsize=9)
    return figure


def _top(scores: np.ndarray, mask: np.ndarray) -> list[int]:
    indices = np.flatnonzero(mask)
    return indices[np.argsort(-scores[indices], kind="stable")][:HEATMAP_SAMPLES_PER_CLASS].tolist()


PER_IMAGE_INTERVAL = "stratified bootstrap over images"


def interval_name(e: Evaluation) -> str:
    """How the AUROC interval was resampled: patients where the test set names them."""
    if e.n_groups and e.n_groups < e.n_normal + e.n_abnormal:
        return f"bootstrap over {e.n_groups} patients (their images are not independent), stratified"
    return PER_IMAGE_INTERVAL


def operating_point_line(point: OperatingPoint | None) -> str:
    if point is None:
        return ""
    return (f"At this threshold, on the test split: sensitivity {point.sensitivity:.4f}, specificity "
            f"{point.specificity:.4f}: what serving does by default (the threshold never saw the test split).")


def model_card(
    evaluation: Evaluation,
    *,
    model_name: str,
    data_version: str,
    dataset: str,
    threshold: float,
    threshold_rule: str,
    vgg_source: str,
    image_size: int,
    image_channels: int,
    feature_stats: str | None = None,
    dead_channels: str | None = None,
    baselines: dict[str, Evaluation] | None = None,
    operating_point: OperatingPoint | None = None,
) -> str:
    """The Markdown model card logged next to the model: what it is for and what it is not."""
    e = evaluation
    weights_warning = (
        "\n- The perceptual loss uses **random, not ImageNet, VGG19 weights**: scores are not "
        "comparable with the paper's and detection is usually weaker."
        if "random" in vgg_source.lower()
        else ""
    )
    return f"""# Model card: {model_name}

## Intended use
Unsupervised anomaly detection in medical images with a Deep Perceptual Autoencoder (DPA): the
model learned what *normal* images look like and scores how far a new image departs from them
(higher = more anomalous), with a per-pixel anomaly map. For research and for triage experiments
only. **Not a medical device; not for diagnosis or any clinical decision.**

## Data
- dataset: {dataset}
- data version (DVC hash of `data/`): `{data_version}`
- input: {image_channels}-channel images resized to {image_size}×{image_size} by the project's preprocessing
- test set: {e.n_normal} normal, {e.n_abnormal} abnormal images

## Metrics (test split)
| metric | value |
|---|---|
| AUROC | {e.auroc:.4f} (95% CI {e.auroc_ci_low:.4f}–{e.auroc_ci_high:.4f}, {interval_name(e)}) |
| AUPRC | {e.auprc:.4f} |
| sensitivity at 95% specificity, threshold fitted on these test scores (optimistic: for comparing models) | {e.sensitivity_at_95_specificity:.4f} |{baseline_section(e.auroc, baselines or {})}

## Operating threshold
`{threshold:.6g}`: {threshold_rule}. `is_anomaly` in the served output is `anomaly_score > threshold`.
{operating_point_line(operating_point)}

## Method details
- perceptual network: VGG19 features, weights source: {vgg_source}; feature statistics: {feature_stats or "not recorded"}
- feature channels given no weight (they never fire on the statistics' images; dead of all, per layer): {dead_channels or "not recorded"}
- anomaly score: relative perceptual L1 reconstruction loss at the final resolution

## Limitations
- Research use only; not validated clinically, not a medical device.
- Trained on normal images of one dataset: scanners, protocols, populations or image types it has
  not seen can raise scores without any pathology (domain shift), and subtle or large diffuse
  anomalies can score low.
- The threshold was set on normal validation images only; its sensitivity is the test figure
  above, not a guarantee.{weights_warning}
"""
